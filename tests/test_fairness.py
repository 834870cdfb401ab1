"""Fairness metrics on hand-made label maps whose Dice / IoU / HD95 / ES-Dice are worked out by hand."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from napari_dmoe.evaluation.metrics import (
    FairnessError,
    PerImage,
    equity_scaled,
    evaluate_image,
    group_means,
    image_metrics,
    metric_values,
)
from napari_dmoe.evaluation.plots import plot_expert_usage, plot_violins
from napari_dmoe.evaluation.report import bootstrap_ci, compare_reports, fairness_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def square(at: tuple[int, int], size: int = 2, shape=(8, 8), label: int = 1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    out[at[0] : at[0] + size, at[1] : at[1] + size] = label
    return out


def test_dice_iou_two_squares_overlapping_by_one_pixel():
    gt, pred = square((1, 1)), square((2, 2))
    m = image_metrics(pred, gt, n_classes=2)["class1"]
    assert m["dice"] == pytest.approx(2 * 1 / (4 + 4))  # 0.25
    assert m["iou"] == pytest.approx(1 / 7)  # union = 4 + 4 - 1
    assert image_metrics(gt, gt, 2)["class1"] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}


def test_hd95_known_distance_isotropic_and_anisotropic():
    gt = np.zeros((9, 9), dtype=np.int64)
    gt[2, 2] = 1
    down, right = np.zeros_like(gt), np.zeros_like(gt)
    down[5, 2] = 1  # 3 pixels along axis 0
    right[2, 6] = 1  # 4 pixels along axis 1
    assert image_metrics(down, gt, 2)["class1"]["hd95"] == pytest.approx(3.0)
    assert image_metrics(right, gt, 2)["class1"]["hd95"] == pytest.approx(4.0)
    spacing = (2.0, 0.5)  # physical size of a pixel along each array axis
    assert image_metrics(down, gt, 2, spacing=spacing)["class1"]["hd95"] == pytest.approx(6.0)
    assert image_metrics(right, gt, 2, spacing=spacing)["class1"]["hd95"] == pytest.approx(2.0)
    # 3D: two slices apart at 2.5 mm slice spacing.
    gt3, pred3 = np.zeros((5, 4, 4), np.int64), np.zeros((5, 4, 4), np.int64)
    gt3[1, 1, 1], pred3[3, 1, 1] = 1, 1
    assert image_metrics(pred3, gt3, 2, spacing=(2.5, 0.8, 0.8))["class1"]["hd95"] == pytest.approx(5.0)


def test_empty_mask_conventions_and_class_names():
    gt = square((1, 1), label=1)
    gt[5:7, 5:7] = 3  # class 3 only in gt; class 2 nowhere
    pred = square((1, 1), label=1)
    m = image_metrics(pred, gt, 4, class_names=["bg", "rim", "cup", "vessel"])
    assert list(m) == ["rim", "cup", "vessel"]
    assert m["cup"] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}  # both empty
    assert m["vessel"]["dice"] == 0.0 and m["vessel"]["iou"] == 0.0  # one empty
    assert math.isnan(m["vessel"]["hd95"])
    # Predicted but absent from the ground truth: same convention.
    m2 = image_metrics(gt, pred, 4)["class3"]
    assert (m2["dice"], m2["iou"]) == (0.0, 0.0) and math.isnan(m2["hd95"])


def test_bad_inputs_raise_clear_errors():
    gt = square((1, 1))
    with pytest.raises(FairnessError, match="shape"):
        image_metrics(gt[:4], gt, 2)
    with pytest.raises(FairnessError, match="labels 0..2"):
        image_metrics(gt * 3, gt, 3)
    with pytest.raises(FairnessError, match="non-integer"):
        image_metrics(gt * 0.5, gt, 2)
    with pytest.raises(FairnessError, match="spacing"):
        image_metrics(gt, gt, 2, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(FairnessError, match="class names"):
        image_metrics(gt, gt, 2, class_names=["lesion"])
    with pytest.raises(FairnessError, match="not in the records"):
        metric_values([evaluate_image("a", "g", gt, gt, 2)], "cup")
    with pytest.raises(FairnessError, match="no per-image records"):
        fairness_report([])


def three_images() -> list[PerImage]:
    """Group A: Dice 1 and 0.25; group B: Dice 0 (nothing predicted)."""
    gt = square((1, 1))
    return [
        evaluate_image("a1", "A", gt, gt, 2, class_names=["bg", "lesion"]),
        evaluate_image("a2", "A", square((2, 2)), gt, 2, class_names=["bg", "lesion"]),
        evaluate_image("b1", "B", np.zeros_like(gt), gt, 2, class_names=["bg", "lesion"]),
    ]


def test_group_means_and_es_dice_by_hand():
    records = three_images()
    by_group = group_means(records, "lesion")
    assert by_group == pytest.approx({"A": (1 + 0.25) / 2, "B": 0.0})
    overall = (1 + 0.25 + 0) / 3
    expected = overall / (1 + abs(0.625 - overall) + abs(0.0 - overall))
    assert equity_scaled(overall, by_group) == pytest.approx(expected)
    assert equity_scaled(0.5, [0.5, 0.5]) == 0.5  # no gap: ES equals the metric
    assert equity_scaled(0.5, {"A": 0.4, "B": math.nan}) == pytest.approx(0.5 / 1.1)  # absent group left out
    report = fairness_report(records, n_boot=50)
    lesion = report["classes"]["lesion"]
    assert lesion["dice"] == pytest.approx(overall)
    assert lesion["es_dice"] == pytest.approx(expected)
    iou_overall = (1 + 1 / 7) / 3
    iou_a = (1 + 1 / 7) / 2
    assert lesion["es_iou"] == pytest.approx(iou_overall / (1 + abs(iou_a - iou_overall) + iou_overall))
    assert lesion["worst_group"] == "B" and lesion["worst_group_dice"] == 0.0
    assert lesion["groups"]["A"]["n"] == 2 and lesion["groups"]["B"]["n"] == 1
    # a1: 0. a2: squares shifted by (1, 1); each pixel's distance to the other square is 0, 1, 1, sqrt(2);
    # their 95th percentile (linear interpolation, position 0.95 * 3) is 1 + 0.85 * (sqrt(2) - 1).
    assert lesion["hd95"] == pytest.approx((0 + 1 + 0.85 * (math.sqrt(2) - 1)) / 2)
    assert lesion["hd95_undefined"] == 1


def varied_records(n: int = 24) -> list[PerImage]:
    rng = np.random.default_rng(1)
    gt = square((2, 2), size=4, shape=(10, 10))
    records = []
    for i in range(n):
        pred = square(tuple(rng.integers(1, 4, size=2)), size=4, shape=(10, 10))
        records.append(evaluate_image(f"img{i}", "AB"[i % 2], pred, gt, 2))
    return records


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    records = varied_records()

    def mean_dice(rs):
        return float(metric_values(rs, "class1").mean())

    point = mean_dice(records)
    low, high = bootstrap_ci(records, mean_dice, n=200, seed=3)
    assert low < point < high
    assert bootstrap_ci(records, mean_dice, n=200, seed=3) == (low, high)
    assert bootstrap_ci(records, mean_dice, n=200, seed=4) != (low, high)

    # The report's vectorised bootstrap uses the same resamples as the generic one.
    def es_dice(rs):
        return equity_scaled(mean_dice(rs), group_means(rs, "class1"))

    report = fairness_report(records, n_boot=200, seed=3)
    ci = report["classes"]["class1"]["ci95"]
    assert ci["dice"] == pytest.approx([low, high])
    assert ci["es_dice"] == pytest.approx(list(bootstrap_ci(records, es_dice, n=200, seed=3)))
    assert ci["es_dice"][0] <= report["classes"]["class1"]["es_dice"] <= ci["es_dice"][1]
    a_dice = report["classes"]["class1"]["groups"]["A"]["dice"]
    assert ci["groups"]["A"]["dice"][0] <= a_dice <= ci["groups"]["A"]["dice"][1]


def test_report_json_and_csv_written_and_readable(tmp_path):
    records = three_images()
    report = fairness_report(records, ["lesion"], n_boot=20, name="baseline")
    json_path, csv_path = write_report(report, records, tmp_path / "out")
    loaded = json.loads(json_path.read_text())
    assert loaded["name"] == "baseline" and loaded["n_images"] == 3 and loaded["groups"] == ["A", "B"]
    assert loaded["classes"]["lesion"]["dice"] == pytest.approx(1.25 / 3)
    assert loaded["classes"]["lesion"]["groups"]["B"]["hd95"] is None  # undefined HD95 -> null, not NaN
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["a1", "a2", "b1"]
    assert list(rows[0]) == ["id", "group", "lesion_dice", "lesion_iou", "lesion_hd95"]
    assert float(rows[1]["lesion_dice"]) == pytest.approx(0.25)
    assert rows[2]["group"] == "B" and rows[2]["lesion_hd95"] == ""


def test_plots_are_valid_pngs(tmp_path):
    records = varied_records(12) + three_images()[:1]  # group "A" here has a single image: no violin
    records[-1].metrics = {"class1": records[-1].metrics["lesion"]}
    records[-1].group = "C"
    violins = plot_violins(records, ["class1"], tmp_path / "violins.png")
    usage = plot_expert_usage(np.random.default_rng(0).dirichlet(np.ones(8), size=3), ["Asian", "Black", "White"],
                              tmp_path / "usage.png")
    for path in (violins, usage):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    with pytest.raises(FairnessError, match="rows"):
        plot_expert_usage(np.ones((2, 8)), ["a", "b", "c"], tmp_path / "bad.png")


def test_compare_reports_lists_both_methods(tmp_path):
    records = three_images()
    write_report(fairness_report(records, n_boot=10), records, tmp_path / "baseline")
    better = three_images()[:2]
    write_report(fairness_report(better, n_boot=10, name="dMoE"), better, tmp_path / "run7")
    table = compare_reports([tmp_path / "baseline" / "report.json", tmp_path / "run7" / "report.json"])
    header = table.splitlines()[0]
    assert "baseline" in header and "dMoE" in header
    dice_row = next(line for line in table.splitlines() if line.startswith("| lesion Dice "))
    assert f"{1.25 / 3:.4f}" in dice_row and f"{0.625:.4f}" in dice_row
    group_b = next(line for line in table.splitlines() if "Dice [B]" in line)
    assert "0.0000" in group_b and "-" in group_b  # the second report has no group B
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(FairnessError, match="junk.json"):
        compare_reports([tmp_path / "junk.json"])
