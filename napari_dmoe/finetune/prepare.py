"""Fine-tune from napari layers, the Qt-free part: export pairs, split, settings, the YAML config, comparison.

The GUI writes the user's (image, labels, attribute) pairs to a run folder in the generic folder + CSV format
the training engine reads (``data.format: folder`` with a ``split`` column that holds the validation cases back;
3D pairs as NIfTI with the layer's scale as voxel size, resampled to the model's spacing as the Segment widget
does), writes a config that fine-tunes from the chosen base model, and runs ``dmoe train`` in a subprocess
(``finetune/process.py``). Nothing here imports Qt, napari or torch at module level.
"""
from __future__ import annotations

import csv
import math
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from napari_dmoe.io.files import atomic_write, atomic_write_text
from napari_dmoe.io.images import layer_spacing, write_volume
from napari_dmoe.model.routers import all_groups, group_name

PAIRS_CSV = "pairs.csv"
SPLIT_COLUMN = "split"
GiB = 1024**3


class FinetuneError(ValueError):
    """The fine-tune request cannot run as given; the message says what is wrong and what to do."""


@dataclass
class TrainingPair:
    """One training case taken from napari: image array (napari axis order), label map, attribute values and,
    for a 3D image, its voxel size in mm (z, y, x; the layer's scale), None when unknown."""

    name: str
    image: Any
    labels: Any
    attributes: dict[str, str]
    rgb: bool = False
    spacing: tuple[float, ...] | None = None


@dataclass
class FinetuneSettings:
    """What the user sets in the widget. ``trainable``: "group_local" (only the corrected groups' routers and
    their private expert copies learn; every other group stays bitwise; ``training/local.py``), "routers_experts"
    or "all" (every group may change); ``local_experts``: private expert copies per group and dMoE layer."""

    steps: int = 100
    lr: float = 0.001
    batch_size: int = 2
    patch_size: list[int] | None = None  # None: the base model's input size
    device: str = "cpu"
    trainable: str = "all"
    local_experts: int = 1
    amp: bool = False
    val_every: int | None = None  # None: about 5 validations over the run
    keep_base: bool = True  # a step replaces the base model only if it scores higher on the held-back pairs
    folds: int = 0  # group_local: k-fold cross-validation picks steps and estimates the gain (training/crossval.py)


@dataclass
class ExportSummary:
    """What was written: the CSV, per-split case names and per-attribute counts (the provenance data summary)."""

    csv_path: Path
    train: list[str]
    val: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # attribute -> value -> cases
    val_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["csv_path"] = str(self.csv_path)
        return out


# -- defaults from memory ---------------------------------------------------------------------------------
def default_settings(device: str, free_bytes: int | None, spatial_dims: int = 2,
                     trainable: str = "all") -> FinetuneSettings:
    """Settings a first fine-tune can start from, from the free memory of ``device`` (None: 4 GiB) and ``trainable``:
    the batch grows with it (a 3D patch costs about 16x a 2D one); CPUs get short runs and no AMP (a GPU gain)."""
    free = (free_bytes if free_bytes is not None and free_bytes > 0 else 4 * GiB) / GiB
    per_sample = 0.5 if spatial_dims == 2 else 8.0  # GiB of activations per sample, rough and cautious
    budget = 0.6 * free  # leave room for the model, the optimizer and the rest of the system
    batch = int(max(1, min(16, 2 ** math.floor(math.log2(max(1.0, budget / per_sample))))))
    gpu = not device.startswith("cpu")
    batch = batch if gpu else min(batch, 4)  # CPU throughput does not grow with the batch
    if trainable == "group_local":  # chosen on validation draws at sites b and c (BENCHMARKS.md, fine-tune at a new site)
        from napari_dmoe.finetune import local_recipe as r

        return FinetuneSettings(steps=r.LOCAL_STEPS, lr=r.LOCAL_LR, batch_size=batch, device=device, amp=False,
                                trainable=trainable, local_experts=r.LOCAL_EXPERTS, folds=r.LOCAL_FOLDS)
    return FinetuneSettings(steps=200 if gpu else 50, lr=0.001 if gpu else 0.002,
                            batch_size=batch, device=device, amp=device.startswith("cuda"), trainable=trainable)


def free_memory(device: str) -> int | None:
    """Free bytes on ``device`` (CUDA: the driver's free memory; CPU: available RAM), None if unknown."""
    if device.startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # no CUDA build, no driver: let the caller fall back to its defaults
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:  # Linux; elsewhere None (defaults still work)
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- validation split ---------------------------------------------------------------------------------------
def split_validation(n: int, fraction: float = 0.2, chosen: Sequence[int] | None = None, seed: int = 0
                     ) -> list[bool]:
    """Which of ``n`` cases are held back for validation (True): the ``chosen`` indices, or a random
    ``fraction`` rounded up, always at least one case, and always leaving at least one case to train on."""
    if n < 2:
        raise FinetuneError(f"{n} training pair(s): add at least 2 pairs (one is held back for validation)")
    if chosen:
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise FinetuneError(f"validation rows {bad} do not exist (there are {n} rows)")
        val = set(int(i) for i in chosen)
    else:
        if not 0 < fraction < 1:
            raise FinetuneError(f"validation fraction {fraction} must be between 0 and 1 (e.g. 0.2)")
        k = max(1, math.ceil(fraction * n))
        val = set(random.Random(seed).sample(range(n), k))
    if len(val) >= n:
        raise FinetuneError("every pair is marked for validation: leave at least one pair to train on")
    return [i in val for i in range(n)]


def pairs_from_layers(layers: Any, rows: Sequence[tuple[str, str, dict[str, str], bool]], val_fraction: float = 0.2,
                      extra_data: bool = False) -> tuple[list[TrainingPair], list[bool]]:
    """Table rows ``(image name, labels name, attributes, validation)`` -> pairs and validation flags.

    ``layers``: napari's layer list (or any mapping name -> layer with ``.data`` and ``.rgb``). With
    ``extra_data`` (a CSV adds training cases) a single layer pair is allowed and held back for validation."""
    pairs = []
    for image, labels, attrs, _ in rows:
        if image not in layers or labels not in layers:
            raise FinetuneError("a table row names a layer that is not open; pick its image and labels again")
        layer, rgb = layers[image], bool(getattr(layers[image], "rgb", False))
        # the Segment widget runs a (non-RGB) layer at its voxel size: fine-tuning must see the same one
        spacing = layer_spacing(getattr(layer, "scale", None), getattr(layer, "metadata", None))
        spacing = spacing if spacing is not None and not rgb and len(spacing) == 3 else None
        pairs.append(TrainingPair(image, layer.data, layers[labels].data, dict(attrs), rgb, spacing))
    if not pairs or (len(pairs) < 2 and not extra_data):
        raise FinetuneError("add at least two pairs (one is held back to validate the new model)")
    if len(pairs) == 1:
        return pairs, [True]
    return pairs, split_validation(len(pairs), val_fraction, [i for i, row in enumerate(rows) if row[3]])


# -- export -----------------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "case"


def _check_pair(pair: TrainingPair, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(pair.image[0] if isinstance(pair.image, (list, tuple)) else pair.image)
    labels = np.asarray(pair.labels[0] if isinstance(pair.labels, (list, tuple)) else pair.labels)
    spatial = image.shape[:-1] if pair.rgb else image.shape
    if spatial != labels.shape:
        raise FinetuneError(f"pair {pair.name!r}: labels shape {labels.shape} differs from the image's {spatial}; "
                            "pick the labels layer drawn on that image")
    if labels.dtype.kind not in "iub":
        raise FinetuneError(f"pair {pair.name!r}: the labels layer holds {labels.dtype} values; use a Labels layer")
    top = int(labels.max()) if labels.size else 0
    if labels.size and (labels.min() < 0 or top >= spec.n_classes):
        raise FinetuneError(f"pair {pair.name!r}: labels use values up to {top} but the model has classes "
                            f"0..{spec.n_classes - 1} ({', '.join(spec.class_names)}); relabel the layer")
    if len(spatial) not in (2, 3):
        raise FinetuneError(f"pair {pair.name!r}: image of shape {image.shape} is neither 2D nor 3D")
    for attr in spec.attributes:
        value = pair.attributes.get(attr.name)
        if value not in attr.values:
            raise FinetuneError(f"pair {pair.name!r}: {attr.name}={value!r} is not in the model's vocabulary "
                                f"{attr.values}; choose one in the table")
    return image, labels.astype(np.uint8 if top < 256 else np.uint16)


def _count(pairs: Sequence[TrainingPair], spec: Any) -> dict[str, dict[str, int]]:
    return {a.name: dict(Counter(p.attributes[a.name] for p in pairs)) for a in spec.attributes}


def _write_nifti(path: Path, array: np.ndarray, spacing: Sequence[float]) -> None:
    """A (z, y, x) array as NIfTI with voxel size ``spacing`` (z, y, x), oriented so that ``read_image`` gives
    back exactly this array: LPS voxel order, its canonical one (``io/nifti.py``)."""
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise FinetuneError(f"layer scale {tuple(spacing)} is not a voxel size (three positive numbers, z, y, x); "
                            "fix the image layer's scale")
    write_volume(path, array, spacing)


def export_pairs(pairs: Sequence[TrainingPair], folder: str | os.PathLike, spec: Any, is_val: Sequence[bool]
                 ) -> ExportSummary:
    """Write the pairs plus ``pairs.csv`` (``image, mask, <attributes>, split``) in ``folder``.

    3D pairs with a voxel size (``pair.spacing``) go as NIfTI (.nii.gz) carrying it, so training resamples them
    to the model's spacing like any NIfTI (and like the Segment widget does). 2D pairs and volumes without a
    voxel size go as TIFF, which keeps float intensities and stacks as they are (PNG would quantise); the engine
    uses those on their own grid. The engine reads both with the same ``read_image`` as every other format.
    """
    import tifffile

    if len(is_val) != len(pairs):
        raise FinetuneError(f"{len(is_val)} split flags for {len(pairs)} pairs")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    names = [a.name for a in spec.attributes]
    rows, train, val, used = [], [], [], Counter()
    for pair, held in zip(pairs, is_val):
        image, labels = _check_pair(pair, spec)
        base = _safe(pair.name)
        used[base] += 1
        case = base if used[base] == 1 else f"{base}_{used[base]}"  # same layer added twice: keep both
        nifti = spec.spatial_dims == 3 and pair.spacing is not None and not pair.rgb and labels.ndim == 3
        suffix = ".nii.gz" if nifti else ".tif"
        if nifti:
            if image.dtype == np.float16 or image.dtype.kind == "b":  # types NIfTI does not store
                image = image.astype(np.float32)
            _write_nifti(folder / "images" / f"{case}{suffix}", image, pair.spacing)
            _write_nifti(folder / "masks" / f"{case}{suffix}", labels, pair.spacing)
        else:
            photometric = "rgb" if pair.rgb else "minisblack"
            atomic_write(folder / "images" / f"{case}{suffix}",
                         lambda tmp: tifffile.imwrite(tmp, image, photometric=photometric))
            atomic_write(folder / "masks" / f"{case}{suffix}", lambda tmp: tifffile.imwrite(tmp, labels))
        rows.append({"image": f"images/{case}{suffix}", "mask": f"masks/{case}{suffix}",
                     **{n: pair.attributes[n] for n in names}, SPLIT_COLUMN: "val" if held else "train"})
        (val if held else train).append(case)
    csv_path = folder / PAIRS_CSV
    atomic_write_text(csv_path, _csv_text(rows, ["image", "mask", *names, SPLIT_COLUMN], header=True))
    held = [p for p, v in zip(pairs, is_val) if v]
    return ExportSummary(csv_path, train, val, _count(pairs, spec), _count(held, spec))


def append_csv_rows(csv_path: str | os.PathLike, extra: str | os.PathLike | None, spec: Any) -> int:
    """Append a user's CSV (``image, mask, <attributes>[, split]``, paths relative to it; the generic folder
    format) to the exported pairs with absolute paths; rows without a split train. Returns the training rows."""
    if not extra or not str(extra).strip():
        return 0
    source = Path(extra).expanduser()
    if not source.is_file():
        raise FinetuneError(f"training CSV {source} not found; pick an existing file or clear the field")
    names = [a.name for a in spec.attributes]
    with open(source, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: Excel writes a BOM
        rows = list(csv.DictReader(fh))
    missing = [c for c in ("image", "mask", *names) if rows and c not in rows[0]]
    if not rows or missing:
        raise FinetuneError(f"{source}: needs columns image, mask, {', '.join(names)}"
                            + (f"; missing {missing}" if missing else "; the file has no rows"))
    out, n_train = [], 0
    for line, row in enumerate(rows, start=2):
        split = (row.get(SPLIT_COLUMN) or "").strip().lower() or "train"
        if split not in ("train", "val", "test"):
            raise FinetuneError(f"{source} line {line}: split {split!r} must be train, val or test")
        paths = {k: (source.parent / row[k].strip()).resolve() for k in ("image", "mask")}
        for path in paths.values():
            if not path.is_file():
                raise FinetuneError(f"{source} line {line}: file {path} not found")
        out.append({**{k: str(v) for k, v in paths.items()}, **{n: row[n] for n in names}, SPLIT_COLUMN: split})
        n_train += split == "train"
    # the whole table again, atomically: an append cut short would leave half a row
    atomic_write_text(csv_path, csv_path.read_text(encoding="utf-8")
                      + _csv_text(out, ["image", "mask", *names, SPLIT_COLUMN], header=False))
    return n_train


def _csv_text(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], header: bool) -> str:
    import io

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# -- what to train ----------------------------------------------------------------------------------------
TRAINABLE_MODES = ("group_local", "routers_experts", "all")


def corrected_groups(spec: Any, attributes: Sequence[Mapping[str, str]]) -> list[str]:
    """The groups (attribute combinations, "Black" or "Black/Female") that the corrected cases cover."""
    names = [a.name for a in spec.attributes]
    return sorted({group_name(a.get(n) for n in names) for a in attributes})


def uncorrected_groups(spec: Any, attributes: Sequence[Mapping[str, str]]) -> list[str]:
    """Every group of the model that no corrected case covers (what a full fine-tune may silently harm)."""
    covered = set(corrected_groups(spec, attributes))
    return [g for g in all_groups(spec) if g not in covered]


def default_trainable(spec: Any, attributes: Sequence[Mapping[str, str]]) -> str:
    """``group_local`` when the corrected cases cover some groups only (the others then stay bitwise as they
    were), else ``all``; models without routers can only train ``all``."""
    if spec.routing != "dmoe":
        return "all"
    return "group_local" if uncorrected_groups(spec, attributes) else "all"


# -- config -----------------------------------------------------------------------------------------------
def build_config(base_model: str | os.PathLike, spec: Any, export: ExportSummary, output_dir: str | os.PathLike,
                 settings: FinetuneSettings, name: str = "finetune", n_train: int | None = None) -> dict[str, Any]:
    """A ``dmoe train`` config that fine-tunes ``base_model`` on the exported pairs (engine schema,
    ``training/config.py``). ``n_train``: training cases in all (default: the exported ones)."""
    if settings.steps < 1 or settings.batch_size < 1 or settings.lr <= 0:
        raise FinetuneError("steps and batch size must be at least 1 and the learning rate positive")
    if settings.trainable not in TRAINABLE_MODES:
        raise FinetuneError(f"trainable={settings.trainable!r}: choose one of {list(TRAINABLE_MODES)}")
    if settings.trainable == "group_local" and spec.routing != "dmoe":
        raise FinetuneError("a group-local fine-tune needs a dMoE model (one router per group); this base model "
                            "has none: train 'all' weights instead")
    if settings.trainable == "routers_experts" and spec.routing == "none":
        raise FinetuneError("this base model has no routers or experts; train 'all' weights instead")
    method = {"dmoe": "dmoe", "moe": "moe", "none": "baseline"}[spec.routing]
    val_every = settings.val_every or max(1, settings.steps // 5)
    # the engine rebuilds the network from preset + overrides: carry every size that differs from the preset
    # so each base tensor fits (its loader silently skips tensors that do not)
    from napari_dmoe.model.registry import PRESETS, preset_for

    preset = preset_for(spec)
    overrides: dict[str, Any] = {k: v for k, v in spec.arch_kwargs.items() if PRESETS[preset].get(k) != v}
    if spec.spatial_dims == 3:  # 3D trains on random patches of the spec's input size
        overrides["input_size"] = list(settings.patch_size or spec.input_size)
    if spec.spacing is not None:
        overrides["spacing"] = list(spec.spacing)
    from napari_dmoe.finetune.local_recipe import candidate_steps, local_recipe

    cv = settings.trainable == "group_local" and settings.folds > 1
    # the engine needs one full batch of training cases (cross-validation: of the cases outside a fold)
    n_cases = (n_train if n_train is not None else len(export.train)) + (len(export.val) if cv else 0)
    n_cases -= math.ceil(n_cases / min(settings.folds, n_cases)) if cv else 0
    batch = max(1, min(settings.batch_size, n_cases))
    return {
        "name": name,
        "seed": 1234,
        "output_dir": str(Path(output_dir).resolve()),
        "method": method,
        "trainable": settings.trainable,
        # group_local adapts the groups (combinations) that have training cases: adapt_groups stays null
        **({"local_experts": int(settings.local_experts)} if settings.trainable == "group_local" else {}),
        "data": {
            "format": "folder",
            "root": str(export.csv_path.parent.resolve()),
            "csv": export.csv_path.name,
            "split_column": SPLIT_COLUMN,
            "attributes": {a.name: list(a.values) for a in spec.attributes},
            "class_names": list(spec.class_names),
            "size": list(spec.input_size) if spec.spatial_dims == 2 else None,  # 3D: whole volumes, patched
            "normalization": dict(spec.normalization),
            "in_channels": int(spec.in_channels),
        },
        "model": {
            "preset": preset,
            "overrides": overrides,
            "n_experts": int(spec.n_experts),
            "top_k": int(spec.top_k),
            "base_model": str(Path(base_model).resolve()),
        },
        "recipe": {
            "name": "paper2d" if spec.spatial_dims == 2 else "3d",
            "lr": float(settings.lr),
            "steps": int(settings.steps),
            "batch_size": int(batch),
            "amp": bool(settings.amp),
            "val_every": int(val_every),
            "validate_first": bool(settings.keep_base),  # the base is kept unless a step beats it
            **(local_recipe() if cv else {}),
        },
        **({"crossval": {"folds": int(settings.folds), "steps": candidate_steps(settings.steps),
                         "keep_base": bool(settings.keep_base)}} if cv else {}),
    }


def write_config(config: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the config as YAML (the file the user can re-run with ``dmoe train`` on a cluster)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, yaml.safe_dump(dict(config), sort_keys=False))
