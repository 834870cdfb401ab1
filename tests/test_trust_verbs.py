"""Issue 28, trust in every verb: one output policy for finetune-compare, evaluate and import-official (inputs
byte-identical afterwards), resume that checks a finished output, leftovers of a killed run cleaned, long names,
and a batch planner whose cost is linear in the rows."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from inference_models import write_png as png
from napari_dmoe.cli.main import main
from training_data import tiny_config, write_folder


@pytest.fixture(scope="module")
def model(model_path):
    return model_path  # conftest's tiny model file


def snapshot(*paths):
    return {p: p.read_bytes() for p in paths}


def one_line_error(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]  # other lines: the thread count note
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


# -- 1. dmoe finetune-compare ---------------------------------------------------------------------------------
@pytest.fixture
def pairs(tmp_path, model):
    """A base and a trained model, and a fine-tune pairs CSV (image, mask, race, split)."""
    import shutil

    folder = tmp_path / "run"
    folder.mkdir()
    png(folder / "a.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(folder / "a_mask.png")
    (folder / "pairs.csv").write_text("image,mask,race,split\na.png,a_mask.png,Black,val\n")
    base, trained = tmp_path / "base.safetensors", folder / "best.safetensors"
    shutil.copy(model, base)
    shutil.copy(model, trained)
    return base, trained, folder / "pairs.csv"


@pytest.mark.parametrize("target", ["base", "trained", "csv"])
def test_finetune_compare_never_replaces_an_input(pairs, capsys, target):
    base, trained, csv = pairs
    before = snapshot(base, trained, csv)
    out_model = {"base": base, "trained": trained}.get(target, trained.parent / "final.safetensors")
    out_json = csv if target == "csv" else trained.parent / "compare.json"
    argv = ["finetune-compare", str(base), str(trained), str(csv), str(out_model), "--out", str(out_json)]
    assert main(argv + ["--overwrite"]) == 2  # even when told to overwrite
    one_line_error(capsys.readouterr().err, "never writes over an input")
    assert snapshot(base, trained, csv) == before


def test_finetune_compare_replaces_an_existing_model_only_with_overwrite(pairs, model, tmp_path, capsys):
    base, trained, csv = pairs
    unrelated = tmp_path / "colleague.safetensors"
    unrelated.write_bytes(model.read_bytes())
    before = snapshot(base, trained, csv, unrelated)
    argv = ["finetune-compare", str(base), str(trained), str(csv), str(unrelated), "--out", str(tmp_path / "c.json")]
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, str(unrelated), "exists; pass --overwrite")
    assert snapshot(base, trained, csv, unrelated) == before and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("csv_text, words", [
    ("image,race,split\na.png,Black,val\n", ["no column 'mask'", "pairs CSV"]),
    ("image,mask,race,split\n,a_mask.png,Black,val\n", ["line 2", "'image' cell is empty"]),
], ids=["no-mask-column", "empty-image-cell"])
def test_finetune_compare_csv_problems_are_one_line_messages(pairs, tmp_path, capsys, csv_text, words):
    base, trained, csv = pairs
    csv.write_text(csv_text)
    argv = ["finetune-compare", str(base), str(trained), str(csv), str(tmp_path / "f.safetensors"),
            "--out", str(tmp_path / "c.json")]
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, str(csv), *words)
    assert not (tmp_path / "f.safetensors").exists()


# -- 2. dmoe evaluate --out -----------------------------------------------------------------------------------
@pytest.fixture
def folder_config(tmp_path):
    root = write_folder(tmp_path / "data", n=6)
    return root, tiny_config(tmp_path / "data.yaml", tmp_path / "unused",
                             {"format": "folder", "root": str(root), "csv": "dataset.csv",
                              "attributes": {"sex": ["F", "M"]},
                              "class_names": ["background", "disc"]})


def test_evaluate_keeps_an_earlier_report_without_overwrite(model, folder_config, tmp_path, capsys):
    root, config = folder_config
    out = tmp_path / "ev"
    out.mkdir()
    (out / "report.json").write_text('{"earlier": true}')
    before = snapshot(out / "report.json", config, model)
    assert main(["evaluate", str(model), str(config), "--out", str(out), "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, "report.json exists; pass --overwrite")
    assert snapshot(out / "report.json", config, model) == before


def test_evaluate_into_the_dataset_folder_keeps_the_users_report(model, folder_config, capsys):
    root, config = folder_config
    (root / "report.csv").write_text("my own notes\n")
    before = snapshot(*sorted(p for p in root.iterdir() if p.is_file()))
    assert main(["evaluate", str(model), str(config), "--out", str(root), "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, "report.csv exists")
    assert snapshot(*sorted(p for p in root.iterdir() if p.is_file())) == before


def test_evaluate_never_replaces_the_table_the_dataset_reads(model, tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=6)
    (root / "dataset.csv").rename(root / "report.csv")  # the user's pairs table happens to be called report.csv
    config = tiny_config(tmp_path / "data.yaml", tmp_path / "unused",
                         {"format": "folder", "root": str(root), "csv": "report.csv",
                          "attributes": {"sex": ["F", "M"]},
                          "class_names": ["background", "disc"]})
    before = snapshot(root / "report.csv")
    assert main(["evaluate", str(model), str(config), "--out", str(root), "--overwrite", "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, "never writes over an input")
    assert snapshot(root / "report.csv") == before


# -- 3. dmoe import-official --out SRC ----------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--force", "--overwrite"])
def test_import_official_never_replaces_its_source(tmp_path, capsys, flag):
    src = tmp_path / "ckpt.safetensors"
    src.write_bytes(b"the only copy of an official checkpoint")
    link = tmp_path / "alias.safetensors"
    link.symlink_to(src)
    for out in (src, link):
        assert main(["import-official", str(src), "--arch", "transunet2d", "--attribute-name", "race",
                     "--attribute-values", "A,B", "--class-names", "bg,fg", "--out", str(out), flag]) == 2
        one_line_error(capsys.readouterr().err, "never writes over an input")
    assert src.read_bytes() == b"the only copy of an official checkpoint"


# -- 13. resume: a finished output is checked; leftovers are cleaned ------------------------------------------
def _batch(tmp_path, names=("a.png", "b.png")):
    (tmp_path / "in").mkdir()
    for i, name in enumerate(names):
        png(tmp_path / "in" / name, seed=i)
    csv = tmp_path / "cases.csv"
    csv.write_text("image,race\n" + "".join(f"{n},Black\n" for n in names))
    (tmp_path / "out").mkdir()
    return csv


def _age(path, seconds=600):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_resume_redoes_an_empty_label_and_removes_a_killed_runs_leftovers(model, tmp_path, capsys):
    csv = _batch(tmp_path)
    out = tmp_path / "out"
    (out / "a_labels.png").write_bytes(b"")  # a 0-byte label is not a finished case
    leftover = out / ".tmp-0123456789ab-b_labels.png"
    leftover.write_bytes(b"half a PNG")
    _age(leftover)
    unrelated = out / ".tmp-0123456789ab-not_ours.png"  # not the temporary of a planned output: kept
    unrelated.write_bytes(b"x")
    _age(unrelated)
    inputs = snapshot(*(tmp_path / "in").iterdir(), csv)
    assert main(["segment", str(model), str(tmp_path / "in"), "--csv", str(csv), "-o", str(out), "-q",
                 "--device", "cpu"]) == 0
    for name in ("a_labels.png", "b_labels.png"):
        assert np.asarray(Image.open(out / name)).shape == (40, 48)
    assert not leftover.exists() and unrelated.exists()
    assert snapshot(*(tmp_path / "in").iterdir(), csv) == inputs
    printed = capsys.readouterr()
    assert "2 of 2 images segmented" in printed.out
    # the user is told what planning did, not only what it skipped
    assert "empty (0 bytes): segmented again" in printed.err and f"removed {leftover.name}" in printed.err


def test_resume_refuses_a_damaged_label_without_overwrite(model, tmp_path, capsys):
    csv = _batch(tmp_path)
    out = tmp_path / "out"
    (out / "a_labels.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # a PNG without its end
    argv = ["segment", str(model), str(tmp_path / "in"), "--csv", str(csv), "-o", str(out), "-q", "--device", "cpu"]
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, "a_labels.png", "not a complete png", "--overwrite")
    assert (out / "a_labels.png").read_bytes() == b"\x89PNG\r\n\x1a\n cut short"
    assert not (out / "b_labels.png").exists()  # refused before any work


def test_a_live_write_is_never_cleaned_up(tmp_path):
    """A temporary file whose writer still runs (it holds the lock) stays, however old it looks."""
    fcntl = pytest.importorskip("fcntl")
    from napari_dmoe.io.files import clean_leftovers

    live, dead = tmp_path / ".tmp-aaaaaaaaaaaa-x.png", tmp_path / ".tmp-bbbbbbbbbbbb-x.png"
    for p in (live, dead):
        p.write_bytes(b"partial")
        _age(p)
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert clean_leftovers([tmp_path / "x.png"]) == [dead]
    assert live.exists() and not dead.exists()


def test_completeness_by_format(tmp_path):
    from napari_dmoe.io.images import write_labels
    from napari_dmoe.io.outputs import completeness

    labels = np.zeros((4, 6, 5), np.uint8)
    for name in ("a.png", "a.tif", "a.nii.gz", "a.nii", "a.seg.nrrd"):
        write_labels(tmp_path / name, labels[0] if name == "a.png" else labels)
        assert completeness(tmp_path / name) == "complete", name
        data = (tmp_path / name).read_bytes()
        cuts = [3] + ([len(data) // 2, len(data) - 1] if name in ("a.png", "a.nii.gz", "a.nii") else [])
        for cut in cuts:  # by its magic; PNG by its end chunk, NIfTI by the length its header promises
            (tmp_path / name).write_bytes(data[:cut])
            assert completeness(tmp_path / name) not in ("complete", "missing"), (name, cut)
    assert completeness(tmp_path / "none.png") == "missing"


# -- 15. long names -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [238, 250, 255])
def test_legal_long_output_names_are_written(tmp_path, length):
    from napari_dmoe.io.images import read_image, write_labels

    for suffix in (".png", ".nii.gz"):
        name = "n" * (length - len(suffix)) + suffix
        labels = np.arange(12, dtype=np.uint8).reshape(3, 4) % 3
        write_labels(tmp_path / name, labels)
        back = read_image(tmp_path / name).array
        assert np.array_equal(np.squeeze(back), labels) and len(name) == length
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_long_output_name_through_the_cli(model, tmp_path):
    src = png(tmp_path / "scan.png")
    out = tmp_path / ("m" * 246 + ".png")
    assert main(["segment", str(model), str(src), "-a", "Black", "-o", str(out), "-q", "--device", "cpu"]) == 0
    assert np.asarray(Image.open(out)).shape == (40, 48)


# -- 9. batch planning is linear in the rows ------------------------------------------------------------------
class _FsCalls:
    """Counts the file-system calls (stat, lstat, open, scandir) made while it is installed."""

    def __init__(self, monkeypatch):
        import builtins

        self.n = 0
        for owner, name in ((os, "stat"), (os, "lstat"), (os, "scandir"), (builtins, "open")):
            monkeypatch.setattr(owner, name, self._counted(getattr(owner, name)))

    def _counted(self, fn):
        def call(*args, **kwargs):
            self.n += 1
            return fn(*args, **kwargs)
        return call


def _plan_calls(folder, n, done_every, monkeypatch):
    """File-system calls to plan ``n`` rows (every ``done_every``-th one finished, every 7th a series folder)."""
    from napari_dmoe.cli.segment import plan_batch_outputs

    src, out = folder / "in", folder / "out"
    src.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        name = f"1.2.840.{i}" if i % 7 == 0 else f"img{i}.png"
        if i % 7 == 0:
            (src / name).mkdir(exist_ok=True)
        if i % done_every == 0:
            marker = out / (f"{name}_labels.nii.gz" if i % 7 == 0 else f"img{i}_labels.png")
            marker.write_bytes(b"")  # empty: judged, then redone
        rows.append((name, None))
    with monkeypatch.context() as m:
        calls = _FsCalls(m)
        cases = plan_batch_outputs(rows, src, out, False, [folder / "model.safetensors", folder / "cases.csv"], False)
    assert len(cases) == n
    return calls.n


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(20, 160), done_every=st.integers(1, 5))
def test_batch_planning_costs_a_constant_number_of_file_system_calls_per_row(tmp_path_factory, monkeypatch, n,
                                                                             done_every):
    small = _plan_calls(tmp_path_factory.mktemp("a"), n, done_every, monkeypatch)
    large = _plan_calls(tmp_path_factory.mktemp("b"), 4 * n, done_every, monkeypatch)
    # linear: 4x the rows cost about 4x the calls (quadratic planning costs 16x); and few calls a row
    assert large <= 4.5 * small + 200, (small, large)
    assert large / (4 * n) < 60, large


# -- 12. DICOM series folders named by their UIDs -----------------------------------------------------------------
@pytest.mark.parametrize("dicom_seg", [False, True])
def test_uid_named_series_folders_are_planned_as_dicom(tmp_path, dicom_seg):
    from napari_dmoe.cli.segment import plan_batch_outputs

    src = tmp_path / "in"
    for uid in ("1.2.840.113619.2.55.3.1", "1.2.840.113619.2.55.3.2"):  # same "stem" once a suffix is stripped
        (src / uid).mkdir(parents=True)
    rows = [("1.2.840.113619.2.55.3.1", None), ("1.2.840.113619.2.55.3.2", None)]
    cases = plan_batch_outputs(rows, src, tmp_path / "out", dicom_seg, [], False)
    ext = ".dcm" if dicom_seg else ".nii.gz"
    assert [c.marker.name for c in cases] == [f"{r[0]}_labels{ext}" for r in rows]


@pytest.mark.slow
def test_a_single_uid_named_series_is_segmented_in_a_batch(tmp_path, capsys):
    """A 3D model, one CT series folder named by its UID: labels as NIfTI (and DICOM SEG with --dicom-seg)."""
    from test_dicom_seg import make_series

    from inference_models import tiny
    from napari_dmoe.io.checkpoint import save_model

    m = tiny("resunet3d-tiny")
    model = save_model(tmp_path / "m3d.safetensors", m.network, m.spec)
    (tmp_path / "in").mkdir()
    make_series(tmp_path / "in" / "1.2.826.0.1.3680043.8.498.1", n=8, size=32)
    attr = m.spec.attributes[0]
    csv = tmp_path / "cases.csv"
    csv.write_text(f"image,{attr.name}\n1.2.826.0.1.3680043.8.498.1,{attr.values[0]}\n")
    before = snapshot(*sorted((tmp_path / "in").rglob("*.dcm")))
    for extra, ext in (([], ".nii.gz"), (["--dicom-seg"], ".dcm")):
        assert main(["segment", str(model), str(tmp_path / "in"), "--csv", str(csv), "-o", str(tmp_path / "out"),
                     "-q", "--device", "cpu", "--force", *extra]) == 0, capsys.readouterr().err
        assert (tmp_path / "out" / f"1.2.826.0.1.3680043.8.498.1_labels{ext}").is_file()
    assert snapshot(*sorted((tmp_path / "in").rglob("*.dcm"))) == before


# -- 10, 11. voxel limits -----------------------------------------------------------------------------------------
def _seg_nrrd_claiming(path, sizes, payload: bytes, encoding="gzip"):
    header = (f"NRRD0004\ntype: unsigned char\ndimension: 3\nspace: left-posterior-superior\nsizes: "
              f"{' '.join(map(str, sizes))}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\n"
              f"encoding: {encoding}\nspace origin: (0,0,0)\n\n")
    path.write_bytes(header.encode() + payload)
    return path


def test_seg_nrrd_size_is_bounded_before_anything_is_allocated(tmp_path, monkeypatch):
    import gzip
    import tracemalloc

    from napari_dmoe.io.images import ImageReadError, read_image

    zeros = gzip.compress(b"\0" * 2**22)  # 4 MiB of zeros, a few kB on disk
    path = _seg_nrrd_claiming(tmp_path / "big.seg.nrrd", (2048, 2048, 1300), zeros)
    tracemalloc.start()
    with pytest.raises(ImageReadError, match="header field sizes.*above the limit"):
        read_image(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20, peak
    monkeypatch.setenv("DMOE_MAX_VOXELS", "inf")  # lifted limit: the file still cannot hold what it claims
    with pytest.raises(ImageReadError, match="file holds"):
        read_image(path)
    monkeypatch.setenv("DMOE_MAX_VOXELS", "1000")
    small = _seg_nrrd_claiming(tmp_path / "small.seg.nrrd", (16, 16, 8), gzip.compress(b"\0" * 2048))
    with pytest.raises(ImageReadError, match="above the limit"):
        read_image(small)
    monkeypatch.delenv("DMOE_MAX_VOXELS")
    assert read_image(small).array.shape == (8, 16, 16)


@pytest.mark.parametrize("value, ok", [("inf", True), ("Infinity", True), ("1e12", True), ("nan", False),
                                       ("-inf", False), ("0", False), ("lots", False)])
def test_max_voxels_inf_lifts_the_limit_and_bad_values_are_named(tmp_path, monkeypatch, value, ok):
    import nibabel as nib
    from pydicom.data import get_testdata_file

    from napari_dmoe.io.images import read_image

    monkeypatch.setenv("DMOE_MAX_VOXELS", value)
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    from napari_dmoe.transforms import resampled_shape

    if ok:
        for path in (tmp_path / "x.nii.gz", get_testdata_file("CT_small.dcm")):
            volume = read_image(path)
            assert volume.array.size > 0
            assert resampled_shape(volume.array.shape, volume.spacing, [s / 2 for s in volume.spacing])
    else:
        with pytest.raises(ValueError, match=f"DMOE_MAX_VOXELS={value!r}"):
            read_image(tmp_path / "x.nii.gz")
