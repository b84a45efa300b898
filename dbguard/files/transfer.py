"""Import the field's image files into an image database, and export one back out.

`import_files` appends the images of MRC (``.mrc``, ``.mrcs``, ``.st``, ``.map``), TIFF
(``.tif``, ``.tiff``), HDF5 (``.h5``, ``.hdf5``, ``.hdf``) and numpy (``.npy``, ``.npz``) files to
a database opened ``"a"``, so the importing host must hold the writer lease. `export_database`
writes a database to one file, the format chosen by the target's suffix; it opens the database
``"r"``, so any host can export what the project store holds (and the writer's own host also
its unflushed records).

Records. A file's first axis counts its images when it has three axes or more (a stack of 2D
images, or of volumes); a 2D array is one image. MRC follows its header: an image stack (or a
``.mrcs``/``.st`` file) gives one record per section, a volume one record, a volume stack one
record per volume, and a volume of depth 1 is the single 2D image it stands for. A TIFF gives
one record per page. In HDF5, ``dataset=`` names the dataset; without it, EMAN2's layout
(``MDF/images/<i>/image``, one record per image, its group's ``EMAN.*`` attributes becoming the
record's attrs) is recognised, and otherwise the file's only dataset is taken. Export needs a
stack: every record of one shape and dtype (2D records for MRC stacks and TIFF; one 3D record
makes an MRC volume).

Voxel size lives in each record's attrs as ``voxel_size``: ``[x, y, z]`` in ångström (MRC's
unit), because a database has no header of its own and records imported from different files
may differ. It maps to MRC's ``voxel_size``; to TIFF's XResolution/YResolution in pixels per
centimetre (read back also from ImageJ's ``unit``/``spacing``; a TIFF that gives no depth is taken
as isotropic); to an HDF5 dataset attribute ``voxel_size`` (also read: ``element_size_um``, z y x
in micrometres, the convention of ilastik and Fiji); to EMAN2's ``apix_x/y/z``. A file holds one
voxel size, so export refuses records whose voxel sizes differ. Per-image attrs survive the
round trip through TIFF (the first page's ImageDescription holds ``{"dbguard": {"attrs": [...],
"voxel_size": ...}}``, exact where resolution tags are rationals) and HDF5 (a string dataset
``<dataset>_attrs`` of one JSON object per image, named by the dataset's ``dbguard_attrs``
attribute). MRC and numpy files have no place for them: export reports which keys it dropped.

Streaming. Readers yield one image at a time from a memory map (mrcfile, numpy) or a page or
slice read (tifffile, h5py, ``.npz`` members read sequentially), and the database takes one
record per append; writers are created with the full shape and filled record by record (mrcfile
``new_mmap``, ``numpy.lib.format.open_memmap``, an h5py dataset chunked by image, tifffile
writing pages from an iterator), with MRC's header statistics accumulated as they go. So memory
stays bounded by one image and the attrs of the database (TIFF's description is written first),
whatever the stack's size. An export is written beside its target and renamed into place, so a
failed export leaves no partial file; an import checks every file before appending anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import h5py  # type: ignore[import-untyped, unused-ignore]  # h5py ships no type hints
import mrcfile  # type: ignore[import-untyped, unused-ignore]  # neither does mrcfile
import numpy as np
import tifffile
from numpy.typing import NDArray

from dbguard.data.imagedb import ImageDB
from dbguard.data.imagedb import open as open_imagedb
from dbguard.errors import UsageError
from dbguard.settings import Settings

if TYPE_CHECKING:
    from dbguard.data.remote import RemoteDB

VOXEL_SIZE = "voxel_size"  # the attr: [x, y, z] in ångström

FORMATS = {
    ".mrc": "mrc",
    ".mrcs": "mrc",
    ".st": "mrc",
    ".map": "mrc",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".hdf": "hdf5",
    ".npy": "npy",
    ".npz": "npz",
}
_MRC_STACKS = (".mrcs", ".st")  # by convention stacks of 2D images whatever the header says
DEFAULT_DATASET = "images"  # the HDF5 dataset an export writes
_EMAN2_IMAGES = "MDF/images"
# EMAN2 attributes that describe its own storage, not the image: dropped on import.
_EMAN2_STORAGE = {"HostEndian", "ImageEndian", "apix_x", "apix_y", "apix_z"}
# Ångström per unit of a TIFF resolution (tag 296: 2 inch, 3 centimetre) or of ImageJ's "unit".
_TIFF_UNITS = {2: 2.54e8, 3: 1e8}
_IMAGEJ_UNITS = {"micron": 1e4, "µm": 1e4, "um": 1e4, "nm": 10.0, "nanometer": 10.0, "a": 1.0, "å": 1.0}
_BIGTIFF_ABOVE = 2**32 - 2**25  # classic TIFF offsets are 32 bits; leave room for the tags

Record = tuple[NDArray[Any], dict[str, Any]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Source:
    """One input file: how many records it gives, and a way to read them one at a time."""

    path: Path
    format: str
    count: int
    records: Callable[[], Iterator[Record]]


# ------------------------------------------------------------------ public


def import_files(
    project: str | Path | None,
    name: str,
    files: list[str | Path] | tuple[str | Path, ...],
    *,
    dataset: str | None = None,
    settings: Settings | None = None,
    progress: Progress | None = None,
    remote: bool | None = None,
) -> dict[str, Any]:
    """Append every image of ``files`` to database ``name``; ``progress(done, total)`` counts
    images. Needs this host's writer lease (the database is opened ``"a"``), or ``remote``: then
    the images go through the host that serves the project."""
    if not files:
        raise UsageError("name at least one file to import")
    with open_imagedb(project, name, "a", settings=settings, remote=remote) as db:
        sources = [_source(Path(path), dataset) for path in files]  # all checked before any append
        total = sum(source.count for source in sources)
        done = 0
        size = 0
        report = []
        for source in sources:
            first: int | None = None
            for array, attrs in source.records():
                index = db.append(array, attrs or None)
                first = index if first is None else first
                done += 1
                size += array.nbytes
                if progress is not None:
                    progress(done, total)
            report.append(
                {"path": str(source.path), "format": source.format, "records": source.count, "first": first}
            )
        return {
            "project": db.project.id,
            "database": name,
            "files": report,
            "records": done,
            "bytes": size,
            "count": len(db),
        }


def export_database(
    project: str | Path | None,
    name: str,
    target: str | Path,
    *,
    dataset: str | None = None,
    settings: Settings | None = None,
    progress: Progress | None = None,
    remote: bool | None = None,
) -> dict[str, Any]:
    """Write database ``name`` to ``target`` in the format its suffix names (``dataset=``: the
    HDF5 dataset, default ``images``). Browses only: no lease needed. ``remote`` reads through
    the host that serves the project (its unflushed records too)."""
    target = Path(target)
    kind = _format_of(target)
    with open_imagedb(project, name, "r", settings=settings, remote=remote) as db:
        count = len(db)
        if count == 0:
            raise UsageError(f"database {name!r} of {db.project.path} has no records to export")
        attrs = [db.attrs(i) for i in range(count)]
        first = db[0]
        stack = _Stack(db, count, first.shape, first.dtype, attrs, _common_voxel(attrs, name))
        partial = target.with_name(f".{target.name}.dbguard-partial")
        writer = _WRITERS[kind]
        try:
            dropped = writer(partial, target, stack, dataset, progress)
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise
        return {
            "project": db.project.id,
            "database": name,
            "generation": getattr(db, "generation", None),  # a served database has none
            "target": str(target),
            "format": kind,
            "records": count,
            "shape": list(first.shape),
            "dtype": first.dtype.name,
            "bytes": count * first.nbytes,
            "voxel_size": stack.voxel,
            "dropped_attrs": sorted(dropped),
        }


# ------------------------------------------------------------------ reading files


def _format_of(path: Path) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UsageError(
            f"{path}: the suffix {path.suffix or '(none)'!r} names no format dbguard reads or writes; "
            f"use one of {', '.join(FORMATS)}"
        )
    return kind


def _source(path: Path, dataset: str | None) -> _Source:
    kind = _format_of(path)
    if not path.is_file():
        raise UsageError(f"{path} is not a file; name the image files to import")
    try:
        return _SOURCES[kind](path, dataset)
    except (
        OSError,
        ValueError,
        KeyError,
        zipfile.BadZipFile,
    ) as exc:  # what the libraries raise for a bad file
        raise UsageError(f"{path} cannot be read as {kind.upper()}: {exc}") from exc


def _along_first_axis(
    data: Any, voxel: list[float] | None, attrs: list[dict[str, Any]] | None
) -> Iterator[Record]:
    """Records of an array-like (memmap, h5py dataset): along axis 0 from three axes up."""
    count = _count_of(data.shape)
    for i in range(count):
        array = _native(data[i] if len(data.shape) >= 3 else data[()])
        yield array, _with_voxel(attrs[i] if attrs else {}, voxel)


def _count_of(shape: tuple[int, ...]) -> int:
    return int(shape[0]) if len(shape) >= 3 else 1


def _native(array: Any) -> NDArray[Any]:
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)


def _with_voxel(attrs: dict[str, Any], voxel: list[float] | None) -> dict[str, Any]:
    return {**attrs, VOXEL_SIZE: voxel} if voxel is not None and VOXEL_SIZE not in attrs else attrs


def _mrc_source(path: Path, dataset: str | None) -> _Source:
    with mrcfile.mmap(path, mode="r") as mrc:
        shape = mrc.data.shape
        split = (
            mrc.is_image_stack()
            or mrc.is_volume_stack()
            or (path.suffix.lower() in _MRC_STACKS and len(shape) == 3)
        )
        count = int(shape[0]) if split else 1

    def records() -> Iterator[Record]:
        with mrcfile.mmap(path, mode="r") as mrc:
            size = mrc.voxel_size
            voxel = [float(size.x), float(size.y), float(size.z)]
            voxel_or_none = voxel if any(voxel) else None
            data = mrc.data
            if not split:
                # A volume one section deep is how MRC stores a single 2D image.
                data = data[np.newaxis] if data.ndim < 3 or data.shape[0] > 1 else data
            for i in range(count):
                yield _native(data[i]), _with_voxel({}, voxel_or_none)

    return _Source(path, "mrc", count, records)


def _tiff_source(path: Path, dataset: str | None) -> _Source:
    with tifffile.TiffFile(path) as tif:
        count = len(tif.pages)

    def records() -> Iterator[Record]:
        with tifffile.TiffFile(path) as tif:
            tif.pages.cache = False  # one page object at a time, however many pages
            first = tif.pages.first
            ours = _our_description(first.description)
            voxel = ours.get(VOXEL_SIZE) if ours else _tiff_voxel(tif, first)
            attrs = ours.get("attrs") if ours else None
            for i, page in enumerate(tif.pages):
                yield _native(page.asarray()), _with_voxel(attrs[i] if attrs else {}, voxel)

    return _Source(path, "tiff", count, records)


def _our_description(text: str) -> dict[str, Any] | None:
    try:
        found = json.loads(text)
    except ValueError:
        return None
    ours = found.get("dbguard") if isinstance(found, dict) else None
    return ours if isinstance(ours, dict) else None


def _tiff_voxel(tif: tifffile.TiffFile, page: Any) -> list[float] | None:
    x, y = page.tags.get("XResolution"), page.tags.get("YResolution")
    if x is None or y is None:
        return None
    meta = tif.imagej_metadata or {}
    per_unit = _IMAGEJ_UNITS.get(str(meta.get("unit", "")).lower()) if meta else None
    if per_unit is None:
        per_unit = _TIFF_UNITS.get(
            int(page.tags.get("ResolutionUnit").value) if page.tags.get("ResolutionUnit") else 0
        )
    if per_unit is None:
        return None
    sizes = [per_unit * value[1] / value[0] if value[0] else 0.0 for value in (x.value, y.value)]
    depth = float(meta["spacing"]) * per_unit if "spacing" in meta else sizes[0]
    return [sizes[0], sizes[1], depth]


def _hdf5_source(path: Path, dataset: str | None) -> _Source:
    with h5py.File(path, "r") as f:
        if dataset is None and _EMAN2_IMAGES in f:
            count = len([key for key in f[_EMAN2_IMAGES] if key.isdigit()])
            return _Source(path, "hdf5-eman2", count, lambda: _eman2_records(path))
        name = dataset if dataset is not None else _only_dataset(f, path)
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise UsageError(
                f"{path} has no dataset {name!r}; its datasets: {', '.join(_datasets(f)) or 'none'}"
            )
        count = _count_of(f[name].shape)

    def records() -> Iterator[Record]:
        with h5py.File(path, "r") as f:
            data = f[name]
            voxel = _hdf5_voxel(data.attrs)
            attrs: list[dict[str, Any]] | None = None
            pointer = data.attrs.get("dbguard_attrs")
            if pointer is not None and str(_plain(pointer)) in f:
                attrs = [json.loads(_plain(text)) for text in f[str(_plain(pointer))][()]]
            yield from _along_first_axis(data, voxel, attrs)

    return _Source(path, "hdf5", count, records)


def _datasets(f: Any) -> list[str]:
    found: list[str] = []
    f.visititems(lambda key, item: found.append(key) if isinstance(item, h5py.Dataset) else None)
    return found


def _only_dataset(f: Any, path: Path) -> str:
    found = [key for key in _datasets(f) if not key.endswith("_attrs")]
    if len(found) != 1:
        raise UsageError(
            f"{path} holds {len(found)} datasets ({', '.join(found) or 'none'}) and is not in EMAN2's "
            "layout; name the one to import with --dataset (dataset= in Python)"
        )
    return found[0]


def _hdf5_voxel(attrs: Any) -> list[float] | None:
    if VOXEL_SIZE in attrs:
        return [float(v) for v in np.ravel(attrs[VOXEL_SIZE])][:3]
    if "element_size_um" in attrs:
        z, y, x = (float(v) * 1e4 for v in np.ravel(attrs["element_size_um"])[-3:])
        return [x, y, z]
    return None


def _eman2_records(path: Path) -> Iterator[Record]:
    with h5py.File(path, "r") as f:
        group = f[_EMAN2_IMAGES]
        for key in sorted((key for key in group if key.isdigit()), key=int):
            image = group[key]
            eman = {
                k.removeprefix("EMAN."): _plain(v) for k, v in image.attrs.items() if k.startswith("EMAN.")
            }
            voxel = None
            if "apix_x" in eman:
                voxel = [float(eman.get(f"apix_{axis}", eman["apix_x"])) for axis in "xyz"]
            attrs = {k: v for k, v in eman.items() if k not in _EMAN2_STORAGE and _jsonable(v)}
            yield _native(image["image"][()]), _with_voxel(attrs, voxel)


def _plain(value: Any) -> Any:
    """An HDF5 attribute value as JSON's kinds: numbers, strings, lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def _npy_source(path: Path, dataset: str | None) -> _Source:
    count = _count_of(np.load(path, mmap_mode="r").shape)

    def records() -> Iterator[Record]:
        yield from _along_first_axis(np.load(path, mmap_mode="r"), None, None)

    return _Source(path, "npy", count, records)


def _npz_source(path: Path, dataset: str | None) -> _Source:
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if m.endswith(".npy")]
        if dataset is not None:
            members = [m for m in members if m.removesuffix(".npy") == dataset]
        count = 0
        for member in members:
            with archive.open(member) as stream:
                count += _count_of(_npy_header(stream)[0])

    def records() -> Iterator[Record]:
        with zipfile.ZipFile(path) as archive:
            for member in members:
                with archive.open(member) as stream:
                    yield from _npy_stream(stream, member)

    return _Source(path, "npz", count, records)


def _npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return tuple(shape), bool(fortran), dtype


def _npy_stream(stream: IO[bytes], member: str) -> Iterator[Record]:
    """An .npz member's records read in order from the (possibly deflated) member: no seeking."""
    shape, fortran, dtype = _npy_header(stream)
    if fortran or dtype.hasobject:
        raise UsageError(
            f"member {member} is stored in Fortran order or holds objects; it cannot be streamed"
        )
    record = shape[1:] if len(shape) >= 3 else shape
    nbytes = math.prod(record) * dtype.itemsize
    for _ in range(_count_of(shape)):
        data = stream.read(nbytes)
        if len(data) != nbytes:
            raise UsageError(f"member {member} ends early: the file is truncated")
        yield _native(np.frombuffer(data, dtype=dtype).reshape(record)), {}


_SOURCES: dict[str, Callable[[Path, str | None], _Source]] = {
    "mrc": _mrc_source,
    "tiff": _tiff_source,
    "hdf5": _hdf5_source,
    "npy": _npy_source,
    "npz": _npz_source,
}


# ------------------------------------------------------------------ writing files


@dataclass(frozen=True)
class _Stack:
    """The database being exported: one shape and dtype for every record, checked as read."""

    db: ImageDB | RemoteDB
    count: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    attrs: list[dict[str, Any]]
    voxel: list[float] | None

    def records(self, progress: Progress | None) -> Iterator[NDArray[Any]]:
        for i in range(self.count):
            array = self.db[i]
            if array.shape != self.shape or array.dtype != self.dtype:
                raise UsageError(
                    f"record {i} of {self.db.name!r} is {array.dtype} {_dims(array.shape)} but record 0 is "
                    f"{self.dtype} {_dims(self.shape)}; a file holds one stack of one shape and type: "
                    "export the records in groups"
                )
            yield array
            if progress is not None:
                progress(i + 1, self.count)

    def other_keys(self) -> set[str]:
        return {key for attrs in self.attrs for key in attrs if key != VOXEL_SIZE}


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _common_voxel(attrs: list[dict[str, Any]], name: str) -> list[float] | None:
    found = {json.dumps(a.get(VOXEL_SIZE)): i for i, a in reversed(list(enumerate(attrs)))}
    if len(found) > 1:
        first, other = sorted(found.values())[:2]
        raise UsageError(
            f"records {first} and {other} of {name!r} have different voxel sizes "
            f"({attrs[first].get(VOXEL_SIZE)} and {attrs[other].get(VOXEL_SIZE)}), and a file holds one; "
            "export them separately"
        )
    voxel = attrs[0].get(VOXEL_SIZE)
    return [float(v) for v in voxel] if voxel is not None else None


def _need_2d(stack: _Stack, kind: str) -> None:
    if len(stack.shape) != 2:
        raise UsageError(
            f"{kind} export writes a stack of 2D images, but the records are {_dims(stack.shape)}"
        )


def _write_mrc(
    partial: Path, target: Path, stack: _Stack, dataset: str | None, progress: Progress | None
) -> set[str]:
    try:
        mode = mrcfile.utils.mode_from_dtype(stack.dtype)
    except ValueError as exc:
        raise UsageError(
            f"MRC cannot hold {stack.dtype} records ({exc}); export to .h5, .tif or .npy"
        ) from exc
    volume = len(stack.shape) == 3 and stack.count == 1
    if not volume:
        _need_2d(stack, "MRC")
    shape = stack.shape if volume else (stack.count, *stack.shape)
    low, high, total, squares, n = math.inf, -math.inf, 0.0, 0.0, 0
    with mrcfile.new_mmap(partial, shape=shape, mrc_mode=mode, overwrite=True) as mrc:
        if volume:
            mrc.set_volume()
        else:
            mrc.set_image_stack()
        if stack.voxel is not None:
            mrc.voxel_size = tuple(stack.voxel)
        data = mrc.data
        for i, array in enumerate(stack.records(progress)):
            if volume:
                data[...] = array
            else:
                data[i] = array
            if np.issubdtype(array.dtype, np.complexfloating):
                continue
            # mrcfile's update_header_stats would compute over the whole map at once.
            values = array.astype(np.float64, copy=False)
            low, high = min(low, float(values.min())), max(high, float(values.max()))
            total += float(values.sum())
            squares += float(np.square(values).sum())
            n += values.size
        if n:
            mean = total / n
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = low, high, mean
            mrc.header.rms = math.sqrt(max(squares / n - mean * mean, 0.0))
    return stack.other_keys()


def _write_tiff(
    partial: Path, target: Path, stack: _Stack, dataset: str | None, progress: Progress | None
) -> set[str]:
    _need_2d(stack, "TIFF")
    description = json.dumps({"dbguard": {VOXEL_SIZE: stack.voxel, "attrs": stack.attrs}}, allow_nan=True)
    options: dict[str, Any] = {}
    if stack.voxel is not None and all(stack.voxel[:2]):
        options = {"resolution": (1e8 / stack.voxel[0], 1e8 / stack.voxel[1]), "resolutionunit": "CENTIMETER"}
    bigtiff = stack.count * math.prod(stack.shape) * stack.dtype.itemsize > _BIGTIFF_ABOVE
    with tifffile.TiffWriter(partial, bigtiff=bigtiff) as tif:
        tif.write(
            data=stack.records(progress),
            shape=(stack.count, *stack.shape),
            dtype=stack.dtype,
            photometric="minisblack",
            description=description,
            metadata=None,
            **options,
        )
    return set()


def _write_hdf5(
    partial: Path, target: Path, stack: _Stack, dataset: str | None, progress: Progress | None
) -> set[str]:
    name = dataset or DEFAULT_DATASET
    with h5py.File(partial, "w") as f:
        data = f.create_dataset(
            name,
            shape=(stack.count, *stack.shape),
            dtype=stack.dtype,
            chunks=(1, *stack.shape) if stack.shape else None,
        )
        if stack.voxel is not None:
            data.attrs[VOXEL_SIZE] = np.asarray(stack.voxel, dtype=np.float64)
        if stack.other_keys():
            attrs = f.create_dataset(f"{name}_attrs", shape=(stack.count,), dtype=h5py.string_dtype())
            data.attrs["dbguard_attrs"] = attrs.name
            for i, record in enumerate(stack.attrs):
                attrs[i] = json.dumps(record, allow_nan=True)
        for i, array in enumerate(stack.records(progress)):
            data[i] = array
    return set()


def _write_npy(
    partial: Path, target: Path, stack: _Stack, dataset: str | None, progress: Progress | None
) -> set[str]:
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=stack.dtype, shape=(stack.count, *stack.shape))
    try:
        for i, array in enumerate(stack.records(progress)):
            out[i] = array
        out.flush()
    finally:
        del out
    return stack.other_keys() | ({VOXEL_SIZE} if stack.voxel is not None else set())


def _write_npz(
    partial: Path, target: Path, stack: _Stack, dataset: str | None, progress: Progress | None
) -> set[str]:
    header = {
        "descr": np.lib.format.dtype_to_descr(stack.dtype),
        "fortran_order": False,
        "shape": (stack.count, *stack.shape),
    }
    member_name = f"{dataset or DEFAULT_DATASET}.npy"
    with (
        zipfile.ZipFile(partial, "w", allowZip64=True) as archive,
        archive.open(member_name, "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_2_0(member, header)
        for array in stack.records(progress):
            member.write(np.ascontiguousarray(array).tobytes())
    return stack.other_keys() | ({VOXEL_SIZE} if stack.voxel is not None else set())


_WRITERS: dict[str, Callable[[Path, Path, _Stack, str | None, Progress | None], set[str]]] = {
    "mrc": _write_mrc,
    "tiff": _write_tiff,
    "hdf5": _write_hdf5,
    "npy": _write_npy,
    "npz": _write_npz,
}
