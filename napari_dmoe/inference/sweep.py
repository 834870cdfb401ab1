"""How much the patient attribute matters: agreement between masks and expert usage per attribute value.

No Qt: the attribute-sweep table and the routing inspector of the napari widgets are drawn from these results,
and the CLI or a notebook can use them directly. ``iter_folder_usage`` runs the inference engine over a folder
of cases (the engine is imported inside it, so the maths above stays plain numpy); ``write_folder_csv`` saves
its per-case results for a spreadsheet or a statistics package.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Mapping, NamedTuple, Sequence

import numpy as np

from napari_dmoe.io.files import atomic_write
from napari_dmoe.model.spec import attribute_text


class SweepError(ValueError):
    """Masks or routing summaries that cannot be compared; the message says why."""


@dataclass
class SweepTable:
    """Pairwise agreement between the label maps of one image segmented under several attribute values.

    ``dice[i, j]``: mean Dice over the foreground classes present in mask i or mask j (1.0 when both masks are
    empty); ``class_dice[i, j, c - 1]``: Dice of class c (NaN when absent from both); ``changed[i, j]``:
    pixels/voxels whose label differs.
    """

    values: list[str]
    dice: np.ndarray
    class_dice: np.ndarray
    changed: np.ndarray
    n_voxels: int

    def pairs(self) -> list[tuple[str, str, float, int, float]]:
        """One row per unordered pair: (value a, value b, Dice, changed voxels, changed percent)."""
        rows = []
        for i in range(len(self.values)):
            for j in range(i + 1, len(self.values)):
                changed = int(self.changed[i, j])
                rows.append((self.values[i], self.values[j], float(self.dice[i, j]), changed,
                             100.0 * changed / max(self.n_voxels, 1)))
        return rows


def pairwise_agreement(masks: Mapping[str, np.ndarray], n_classes: int | None = None) -> SweepTable:
    """Compare every pair of label maps (same shape, integer labels, 0 = background)."""
    if len(masks) < 2:
        raise SweepError(f"need at least two masks to compare, got {len(masks)}")
    values = [str(v) for v in masks]
    arrays = [np.asarray(m) for m in masks.values()]
    shape = arrays[0].shape
    for value, a in zip(values, arrays):
        if a.shape != shape:
            raise SweepError(f"mask for {value!r} has shape {a.shape}, expected {shape} like the others")
        if a.dtype.kind not in "iub":
            raise SweepError(f"mask for {value!r} has dtype {a.dtype}; label maps must hold integers")
    if n_classes is None:
        n_classes = int(max(a.max(initial=0) for a in arrays)) + 1
    n = len(arrays)
    class_dice = np.full((n, n, max(n_classes - 1, 0)), np.nan)
    changed = np.zeros((n, n), dtype=np.int64)
    # Boolean counts per class, not MONAI's compute_dice: that needs one-hot float tensors of the whole
    # volume per pair (gigabytes at 512x512x300), while these counts need one boolean mask at a time.
    sizes = [[np.count_nonzero(a == c) for c in range(1, n_classes)] for a in arrays]
    for i in range(n):
        for j in range(i, n):
            changed[i, j] = changed[j, i] = np.count_nonzero(arrays[i] != arrays[j])
            for c in range(1, n_classes):
                total = sizes[i][c - 1] + sizes[j][c - 1]
                if total == 0:
                    continue
                both = np.count_nonzero((arrays[i] == c) & (arrays[j] == c)) if i != j else sizes[i][c - 1]
                class_dice[i, j, c - 1] = class_dice[j, i, c - 1] = 2.0 * both / total
    dice = np.ones((n, n))
    for i in range(n):
        for j in range(n):
            present = class_dice[i, j][~np.isnan(class_dice[i, j])]
            if present.size:
                dice[i, j] = present.mean()
    return SweepTable(values, dice, class_dice, changed, int(np.prod(shape)))


def expert_usage(routing_map: np.ndarray) -> list[float]:
    """Mean gate weight of each expert over the whole grid of a routing map ``[E, *grid]``."""
    arr = np.asarray(routing_map)
    if arr.ndim < 2:
        raise SweepError(f"a routing map is [experts, *grid], got shape {arr.shape}")
    return [float(v) for v in arr.reshape(arr.shape[0], -1).mean(axis=1, dtype=np.float64)]


def usage_matrix(rows: Sequence[tuple[str, Mapping[str, Sequence[float]]]], position: str = "mean"
                 ) -> tuple[list[str], np.ndarray]:
    """Stack per-attribute expert usage into an ``[attribute values, experts]`` matrix for one position.

    ``rows``: (row label, usage dict position -> per-expert means) as stored by the segment widget. Rows
    without that position are skipped; all rows must have the same number of experts.
    """
    labels, data = [], []
    for label, usage in rows:
        if position not in usage:
            continue
        vec = [float(v) for v in usage[position]]
        if data and len(vec) != len(data[0]):
            raise SweepError(f"row {label!r} has {len(vec)} experts, others have {len(data[0])}")
        labels.append(label)
        data.append(vec)
    return labels, np.asarray(data, dtype=float).reshape(len(data), -1 if data else 0)


# -- expert usage over a folder of cases ---------------------------------------------------------------------
class FolderProgress(NamedTuple):
    """Cases ``done`` of ``total``; ``name`` is the case being segmented and ``stage`` the engine's step."""

    done: int
    total: int
    name: str
    stage: str = ""


class CaseUsage(NamedTuple):
    """One case of a folder: its attribute from the CSV (None = unknown), the routers the engine ran (their outputs
    averaged when several), the attribute as the engine describes it, usage (position -> per-expert mean gate
    weight over the image; "mean" only, as the folder run keeps no per-position maps) and why it was skipped
    ("" when it was not; skipped cases have no usage)."""

    name: str
    attribute: dict[str, str] | None
    routers: list[int]
    used: str
    usage: dict[str, list[float]]
    error: str = ""


class FolderUsage(NamedTuple):
    """Rows (one per attribute value or combination, vocabulary order, "unknown" last), the ``[rows, experts]``
    mean gate weights (mean over the cases of each case's image-mean), cases per row, skipped (name, message);
    then every case in CSV order, the model's attribute names and the model file (for ``write_folder_csv``)."""

    labels: list[str]
    matrix: np.ndarray
    counts: list[int]
    errors: list[tuple[str, str]]
    cases: list[CaseUsage]
    attributes: list[str]
    model: str


def _group_key(spec: Any, attribute: Mapping[str, str] | None) -> tuple[int, str]:
    if attribute is None:
        return (spec.n_routers, "unknown")  # after every router: "unknown" comes last
    label = attribute_text(attribute)
    if any(v.lower() == "unknown" for v in attribute.values()):  # partly unknown: after every router too
        return (spec.n_routers, label)
    index = spec.router_index(attribute) if spec.routing == "dmoe" else 0
    return (index, label)


def iter_folder_usage(model: Any, folder: str | Path, csv_path: str | Path, **options: Any
                      ) -> Generator[FolderProgress, None, FolderUsage]:
    """Segment every case listed in ``csv_path`` (column ``image`` + one per attribute) and average the expert
    usage per attribute value. Unreadable or unusable cases are skipped and listed in ``errors``; bad CSVs,
    models without experts and folders without a single usable case raise a ``ValueError``.

    ``options`` go to ``iter_segment`` (``device``, ``overlap``...); routing is always ``"mean"``.
    """
    from napari_dmoe.io.cases import read_batch_csv
    from napari_dmoe.generators import relay
    from napari_dmoe.io.images import read_image
    from napari_dmoe.inference.engine import iter_segment
    from napari_dmoe.model.routers import resolve_routers

    spec = model.spec
    if spec.routing == "none":
        raise SweepError(f"model {getattr(model, 'path', '')!s} has no mixture of experts: there is no expert "
                         "usage to show; pick a dMoE or MoE model")
    folder = Path(folder)
    if not folder.is_dir():
        raise SweepError(f"{folder} is not a folder; pick the folder that holds the images listed in the CSV")
    rows = read_batch_csv(Path(csv_path), spec)
    sums: dict[tuple[int, str], np.ndarray] = {}
    counts: dict[tuple[int, str], int] = {}
    errors: list[tuple[str, str]] = []
    cases: list[CaseUsage] = []
    for i, (name, attribute) in enumerate(rows):
        yield FolderProgress(i, len(rows), name, "reading")
        try:
            volume = read_image(folder / name)
            gen = iter_segment(model, volume.array, attribute, spacing=volume.known_spacing, rgb=volume.rgb,
                               **{**options, "routing": "mean"})
            # a cancelled worker stops here and the engine puts the network back
            seg = yield from relay(gen, lambda step: FolderProgress(i, len(rows), name, step.stage))
            usage = np.asarray(expert_usage(seg.routing["mean"]))
            routers = resolve_routers(spec, attribute, options.get("unknown", "average")).indices  # as the engine did
        except (ValueError, OSError) as err:  # one bad case must not stop the folder; it is reported instead
            errors.append((name, " ".join(str(err).split())))
            cases.append(CaseUsage(name, attribute, [], "", {}, errors[-1][1]))
            continue
        cases.append(CaseUsage(name, attribute, routers, attribute_text(seg.attribute), {"mean": usage.tolist()}))
        key = _group_key(spec, attribute)
        sums[key] = sums.get(key, 0.0) + usage
        counts[key] = counts.get(key, 0) + 1
    yield FolderProgress(len(rows), len(rows), "", "done")
    if not sums:
        detail = "; ".join(f"{n}: {m}" for n, m in errors[:3])
        raise SweepError(f"none of the {len(rows)} cases in {csv_path} could be segmented ({detail})")
    keys = sorted(sums)
    matrix = np.stack([sums[k] / counts[k] for k in keys])
    return FolderUsage([k[1] for k in keys], matrix, [counts[k] for k in keys], errors, cases,
                       [a.name for a in spec.attributes], str(getattr(model, "path", "")))


def folder_csv_rows(result: FolderUsage) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``write_folder_csv`` (strings, as written)."""
    n_experts = result.matrix.shape[1]
    positions = sorted({p for c in result.cases for p in c.usage}, key=lambda p: (p != "mean", len(p), p))
    experts = [f"expert_{e}" if p == "mean" else f"{p}_expert_{e}" for p in positions for e in range(n_experts)]
    header = ["case", *result.attributes, "router", "attribute_used", *experts, "status", "reason", "model"]
    from napari_dmoe.io.cases import spreadsheet_text as text  # names and values from the user's files (OWASP)

    rows = []
    for case in result.cases:
        values = [text((case.attribute or {}).get(a, "unknown")) for a in result.attributes]
        usage = [f"{v:.6f}" if p in case.usage else "" for p in positions
                 for v in case.usage.get(p, [0.0] * n_experts)]  # blank cells where a case has no such usage
        rows.append([text(case.name), *values, " ".join(str(r) for r in case.routers), text(case.used), *usage,
                     "skipped" if case.error else "ok", text(case.error), text(result.model)])
    return header, rows


def write_folder_csv(result: FolderUsage, path: str | Path) -> Path:
    """Write one row per case of a folder run, in the order of its CSV, and return the path.

    Columns: ``case`` (image file name), one per attribute (the value from the CSV; ``unknown`` for an empty
    cell: the case ran every router that fits its known values), ``router`` (the router indices the engine ran,
    space-separated when their outputs were averaged), ``attribute_used`` (the engine's description),
    ``expert_0`` .. ``expert_{E-1}`` (mean gate weight of each expert over the image, averaged over the dMoE
    positions; they sum to 1), ``<position>_expert_<e>`` when a result has per-position usage, ``status``
    (``ok`` or ``skipped``), ``reason`` (why a case was skipped; its expert columns stay empty) and ``model``.
    Skipped cases stay in the same file so the table lists every case of the CSV. Written atomically (a
    temporary file in the same folder, then renamed), so a failed export never leaves half a file.
    """
    path = Path(path)
    if path.is_dir():
        raise SweepError(f"{path} is a folder; give a file name such as {path / 'expert_usage.csv'}")
    if not path.parent.is_dir():
        raise SweepError(f"cannot write {path}: the folder {path.parent} does not exist")
    header, rows = folder_csv_rows(result)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    try:
        return atomic_write(path, write)
    except OSError as err:
        raise SweepError(f"cannot write {path}: {err.strerror or err}") from None
