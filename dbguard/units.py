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
