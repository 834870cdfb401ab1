"""Issue 26's recipe options: site augmentations (MONAI array transforms), group-balanced sampling, and the
validation-only synthetic site V."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_dmoe.synthetic import FUNDUS_SITES, make_fundus
from napari_dmoe.training.config import ConfigError, load_config
from napari_dmoe.training.data import TrainItems, _augmentations, balanced_order, make_dataset
from training_data import tiny_config, write_fairseg

SITE = {"contrast": 0.3, "gamma": [0.7, 1.5], "blur": 1.0, "noise": 0.04, "bias_field": 0.3, "low_res": 0.6}


def _config(tmp_path: Path, **sections: dict) -> dict:
    root = write_fairseg(tmp_path / "fairseg", n_train=24, n_test=4)
    data = {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None}
    return load_config(tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, **sections))


class _Spec:
    def __init__(self, dims: int) -> None:
        self.spatial_dims, self.input_size = dims, (8,) * dims


@pytest.mark.parametrize("dims", [2, 3])
def test_site_augmentations_change_the_image_not_the_label(dims: int) -> None:
    augment = {"flip": False, "rotate90": False, "rotate_degrees": 0.0, "intensity": 0.0, "prob": 0.5,
               "colour": 0.0, "zoom": 0.0, "site_prob": 1.0, **SITE}
    transform = _augmentations(_Spec(dims), augment, crop=False)
    rng = np.random.default_rng(0)
    shape = (16,) * dims
    image = rng.uniform(0.2, 0.8, (1, *shape)).astype(np.float32)
    label = (rng.random((1, *shape)) > 0.5).astype(np.int64)
    outs = []
    for seed in (1, 1, 2):
        transform.set_random_state(seed=seed)
        out = transform({"image": image.copy(), "label": label.copy()})
        outs.append(np.asarray(out["image"]))
        assert np.asarray(out["image"]).shape == image.shape
        assert np.array_equal(np.asarray(out["label"]), label)  # intensity and blur only: labels untouched
    assert not np.allclose(outs[0], image) and np.array_equal(outs[0], outs[1])  # seeded: same seed, same sample
    assert not np.allclose(outs[0], outs[2])


def test_colour_jitter_scales_each_channel() -> None:
    augment = {"flip": False, "rotate90": False, "rotate_degrees": 0.0, "intensity": 0.0, "prob": 0.5,
               "contrast": 0.0, "gamma": None, "blur": 0.0, "noise": 0.0, "bias_field": 0.0, "low_res": 0.0,
               "colour": 0.3, "zoom": 0.0, "site_prob": 1.0}
    transform = _augmentations(_Spec(2), augment, crop=False)
    transform.set_random_state(seed=3)
    image = np.ones((3, 8, 8), np.float32)
    out = np.asarray(transform({"image": image, "label": np.zeros((1, 8, 8), np.int64)})["image"])
    gains = out.reshape(3, -1).mean(1)
    assert np.all(np.abs(gains - 1) <= 0.3 + 1e-6) and len(set(np.round(gains, 5))) == 3


def test_recipe_options_are_checked(tmp_path: Path) -> None:
    root = write_fairseg(tmp_path / "fairseg", n_train=6, n_test=2)
    data = {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None}
    for key, value, message in [("augment", {"gamma": [1.5, 0.7]}, "augment.gamma"),
                                ("augment", {"low_res": 1.0}, "augment.low_res"),
                                ("augment", {"noise": -0.1}, "augment.noise"),
                                ("augment", {"site_prob": 2}, "augment.site_prob"),
                                ("augment", {"zoom": 1.0}, "augment.zoom"),
                                ("sampling", {"group_balance": 1.5}, "sampling.group_balance"),
                                ("sampling", {"router_dropout": -0.1}, "sampling.router_dropout")]:
        cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, **{key: value})
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_config(cfg)
    config = load_config(tiny_config(tmp_path / "c.yaml", tmp_path / "run", data))
    assert config["sampling"]["group_balance"] == 0.0 and config["augment"]["noise"] == 0.0  # off by default


def test_group_balanced_sampling(tmp_path: Path) -> None:
    config = _config(tmp_path)
    ds = make_dataset(config, "train", (32, 32))
    groups = ["Black"] * 6 + ["White"] * 54  # 10 % / 90 %, as records with the dataset's fields
    from napari_dmoe.datasets.base import Record

    ds.records = [Record(f"x{i}", Path("x"), Path("x"), (g,)) for i, g in enumerate(groups)]
    assert balanced_order(ds, 0.0, 1, 0) is None
    draws = Counter(groups[i] for e in range(20) for i in balanced_order(ds, 1.0, 1, e))
    assert 0.4 < draws["Black"] / sum(draws.values()) < 0.6  # full balance: about half and half
    half = Counter(groups[i] for e in range(20) for i in balanced_order(ds, 0.5, 1, e))
    assert 0.15 < half["Black"] / sum(half.values()) < 0.35  # sqrt: 6**0.5 : 54**0.5 = 1 : 3, i.e. 25 %
    assert np.array_equal(balanced_order(ds, 1.0, 1, 3), balanced_order(ds, 1.0, 1, 3))  # resumes repeat it
    assert not np.array_equal(balanced_order(ds, 1.0, 1, 3), balanced_order(ds, 1.0, 1, 4))


def test_train_items_follow_the_balanced_order(tmp_path: Path) -> None:
    config = _config(tmp_path, sampling={"group_balance": 1.0})
    from napari_dmoe.distributed import setup
    from napari_dmoe.training.setup import build_run

    items = build_run(config, setup("cpu")).train_items
    assert items.group_balance == 1.0
    items.epoch = 2
    order = items._order
    assert order is not None and [items[i]["id"] for i in range(3)] == [items.ds.records[j].id for j in order[:3]]


def test_router_dropout_sends_some_images_through_other_routers(tmp_path: Path) -> None:
    import torch
    from napari_dmoe.distributed import setup
    from napari_dmoe.training.setup import build_run

    groups = torch.zeros(4000, dtype=torch.long)  # every image of group 0
    off = build_run(_config(tmp_path / "off"), setup("cpu"))
    assert torch.equal(off.train_router(groups, 7, 0), groups)
    run = build_run(_config(tmp_path / "on", sampling={"router_dropout": 0.3}), setup("cpu"))
    n = run.spec.n_routers
    routed = run.train_router(groups, 7, 0)
    moved = float((routed != 0).float().mean())
    assert abs(moved - 0.3 * (n - 1) / n) < 0.03  # a dropped image may draw its own router again
    assert set(routed.tolist()) == set(range(n))
    assert torch.equal(run.train_router(groups, 7, 0), routed)  # a resumed run draws the same
    assert not torch.equal(run.train_router(groups, 8, 0), routed)
    assert not torch.equal(run.train_router(groups, 7, 1), routed)  # each process its own
    assert torch.equal(run.to_router(groups), groups)  # validation and inference are untouched
    root = write_fairseg(tmp_path / "local", n_train=6, n_test=2)
    data = {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None}
    with pytest.raises(ConfigError, match="router_dropout.*group-local"):
        load_config(tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, sampling={"router_dropout": 0.3}),
                    ["trainable=group_local"])


def test_site_v_is_neither_a_nor_b() -> None:
    assert set(FUNDUS_SITES) >= {"a", "b", "v"}
    imgs = {site: make_fundus(3, race="White", size=64, index=0, site=site).image for site in "abv"}
    assert not np.array_equal(imgs["v"], imgs["a"]) and not np.array_equal(imgs["v"], imgs["b"])
    # brighter than B and a narrower view than A (larger labelled disc), as its SITES entry says
    v = [make_fundus(5, race="White", size=96, index=i, site="v") for i in range(24)]
    a = [make_fundus(5, race="White", size=96, index=i) for i in range(24)]
    b = [make_fundus(5, race="White", size=96, index=i, site="b") for i in range(12)]
    assert np.mean([s.image.mean() for s in v]) > np.mean([s.image.mean() for s in b]) + 5
    assert np.mean([(s.mask != 0).sum() for s in v]) > 1.05 * np.mean([(s.mask != 0).sum() for s in a])


def test_zoom_moves_image_and_label_together() -> None:
    augment = {"flip": False, "rotate90": False, "rotate_degrees": 0.0, "intensity": 0.0, "prob": 0.5,
               "contrast": 0.0, "gamma": None, "blur": 0.0, "noise": 0.0, "bias_field": 0.0, "low_res": 0.0,
               "colour": 0.0, "zoom": 0.3, "site_prob": 1.0}
    transform = _augmentations(_Spec(2), augment, crop=False)
    yy, xx = np.mgrid[:32, :32]
    disc = (np.hypot(yy - 16, xx - 16) < 8)
    sizes = []
    for seed in range(6):
        transform.set_random_state(seed=seed)
        out = transform({"image": disc[None].astype(np.float32), "label": disc[None].astype(np.int64)})
        image, label = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
        assert image.shape == label.shape == (32, 32) and set(np.unique(label)) <= {0, 1}
        inside = image > 0.5  # the zoomed image and label agree up to interpolation at the rim
        assert 2 * (inside & (label == 1)).sum() / (inside.sum() + label.sum()) > 0.9
        sizes.append(int(label.sum()))
    assert min(sizes) < disc.sum() < max(sizes)  # larger and smaller fields of view


def test_site_d_is_a_new_domain_shift_only() -> None:
    """Site D (the second unseen test site): its own images, brighter and noisier than A, and the same labelling
    convention per group (no ``looks_like``), so a change of Dice there is a domain shift and not a new rule."""
    assert "looks_like" not in FUNDUS_SITES["d"]
    imgs = {site: make_fundus(3, race="Black", size=64, index=0, site=site).image for site in "abvd"}
    assert all(not np.array_equal(imgs["d"], imgs[s]) for s in "abv")
    d = [make_fundus(5, race="White", size=96, index=i, site="d") for i in range(24)]
    a = [make_fundus(5, race="White", size=96, index=i) for i in range(24)]
    assert np.mean([s.image.mean() for s in d]) > np.mean([s.image.mean() for s in a]) + 10
    # pixel noise: the residual after a small smoothing is larger than at site A
    def residual(s) -> float:
        return float(np.std(s.image.astype(float) - ndimage.uniform_filter(s.image.astype(float), 3)))

    assert np.mean([residual(s) for s in d]) > 1.5 * np.mean([residual(s) for s in a])
    again = make_fundus(3, race="Black", size=64, index=0, site="d").image
    assert np.array_equal(again, imgs["d"])


def test_site_factors_variants_of_site_d_share_its_draws(tmp_path: Path) -> None:
    """The diagnosis of a test site: the site itself is its test set's images, and each variant puts one factor
    back to site A's value on the same random draws (same discs, groups and masks; only the camera differs)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_data"))
    import site_factors

    from napari_dmoe.synthetic import fundus

    saved = (dict(fundus.SITES), dict(fundus._SITE_KEY))
    try:
        site_factors.write_variants(tmp_path, 3, "d")
        assert set(site_factors.variants("d")) == {"d", "d-fov", "d-contrast", "d-optics"}
        own = np.load(tmp_path / "d" / "data_000001.npz")
        fundus.write_fairseg(tmp_path / "test-set", n_train=0, n_test=3, seed=2031, size=128, site="d")
        test_set = np.load(tmp_path / "test-set" / "data_000001.npz")  # as seed_study.py writes site-d
        assert np.array_equal(own["slo_fundus"], test_set["slo_fundus"])
        optics = np.load(tmp_path / "d-optics" / "data_000001.npz")
        assert np.array_equal(optics["disc_cup_mask"], own["disc_cup_mask"]) and int(optics["race"]) == int(own["race"])
        assert not np.array_equal(optics["slo_fundus"], own["slo_fundus"])
    finally:
        fundus.SITES.clear(), fundus.SITES.update(saved[0])
        fundus._SITE_KEY.clear(), fundus._SITE_KEY.update(saved[1])


def test_sites_w_and_e_are_their_own_domain_shifts() -> None:
    """W (validation only) is a higher-gain camera like D, milder; E (a test site) a bright, soft, wide one. Both
    keep every group's labelling (no ``looks_like``) and draw their own images."""
    assert not {"looks_like"} & (set(FUNDUS_SITES["w"]) | set(FUNDUS_SITES["e"]))
    assert 1.0 < FUNDUS_SITES["w"]["contrast"] < FUNDUS_SITES["d"]["contrast"]
    imgs = {site: make_fundus(4, race="Asian", size=64, index=1, site=site).image for site in "abvdwe"}
    assert all(not np.array_equal(imgs[x], imgs[y]) for x in imgs for y in imgs if x < y)
    e = [make_fundus(6, race="White", size=96, index=i, site="e") for i in range(16)]
    a = [make_fundus(6, race="White", size=96, index=i) for i in range(16)]
    assert np.mean([s.image.mean() for s in e]) > np.mean([s.image.mean() for s in a]) + 10
    assert np.mean([(s.mask != 0).sum() for s in e]) < 0.9 * np.mean([(s.mask != 0).sum() for s in a])  # wider view


# sha256 of make_fundus(0, size=64, index=0, site=s) taken at fd3a499, before sites were drawn from CAMERA_RANGE
SITE_HASHES = {
    "b": "52eabb1c7f2a902a570fcd761de5dc97a20c15ee2d4fefddfbd0e62b0436210e",
    "v": "09fce13edd7f206a4efa0da04e79780ea10ed0f8e5d089be9ff6c93cea1b8d60",
    "c": "5b22308cc14b460c9e3994e58c8da8c5f0c38f96d3f801aae596435df64f6d01",
    "d": "c9e9bc807409c85aa615e92a4db96f3af69271536abf9b5c2ca7cf04177278ab",
    "w": "9560e85e2cd3671212d612b827fe00788974e2a23e7647fa85e6239053b08bc3",
    "e": "e15b2061bdb9eac0eef9288bbde231755edec9732ea310731b1731e7243a406e",
}


def test_drawn_sites_stay_in_the_camera_range_and_leave_the_made_sites_alone() -> None:
    """Sites drawn from the camera distribution: reproducible from their seed, every factor inside its range, group
    shares that sum to one, their own random streams; and adding them changed no earlier site's images."""
    import hashlib
    import json

    from napari_dmoe.synthetic import fundus

    for name, seed in fundus.DRAWN_SITES.items():
        site = fundus.SITES[name]
        assert site == fundus.draw_site(seed)
        for factor, (lo, hi) in fundus.CAMERA_RANGE.items():
            assert lo <= site[factor] <= hi, (name, factor)
        assert abs(sum(site["frequencies"].values()) - 1.0) < 1e-9 and min(site["frequencies"].values()) > 0.1
        assert "looks_like" not in site  # a domain shift only
    assert fundus.draw_site(1) != fundus.draw_site(2)
    keys = [fundus.site_key(s) for s in fundus.SITES]
    assert len(set(keys)) == len(keys)
    for name, digest in SITE_HASHES.items():
        s = make_fundus(0, size=64, index=0, site=name)
        got = hashlib.sha256(s.image.tobytes() + s.mask.tobytes() + s.race.encode()
                             + json.dumps(s.attributes).encode()).hexdigest()
        assert got == digest, name
    g = [make_fundus(2, race="White", size=96, index=i, site="g") for i in range(16)]  # G: brighter, lower contrast
    a = [make_fundus(2, race="White", size=96, index=i) for i in range(16)]
    assert np.mean([s.image.mean() for s in g]) > np.mean([s.image.mean() for s in a]) + 10


def test_seed_study_scores_named_sets_only(tmp_path: Path) -> None:
    """``seed_study.py score`` evaluates finished runs on the sets it is given and refuses a name it does not know;
    the drawn validation sets are smaller (200 images) and the drawn test sites are fundus only."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_data"))
    import seed_study

    assert {f"val-r{i}" for i in range(1, 9)} <= set(seed_study.VAL_SEEDS)
    assert seed_study.VAL_N["val-r3"] == 200 and seed_study.VAL_N["val-a"] == 400
    assert all(seed_study.TEST_DATASETS[t] == ("fundus",) for t in ("site-f", "site-g", "site-h"))
    with pytest.raises(SystemExit) as refused:
        seed_study.main(["score", "--runs", str(tmp_path), "--sets", "val-zz", "--datasets", "prostate"])
    assert refused.value.code == 2
    assert not any(tmp_path.iterdir())  # refused before anything was written
