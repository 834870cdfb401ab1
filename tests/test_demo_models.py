"""The shipped demo models: they load, carry provenance and metrics, fit the size budget and segment the samples.

Sample thresholds: the shipped models score rim 0.77 / cup 0.88 on the fundus sample (race Black) and CTV 0.88
on the prostate sample (T3); on the test split the dMoE models' group means are 0.79-0.85 (rim, Black lowest,
95 % CI down to 0.76), 0.80-0.84 (cup) and 0.79-0.87 (CTV, T4 lowest). The bounds sit below those CIs so that a retrained model
passes, and far above what a broken pipeline gives (wrong spacing, normalisation or router mapping, untrained
weights: Dice near 0).

The skin model scores lesion 0.92 on the napari skin sample (age 80+; its test-split 80+ group: 0.926, 95 % CI
0.919-0.932) and 0.61 when told the wrong age (0-19, whose annotators leave out the faint periphery): the router,
not only the image, sets where the boundary goes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_dmoe.io.checkpoint import load_model, read_spec
from napari_dmoe.cli.demo_pictures import MODELS_DIR, demo_cases
from napari_dmoe.evaluation.metrics import image_metrics
from napari_dmoe.inference.engine import segment

ROOT = Path(__file__).resolve().parents[1]
MODELS = {name: MODELS_DIR / f"{name}-dmoe.safetensors" for name in ("fundus", "prostate", "skin")}
# Minimum foreground Dice on the bundled napari/demo sample (one inference each); see the module docstring.
MIN_SKIN_SAMPLE_DICE = 0.8
MIN_SAMPLE_DICE = {"fundus": {"rim": 0.6, "cup": 0.6}, "prostate": {"CTV": 0.7}, "skin": {"lesion": MIN_SKIN_SAMPLE_DICE}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shipped_model_has_provenance_and_metrics(name):
    spec = read_spec(MODELS[name])  # header only: no weights needed to see where a model came from
    prov = spec.provenance
    assert prov["method"] == "dmoe" and spec.routing == "dmoe"
    assert prov["seed"] == 1234
    assert "train" in prov["command"] and prov["config"]["name"] == f"demo-{name}-dmoe"
    assert (ROOT / "training" / f"demo-{name}-dmoe.yaml").is_file()
    command = prov["benchmark_command"].split()  # the whole script, or a rerun of this model's lane
    assert command[:2] == ["bash", "sample_data/train_demo_models.sh"] and set(command[2:]) <= {name}
    assert "git_commit" in prov and prov["data"]["train"]["n"] > 0
    assert spec.metrics["split"] == "val" and set(spec.metrics["groups"]) == set(spec.attributes[0].values)
    test = spec.metrics["test"]
    assert test["split"] == "test" and test["n"] > 0
    for row in test["classes"].values():
        assert set(row["groups"]) <= set(spec.attributes[0].values)
        assert row["worst_group_dice"] == min(g["dice"] for g in row["groups"].values())


def test_shipped_models_fit_the_size_budget():
    sizes = {name: path.stat().st_size for name, path in MODELS.items()}
    assert sum(sizes.values()) < 16e6, sizes  # the issue asks for "well under 20 MB" all together


def test_shipped_metrics_match_the_benchmark_results():
    summary = json.loads((ROOT / "sample_data/results/summary.json").read_text())
    for name, path in MODELS.items():
        shipped = read_spec(path).metrics["test"]["classes"]
        bench = {r["class"]: r for r in summary[name]["rows"]["dmoe"]}
        for cname, row in shipped.items():
            assert row["dice"] == pytest.approx(bench[cname]["dice"])


@pytest.mark.parametrize("case", demo_cases(), ids=lambda c: c.name)
def test_demo_model_segments_the_bundled_sample(case):
    model = load_model(MODELS[case.name])
    assert model.spec.spatial_dims == case.image.ndim - case.rgb
    result = segment(model, case.image, case.attribute, spacing=case.spacing, device="cpu")
    assert result.labels.shape == case.truth.shape
    assert result.attribute == case.attribute  # the sample's own router was used, not a fallback average
    scores = image_metrics(result.labels, case.truth, model.spec.n_classes, spacing=case.spacing,
                           class_names=model.spec.class_names)
    for cname, minimum in MIN_SAMPLE_DICE[case.name].items():
        assert scores[cname]["dice"] > minimum, (cname, scores)
    assert np.isfinite(result.probabilities.astype(np.float32)).all()


def test_benchmark_summary_is_rebuilt_from_the_reports(tmp_path, capsys):
    """benchmark_fairness.py recomputes the table, target check and figure from the per-method reports."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("benchmark_fairness", ROOT / "sample_data/benchmark_fairness.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for dataset in bench.DATASETS:
        for method in bench.METHODS:
            src = ROOT / "sample_data/results" / dataset / method / "report.json"
            if not src.is_file():  # the skin lane trains baseline and dMoE only
                continue
            (tmp_path / dataset / method).mkdir(parents=True)
            shutil.copy(src, tmp_path / dataset / method / "report.json")
    assert bench.main(["--results", str(tmp_path), "--runs", str(tmp_path / "none")]) == 0
    last = dict(p.split("=", 1) for p in capsys.readouterr().out.strip().splitlines()[-1].split())  # key=value, last
    assert last["bench"] == "fairness" and "prostate_worst_group_gain" in last
    summary = json.loads((tmp_path / "summary.json").read_text())
    report = json.loads((tmp_path / "prostate/dmoe/report.json").read_text())["classes"]["CTV"]
    base = json.loads((tmp_path / "prostate/baseline/report.json").read_text())["classes"]["CTV"]
    check = summary["prostate"]["target"]
    assert check["worst_group_gain"] == pytest.approx(report["worst_group_dice"] - base["worst_group_dice"])
    assert check["worst_group_gain_ok"] == (check["worst_group_gain"] >= bench.TARGET_GAIN)
    fundus_mean = summary["fundus"]["rows"]["dmoe"][-1]
    assert fundus_mean["class"] == "mean"
    assert fundus_mean["worst_group_dice"] == min(g["dice"] for g in fundus_mean["groups"].values())
    assert (tmp_path / "per_group_dice.png").stat().st_size > 10_000
    assert "| dmoe | CTV |" in (tmp_path / "benchmark.md").read_text()
    assert summary == json.loads((ROOT / "sample_data/results/summary.json").read_text())  # shipped = recomputed


def test_skin_model_segments_the_napari_skin_sample():
    """The skin demo model is conditioned on the skin sample's attribute (age, 80+) and finds its lesion."""
    from napari_dmoe.plugin.samples import skin_sample

    (image, image_kw, _), (truth, _, _) = skin_sample()
    (name, value), = image_kw["metadata"]["dmoe_attributes"].items()
    model = load_model(MODELS["skin"])
    assert [a.name for a in model.spec.attributes] == [name] and model.spec.class_names == ["background", "lesion"]
    assert value in model.spec.attributes[0].values and model.spec.in_channels == 3
    result = segment(model, image, {name: value}, device="cpu")
    assert result.labels.shape == truth.shape and result.attribute == {name: value}
    scores = image_metrics(result.labels, truth, model.spec.n_classes, spacing=(1.0, 1.0),
                           class_names=model.spec.class_names)
    assert scores["lesion"]["dice"] > MIN_SKIN_SAMPLE_DICE, scores
    # the youngest group's router draws the boundary at the visible edge, leaving out the 80+ periphery
    young = segment(model, image, {name: "0-19"}, device="cpu")
    young_dice = image_metrics(young.labels, truth, 2, spacing=(1.0, 1.0), class_names=model.spec.class_names)
    assert young_dice["lesion"]["dice"] < scores["lesion"]["dice"] - 0.1, (young_dice, scores)
    assert young.labels.sum() < result.labels.sum()


@pytest.mark.gui
def test_segment_widget_picks_the_skin_model_for_the_skin_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", "Segment (dMoE)")
    widget.models.refresh(select=str(MODELS["fundus"]))
    assert [a.name for a in widget.spec.attributes] == ["race"]
    viewer.open_sample("napari-dmoe", "skin")
    assert widget.models.path() == str(MODELS["skin"])
    assert widget.attributes.values() == {"age": "80+"}
    assert "skin-dmoe" in widget.status.text()
