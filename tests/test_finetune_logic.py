"""Fine-tune logic without Qt: defaults, split, export (read back by the real dataset), config (checked by the
engine's schema), JSON-lines events, process control with real subprocesses, before/after rows."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_dmoe.finetune.prepare import (
    GiB,
    FinetuneError,
    FinetuneSettings,
    TrainingPair,
    build_config,
    default_settings,
    export_pairs,
    split_validation,
    write_config,
)
from napari_dmoe.finetune.compare import compare_metrics
from napari_dmoe.finetune.run_state import EventReader, RunState
from napari_dmoe.finetune.process import TrainingProcess, train_command
from napari_dmoe.model import make_spec


@pytest.fixture
def spec():
    return make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], ["background", "disc"])


def _pairs(n: int, rng: np.random.Generator) -> list[TrainingPair]:
    values = ["Asian", "Black", "White"]
    out = []
    for i in range(n):
        image = rng.normal(100, 20, (40, 48)).astype(np.float32)
        labels = np.zeros((40, 48), np.int32)
        labels[10:20 + i, 12:30] = 1
        out.append(TrainingPair(f"case {i}", image, labels, {"race": values[i % 3]}))
    return out


def test_default_settings_follow_free_memory():
    small = default_settings("cuda", 2 * GiB, spatial_dims=2)
    big = default_settings("cuda", 40 * GiB, spatial_dims=2)
    assert small.batch_size < big.batch_size <= 16
    assert big.amp and big.device == "cuda"
    vol_small, vol_big = default_settings("cuda", 8 * GiB, 3), default_settings("cuda", 80 * GiB, 3)
    assert vol_small.batch_size < vol_big.batch_size
    assert vol_small.batch_size < default_settings("cuda", 8 * GiB, 2).batch_size  # a 3D patch costs more
    cpu = default_settings("cpu", 64 * GiB, 2)
    assert not cpu.amp and cpu.batch_size <= 4 and cpu.steps < big.steps
    assert default_settings("cpu", None).batch_size >= 1  # unknown memory still gives usable defaults
    local = default_settings("cpu", 64 * GiB, 2, trainable="group_local")  # its own lr and local experts
    assert local.trainable == "group_local" and local.lr > cpu.lr and local.local_experts >= 1
    assert local.batch_size == cpu.batch_size and cpu.local_experts == 1
    assert local.folds >= 2 and cpu.folds == 0  # group-local picks its steps by cross-validation (crossval.py)


def test_split_holds_back_at_least_one_and_leaves_one():
    flags = split_validation(10, 0.2, seed=3)
    assert sum(flags) == 2 and len(flags) == 10
    assert sum(split_validation(2, 0.2)) == 1
    assert sum(split_validation(3, 0.01)) == 1  # rounded up: never zero
    assert split_validation(4, chosen=[0, 3]) == [True, False, False, True]
    with pytest.raises(FinetuneError, match="at least 2 pairs"):
        split_validation(1)
    with pytest.raises(FinetuneError, match="leave at least one"):
        split_validation(2, chosen=[0, 1])
    with pytest.raises(FinetuneError, match="do not exist"):
        split_validation(3, chosen=[5])


def test_export_is_read_back_by_the_training_dataset(tmp_path, spec):
    from napari_dmoe.datasets.formats import GenericFolderDataset

    pairs = _pairs(4, np.random.default_rng(0))
    pairs.append(TrainingPair("case 0", pairs[0].image, pairs[0].labels, {"race": "Asian"}))  # same layer twice
    summary = export_pairs(pairs, tmp_path / "data", spec, [False, True, False, False, False])
    assert summary.val == ["case_1"] and len(summary.train) == 4 and "case_0_2" in summary.train
    assert summary.counts == {"race": {"Asian": 3, "Black": 1, "White": 1}}
    assert summary.val_counts == {"race": {"Black": 1}}
    ds = GenericFolderDataset(summary.csv_path, spec, n_classes=2)
    assert len(ds) == 5
    item = ds[1]
    np.testing.assert_allclose(item["image"][0], pairs[1].image)  # float intensities kept exactly
    np.testing.assert_array_equal(item["label"], pairs[1].labels)
    assert item["group"] == "Black" and item["attr"] == 1
    text = summary.csv_path.read_text()
    assert text.splitlines()[0] == "image,mask,race,split" and text.count(",val") == 1


def test_export_rejects_bad_pairs_with_clear_messages(tmp_path, spec):
    good = _pairs(1, np.random.default_rng(0))[0]
    cases = [
        (TrainingPair("a", good.image, good.labels[:-1], {"race": "Asian"}), "differs from the image"),
        (TrainingPair("b", good.image, good.labels * 3, {"race": "Asian"}), "relabel"),
        (TrainingPair("c", good.image, good.labels, {"race": "Martian"}), "not in the model's vocabulary"),
        (TrainingPair("d", good.image, good.labels.astype(float), {"race": "Asian"}), "Labels layer"),
    ]
    for pair, message in cases:
        with pytest.raises(FinetuneError, match=message):
            export_pairs([pair], tmp_path / pair.name, spec, [False])


def test_config_passes_the_engine_schema(tmp_path, spec):
    from napari_dmoe.io.checkpoint import save_model
    from napari_dmoe.model import build_network
    from napari_dmoe.training.config import load_config

    base = save_model(tmp_path / "base.safetensors", build_network(spec), spec)
    summary = export_pairs(_pairs(3, np.random.default_rng(1)), tmp_path / "data", spec, [False, False, True])
    settings = FinetuneSettings(steps=7, lr=0.003, batch_size=2, trainable="routers_experts")
    config = build_config(base, spec, summary, tmp_path / "out", settings)
    path = write_config(config, tmp_path / "ft.yaml")
    loaded = load_config(path)  # the engine's own validation
    assert loaded["model"]["base_model"] == str(base.resolve())
    assert loaded["model"]["preset"] == "transunet2d-tiny"
    assert loaded["recipe"]["steps"] == 7 and loaded["recipe"]["lr"] == 0.003
    assert loaded["trainable"] == "routers_experts" and loaded["method"] == "dmoe"
    assert loaded["data"]["split_column"] == "split" and loaded["data"]["size"] == [64, 64]
    assert loaded["data"]["attributes"] == [{"name": "race", "values": ["Asian", "Black", "White"]}]
    with pytest.raises(FinetuneError, match="steps"):
        build_config(base, spec, summary, tmp_path / "out", FinetuneSettings(steps=0))
    plain = make_spec("transunet2d-tiny", "race", ["Asian"], ["background", "disc"], routing="none")
    with pytest.raises(FinetuneError, match="no routers"):
        build_config(base, plain, summary, tmp_path / "out", settings)


def test_event_reader_handles_partial_lines_and_noise(tmp_path):
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.read() == []  # file not there yet
    with open(path, "w") as fh:
        fh.write('{"event": "start", "total_steps": 4}\n{"event": "step", "st')
    assert [e["event"] for e in reader.read()] == ["start"]
    with open(path, "a") as fh:
        fh.write('ep": 1, "loss": 0.9}\nnot json\n{"event": "val", "step": 1, "groups": {"Asian": {"dice": 0.5}}}\n')
    events = reader.read()
    assert [e["event"] for e in events] == ["step", "val"] and events[0]["step"] == 1
    assert reader.bad_lines == ["not json"]
    state = RunState()
    for e in [{"event": "start", "total_steps": 4}, *events]:
        state.apply(e)
    assert state.total_steps == 4 and state.losses == [(1, 0.9)] and state.val == {"Asian": [(1, 0.5)]}
    state.apply({"event": "val", "step": 2, "dice": {"Black": 0.25}, "mean_dice": 0.3})
    assert state.val["Black"] == [(2, 0.25)] and state.val["all"] == [(2, 0.3)]
    state.apply({"event": "done", "best": "/x/best.safetensors"})
    assert state.done and state.best == "/x/best.safetensors"


FAKE_ENGINE = r"""
import json, sys, time
out = open(sys.argv[1], "a")
def emit(**e):
    out.write(json.dumps(e) + "\n"); out.flush()
emit(event="start", total_steps=int(sys.argv[2]))
for i in range(1, int(sys.argv[2]) + 1):
    time.sleep(float(sys.argv[3]))
    emit(event="step", step=i, loss=1.0 / i)
if sys.argv[4] == "fail":
    print("Traceback ...\nConfigError: config key 'recipe.lr': must be positive", file=sys.stderr)
    sys.exit(2)
emit(event="done", best="best.safetensors")
"""


def _fake(tmp_path: Path, steps: int, delay: float, mode: str) -> TrainingProcess:
    events = tmp_path / "events.jsonl"
    cmd = [sys.executable, "-c", FAKE_ENGINE, str(events), str(steps), str(delay), mode]
    return TrainingProcess(cmd, tmp_path, events=events)


def _wait(process: TrainingProcess, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while process.returncode is None and time.monotonic() < end:
        process.poll()
        time.sleep(0.02)


def test_process_reports_events_eta_and_success(tmp_path):
    process = _fake(tmp_path, steps=5, delay=0.05, mode="ok")
    process.start()
    _wait(process)
    assert process.returncode == 0 and process.failure() is None
    assert process.state.step == 5 and process.state.done and len(process.state.losses) == 5
    assert process.state.eta_seconds() == 0


def test_process_failure_is_readable(tmp_path):
    process = _fake(tmp_path, steps=1, delay=0.0, mode="fail")
    process.start()
    _wait(process)
    assert process.returncode == 2
    assert process.failure() == "ConfigError: config key 'recipe.lr': must be positive"
    assert "Traceback" in process.stderr_tail()


def test_stop_terminates_a_running_process(tmp_path):
    process = _fake(tmp_path, steps=1000, delay=0.05, mode="ok")
    process.start()
    end = time.monotonic() + 20
    while process.state.step < 2 and time.monotonic() < end:
        process.poll()
        time.sleep(0.02)
    assert process.running()
    code = process.stop(timeout=5)
    assert code is not None and code != 0 and not process.running()
    assert 2 <= process.state.step < 1000


def test_train_command_uses_this_interpreter(tmp_path):
    cmd = train_command(tmp_path / "c.yaml", tmp_path / "e.jsonl", "cpu", ["recipe.steps=3"])
    assert cmd[0] == sys.executable and cmd[1:4] == ["-m", "napari_dmoe.cli.main", "train"]
    assert cmd[cmd.index("--events") + 1] == str(tmp_path / "e.jsonl")
    assert cmd[-2:] == ["--device", "cpu"] and "recipe.steps=3" in cmd


def test_compare_rows():
    rows = compare_metrics({"Asian": 0.5, "all": 0.6}, {"Asian": 0.7, "Black": 0.2, "all": 0.65})
    assert [r[0] for r in rows] == ["Asian", "Black", "all"]
    assert rows[0][3] == pytest.approx(0.2) and math.isnan(rows[1][1]) and rows[2][3] == pytest.approx(0.05)
    assert json.dumps(rows, allow_nan=True)


def test_3d_pairs_export_and_config(tmp_path):
    from napari_dmoe.datasets.formats import GenericFolderDataset
    from napari_dmoe.training.config import validate

    spec = make_spec("resunet3d-tiny", "stage", ["T1", "T2"], ["background", "prostate"], spacing=[2.0, 1.0, 1.0])
    rng = np.random.default_rng(2)
    pairs = []
    for i in range(2):
        labels = np.zeros((12, 20, 24), np.uint8)
        labels[3:9, 5:15, 6:18] = 1
        pairs.append(TrainingPair(f"vol{i}", rng.normal(0, 1, labels.shape).astype(np.float32), labels,
                                  {"stage": ["T1", "T2"][i]}))
    summary = export_pairs(pairs, tmp_path / "data", spec, [False, True])
    ds = GenericFolderDataset(summary.csv_path, spec, n_classes=2)
    item = ds[0]
    assert item["image"].shape == (1, 12, 20, 24) and item["label"].shape == (12, 20, 24)
    np.testing.assert_array_equal(item["label"], pairs[0].labels)
    settings = FinetuneSettings(steps=2, batch_size=4, patch_size=[32, 32, 32])
    from napari_dmoe.io.checkpoint import save_model
    from napari_dmoe.model import build_network

    base = save_model(tmp_path / "base3d.safetensors", build_network(spec), spec)
    config = validate(build_config(base, spec, summary, tmp_path / "out", settings), base_dir=tmp_path)
    assert config["model"]["overrides"] == {"input_size": [32, 32, 32], "spacing": [2.0, 1.0, 1.0]}
    assert config["data"]["size"] is None  # whole volumes; the engine crops patches of input_size
    assert config["recipe"]["name"] == "3d" and config["recipe"]["batch_size"] == 1  # only 1 training case


def test_3d_export_keeps_the_layer_spacing_and_trains_at_the_model_spacing(tmp_path):
    """3D layers with scale (3, 1.5, 1.5) go out as NIfTI with that voxel size; training resamples them to the
    model's 3 mm as the Segment widget would; the exported config runs."""
    from types import SimpleNamespace

    import nibabel as nib

    from napari_dmoe.io.checkpoint import load_model, save_model
    from napari_dmoe.datasets.formats import GenericFolderDataset
    from napari_dmoe.io.images import read_image
    from napari_dmoe.finetune.prepare import pairs_from_layers
    from napari_dmoe.model import build_network
    from napari_dmoe.training.config import validate
    from napari_dmoe.training.engine import train

    spec = make_spec("resunet3d-tiny", "stage", ["T1", "T2"], ["background", "prostate"], spacing=[3.0, 3.0, 3.0])
    rng, layers, rows = np.random.default_rng(4), {}, []
    for i in range(2):
        labels = np.zeros((12, 20, 24), np.int32)
        labels[3:9, 5:15 + i, 6:18] = 1
        image = (rng.normal(0, 1, labels.shape) + 3 * labels).astype(np.float32)
        layers[f"vol{i}"] = SimpleNamespace(data=image, rgb=False, scale=np.array([3.0, 1.5, 1.5]))
        layers[f"vol{i} truth"] = SimpleNamespace(data=labels, scale=np.array([3.0, 1.5, 1.5]))
        rows.append((f"vol{i}", f"vol{i} truth", {"stage": ["T1", "T2"][i]}, i == 1))
    pairs, is_val = pairs_from_layers(layers, rows)
    assert pairs[0].spacing == (3.0, 1.5, 1.5)
    summary = export_pairs(pairs, tmp_path / "data", spec, is_val)
    assert summary.csv_path.read_text().splitlines()[1].startswith("images/vol0.nii.gz,masks/vol0.nii.gz,T1,")
    for kind in ("images", "masks"):
        header = nib.load(tmp_path / "data" / kind / "vol0.nii.gz").header
        assert header.get_zooms() == pytest.approx((1.5, 1.5, 3.0))  # x, y, z
    volume = read_image(tmp_path / "data" / "images" / "vol0.nii.gz")
    assert volume.spacing == pytest.approx((3.0, 1.5, 1.5))
    np.testing.assert_array_equal(volume.array, layers["vol0"].data)  # same voxel order as the layer, no flips
    mask = read_image(tmp_path / "data" / "masks" / "vol0.nii.gz").array
    np.testing.assert_array_equal(mask, layers["vol0 truth"].data)
    ds = GenericFolderDataset(summary.csv_path, spec, n_classes=2, spacing=spec.spacing)
    assert ds[0]["image"].shape == (1, 12, 10, 12) and set(np.unique(ds[0]["label"])) == {0, 1}

    base = save_model(tmp_path / "base3d.safetensors", build_network(spec), spec)
    settings = FinetuneSettings(steps=2, batch_size=1, patch_size=[64, 64, 64], val_every=2)
    config = validate(build_config(base, spec, summary, tmp_path / "out", settings), base_dir=tmp_path)
    best = train(config, device="cpu", quiet=True)
    trained = load_model(best).spec
    assert trained.spacing == [3.0, 3.0, 3.0]
    assert trained.provenance["data"]["train"]["spacing"] == {"target": [3.0, 3.0, 3.0], "resampled": 1,
                                                               "unknown": 0}


def test_extra_csv_rows_are_appended_with_absolute_paths(tmp_path, spec):
    import tifffile

    from napari_dmoe.datasets.formats import GenericFolderDataset
    from napari_dmoe.finetune.prepare import append_csv_rows

    summary = export_pairs(_pairs(2, np.random.default_rng(3)), tmp_path / "run", spec, [False, True])
    user = tmp_path / "user"
    (user / "img").mkdir(parents=True)
    tifffile.imwrite(user / "img" / "u1.tif", np.ones((40, 48), np.float32))
    tifffile.imwrite(user / "img" / "u1_mask.tif", np.zeros((40, 48), np.uint8))
    table = user / "list.csv"
    table.write_text("image,mask,race\nimg/u1.tif,img/u1_mask.tif,White\n")
    assert append_csv_rows(summary.csv_path, table, spec) == 1
    ds = GenericFolderDataset(summary.csv_path, spec, n_classes=2)
    assert len(ds) == 3 and ds[2]["group"] == "White"
    assert append_csv_rows(summary.csv_path, "", spec) == 0
    table.write_text("image,mask\nimg/u1.tif,img/u1_mask.tif\n")
    with pytest.raises(FinetuneError, match=r"missing \['race'\]"):
        append_csv_rows(summary.csv_path, table, spec)
    table.write_text("image,mask,race\nimg/nope.tif,img/u1_mask.tif,White\n")
    with pytest.raises(FinetuneError, match="not found"):
        append_csv_rows(summary.csv_path, table, spec)


def test_pairs_from_layer_rows():
    from types import SimpleNamespace

    from napari_dmoe.finetune.prepare import pairs_from_layers

    img, lab = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8)
    layers = {"a": SimpleNamespace(data=img, rgb=False), "a truth": SimpleNamespace(data=lab),
              "b": SimpleNamespace(data=img, rgb=False), "b truth": SimpleNamespace(data=lab)}
    rows = [("a", "a truth", {"race": "Asian"}, False), ("b", "b truth", {"race": "Black"}, True)]
    pairs, is_val = pairs_from_layers(layers, rows)
    assert [p.name for p in pairs] == ["a", "b"] and is_val == [False, True] and pairs[1].labels is lab
    with pytest.raises(FinetuneError, match="at least two pairs"):
        pairs_from_layers(layers, rows[:1])
    assert pairs_from_layers(layers, rows[:1], extra_data=True)[1] == [True]  # the CSV trains, the layer validates
    with pytest.raises(FinetuneError, match="not open"):
        pairs_from_layers(layers, [("gone", "a truth", {}, False), *rows])
