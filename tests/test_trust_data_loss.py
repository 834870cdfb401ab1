"""Issue 12, data loss: nothing we write replaces an input, an existing output is replaced only when asked, a
batch never lets two rows write one file, and a failed write leaves the old file whole and no partial file."""
from __future__ import annotations

import errno
import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from inference_models import write_png as png
from napari_dmoe.cli.main import main


@pytest.fixture(scope="module")
def model(model_path):
    return model_path  # conftest's tiny model file


def nifti(path, seed=0):
    nib.save(nib.Nifti1Image(np.random.default_rng(seed).random((24, 20, 6)).astype("float32"), np.eye(4)), path)
    return path


def leftovers(folder):
    """Temporary files of io.files.atomic_write (or anything half-written) left in ``folder``."""
    return [p.name for p in folder.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]


def segment(model, *args):
    return main(["segment", str(model), *map(str, args), "-q", "--device", "cpu"])


# -- an output that is an input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["png", "nifti", "hardlink", "symlink", "model"])
def test_segment_never_writes_over_its_input(model, tmp_path, capsys, kind):
    src = png(tmp_path / "scan.png") if kind != "nifti" else nifti(tmp_path / "scan.nii.gz")
    out = {"png": src, "nifti": src, "model": model}.get(kind, tmp_path / "alias.png")
    if kind == "hardlink":
        os.link(src, out)
    elif kind == "symlink":
        out.symlink_to(src)
    before, model_before = src.read_bytes(), model.read_bytes()
    assert segment(model, src, "-a", "Black", "-o", out, "--overwrite") == 2  # even when told to overwrite
    assert "never writes over an input" in capsys.readouterr().err
    assert src.read_bytes() == before and model.read_bytes() == model_before
    assert leftovers(tmp_path) == []


def test_existing_output_is_replaced_only_with_overwrite(model, tmp_path, capsys):
    src, out = png(tmp_path / "scan.png"), tmp_path / "mask.png"
    out.write_bytes(b"a mask drawn by hand")
    assert segment(model, src, "-a", "Black", "-o", out) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"a mask drawn by hand"
    assert segment(model, src, "-a", "Black", "-o", out, "--overwrite") == 0
    assert np.asarray(Image.open(out)).shape == (40, 48)


def test_existing_routing_maps_are_replaced_only_with_overwrite(model, tmp_path, capsys):
    src, routing = png(tmp_path / "scan.png"), tmp_path / "routing"
    routing.mkdir()
    (routing / "scan_expert0.png").write_bytes(b"old")
    assert segment(model, src, "-a", "Black", "-o", tmp_path / "m.png", "--routing-out", routing) == 2
    assert "scan_expert0.png exists" in capsys.readouterr().err
    assert (routing / "scan_expert0.png").read_bytes() == b"old" and not (tmp_path / "m.png").exists()


# -- batches --------------------------------------------------------------------------------------------------
def test_batch_continues_where_it_stopped(model, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        png(tmp_path / "in" / name, seed=i)
    csv = tmp_path / "cases.csv"
    csv.write_bytes("\ufeffimage,race\na.png,Black\nb.png,White\nc.png,\n".encode())  # Excel's BOM
    out = tmp_path / "out"
    assert segment(model, tmp_path / "in", "--csv", csv, "-o", out) == 0
    (out / "b_labels.png").unlink()  # what a batch killed during b leaves: a's and c's labels
    a_before = (out / "a_labels.png").stat().st_mtime_ns
    capsys.readouterr()
    assert segment(model, tmp_path / "in", "--csv", csv, "-o", out) == 0
    captured = capsys.readouterr()
    assert "1 of 3 images segmented" in captured.out and "2 skipped" in captured.out
    assert "a_labels.png exists: skipped (pass --overwrite to redo it)" in captured.err
    assert (out / "b_labels.png").is_file() and (out / "a_labels.png").stat().st_mtime_ns == a_before
    assert segment(model, tmp_path / "in", "--csv", csv, "-o", out, "--overwrite") == 0
    assert "3 of 3 images segmented" in capsys.readouterr().out


@pytest.mark.parametrize("rows", [["a.png", "sub/a.png"], ["a.png", "a.png"]], ids=["same-stem", "duplicate"])
def test_batch_rows_that_would_write_one_file_are_refused_up_front(model, tmp_path, capsys, rows):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    png(tmp_path / "in" / "a.png", seed=0)
    png(tmp_path / "in" / "sub" / "a.png", seed=1)
    csv = tmp_path / "cases.csv"
    csv.write_text("image,race\n" + "".join(f"{r},Black\n" for r in rows))
    assert segment(model, tmp_path / "in", "--csv", csv, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "CSV row 1" in err and "CSV row 2" in err and "would both write" in err and rows[1] in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_batch_output_folder_inside_inputs_never_replaces_an_image(model, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    png(tmp_path / "in" / "a.png")
    png(tmp_path / "in" / "a_labels.png", seed=3)  # an input that is named like a's output
    before = (tmp_path / "in" / "a_labels.png").read_bytes()
    csv = tmp_path / "cases.csv"
    csv.write_text("image,race\na.png,Black\na_labels.png,White\n")
    assert segment(model, tmp_path / "in", "--csv", csv, "-o", tmp_path / "in", "--overwrite") == 2
    assert "lies inside the input folder" in capsys.readouterr().err  # the batch's own folder: refused whole
    assert (tmp_path / "in" / "a_labels.png").read_bytes() == before


# -- dmoe compare --out ------------------------------------------------------------------------------------------
def test_compare_out_never_replaces_an_input_report(tmp_path, capsys):
    from napari_dmoe.evaluation.report import write_json

    reports = []
    for name in ("a", "b"):
        report = {"model": name, "n_images": 1, "overall": {"dice": 0.5, "es_dice": 0.4}, "by_group": {}}
        reports.append(write_json(tmp_path / f"{name}.json", report))
    before = reports[0].read_bytes()
    assert main(["compare", *map(str, reports), "--out", str(reports[0]), "--overwrite"]) == 2
    assert "never writes over an input" in capsys.readouterr().err
    assert reports[0].read_bytes() == before
    table = tmp_path / "table.md"
    table.write_text("kept")
    assert main(["compare", *map(str, reports), "--out", str(table)]) == 2
    assert table.read_text() == "kept"


# -- a write that fails ------------------------------------------------------------------------------------------
def _full_disk(monkeypatch, after: int = 0):
    """Every fsync after the first ``after`` ones fails as a full disk does: the file was written, not kept."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _writers(tmp_path):
    """(target, write) for each kind of file the project writes."""
    from napari_dmoe.evaluation.report import write_json
    from napari_dmoe.io.files import atomic_write_text
    from napari_dmoe.io.images import read_image, write_labels, write_volume

    src = nifti(tmp_path / "src.nii.gz")
    volume = read_image(src)
    labels3d = np.ones(volume.spatial_shape, np.uint8)
    return {
        "png": (tmp_path / "m.png", lambda p: write_labels(p, np.ones((8, 9), np.uint8))),
        "tiff": (tmp_path / "m.tif", lambda p: write_labels(p, np.ones((8, 9), np.uint8))),
        "nifti": (tmp_path / "m.nii.gz", lambda p: write_labels(p, labels3d, like=volume)),
        "volume": (tmp_path / "v.nii.gz", lambda p: write_volume(p, np.ones((4, 5, 6), np.float32), (1, 1, 1))),
        "report": (tmp_path / "r.json", lambda p: write_json(p, {"overall": {"dice": 1.0}})),
        "text": (tmp_path / "t.md", lambda p: atomic_write_text(p, "| new |")),
    }


@pytest.mark.parametrize("kind", ["png", "tiff", "nifti", "volume", "report", "text"])
def test_failed_write_keeps_the_old_file_and_leaves_no_partial_file(tmp_path, monkeypatch, kind):
    target, write = _writers(tmp_path)[kind]
    write(target)
    before = target.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="no space left on device.*previous file, if any, is unchanged"):
        write(target)
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []
    fresh = tmp_path / f"new_{target.name}"
    with pytest.raises(OSError):
        write(fresh)
    assert not fresh.exists() and leftovers(tmp_path) == []  # no 0-byte file under the final name either


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(model, tmp_path, monkeypatch):
    """save_model and the two-file resume state: the previous checkpoint stays whole and consistent."""
    import torch

    from napari_dmoe.io.checkpoint import load_model, save_model
    from napari_dmoe.training import resume

    m = load_model(model)
    ckpt = save_model(tmp_path / "last.safetensors", m.network, m.spec)
    opt = torch.optim.SGD(m.network.parameters(), lr=0.1)
    resume.save_state(tmp_path, m.network, opt, {"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="no space left"):
        save_model(ckpt, m.network, m.spec)
    _full_disk(monkeypatch, after=1)  # the tensors are written, the scalars are not
    with pytest.raises(OSError, match="no space left"):
        resume.save_state(tmp_path, m.network, opt, {"step": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert resume.load_state(tmp_path, m.network, opt)["step"] == 1
    assert json.loads((tmp_path / resume.SCALARS).read_text())["step"] == 1


def test_full_disk_while_segmenting_leaves_the_old_mask_and_the_input(model, tmp_path, monkeypatch, capsys):
    src, out = png(tmp_path / "scan.png"), tmp_path / "mask.png"
    assert segment(model, src, "-a", "Black", "-o", out) == 0
    before, mask_before = src.read_bytes(), out.read_bytes()
    _full_disk(monkeypatch)
    assert segment(model, src, "-a", "White", "-o", out, "--overwrite", "--routing-out", tmp_path / "r") == 2
    assert "no space left on device" in capsys.readouterr().err
    assert src.read_bytes() == before and out.read_bytes() == mask_before
    assert leftovers(tmp_path) == [] and not any((tmp_path / "r").iterdir())
