"""Issue 26, seventh step: the site calibration of a 2D model's field of view (``inference.scale``, ``--zoom``,
``dmoe calibrate``): measured on unlabelled images, undone before the model, mapped back after it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_dmoe.cli.main import main
from napari_dmoe.inference.plan import InferenceError
from napari_dmoe.inference.scale import (ZOOM_RANGE, check_zoom, foreground_radius, measure, site_zoom, zoom_back,
                                         zoom_image)

from inference_models import TinyModel, tiny

SHIPPED = Path(__file__).resolve().parents[1] / "napari_dmoe" / "assets" / "models" / "fundus-dmoe.safetensors"


def disc(size: int, radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    cy, cx = centre or ((size - 1) / 2, (size - 1) / 2)
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.uint8)


class BrightIsForeground(torch.nn.Module):
    """A 'network' that labels what is brighter than the image mean as class 1: a segmentation we can predict."""

    def forward(self, x: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        fg = 20.0 * x[:, :1]
        return torch.cat([torch.zeros_like(fg), fg, torch.full_like(fg, -50.0)], dim=1)


def threshold_model() -> TinyModel:
    model = tiny("transunet2d-tiny", routing="none")
    return TinyModel(model.spec, BrightIsForeground())


def test_foreground_radius_of_a_disc_is_its_radius_over_the_side():
    assert foreground_radius(disc(200, 30)) == pytest.approx(30 / 200, rel=0.01)
    assert foreground_radius(np.zeros((20, 20))) is None
    with pytest.raises(InferenceError, match="2D label image"):
        foreground_radius(np.zeros((2, 20, 20)))


@pytest.mark.parametrize("zoom", [0.8, 1.25])
def test_zoom_scales_the_structure_about_the_centre_and_keeps_type_and_size(zoom):
    image = (disc(120, 20) * 200 + 20).astype(np.uint8)
    out = zoom_image(image, zoom, rgb=False)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert foreground_radius(out > 110) == pytest.approx(zoom * 20 / 120, rel=0.04)
    rgb = np.stack([image] * 3, axis=-1)
    assert np.array_equal(zoom_image(rgb, zoom, rgb=True)[..., 1], out)  # colour is not a spatial axis


@pytest.mark.parametrize("zoom", [0.8, 1.0, 1.25])
def test_a_zoomed_segmentation_maps_back_onto_the_image(zoom):
    """The bright disc, segmented through the zoom, lands where the disc is in the original image."""
    from napari_dmoe.inference.engine import segment

    truth = disc(96, 18, centre=(40, 55))
    image = (truth * 150 + 30).astype(np.uint8) + np.random.default_rng(0).integers(0, 10, truth.shape).astype(np.uint8)
    seg = segment(threshold_model(), image, None, device="cpu", zoom=zoom)
    assert seg.labels.shape == truth.shape and seg.probabilities.shape == (3, *truth.shape)
    dice = 2 * np.sum((seg.labels == 1) & (truth == 1)) / (np.sum(seg.labels == 1) + truth.sum())
    assert dice > 0.93, dice
    assert np.allclose(seg.probabilities.astype(np.float32).sum(axis=0), 1, atol=0.02)
    assert any("zoomed" in c for c in seg.conversions) == (zoom != 1.0)


def test_zoom_one_changes_nothing_and_routing_maps_come_back_on_the_grid():
    from napari_dmoe.inference.engine import segment

    model = tiny("transunet2d-tiny")
    image = np.random.default_rng(2).normal(100, 20, (50, 70)).astype(np.float32)
    plain, same = segment(model, image, "Black", device="cpu"), segment(model, image, "Black", device="cpu", zoom=1.0)
    assert np.array_equal(plain.labels, same.labels) and np.array_equal(plain.probabilities, same.probabilities)
    zoomed = segment(model, image, "Black", device="cpu", zoom=1.2)
    assert {k: v.shape for k, v in zoomed.routing.items()} == {k: v.shape for k, v in plain.routing.items()}
    assert zoomed.dominant_expert.shape == (50, 70) and zoomed.dominant_expert.max() < 8


def test_zoom_is_refused_outside_its_range_and_for_3d_models():
    assert check_zoom("1.1", 2) == 1.1
    for bad in (ZOOM_RANGE[0] - 0.01, ZOOM_RANGE[1] + 0.01, 0, -1):
        with pytest.raises(InferenceError, match="outside"):
            check_zoom(bad, 2)
    with pytest.raises(InferenceError, match="expected a number"):
        check_zoom("wide", 2)
    with pytest.raises(InferenceError, match="3D model"):
        check_zoom(1.1, 3)
    assert check_zoom(1.0, 3) == 1.0


def test_site_zoom_is_the_radius_ratio_clipped_and_refuses_too_few_measures():
    cal = site_zoom(0.11, [0.1] * 12 + [None])
    assert cal.zoom == pytest.approx(1.1) and cal.n_measured == 12 and cal.n_images == 13 and not cal.clipped
    assert site_zoom(0.11, [0.05] * 12).zoom == ZOOM_RANGE[1] and site_zoom(0.11, [0.05] * 12).clipped
    with pytest.raises(InferenceError, match="at least 10"):
        site_zoom(0.11, [0.1] * 9)
    with pytest.raises(InferenceError, match="at least half"):
        site_zoom(0.11, [0.1] * 10 + [None] * 11)


def test_measured_zoom_undoes_a_wider_camera():
    """Training images with discs of radius 16, a site whose camera shows them at 13: the zoom is 16 / 13, and the
    site's discs segmented with it have the training size in the zoomed view."""
    rng = np.random.default_rng(3)

    def images(radius: float) -> list[tuple[np.ndarray, bool]]:
        return [((disc(100, radius * rng.normal(1, 0.05), tuple(rng.uniform(45, 55, 2))) * 150 + 40).astype(np.uint8),
                 False) for _ in range(12)]

    model = threshold_model()
    reference = float(np.median(measure(model, images(16.0), device="cpu")))
    cal = site_zoom(reference, measure(model, images(13.0), device="cpu"))
    assert cal.zoom == pytest.approx(16 / 13, rel=0.05)


@pytest.fixture(scope="module")
def fundus_sites(tmp_path_factory) -> dict[str, Path]:
    """Twelve fundus images of the training camera (site A) and of a wide-view camera (site B, fov 0.85)."""
    import imageio.v3 as iio

    from napari_dmoe.synthetic.fundus import make_fundus

    root = tmp_path_factory.mktemp("sites")
    for site in "ab":
        (root / site).mkdir()
        for i in range(12):
            iio.imwrite(root / site / f"{i:02d}.png", make_fundus(7, size=128, index=i, site=site).image)
    return {"a": root / "a", "b": root / "b"}


def test_dmoe_calibrate_measures_a_wide_view_camera_with_the_shipped_model(fundus_sites, tmp_path, capsys):
    """Site B's camera shows discs at 0.85 of site A's scale (labels: radius ratio 1.13 on these images)."""
    def calibrate(out: Path, *extra: str) -> int:
        return main(["calibrate", str(SHIPPED), str(fundus_sites["b"]), "--reference-images", str(fundus_sites["a"]),
                     "--json", str(out), "--device", "cpu", "--quiet", *extra])

    assert calibrate(tmp_path / "one.json", "--rounds", "1") == 0, capsys.readouterr().err
    one = json.loads((tmp_path / "one.json").read_text())
    assert 1.03 < one["zoom"] < 1.2 and one["n_measured"] == 12 and one["rounds"] == 1
    assert f"zoom {one['zoom']:.3f}" in capsys.readouterr().out
    assert calibrate(tmp_path / "two.json", "--rounds", "2") == 0, capsys.readouterr().err
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["rounds"] == 2 and two["zoom"] > one["zoom"]  # the model under-measures: the second round goes on
    assert calibrate(tmp_path / "one.json") == 2  # an existing output is not replaced
    assert "exists" in capsys.readouterr().err


def test_dmoe_calibrate_refuses_a_model_without_a_reference_and_3d_models(fundus_sites, capsys):
    assert main(["calibrate", str(SHIPPED), str(fundus_sites["b"]), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no trained_on.scale record" in err and "--reference-images" in err and "Traceback" not in err
    prostate = SHIPPED.with_name("prostate-dmoe.safetensors")
    assert main(["calibrate", str(prostate), str(fundus_sites["b"]), "--quiet"]) == 2
    assert "3D model" in capsys.readouterr().err


def test_dmoe_segment_with_zoom_records_it_and_refuses_it_for_3d(fundus_sites, tmp_path, capsys):
    from napari_dmoe.io.images import read_image

    out = tmp_path / "mask.png"
    assert main(["segment", str(SHIPPED), str(fundus_sites["a"] / "00.png"), "-a", "Black", "--out", str(out),
                 "--zoom", "1.15", "--device", "cpu", "--quiet"]) == 0, capsys.readouterr().err
    assert read_image(out).array.shape == (128, 128)
    prostate = SHIPPED.with_name("prostate-dmoe.safetensors")
    assert main(["segment", str(prostate), str(fundus_sites["b"] / "00.png"), "--out", str(tmp_path / "m.png"),
                 "--zoom", "1.1", "--quiet"]) == 2
    assert "zoom is for 2D models" in capsys.readouterr().err


def test_dmoe_train_records_the_scale_reference_and_calibrate_uses_it(tmp_path, capsys):
    """A 2D model trained now carries trained_on.scale (its own measure on its training images), so `dmoe
    calibrate` needs no reference images; the record is what the same measure gives on the same images."""
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.training.config import load_config
    from napari_dmoe.training.data import make_dataset
    from napari_dmoe.training.engine import train
    from napari_dmoe.training.trained_on import scale_record
    from training_data import tiny_config, write_fairseg

    root = tmp_path / "fairseg"
    write_fairseg(root, n_train=24, n_test=12)
    data = {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None}
    train(load_config(tiny_config(tmp_path / "c.yaml", tmp_path / "run", data), ["recipe.steps=4"]), quiet=True,
          device="cpu")
    model = load_model(tmp_path / "run" / "best.safetensors")
    record = model.spec.trained_on["scale"]
    assert record["cases"] >= 10 and 0 < record["foreground_radius"] <= 1 / np.sqrt(np.pi) + 1e-5
    config = load_config(tmp_path / "c.yaml", ["recipe.steps=4"])
    again = scale_record(model.network, model.spec, make_dataset(config, "train", size=None), config["seed"])
    assert abs(again["foreground_radius"] - record["foreground_radius"]) < 0.01  # train split: the run's own
    import imageio.v3 as iio

    from napari_dmoe.training.trained_on import case_image

    site, test = tmp_path / "site", make_dataset(config, "test", size=None)
    site.mkdir()
    for i in range(len(test)):  # the site's images as a clinic has them: image files
        iio.imwrite(site / f"{i:02d}.png", np.clip(case_image(test, i)[0], 0, 255).astype(np.uint8))
    assert main(["calibrate", str(tmp_path / "run" / "best.safetensors"), str(site),
                 "--device", "cpu", "--quiet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"training images {record['foreground_radius']:.4f} (1 round(s))" in out and "not a setting" in out
    from napari_dmoe.io.checkpoint import save_model

    model.spec.trained_on["scale"] = {**record, "spread": [0.05, 0.2]}  # a lesion's size varies: say so
    save_model(tmp_path / "lesion.safetensors", model.network, model.spec)
    assert main(["calibrate", str(tmp_path / "lesion.safetensors"), str(site), "--rounds", "1", "--quiet"]) == 0
    assert "varies widely in size" in capsys.readouterr().err
    model.spec.trained_on["scale"] = {"foreground_radius": float("nan")}  # a header can say anything
    save_model(tmp_path / "damaged.safetensors", model.network, model.spec)
    assert main(["calibrate", str(tmp_path / "damaged.safetensors"), str(site), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "damaged trained_on.scale record" in err and "--reference-images" in err and "Traceback" not in err
