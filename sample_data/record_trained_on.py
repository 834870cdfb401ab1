"""Write the "trained on" record into the shipped demo models without retraining them.

The record is computed exactly as ``dmoe train`` does (``training.setup.build_run`` on the lane's config,
``training/demo-<lane>-dmoe.yaml``, and ``trained_on.feature_record`` with the shipped weights on the same
training and validation splits, as ``RunParts.spec_for`` does for every saved model), from the synthetic data
regenerated with the settings and seeds of ``sample_data/train_demo_models.sh``. Only the header changes: the
script checks that every tensor of the rewritten file is bitwise equal to the original's before it replaces the
model.

    python sample_data/generate.py fundus --out DATA --n 600 --n-test 400 --size 128 --seed 0
    python sample_data/generate.py prostate --out DATA --n 160 --size 64x64x32 --spacing 3x3x3 --seed 0
    python sample_data/generate.py skin --out DATA --n 2000 --size 150x200 --seed 0
    python sample_data/record_trained_on.py --data DATA [--write]      # without --write: print the records only
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
LANES = {"fundus": ("fairseg", "fundus photo (SLO)"), "prostate": ("prostate", "CT"), "skin": ("ham10000", "dermoscopy")}


def record(lane: str, data: Path, model_path: Path) -> dict:
    from napari_dmoe.distributed import DistInfo
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.training.config import load_config
    from napari_dmoe.training.setup import build_run
    from napari_dmoe.training.trained_on import feature_record, scale_record

    sub, modality = LANES[lane]
    config = load_config(ROOT / "training" / f"demo-{lane}-dmoe.yaml",
                         [f"data.root={data / sub}", f"data.modality={modality}"])
    run = build_run(config, DistInfo())
    shipped = load_model(model_path)
    val = run.val_items.ds if run.val_items is not None else None
    features = feature_record(shipped.network, shipped.spec, run.train_items.ds, val, int(config["seed"]))
    out = {**run.spec.trained_on, "features": features}
    scale = scale_record(shipped.network, shipped.spec, run.train_items.ds, int(config["seed"]))
    if scale is not None:  # 2D: the reference of a site calibration (inference.scale), as dmoe train writes it
        out["scale"] = scale
    return out


def rewrite(path: Path, trained_on: dict | None = None, provenance: dict | None = None) -> None:
    """Save ``path`` again with ``trained_on`` in its spec and/or ``provenance`` entries added to its provenance;
    refuse unless every tensor is bitwise unchanged."""
    from napari_dmoe.io.checkpoint import load_model, save_model

    model = load_model(path)
    if trained_on is not None:
        model.spec.trained_on = trained_on
    if provenance:
        model.spec.provenance = {**model.spec.provenance, **provenance}
    before = load_file(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        probe = save_model(Path(tmp) / path.name, model.network, model.spec)
        after = load_file(str(probe))
    same = before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and torch.equal(before[k].reshape(-1).view(torch.uint8), after[k].reshape(-1).view(torch.uint8))
        for k in before)
    if not same:
        raise SystemExit(f"{path}: the re-saved weights differ from the shipped ones; nothing written")
    save_model(path, model.network, model.spec)
    print(f"{path}: header written, {len(before)} tensors bitwise unchanged")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder the generators wrote (fairseg/, ...)")
    parser.add_argument("--lanes", nargs="+", default=list(LANES), choices=list(LANES))
    parser.add_argument("--write", action="store_true", help="rewrite napari_dmoe/assets/models/<lane>-dmoe")
    args = parser.parse_args(argv)
    for lane in args.lanes:
        path = ROOT / "napari_dmoe" / "assets" / "models" / f"{lane}-dmoe.safetensors"
        rec = record(lane, args.data, path)
        features = rec["features"] or {}
        print(lane, json.dumps({**rec, "features": {k: v for k, v in features.items() if k != "layers"}}))
        if args.write:
            rewrite(path, rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
