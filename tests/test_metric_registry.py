"""A metric registered in evaluation/metrics.py reaches dmoe evaluate's report and CSV, validation during
training and the comparison table, with no other edit."""
from __future__ import annotations

import json

import numpy as np
import pytest

from napari_dmoe.evaluation import metrics
from napari_dmoe.evaluation.metrics import Metric, evaluate_image, register_metric
from napari_dmoe.evaluation.report import compare_reports, fairness_report, write_report


def _volume_ratio(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """Predicted over true area: a made-up metric, easy to check by hand."""
    return float(pred.sum()) / max(float(truth.sum()), 1.0)


@pytest.fixture
def with_ratio(monkeypatch):
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))  # the registry, restored after the test
    import napari_dmoe.evaluation.report as report

    monkeypatch.setattr(report, "METRICS", metrics.METRICS)
    register_metric(Metric("area_ratio", "area ratio", _volume_ratio, equity_scaled=True))
    yield


def _records():
    truth = np.zeros((8, 8), np.int64)
    truth[2:6, 2:6] = 1  # 16 pixels
    half = truth.copy()
    half[2:4] = 0  # 8 pixels predicted
    return [evaluate_image("a", "Asian", truth, truth, 2), evaluate_image("b", "Black", half, truth, 2)]


def test_a_registered_metric_reaches_records_report_csv_and_table(with_ratio, tmp_path):
    records = _records()
    assert [r.metrics["class1"]["area_ratio"] for r in records] == [1.0, 0.5]
    report = fairness_report(records, n_boot=20)
    cls = report["classes"]["class1"]
    assert cls["area_ratio"] == pytest.approx(0.75) and cls["groups"]["Black"]["area_ratio"] == 0.5
    assert cls["es_area_ratio"] == pytest.approx(0.75 / (1 + 0.25 + 0.25))  # FairSeg's equity scaling
    assert "es_area_ratio" in cls["ci95"] and "area_ratio" in report["mean_over_classes"]
    json_path, csv_path = write_report(report, records, tmp_path)
    assert "class1_area_ratio" in csv_path.read_text().splitlines()[0]
    assert "class1 area ratio" in compare_reports([json_path]) and "ES-area ratio" in compare_reports([json_path])
    assert json.loads(json_path.read_text())["classes"]["class1"]["area_ratio"] == pytest.approx(0.75)


def test_a_registered_metric_reaches_validation(with_ratio):
    import torch
    from torch.utils.data import Dataset

    from inference_models import tiny
    from napari_dmoe.training.validate import validate

    model = tiny("transunet2d-tiny")
    size = model.spec.input_size

    class Items(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            label = torch.zeros(size, dtype=torch.long)
            label[4:12, 4:12] = 1
            return {"image": torch.rand(model.spec.in_channels, *size), "attr": torch.tensor(i), "id": str(i),
                    "group": ["Asian", "Black"][i], "label": label}

    summary = validate(model.network, Items(), model.spec, torch.device("cpu"), lambda a: a)
    for cls in summary["classes"].values():  # every class of the model (rim, cup)
        assert "area_ratio" in cls and "es_area_ratio" in cls and cls["area_ratio"] >= 0


def test_registering_a_taken_key_is_refused(with_ratio):
    with pytest.raises(ValueError, match="'dice'"):
        register_metric(Metric("dice", "Dice again", _volume_ratio))
