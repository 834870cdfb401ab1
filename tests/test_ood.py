"""The feature score of the fit check (inference/ood.py) on the shipped demo models and on a tiny trained record:
in-distribution images pass, photographs and other models' samples are flagged, the threshold is recorded, the
image is judged as the model sees it, and a damaged record is refused with a message naming the field."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_dmoe.inference import ood
from napari_dmoe.inference.fit import FitError, check_fit
from napari_dmoe.io.checkpoint import load_model, save_model

ASSETS = Path(__file__).resolve().parent.parent / "napari_dmoe" / "assets" / "models"


@pytest.fixture(scope="module")
def models():
    return {lane: load_model(ASSETS / f"{lane}-dmoe.safetensors") for lane in ("fundus", "skin", "prostate")}


@pytest.fixture(scope="module")
def demo():
    from napari_dmoe.plugin import samples

    return {"fundus": samples.fundus_sample()[0], "skin": samples.skin_sample()[0],
            "prostate": samples.prostate_sample()[0]}


def _kinds(model, image, spacing=None, rgb=None, modality=None):
    return [f.kind for f in check_fit(model, image, spacing, rgb=rgb, modality=modality)]


def test_demo_models_record_their_features_and_threshold(models):
    for lane, model in models.items():
        rec = model.spec.trained_on["features"]
        parsed = ood.parse_record(rec)
        assert rec["method"] == ood.METHOD and parsed.threshold > 1  # above the held-out median (1 by design)
        assert rec["quantile"] == ood.QUANTILE and rec["margin"] == ood.MARGIN
        assert rec["n_train"] >= 100 and rec["n_validation"] >= 20 and rec["n_heldout"] > rec["n_validation"]
        held = rec["heldout_scores"]
        assert held["median"] < held["q99"] <= rec["threshold"] / (1 + ood.MARGIN) + 1e-3
        assert [st.name for st in parsed.layers] == [n for n, _ in ood.feature_layers(model.network)]
        # compact: small pooled features, a few principal directions each
        assert all(st.components.shape[0] <= ood.N_COMPONENTS for st in parsed.layers)
        assert len(json.dumps(rec)) < 300_000, lane


def test_in_distribution_samples_pass(models, demo):
    f_img, _, _ = demo["fundus"]
    s_img, _, _ = demo["skin"]
    p_img, p_kw, _ = demo["prostate"]
    for model, image, spacing, rgb in ((models["fundus"], f_img, None, False), (models["skin"], s_img, None, True),
                                       (models["prostate"], p_img, p_kw["scale"], False)):
        s = ood.score(model, image, spacing, rgb)
        assert not s.flagged and s.value < s.threshold, (model.spec.trained_on["modality"], s)
        assert _kinds(model, image, spacing, rgb) == []


def test_photographs_and_other_models_samples_are_flagged(models, demo):
    import skimage.data

    photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "camera", "coffee", "chelsea")}
    for lane in ("fundus", "skin"):
        for name, photo in photos.items():
            found = check_fit(models[lane], photo, None, rgb=photo.ndim == 3)
            features = [f for f in found if f.kind == "features"]
            assert features, (lane, name, found)
            assert "threshold" in features[0].message and "feature distance" in features[0].message
    dark = (skimage.data.retina().astype(np.float32) * 0.4).astype(np.uint8)  # issue 23: 22 % painted as lesion
    assert "features" in _kinds(models["skin"], dark, rgb=True)
    assert ood.score(models["fundus"], photos["camera"]).flagged  # the cameraman under the fundus model
    s_img, _, _ = demo["skin"]
    f_img, _, _ = demo["fundus"]
    assert ood.score(models["fundus"], s_img, None, True).flagged
    assert ood.score(models["skin"], f_img, None, False).flagged
    camera_volume = np.repeat(photos["camera"][None], 32, axis=0)
    assert ood.score(models["prostate"], camera_volume, (3.0, 1.0, 1.0), False).flagged


def test_the_image_is_judged_as_the_model_sees_it(models, demo):
    from scipy.ndimage import zoom

    prostate = models["prostate"]
    p_img, p_kw, _ = demo["prostate"]
    z, y, x = p_kw["scale"]  # 3 x 2 x 2 mm
    fine = zoom(p_img.astype(np.float32), (1, y / 1.2, x / 1.2), order=1).astype(np.int16)  # 1.2 mm in-plane
    assert _kinds(prostate, fine, (z, 1.2, 1.2), modality="CT") == []  # finer voxels: resampled, not flagged
    assert not ood.score(prostate, fine, (z, 1.2, 1.2)).flagged
    coarse = p_img[:, ::4, ::4]
    assert "spacing" in _kinds(prostate, coarse, (z, 4 * y, 4 * x), modality="CT")  # 8 mm: detail is gone
    fundus = models["fundus"]
    f_img, _, _ = demo["fundus"]
    eight = ood.score(fundus, f_img)
    sixteen = ood.score(fundus, f_img.astype(np.uint16) * 257)  # a 16-bit PNG of the same picture
    assert sixteen.value == pytest.approx(eight.value, rel=1e-4)


def _tampered(model, change):
    spec = copy.deepcopy(model.spec)
    change(spec.trained_on["features"])
    return type(model)(spec=spec, network=model.network, path=model.path)


@pytest.mark.parametrize("change, field", [
    (lambda r: r["layers"][0]["components"][0].pop(), r"layers\[0\]\.components\[0\]: \d+ values, expected"),
    (lambda r: r["layers"][1]["mean"].__setitem__(0, "x"), r"layers\[1\]\.mean: holds something other than"),
    (lambda r: r["layers"][0]["variances"].__setitem__(2, -1.0), r"layers\[0\]\.variances: holds values that"),
    (lambda r: r.__setitem__("threshold", float("nan")), r"features\.threshold"),
    (lambda r: r.__setitem__("threshold", 10**400), r"features\.threshold: 1000"),
    (lambda r: r["layers"][0]["mean"].__setitem__(3, 10**400), r"layers\[0\]\.mean: holds values that are not"),
    (lambda r: r.__setitem__("layers", r["layers"] * 10), r"features\.layers: expected a list of 1 to 16"),
    (lambda r: r["layers"][0].__setitem__("mean", [0.0] * (ood.MAX_DIM + 1)), r"layers\[0\]\.mean: expected a"),
    (lambda r: r["layers"][0].__setitem__("name", "block9"), r"features\.layers: names"),
    (lambda r: r.__setitem__("windows", 10**9), r"features\.windows"),
    (lambda r: r.__setitem__("method", "knn"), r"features\.method"),
    (lambda r: r["layers"][0].__setitem__("mean", r["layers"][0]["mean"][:-2]), r"layers\[0\]\.(mean|components)"),
])
def test_a_tampered_record_is_refused_clearly(models, demo, change, field):
    model = _tampered(models["fundus"], change)
    f_img, _, _ = demo["fundus"]
    with pytest.raises(ood.RecordError, match=field):
        ood.score(model, f_img)
    found = check_fit(model, f_img, None)
    assert [f.kind for f in found] == ["record"] and "re-record it" in found[0].message


def test_dmoe_segment_refuses_a_tampered_record_in_one_line(models, tmp_path):
    from PIL import Image

    model = _tampered(models["fundus"], lambda r: r["layers"][2]["components"][3].append(1.0))
    path = save_model(tmp_path / "tampered.safetensors", model.network, model.spec)
    image = tmp_path / "fundus.png"
    from napari_dmoe.plugin import samples

    Image.fromarray(samples.fundus_sample()[0][0]).save(image)
    out = subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", "segment", str(path), str(image), "-a",
                          "Black", "-o", str(tmp_path / "mask.png"), "-q"], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr and not (tmp_path / "mask.png").exists()
    assert "trained_on.features.layers[2].components[3]" in out.stderr and "re-record it" in out.stderr


def test_the_request_reports_the_score_and_threshold(models, tmp_path):
    import skimage.data
    from PIL import Image

    from napari_dmoe.inference.request import SegmentRequest, run
    from napari_dmoe.io.images import read_image

    path = tmp_path / "camera.png"
    Image.fromarray(skimage.data.camera()).save(path)
    volume = read_image(path)
    request = SegmentRequest(volume.array, None, volume.known_spacing, rgb=volume.rgb, source=str(path))
    with pytest.raises(FitError, match=r"camera\.png: does not fit .*feature distance [\d.]+, above the threshold"):
        run(models["fundus"], request)
    spec_only = check_fit(models["fundus"].spec, volume.array, None, rgb=volume.rgb)
    assert all(f.kind != "features" for f in spec_only)  # a spec alone: no features to compare


def test_fit_record_from_few_images_and_gaussian_features():
    rng = np.random.default_rng(0)
    names = ["a", "b"]

    def draw(n, shift=0.0):
        return [[rng.normal(shift, 1.0, 12), rng.normal(shift, 2.0, 40)] for _ in range(n)]

    assert ood.fit_record(names, draw(ood.MIN_CASES - 1), draw(2)) is None  # too few to estimate anything
    few = ood.parse_record(ood.fit_record(names, draw(6), draw(3)))  # shrinkage: six images still give a record
    assert np.isfinite(few.threshold) and all(st.residual > 0 for st in few.layers)
    rec = ood.parse_record(ood.fit_record(names, draw(300), draw(100)))
    inside = np.array([ood.scored(rec.layers, f).mean() for f in draw(400)])
    assert 0.8 < np.median(inside) < 1.25 and (inside > rec.threshold).mean() <= 0.02
    outside = np.array([ood.scored(rec.layers, f).mean() for f in draw(50, shift=3.0)])  # 3 std away
    assert (outside > rec.threshold).all()


def test_every_front_end_request_is_refused_with_score_and_threshold_unless_forced(models):
    """dmoe segment, dmoe serve and the widget's jobs all run ``request.iter_run``: the feature finding refuses the
    cameraman under the fundus model, and a forced run carries the score and threshold in its provenance."""
    import skimage.data

    from napari_dmoe.inference.request import EngineSettings, SegmentRequest, run

    settings = EngineSettings(device="cpu")
    camera = SegmentRequest(skimage.data.camera(), "Black", settings=settings, source="camera.png")
    with pytest.raises(FitError, match=r"camera\.png: does not fit .*feature distance [\d.]+, above the threshold"):
        run(models["fundus"], camera)
    forced = run(models["fundus"], SegmentRequest(skimage.data.camera(), "Black", force=True, settings=settings))
    assert forced.provenance.forced and any("threshold" in f for f in forced.provenance.fit_findings)
    from napari_dmoe.plugin import samples

    fundus = run(models["fundus"], SegmentRequest(samples.fundus_sample()[0][0], "Black", settings=settings))
    assert not fundus.provenance.forced and fundus.provenance.fit_findings == []
