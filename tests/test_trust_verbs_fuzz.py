"""Issue 28, hostile input for more verbs: ``dmoe info`` on tampered model headers, the recipe (config) loader on
random values and ``.seg.nrrd`` files with random bytes or headers give a result or one clean error line, never a
traceback. Also: DICOM SEG from anonymised series, formulas in report names, CSV rows without their image."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from napari_dmoe.cli.main import main

from inference_models import tiny

HUNT = "DMOE_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=int(os.environ.get("DMOE_FUZZ_EXAMPLES", "30")), deadline=None, derandomize=not HUNT,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True),
                              st.text(max_size=12)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4)),
                    max_leaves=12)


def clean_exit(code: int, err: str) -> None:
    """0, or 2 with one error line; never a traceback."""
    assert "Traceback" not in err, err
    assert code == 0 or (code == 2 and len([x for x in err.splitlines() if ": error: " in x]) == 1), (code, err)


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    from napari_dmoe.io.checkpoint import save_model

    m = tiny("transunet2d-tiny")
    path = save_model(tmp_path_factory.mktemp("m") / "a.safetensors", m.network, m.spec)
    return Blob(path.read_bytes())


class Blob(bytes):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example: not a megabyte of weights
        return f"Blob({len(self)} bytes)"


INFO_FIELDS = ["provenance", "metrics", "trained_on", "provenance.data", "provenance.finetune",
               "provenance.adaptation", "provenance.method", "metrics.classes", "metrics.test",
               "metrics.finetune_groups",
               "metrics.dice", "local_experts", "normalization", "arch_kwargs", "spacing", "class_names", "attributes"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(INFO_FIELDS), JSON, min_size=1, max_size=3))
@example(changes={"metrics.test": {"classes": {"rim": {"groups": [1]}}}})
@example(changes={"metrics.classes": {"rim": {"groups": 3}}, "provenance.data": {"train": {"n": 1, "groups": 2}}})
@example(changes={"metrics.finetune_groups": [{"before": "x", "agreement": [1]}],
                  "provenance.adaptation": {"groups": 3}})
def test_dmoe_info_on_tampered_headers(tmp_path, capsys, model_bytes, changes):
    src = tmp_path / "src.safetensors"
    src.write_bytes(model_bytes)
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    spec = json.loads(meta["dmoe_spec"])
    for key, value in changes.items():
        node, _, leaf = key.rpartition(".")
        if node and not isinstance(spec.get(node), dict):
            spec[node] = {}
        (spec[node] if node else spec)[leaf] = value
    meta["dmoe_spec"] = json.dumps(spec)
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, str(path), metadata=meta)
    for extra in ([], ["--json"]):
        code = main(["info", str(path), *extra])
        clean_exit(code, capsys.readouterr().err)


# -- the recipe loader ----------------------------------------------------------------------------------------------
RECIPE_KEYS = ["seed", "method", "recipe.lr", "recipe.grad_clip", "recipe.poly_power", "recipe.momentum",
               "recipe.steps", "recipe.batch_size", "recipe.warmup_steps", "recipe.sw_overlap", "augment.prob",
               "augment.gamma", "augment.low_res", "model.top_k", "model.n_experts", "data.size", "data.label_map",
               "data.attributes", "sampling.group_balance", "crossval.folds", "data.val_fraction", "recipe"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from training_data import write_folder

    return write_folder(tmp_path_factory.mktemp("d") / "data", n=6)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(RECIPE_KEYS), JSON, min_size=1, max_size=4))
@example(changes={"recipe.grad_clip": -1})
@example(changes={"recipe.poly_power": -1.0})
@example(changes={"recipe.lr": 1e400})
@example(changes={"data.attributes": [[]]})  # CI found: a list inside the list of names
@example(changes={"data.attributes": {"sex": [["F"], "M"]}})
@example(changes={"data.attributes": ["sex", "sex"]})
def test_recipe_loader_on_random_values(tmp_path, data_root, changes):
    from napari_dmoe.training.config import ConfigError, load_config

    config = {"output_dir": str(tmp_path / "out"), "model": {"preset": "transunet2d-tiny"},
              "data": {"format": "folder", "root": str(data_root), "csv": "dataset.csv",
                       "attributes": {"sex": ["F", "M"]}}, "recipe": {"steps": 2}}
    for key, value in changes.items():
        node, _, leaf = key.rpartition(".")
        if node and not isinstance(config.get(node), dict):
            config[node] = {}
        (config[node] if node else config)[leaf] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        loaded = load_config(path)
    except ConfigError:
        return
    recipe = loaded["recipe"]  # what loads is in range
    assert recipe["grad_clip"] is None or recipe["grad_clip"] > 0
    assert recipe["poly_power"] >= 0 and (recipe["lr"] is None or 0 < recipe["lr"] < float("inf"))


# -- .seg.nrrd input ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_bytes(tmp_path_factory) -> bytes:
    from napari_dmoe.io.slicer_seg import write_seg_nrrd

    path = tmp_path_factory.mktemp("s") / "a.seg.nrrd"
    write_seg_nrrd(path, (np.arange(6 * 7 * 5).reshape(5, 7, 6) % 3).astype(np.uint8), class_names=["bg", "a", "b"])
    return Blob(path.read_bytes())


def _read_clean(path: Path) -> None:
    import tracemalloc

    from napari_dmoe.io.images import ImageReadError, read_image

    tracemalloc.start()
    try:
        read_image(path)
    except ImageReadError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 200 * 2**20, peak


@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6))
def test_seg_nrrd_damaged_bytes(tmp_path, seg_bytes, cut, flips):
    data = bytearray(seg_bytes[: max(1, int(len(seg_bytes) * cut))])
    for where, value in flips:
        data[min(len(data) - 1, int(where * len(data)))] = value
    path = tmp_path / "x.seg.nrrd"
    path.write_bytes(bytes(data))
    _read_clean(path)


HEADER_LINES = st.sampled_from(["sizes: 100000 100000 100000", "sizes: -1 2 3", "sizes: 2 2", "dimension: 9",
                                "type: double", "type: nonsense", "encoding: raw", "encoding: bzip2",
                                "space directions: (0,0,0) (0,1,0) (0,0,1)", "space directions: (nan,0,0) none none",
                                "space origin: (inf,0,0)", "data file: other.raw", "sizes: 4294967296 1 1",
                                "Segment0_LabelValue:=abc", "Segment0_Layer:=7"])


@FUZZ
@given(lines=st.lists(HEADER_LINES, min_size=1, max_size=3))
def test_seg_nrrd_random_header_fields(tmp_path, seg_bytes, lines):
    head, _, body = seg_bytes.partition(b"\n\n")
    fields = {line.split(b":")[0]: line for line in head.split(b"\n")[1:]}
    for line in lines:
        fields[line.split(":")[0].encode()] = line.encode()
    path = tmp_path / "y.seg.nrrd"
    path.write_bytes(head.split(b"\n")[0] + b"\n" + b"\n".join(fields.values()) + b"\n\n" + body)
    _read_clean(path)


# -- 14. DICOM SEG from an anonymised series ---------------------------------------------------------------------
@pytest.mark.parametrize("drop", ["PatientBirthDate", "StudyTime", "PatientSex", "StudyDate", "PatientName",
                                  "PatientID", "StudyID", "AccessionNumber"])
def test_dicom_seg_of_a_series_without_type_2_attributes(tmp_path, drop):
    import highdicom as hd

    from napari_dmoe.io.dicom_seg import write_dicom_seg
    from napari_dmoe.io.images import read_image
    from test_dicom_seg import make_series

    make_series(tmp_path / "s", n=3, size=16)
    for f in sorted((tmp_path / "s").iterdir()):
        ds = pydicom.dcmread(f)
        delattr(ds, drop)
        ds.save_as(f)
    before = {f: f.read_bytes() for f in (tmp_path / "s").iterdir()}
    volume = read_image(tmp_path / "s")
    labels = np.zeros(volume.spatial_shape, np.uint8)
    labels[1, 4:9, 4:9] = 1
    write_dicom_seg(tmp_path / "seg.dcm", labels, volume, ["background", "lesion"])
    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    assert str(getattr(seg, drop)) == ""  # written empty, as Type 2 allows
    assert {f: f.read_bytes() for f in (tmp_path / "s").iterdir()} == before  # the sources untouched


def test_dicom_seg_without_a_type_1_attribute_is_refused_before_inference(tmp_path, capsys):
    from inference_models import make_model
    from test_dicom_seg import make_series

    model = make_model(tmp_path / "m.safetensors")
    make_series(tmp_path / "s", n=3, size=64)
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        del ds.StudyInstanceUID
        ds.save_as(f)
    assert main(["segment", str(model), str(tmp_path / "s"), "-a", "Black", "-o", str(tmp_path / "o.dcm"), "--force",
                 "-q",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "DICOM SEG needs StudyInstanceUID" in err and "save as .nii.gz" in err and ": infer" not in err


# -- 16. formulas in reports ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["=1+2", "+SUM(A1)", "-2+3", "@cmd", "\tx", "plain", "a=b"])
def test_report_csv_never_holds_a_formula_cell(tmp_path, name):
    from napari_dmoe.evaluation.metrics import PerImage
    from napari_dmoe.evaluation.report import write_report

    records = [PerImage(name, "=HYPERLINK(\"x\")", {"lesion": {"dice": 0.5, "iou": 0.33, "hd95": 1.0}})]
    _, path = write_report({}, records, tmp_path)
    with open(path, newline="", encoding="utf-8") as f:
        row = list(csv.reader(f))[1]
    assert row[0] == (name if name[0] not in "=+-@\t" else "'" + name) and row[1] == "'=HYPERLINK(\"x\")"
    assert row[2:] == ["0.5", "0.33", "1"]  # numbers stay numbers


# -- tracebacks that became messages -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, words", [("image,race\n,Black\n", ["line 2", "'image' cell is empty"]),
                                          ("image,race\na.png\n", []),  # a short row: the attribute is unknown
                                          ("race,image\nBlack\n", ["line 2", "'image' cell is empty"]),
                                          (b"image,race\n\xff\xfe.png,Black\n", ["not a UTF-8 text CSV"])])
def test_batch_csv_rows_without_their_image(tmp_path, text, words):
    from napari_dmoe.io.cases import read_batch_csv

    spec = tiny("transunet2d-tiny").spec
    path = tmp_path / "c.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    if not words:
        assert read_batch_csv(path, spec) == [("a.png", None)]
        return
    with pytest.raises(ValueError) as err:
        read_batch_csv(path, spec)
    assert all(w in str(err.value) for w in words) and str(path) in str(err.value)


@pytest.mark.parametrize("record", [{"spacing": "abc"}, {"intensity": {"case_p50": 5}}, {"spatial_dims": "2"},
                                    {"intensity": {"case_p50": [1, 2], "case_p99": [3], "p1": 0, "p99": 1}}])
def test_fit_check_on_a_tampered_trained_on_record(tmp_path, capsys, record):
    import dataclasses

    from napari_dmoe.inference.fit import check_fit
    from napari_dmoe.io.checkpoint import save_model
    from PIL import Image

    m = tiny("transunet2d-tiny")
    spec = dataclasses.replace(m.spec, trained_on={"spatial_dims": 2, "channels": 1, **record})
    key = next(iter(record))
    assert [f.kind for f in check_fit(spec, np.zeros((64, 64), np.float32))] == ["record"]
    path = save_model(tmp_path / "m.safetensors", m.network, spec)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "a.png")
    argv = ["segment", str(path), str(tmp_path / "a.png"), "-a", "Black", "-o", str(tmp_path / "o.png"), "-q",
            "--device", "cpu"]
    code = main(argv)
    clean_exit(code, err := capsys.readouterr().err)
    assert code == 2 and f"trained_on.{key} record is damaged" in err
