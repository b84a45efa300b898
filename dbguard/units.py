"""Numbers as people read them."""

from __future__ import annotations


def human_size(count: int) -> str:
    """Bytes as a person reads them: 512 B, 1.5 KiB, 10.0 MiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


_SPANS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float) -> float:
    """A point in time as a person writes it, in wall-clock seconds: a span back from ``now``
    ("90s", "30m", "2h", "3d", "1w"), a local date or date and time ("2026-12-02",
    "2026-12-02T18:30", "2026-12-02 18:30:05"), or seconds since the epoch. ValueError saying
    what is accepted otherwise."""
    import datetime

    value = text.strip()
    if len(value) > 1 and value[-1] in _SPANS and value[:-1].replace(".", "", 1).isdigit():
        return now - float(value[:-1]) * _SPANS[value[-1]]
    if value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give a span back from now (90s, 30m, 2h, 3d, 1w), "
            "a date or date and time (2026-12-02, 2026-12-02T18:30) or seconds since the epoch"
        ) from None
