"""``dmoe evaluate`` and ``dmoe compare`` on real model files and data written by the tests."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from napari_dmoe.io.checkpoint import save_model
from napari_dmoe.cli.main import main
from napari_dmoe.model import build_network, make_spec
from napari_dmoe.model.spec import Attribute
from training_data import tiny_config, write_fairseg, write_folder


def _model(path, routing="dmoe", attributes=None, class_names=("background", "rim", "cup")):
    spec = make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], list(class_names), routing=routing,
                     img_size=32, n_experts=4)
    if attributes:
        spec.attributes = attributes
    torch.manual_seed(0)
    return save_model(path, build_network(spec).eval(), spec)


@pytest.fixture
def fairseg_config(tmp_path):
    root = write_fairseg(tmp_path / "fairseg", n_train=3, n_test=6)
    return tiny_config(tmp_path / "data.yaml", tmp_path / "unused",
                       {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None})


@pytest.mark.slow
def test_evaluate_subprocess_writes_report_plots_and_heatmap(tmp_path, fairseg_config):
    model = _model(tmp_path / "dmoe.safetensors")
    out = tmp_path / "ev"
    proc = subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", "evaluate", str(model), str(fairseg_config),
                           "--out", str(out), "--n-boot", "50", "--device", "cpu", "--name", "dMoE"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["name"] == "dMoE" and report["n_images"] == 6 and report["groups"] == ["Asian", "Black", "White"]
    for cname in ("rim", "cup"):
        c = report["classes"][cname]
        assert {g["n"] for g in c["groups"].values()} == {2}
        assert c["es_dice"] <= c["dice"] + 1e-12 and len(c["ci95"]["dice"]) == 2
    with open(out / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {"rim_dice", "cup_hd95"} <= set(rows[0])
    # mean gate weights: each pixel's weights over experts sum to 1, so each group's row does too
    usage = report["expert_usage"]
    assert set(usage) == {"Asian", "Black", "White"}
    assert all(len(v) == 4 and sum(v) == pytest.approx(1.0, abs=1e-2) for v in usage.values())
    for png in ("violin_dice.png", "expert_usage.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_baseline_has_no_heatmap_and_compare_table(tmp_path, fairseg_config, capsys):
    a, b = _model(tmp_path / "base.safetensors", routing="none"), _model(tmp_path / "dmoe.safetensors")
    assert main(["evaluate", str(a), str(fairseg_config), "--out", str(tmp_path / "a"), "--n-boot", "20",
                 "--name", "baseline", "--device", "cpu", "--quiet"]) == 0
    assert main(["evaluate", str(b), str(fairseg_config), "--out", str(tmp_path / "b"), "--n-boot", "20",
                 "--name", "dmoe", "--device", "cpu", "--quiet"]) == 0
    assert not (tmp_path / "a" / "expert_usage.png").exists()
    capsys.readouterr()
    proc = subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", "compare", str(tmp_path / "a"),
                           str(tmp_path / "b" / "report.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split("|")[2].strip() == "baseline" and lines[0].split("|")[3].strip() == "dmoe"
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    es_row = next(line for line in lines if line.startswith("| rim ES-Dice"))
    assert f"{rep['classes']['rim']['es_dice']:.4f}" in es_row


def test_intersectional_report_per_combination_and_per_attribute(tmp_path):
    root = write_folder(tmp_path / "folder", n=12)
    rows = (root / "dataset.csv").read_text().splitlines()
    (root / "dataset.csv").write_text("\n".join([rows[0] + ",site"] + [r + "," + "ab"[i % 3 == 0] for i, r in
                                                                       enumerate(rows[1:])]) + "\n")
    cfg = tiny_config(tmp_path / "d.yaml", tmp_path / "unused",
                      {"format": "folder", "root": str(root), "split_column": "split",
                       "attributes": {"sex": ["F", "M"], "site": ["a", "b"]}})
    attrs = [Attribute("sex", ["F", "M"]), Attribute("site", ["a", "b"])]
    model = _model(tmp_path / "x.safetensors", attributes=attrs, class_names=("background", "disc"))
    assert main(["evaluate", str(model), str(cfg), "--out", str(tmp_path / "ev"), "--n-boot", "10",
                 "--device", "cpu", "--quiet"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    # test rows 9, 10, 11: sex M, F, M; site b, a, a  -> combinations and single attributes
    assert report["groups"] == ["F/a", "M/a", "M/b"]
    assert report["by_attribute"]["sex"]["groups"] == ["F", "M"]
    assert report["by_attribute"]["site"]["groups"] == ["a", "b"]
    assert report["by_attribute"]["sex"]["classes"]["disc"]["groups"]["M"]["n"] == 2
    assert report["by_attribute"]["site"]["classes"]["disc"]["groups"]["b"]["n"] == 1


def test_evaluate_errors_are_one_clear_line(tmp_path, fairseg_config, capsys):
    model = _model(tmp_path / "m.safetensors")
    assert main(["evaluate", str(model), str(fairseg_config), "--out", str(tmp_path / "o"), "--split", "val",
                 "--set", "data.val_fraction=0"]) == 2
    assert "the val split" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nothing.json")]) == 2
    assert "run `dmoe evaluate` first" in capsys.readouterr().err
