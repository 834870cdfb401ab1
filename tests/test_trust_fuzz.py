"""Issue 12, hostile files: the readers and the model loader, fed random bytes, truncated files and random header
values, give a valid result or a clean project error, never another exception and never unbounded memory."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from safetensors import safe_open
from safetensors.torch import save_file

from napari_dmoe.io.checkpoint import CheckpointError, Model, load_model, save_model
from napari_dmoe.io.images import ImageReadError, Volume, read_image

from inference_models import tiny

MEMORY_BOUND = 200 * 2**20  # bytes Python/numpy may hold at the peak while reading one small hostile file
# The suite replays the same examples every run (derandomize), so a CI result never depends on the draw;
# DMOE_FUZZ_EXAMPLES=500 hunts with fresh random examples, longer than CI affords. What a hunt finds is kept
# as an @example.
HUNT = "DMOE_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=int(os.environ.get("DMOE_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=not HUNT,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    """One valid small file of each kind the readers take, as bytes."""
    folder = tmp_path_factory.mktemp("originals")
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((10, 9, 4)).astype(np.float32), np.diag([0.8, 0.9, 2.5, 1])),
             folder / "a.nii")
    nib.save(nib.Nifti1Image(rng.random((10, 9, 4)).astype(np.float32), np.eye(4)), folder / "a.nii.gz")
    iio.imwrite(folder / "a.png", (rng.random((12, 11)) * 255).astype(np.uint8))
    tifffile.imwrite(folder / "a.tif", (rng.random((12, 11)) * 65535).astype(np.uint16))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(folder / "a.dcm")
    m = tiny("transunet2d-tiny")
    save_model(folder / "a.safetensors", m.network, m.spec)
    return Originals({p.name[1:]: p.read_bytes() for p in folder.iterdir()})


class Originals(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Originals({sorted(self)})"


def _read(path: Path):
    return load_model(path) if path.suffix == ".safetensors" else read_image(path)


def check_clean(path: Path) -> None:
    """A valid result or a project error, within the memory bound."""
    tracemalloc.start()
    try:
        result = _read(path)
    except (ImageReadError, CheckpointError) as err:
        assert str(path) in str(err)  # names the file
        result = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.0f} MiB to read a {path.stat().st_size} byte file"
    if isinstance(result, Volume):
        assert all(math.isfinite(s) and 0 < s <= 100 for s in result.spacing), result.spacing
        assert all(math.isfinite(o) for o in result.origin), result.origin
        if result.affine is not None:
            assert np.all(np.isfinite(result.affine))
    elif result is not None:
        assert isinstance(result, Model)


SUFFIXES = [".nii", ".nii.gz", ".png", ".tif", ".dcm", ".safetensors"]


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=4096))
def test_random_bytes(tmp_path, suffix, data):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    check_clean(path)


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1),
       st.integers(0, 255)), max_size=8))
@example(suffix=".tif", cut=1.0, flips=[(0.0390625, 134)])  # a header claiming 200 MiB in a 520-byte file (CI)
def test_truncated_and_damaged_files(tmp_path, originals, suffix, cut, flips):
    data = bytearray(originals[suffix])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(bytes(data[: int(cut * len(data))] if cut < 0.999 else data))
    check_clean(path)


# NIfTI-1 header fields (byte offset, numpy dtype, count) a hostile file may set to anything
NIFTI_FIELDS = {"dim": (40, "<i2", 8), "datatype": (70, "<i2", 1), "bitpix": (72, "<i2", 1),
                "pixdim": (76, "<f4", 8), "vox_offset": (108, "<f4", 1), "scl_slope": (112, "<f4", 1),
                "qform_code": (252, "<i2", 1), "sform_code": (254, "<i2", 1), "quatern": (256, "<f4", 6),
                "srow": (280, "<f4", 12)}
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=32)
ANY_INT = st.one_of(st.integers(-3, 12), st.integers(-(2**15), 2**15 - 1))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(NIFTI_FIELDS)), st.data(), min_size=1, max_size=4),
       gz=st.booleans())
def test_random_nifti_header_values(tmp_path, originals, changes, gz):
    raw = bytearray(originals[".nii"])
    for name, data in changes.items():
        offset, dtype, count = NIFTI_FIELDS[name]
        values = data.draw(st.lists(ANY_FLOAT if "f" in dtype else ANY_INT, min_size=count, max_size=count))
        raw[offset: offset + np.dtype(dtype).itemsize * count] = np.array(values, dtype).tobytes()
    path = tmp_path / ("h.nii.gz" if gz else "h.nii")
    if gz:
        import gzip

        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(bytes(raw))
    check_clean(path)


# spec fields a hostile model header may set to anything
SPEC_VALUES = st.one_of(st.integers(-10, 10**9), st.floats(allow_nan=True), st.text(max_size=20),
                        st.lists(st.integers(-10, 10**6), max_size=4), st.none(), st.booleans())
SPEC_FIELDS = ["n_experts", "top_k", "in_channels", "input_size", "class_names", "routing", "normalization",
               "spacing", "arch_kwargs.depth", "arch_kwargs.hidden", "arch_kwargs.heads", "arch_kwargs.img_size",
               "arch_kwargs.patch_size", "arch_kwargs.mlp_dim", "arch_kwargs.decoder_channels", "attributes"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(SPEC_FIELDS), SPEC_VALUES, min_size=1, max_size=3))
def test_random_model_header_values(tmp_path, originals, changes):
    src = tmp_path / "src.safetensors"
    src.write_bytes(originals[".safetensors"])
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    spec = json.loads(meta["dmoe_spec"])
    for key, value in changes.items():
        node, _, leaf = key.rpartition(".")
        (spec[node] if node else spec)[leaf] = value
    meta["dmoe_spec"] = json.dumps(spec)
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, str(path), metadata=meta)
    check_clean(path)


# -- memory under a hard limit (torch's allocations are not seen by tracemalloc) ----------------------------------
ABSURD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from safetensors import safe_open
    from safetensors.torch import save_file
    from napari_dmoe.io.checkpoint import CheckpointError, load_model
    src, folder = Path(sys.argv[1]), Path(sys.argv[2])
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cases = {"depth": {"depth": 10**7}, "hidden": {"hidden": 2**20}, "negative": {"img_size": -64},
             "huge_input": {"img_size": 100000}, "mlp": {"mlp_dim": 2**24}, "heads": {"heads": 10**6},
             "experts": {"n_experts": 10**6}, "classes": {"class_names": ["c%d" % i for i in range(10**5)]},
             "vocabulary": {"attributes": [{"name": "race", "values": ["v%d" % i for i in range(10**5)]}]},
             "within_bounds_but_big": {"hidden": 4096, "depth": 64, "mlp_dim": 16384, "heads": 64}}
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + 768 * 2**20, resource.RLIM_INFINITY))  # 768 MiB more, at most
    for name, change in cases.items():
        spec = json.loads(meta["dmoe_spec"])
        for key, value in change.items():
            (spec["arch_kwargs"] if key in spec["arch_kwargs"] or key in ("depth", "mlp_dim") else spec)[key] = value
        path = folder / (name + ".safetensors")
        save_file(tensors, str(path), metadata={**meta, "dmoe_spec": json.dumps(spec)})
        try:
            load_model(path)
            print(name, "LOADED")
        except CheckpointError as err:
            print(name, "REFUSED", str(err).split(": ", 1)[1][:150])
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_absurd_model_headers_are_refused_under_a_hard_memory_limit(tmp_path, originals):
    src = tmp_path / "src.safetensors"
    src.write_bytes(originals[".safetensors"])
    proc = subprocess.run([sys.executable, "-c", ABSURD, str(src), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr  # a MemoryError or a traceback would end the script
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert len(lines) == 10 and all(v.startswith("REFUSED") for v in lines.values()), proc.stdout


def test_resampling_to_a_huge_grid_is_refused_before_allocating(model3d, monkeypatch):
    import dataclasses

    from napari_dmoe.inference.engine import segment
    from napari_dmoe.limits import MAX_VOXELS_ENV

    model = dataclasses.replace(model3d, spec=dataclasses.replace(model3d.spec, spacing=[1.0, 1.0, 1.0]))
    image = np.zeros((20, 20, 20), np.float32)
    tracemalloc.start()
    with pytest.raises(ValueError, match=f"above the limit .* set the environment variable {MAX_VOXELS_ENV}"):
        segment(model, image, "Black", spacing=(90.0, 90.0, 90.0), device="cpu")  # 1800^3 voxels at 1 mm
    assert tracemalloc.get_traced_memory()[1] < 64 * 2**20
    tracemalloc.stop()
    monkeypatch.setenv(MAX_VOXELS_ENV, "1000")  # the user's own, lower limit
    with pytest.raises(ValueError, match="above the limit of 1e\\+03 voxels"):
        segment(model, image, "Black", spacing=(1.0, 1.0, 1.0), device="cpu")


def test_pipes_are_refused_not_read(tmp_path):
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    with pytest.raises(ImageReadError, match="not a regular file or folder"):
        read_image(fifo)
    model = tmp_path / "model.safetensors"
    os.mkfifo(model)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_model(model)
    with pytest.raises(ImageReadError, match="not a regular file or folder"):
        read_image(Path("/dev/zero"))


def test_dicom_with_a_damaged_length_field_is_read_within_bounds(tmp_path, originals):
    """Found by test_truncated_and_damaged_files: one zeroed byte made pydicom ask Python for 4 GB."""
    data = bytearray(originals[".dcm"])
    data[int(0.15851471365089356 * (len(data) - 1))] = 0
    path = tmp_path / "damaged.dcm"
    path.write_bytes(bytes(data))
    check_clean(path)


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header for a grey image of ``width`` x ``height`` with (almost) no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_png_and_tiff_sizes_are_bounded_before_decoding(tmp_path, originals, monkeypatch):
    from napari_dmoe.limits import MAX_VOXELS_ENV

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(60000, 60000))  # 3.6e9 pixels announced in 100 bytes
    check_clean(bomb)
    with pytest.raises(ImageReadError, match="exceeds limit .* decompression bomb"):  # Pillow's own guard first
        read_image(bomb)
    monkeypatch.setenv(MAX_VOXELS_ENV, "100")  # the user's own limit applies to small files too
    for suffix in (".png", ".tif"):
        path = tmp_path / f"small{suffix}"
        path.write_bytes(originals[suffix])
        with pytest.raises(ImageReadError, match="above the limit of 100 voxels"):
            read_image(path)
