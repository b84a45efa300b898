"""Import and export between the field's image files and image databases (`dbguard.files.transfer`).

The importer holds the lease on host A; after A flushes, host B, which only browses, exports.
What comes back must be the same arrays, dtypes and voxel sizes as the files that went in, and a
stack twice the size of a memory limit imports under that limit.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from dbguard.errors import UsageError
from dbguard.files.transfer import export_database
from tools.testbed import Host

WRITE_FILES = """
import h5py, mrcfile, numpy as np, tifffile
rng = np.random.default_rng(7)
stack = rng.random((5, 24, 32), dtype=np.float32)
folder = {folder!r}
np.save(folder + "/stack.npy", stack)
with mrcfile.new(folder + "/stack.mrcs") as mrc:
    mrc.set_data(stack)
    mrc.set_image_stack()
    mrc.voxel_size = (1.06, 1.06, 1.06)
tifffile.imwrite(
    folder + "/stack.tif", (stack * 1000).astype(np.uint16), photometric="minisblack",
    resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER",
)
with h5py.File(folder + "/stack.h5", "w") as f:
    f.create_dataset("data/particles", data=stack.astype(np.int16))
    f["data/particles"].attrs["voxel_size"] = [2.5, 2.5, 3.0]
    f.create_dataset("other", data=np.zeros(3))
with h5py.File(folder + "/eman2.hdf", "w") as f:
    for i in range(3):
        group = f.create_group(f"MDF/images/{{i}}")
        group.create_dataset("image", data=stack[i])
        group.attrs["EMAN.apix_x"] = 1.7
        group.attrs["EMAN.apix_y"] = 1.7
        group.attrs["EMAN.apix_z"] = 1.7
        group.attrs["EMAN.defocus"] = 1.5 + i
        group.attrs["EMAN.HostEndian"] = b"little"
np.savez(folder + "/pair.npz", a=stack[:2], b=stack[2])
"""

IMPORT = """
import json
from dbguard.files.transfer import import_files
done = []
for name, path, dataset in {jobs!r}:
    seen = []
    result = import_files(
        {project!r}, name, [path], dataset=dataset, progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1][0] == seen[-1][1] == result["records"], seen
    done.append(result)
print(json.dumps(done))
"""

EXPORT = """
import json
from dbguard.files.transfer import export_database
print(json.dumps([export_database({project!r}, name, path, **options) for name, path, options in {jobs!r}]))
"""

COMPARE = """
import json, h5py, mrcfile, numpy as np, tifffile
folder = {folder!r}
def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
with mrcfile.open(folder + "/stack.mrcs") as one, mrcfile.open(folder + "/out.mrcs") as two:
    voxels = [one.voxel_size.tolist(), two.voxel_size.tolist()]
    mrc = [same(one.data, two.data), *voxels, bool(two.is_image_stack())]
    stats = [float(two.header.dmax), float(two.data.max())]
tif_in, tif_out = tifffile.imread(folder + "/stack.tif"), tifffile.imread(folder + "/out.tif")
with tifffile.TiffFile(folder + "/out.tif") as t:
    resolution = t.pages[0].tags["XResolution"].value
with h5py.File(folder + "/stack.h5") as one, h5py.File(folder + "/out.h5") as two:
    h5 = [same(one["data/particles"][()], two["images"][()]),
          list(one["data/particles"].attrs["voxel_size"]), list(two["images"].attrs["voxel_size"])]
with h5py.File(folder + "/eman2.h5") as two:
    eman_attrs = [json.loads(s) for s in two["images_attrs"][()]]
print(json.dumps({{
    "mrc": mrc, "stats": stats, "tiff": same(tif_in, tif_out), "resolution": list(resolution), "h5": h5,
    "npy": same(np.load(folder + "/stack.npy"), np.load(folder + "/out.npy")),
    "npz": same(np.load(folder + "/stack.npy")[:3], np.load(folder + "/out.npz")["images"]),
    "eman": same(np.load(folder + "/stack.npy")[:3], h5py.File(folder + "/eman2.h5")["images"][()]),
    "eman_attrs": eman_attrs,
}}))
"""


def _run(host: Host, code: str) -> Any:
    result = host.python(textwrap.dedent(code), timeout=300)
    assert result.returncode == 0, f"on {host.name}:\n{result.stderr}"
    return json.loads(result.stdout.splitlines()[-1])


def test_mrc_tiff_hdf5_and_numpy_stacks_come_back_identical_with_their_voxel_sizes(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    files = tmp_path / "shared" / "files"
    files.mkdir()
    assert a.python(WRITE_FILES.format(folder=str(files))).returncode == 0
    assert a.run("acquire", str(project)).returncode == 0
    jobs = [
        ("mrc", str(files / "stack.mrcs"), None),
        ("tiff", str(files / "stack.tif"), None),
        ("hdf5", str(files / "stack.h5"), "data/particles"),
        ("npy", str(files / "stack.npy"), None),
        ("npz", str(files / "pair.npz"), None),
        ("eman2", str(files / "eman2.hdf"), None),
    ]
    imported = _run(a, IMPORT.format(project=str(project), jobs=jobs))
    assert [r["records"] for r in imported] == [5, 5, 5, 5, 3, 3]
    assert [r["files"][0]["format"] for r in imported] == ["mrc", "tiff", "hdf5", "npy", "npz", "hdf5-eman2"]
    assert a.run("flush", str(project)).returncode == 0

    # B holds no lease: it exports what the project store holds.
    exports: list[tuple[str, str, dict[str, str]]] = [
        ("mrc", str(files / "out.mrcs"), {}),
        ("tiff", str(files / "out.tif"), {}),
        ("hdf5", str(files / "out.h5"), {}),
        ("npy", str(files / "out.npy"), {}),
        ("npz", str(files / "out.npz"), {}),
        ("eman2", str(files / "eman2.h5"), {}),
    ]
    exported = _run(b, EXPORT.format(project=str(project), jobs=exports))
    by_name = {r["database"]: r for r in exported}
    assert by_name["tiff"]["voxel_size"] == pytest.approx([0.5e4, 0.5e4, 0.5e4])
    assert by_name["hdf5"]["voxel_size"] == [2.5, 2.5, 3.0]
    assert by_name["npy"]["dropped_attrs"] == []
    assert by_name["mrc"]["dropped_attrs"] == []
    assert not list(files.glob(".*dbguard-partial"))

    found = _run(b, COMPARE.format(folder=str(files)))
    same_mrc, voxel_in, voxel_out, is_stack = found["mrc"]
    assert same_mrc and is_stack and voxel_in == voxel_out
    assert found["stats"][0] == pytest.approx(found["stats"][1])  # header statistics, streamed
    assert found["tiff"] and found["h5"][0] and found["npy"] and found["npz"] and found["eman"]
    assert found["h5"][1] == found["h5"][2]
    # EMAN2's per-image attributes reach the database and the exported file; its storage ones do not.
    assert [attrs["defocus"] for attrs in found["eman_attrs"]] == [1.5, 2.5, 3.5]
    assert all(attrs["voxel_size"] == pytest.approx([1.7] * 3) for attrs in found["eman_attrs"])
    assert all("HostEndian" not in attrs for attrs in found["eman_attrs"])

    # Round trip of the exported TIFF and HDF5 back in: per-image attrs and voxel sizes survive.
    again = [("tiff2", str(files / "out.tif"), None), ("eman3", str(files / "eman2.h5"), None)]
    _run(a, IMPORT.format(project=str(project), jobs=again))
    records = _run(a, LS.format(project=str(project)))
    assert records["tiff2"] == records["tiff"]
    assert records["eman3"] == records["eman2"]


LS = """
import json, dbguard
out = {{}}
for name in ("tiff", "tiff2", "eman2", "eman3"):
    with dbguard.open({project!r}, name, "r") as db:
        out[name] = [db.attrs(i) for i in range(len(db))]
print(json.dumps(out))
"""


MEMORY = """
import json, resource, numpy as np
from dbguard.files.transfer import import_files
LIMIT = {limit}
def data_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
# RLIMIT_DATA counts private writable memory (heap and anonymous maps: what a copy of the stack
# would take), not shared file maps (the input's mmap, the cache's LMDB), which the kernel can
# always write back and drop.
resource.setrlimit(resource.RLIMIT_DATA, (data_size() + LIMIT, resource.RLIM_INFINITY))
try:
    np.ones({stack_bytes} // 4, dtype=np.float32)
    bites = False
except MemoryError:
    bites = True
result = import_files({project!r}, "big", [{path!r}])
print(json.dumps({{"bites": bites, "records": result["records"], "bytes": result["bytes"]}}))
"""


def test_a_stack_twice_the_memory_limit_imports_under_that_limit(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a = hosts["a"]
    limit = 100 << 20
    images, shape = 200, (512, 512)  # 200 float32 images of 1 MiB: 200 MiB, twice the limit
    path = tmp_path / "big.mrcs"
    make = f"""
import mrcfile, numpy as np
with mrcfile.new_mmap({str(path)!r}, shape=({images}, {shape[0]}, {shape[1]}), mrc_mode=2) as mrc:
    mrc.set_image_stack()
    for i in range({images}):
        mrc.data[i] = i
"""
    assert a.python(make).returncode == 0
    assert a.run("acquire", str(project)).returncode == 0
    code = MEMORY.format(limit=limit, stack_bytes=2 * limit, project=str(project), path=str(path))
    found = _run(a, code)
    assert found["bites"], "the limit must be one a whole copy of the stack would exceed"
    assert found["records"] == images and found["bytes"] == images * shape[0] * shape[1] * 4 == 2 * limit


def test_an_export_to_an_unknown_format_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"names no format.*\.mrc"):
        export_database(tmp_path, "images", tmp_path / "out.jpg")
    assert not list(tmp_path.iterdir())


def test_the_import_and_export_commands_round_trip_an_mrc_stack_between_hosts(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    source, back = tmp_path / "stack.mrcs", tmp_path / "back.mrcs"
    made = a.python(
        textwrap.dedent(
            f"""
            import mrcfile, numpy as np
            data = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
            with mrcfile.new({str(source)!r}) as mrc:
                mrc.set_data(data)
                mrc.voxel_size = 1.5
            """
        )
    )
    assert made.returncode == 0, made.stderr
    assert a.run("acquire", str(project)).returncode == 0
    imported = a.run("import", str(project), "particles", str(source), "--json")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["records"] == 4
    refused = b.run("import", str(project), "particles", str(source))
    assert refused.returncode == 3 and "host-a" in refused.stderr  # only the writer imports
    assert a.run("flush", str(project)).returncode == 0
    exported = b.run("export", str(project), "particles", "--to", str(back), "--json")
    assert exported.returncode == 0, exported.stderr
    compared = b.python(
        textwrap.dedent(
            f"""
            import mrcfile, numpy as np
            with mrcfile.open({str(source)!r}) as one, mrcfile.open({str(back)!r}) as two:
                assert np.array_equal(one.data, two.data)
                assert one.voxel_size == two.voxel_size, (one.voxel_size, two.voxel_size)
            """
        )
    )
    assert compared.returncode == 0, compared.stderr
