"""The fit check's feature score on the shipped demo models: false alarms, the second site, and catches.

For each demo model (fundus, prostate, skin) it scores, with the record stored in the model file:
- in-distribution test images: the held-out test split of the training site A (the goal: at most 1 % flagged);
- the second synthetic site B (fundus, prostate): a scanner/clinic shift the models never saw; for the fundus model
  also site D (issue 26) when DATA/site-d exists;
- a catch set of non-medical and wrong-modality images: scikit-image's offline photographs (astronaut, camera,
  coffee, chelsea, the retina photo darkened) and the other demo models' napari samples; for the 3D model the
  photographs and 2D samples are stacked into volumes (32 slices of 3 mm), since a 2D image is refused outright.
It reports the feature score alone and the whole ``check_fit`` (any finding) on the catch set; an image the
engine refuses outright (a signed CT under a model for 8-bit photographs) cannot be scored: it counts as
flagged and its row says why. For the test split and site B it also gives the median Dice of the flagged and
the unflagged cases.

``--select`` redoes the choice of the defaults (pooling, principal directions, margin) on validation data only:
each variant's record is fitted on the training sample and the validation split, and scored on a validation
catch set of other scikit-image pictures (``VALIDATION_PICTURES``, none of them in the catch set above); the
test splits, site B and the catch set play no part in it.

    python sample_data/generate.py fundus --out DATA --n 600 --n-test 400 --size 128 --seed 0
    python sample_data/generate.py prostate --out DATA --n 160 --size 64x64x32 --spacing 3x3x3 --seed 0
    python sample_data/generate.py skin --out DATA --n 2000 --size 150x200 --seed 0
    python sample_data/generate.py fundus --out DATA/site-b --n 0 --n-test 200 --size 128 --seed 7 --site b
    python sample_data/generate.py prostate --out DATA/site-b --n 40 --size 64x64x32 --spacing 3x3x3 --seed 7 --site b
    python sample_data/generate.py fundus --out DATA/site-d --n 0 --n-test 200 --size 128 --seed 7 --site d   # optional
    OMP_NUM_THREADS=1 python bench/bench_fit_check.py --data DATA --out sample_data/results/fit_check.json
    OMP_NUM_THREADS=1 python bench/bench_fit_check.py --data DATA --select
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "sample_data"))
LANES = {"fundus": ("fairseg", "fundus photo (SLO)"), "prostate": ("prostate", "CT"),
         "skin": ("ham10000", "dermoscopy")}
PHOTOS = ("astronaut", "camera", "coffee", "chelsea")
VALIDATION_PICTURES = ("moon", "text", "coins", "page", "clock", "grass", "brick", "gravel", "cell",
                       "hubble_deep_field", "colorwheel", "immunohistochemistry", "microaneurysms", "checkerboard")
Case = tuple[str, Any, Any, bool, Any]  # name, image (napari layout), spacing, rgb, modality


def lane_config(lane: str, root: Path) -> dict:
    from napari_dmoe.training.config import load_config

    sub, modality = LANES[lane]
    return load_config(ROOT / "training" / f"demo-{lane}-dmoe.yaml", [f"data.root={root / sub}",
                                                                       f"data.modality={modality}"])


def split_cases(lane: str, root: Path, splits: tuple[str, ...]) -> Iterator[Case]:
    """The cases of ``splits`` of the lane's data under ``root``, as read from their files."""
    from napari_dmoe.training.data import make_dataset
    from napari_dmoe.training.trained_on import case_image

    config = lane_config(lane, root)
    for split in splits:
        ds = make_dataset(config, split, None, None)
        for i in range(len(ds)):
            image, spacing, rgb = case_image(ds, i)
            yield ds.records[i].id, image, spacing, rgb, LANES[lane][1]


def _as_volume(image: np.ndarray, rgb: bool) -> np.ndarray:
    grey = image[..., :3].mean(-1) if rgb else image
    return np.repeat(grey[None].astype(np.float32), 32, axis=0)


def catch_cases(lane: str) -> list[Case]:
    """Non-medical and wrong-modality images for ``lane``'s model (never its own kind of image)."""
    import skimage.data

    from napari_dmoe.plugin import samples

    flat: list[tuple[str, np.ndarray, bool, str | None]] = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        flat.append((name, img, img.ndim == 3, None))
    if lane != "fundus":  # a real fundus photograph is the fundus model's own kind (reported apart)
        dark = (skimage.data.retina().astype(np.float32) * 0.4).astype(np.uint8)
        flat.append(("retina darkened", dark, True, "fundus photo"))
    others = {"fundus": samples.fundus_sample, "skin": samples.skin_sample, "prostate": samples.prostate_sample}
    cases: list[Case] = []
    for name, make in others.items():
        if name == lane:
            continue
        img, kw, _ = make()[0]
        meta = kw["metadata"].get("dmoe_modality")
        if img.ndim == 3 and not kw.get("rgb"):  # the prostate CT volume
            cases.append((f"{name} sample", img, tuple(kw["scale"]), False, meta))
        else:
            flat.append((f"{name} sample", img, bool(kw.get("rgb")), meta))
    for name, img, rgb, meta in flat:
        if lane == "prostate":
            cases.append((f"{name} (32-slice volume)", _as_volume(img, rgb), (3.0, 1.0, 1.0), False, meta))
        else:
            cases.append((name, img, None, rgb, meta))
    return cases


def related_cases(lane: str) -> list[Case]:
    """Same kind, other source: reported, not counted as catches (the fundus model and the real retina photo)."""
    if lane != "fundus":
        return []
    import skimage.data

    retina = skimage.data.retina()
    return [("retina photo", retina, None, True, "fundus photo"),
            ("retina darkened", (retina.astype(np.float32) * 0.4).astype(np.uint8), None, True, "fundus photo")]


def score_cases(model: Any, cases: Any, full: bool = False) -> list[dict]:
    from napari_dmoe.inference.fit import check_fit
    from napari_dmoe.inference.ood import score

    rows = []
    for name, image, spacing, rgb, modality in cases:
        refused = None
        try:
            s = score(model, image, spacing, rgb)
        except ValueError as err:  # the engine refuses the image outright: it can never be segmented
            s, refused = None, str(err)
        row = {"case": str(name), "score": None if s is None else round(s.value, 3),
               "flagged": refused is not None or (s is not None and s.flagged), "refused_by_engine": refused}
        if full:
            row["findings"] = [f.kind for f in check_fit(model, image, spacing, rgb=rgb, modality=modality)]
        rows.append(row)
    return rows


def summary(rows: list[dict], key: str = "flagged") -> dict:
    flagged = [r for r in rows if r[key]]
    scores = [r["score"] for r in rows if r["score"] is not None]
    return {"n": len(rows), "flagged": len(flagged), "rate": round(len(flagged) / max(len(rows), 1), 4),
            "score_median": round(float(np.median(scores)), 3) if scores else None,
            "score_max": round(float(np.max(scores)), 3) if scores else None}


def dice_by_flag(model: Any, lane: str, root: Path, splits: tuple[str, ...], rows: list[dict]) -> dict:
    """Median Dice (mean over foreground classes) of the flagged and the unflagged cases: do the flags point at
    worse masks? Each case segmented as ``dmoe evaluate`` does, with its own attribute."""
    from napari_dmoe.evaluation.loop import dataset_cases, evaluate_cases
    from napari_dmoe.training.data import make_dataset

    config = lane_config(lane, root)
    dice: dict[str, float] = {}
    for split in splits:
        records = evaluate_cases(model, dataset_cases(make_dataset(config, split, None, None)), hd95=False,
                                 routing=False).records
        dice.update({r.id: float(np.mean([m["dice"] for c, m in r.metrics.items()])) for r in records})
    out = {}
    for key, flagged in (("flagged", True), ("not_flagged", False)):
        values = [dice[r["case"]] for r in rows if r["flagged"] is flagged and r["case"] in dice]
        out[key] = {"n": len(values), "median_dice": round(float(np.median(values)), 3) if values else None}
    return out


def run_lane(lane: str, data: Path) -> dict:
    from napari_dmoe.io.checkpoint import load_model

    model = load_model(ROOT / "napari_dmoe" / "assets" / "models" / f"{lane}-dmoe.safetensors")
    rec = model.spec.trained_on["features"]
    t0 = time.perf_counter()
    test = score_cases(model, split_cases(lane, data, ("test",)))
    seconds = (time.perf_counter() - t0) / max(len(test), 1)
    out: dict[str, Any] = {"threshold": rec["threshold"], "record": {k: rec[k] for k in (
        "n_train", "n_validation", "n_heldout", "quantile", "margin", "heldout_scores")},
        "test_site_a": summary(test), "seconds_per_image": round(seconds, 3)}
    out["test_site_a"]["dice"] = dice_by_flag(model, lane, data, ("test",), test)
    if lane in ("fundus", "prostate"):
        splits = ("test",) if lane == "fundus" else ("train", "val", "test")
        # site B always; site D (issue 26's second unseen site, fundus only) when the data holds it
        sites = ["site-b"] + (["site-d"] if lane == "fundus" and (data / "site-d").is_dir() else [])
        for site in sites:
            rows = score_cases(model, split_cases(lane, data / site, splits))
            flags = dice_by_flag(model, lane, data / site, splits, rows)
            out[site.replace("-", "_")] = {**summary(rows), "dice": flags}
    catches = score_cases(model, catch_cases(lane), full=True)
    for row in catches:
        row["any_finding"] = bool(row["findings"])
    out["catch"] = {"by_score": summary(catches), "by_check_fit": summary(catches, "any_finding"), "cases": catches}
    related = related_cases(lane)
    if related:
        out["related"] = score_cases(model, related, full=True)
    return out


def select(lane: str, data: Path) -> list[str]:
    """The validation table behind the defaults: every variant's held-out false alarms and validation catches."""
    import skimage.data

    from napari_dmoe.inference import ood
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.training.data import make_dataset
    from napari_dmoe.training.trained_on import MAX_FEATURE_CASES, MAX_HELDOUT_CASES, _sample, case_image

    model = load_model(ROOT / "napari_dmoe" / "assets" / "models" / f"{lane}-dmoe.safetensors")
    config = lane_config(lane, data)
    seed = int(config["seed"])
    train_ds, val_ds = make_dataset(config, "train", None, None), make_dataset(config, "val", None, None)
    train = ood.features_of(model, (case_image(train_ds, i) for i in _sample(len(train_ds), MAX_FEATURE_CASES, seed)))
    val = ood.features_of(model, (case_image(val_ds, i) for i in _sample(len(val_ds), MAX_HELDOUT_CASES, seed + 1)))
    pictures = []
    for name in VALIDATION_PICTURES:
        img = getattr(skimage.data, name)()
        pictures.append((_as_volume(img, img.ndim == 3), (3.0, 1.0, 1.0), False) if lane == "prostate"
                        else (img, None, img.ndim == 3))
    catch = ood.features_of(model, pictures)
    names = [n for n, _ in ood.feature_layers(model.network)]
    lines = []
    for pool in ("mean", "mean_std"):
        half = (lambda f: [x[: len(x) // 2] for x in f]) if pool == "mean" else (lambda f: f)  # mean: first half
        for k in (8, 16, 32):
            for margin in (0.0, 0.25, 0.5):
                rec = ood.parse_record(ood.fit_record(names, [half(f) for f in train], [half(f) for f in val],
                                                      pool=pool, n_components=k, margin=margin))
                def rate(feats: list) -> float:
                    return float(np.mean([ood.scored(rec.layers, half(f)).mean() > rec.threshold for f in feats]))
                lines.append(f"| {lane} | {pool} | {k} | {margin} | {rec.threshold:.3g} | {rate(val):.3f} | "
                             f"{rate(catch) * len(catch):.0f}/{len(catch)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder the generators wrote (fairseg/, site-b/...)")
    parser.add_argument("--lanes", nargs="+", default=list(LANES), choices=list(LANES))
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results as JSON here (an existing file keeps the lanes not run)")
    parser.add_argument("--select", action="store_true", help="print the validation table behind the defaults")
    args = parser.parse_args(argv)
    if args.select:
        print("| model | pooling | directions | margin | threshold | validation split flagged | pictures caught |")
        print("|---|---|---|---|---|---|---|")
        for lane in args.lanes:
            print("\n".join(select(lane, args.data)), flush=True)
        return 0
    results = {}
    for lane in args.lanes:
        results[lane] = run_lane(lane, args.data)
        r = results[lane]
        line = (f"{lane}: threshold {r['threshold']:.3g}; test site A {r['test_site_a']['flagged']}/"
                f"{r['test_site_a']['n']} flagged")
        for key, name in (("site_b", "site B"), ("site_d", "site D")):
            if key in r:
                line += f"; {name} {r[key]['flagged']}/{r[key]['n']}"
        c = r["catch"]
        line += (f"; catch set {c['by_score']['flagged']}/{c['by_score']['n']} by the score, "
                 f"{c['by_check_fit']['flagged']}/{c['by_check_fit']['n']} by check_fit")
        print(line, flush=True)
    if args.out:  # lanes not run this time keep their entries (a retrained model is measured alone)
        kept = json.loads(args.out.read_text()) if args.out.is_file() else {}
        from napari_dmoe.io.files import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({**kept, **results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
