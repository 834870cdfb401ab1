"""The feature record of a model (``trained_on["features"]``): how it is fitted, stored and read back.

Fitting (``fit_record``): per layer, the mean and a Ledoit-Wolf shrunk covariance (Ledoit & Wolf 2004) of the
pooled features over the training images, kept as its top principal directions and one variance for the other
directions; each layer's squared Mahalanobis distance is divided by its median over held-out images, and the
per-layer ratios are averaged (about 1 for a training-like image). The threshold is the ``QUANTILE`` of the
held-out scores (the validation split, plus each training image scored by statistics fitted without it, in
``FOLDS`` folds) times ``1 + MARGIN``. Numbers are stored with ``DIGITS`` significant digits.

Reading (``parse_record``): a model file is data from elsewhere: every size is bounded and every value checked
before use, and anything wrong raises ``RecordError`` naming the field. numpy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

METHOD = "mahalanobis-lw-pca"
POOLS = ("mean", "mean_std")
POOL = "mean_std"  # mean and standard deviation of each channel over the window
WINDOWS = 8  # windows (or slices) of one image that enter its features, evenly spread
N_COMPONENTS = 16  # principal directions kept per layer (the rest share one variance)
FOLDS = 5  # cross-fitting of the training images' own held-out scores
# threshold = QUANTILE of the held-out scores x (1 + MARGIN). MARGIN: the largest that still flags all 14 validation
# pictures under every demo model (bench_fit_check.py --select); 0.25 until the fundus model's retrain (issue 26)
QUANTILE, MARGIN = 0.99, 0.5
MIN_CASES = 4  # fewer training images give no record
# bounds on what a model file may state (far above any record we write)
MAX_LAYERS, MAX_DIM, MAX_COMPONENTS, MAX_WINDOWS, MAX_NUMBERS = 16, 8192, 64, 64, 2**21
DIGITS = 4  # significant digits stored


class RecordError(ValueError):
    """The feature record of a model cannot be used; the message names the field and what to do."""


@dataclass(frozen=True)
class LayerStats:
    name: str
    mean: np.ndarray  # [d]
    components: np.ndarray  # [k, d], orthonormal rows
    variances: np.ndarray  # [k]
    residual: float  # variance of every direction outside the components
    scale: float  # median held-out distance (1.0 before it is known)

    def distance(self, x: np.ndarray) -> float:
        c = x - self.mean
        p = self.components @ c
        r = c - self.components.T @ p
        return float(np.sum(p * p / self.variances) + (r @ r) / self.residual)


@dataclass(frozen=True)
class Record:
    layers: list[LayerStats]
    threshold: float
    pool: str
    windows: int
    router: int


# -- statistics --------------------------------------------------------------------------------------------------
def _fit_layer(name: str, x: np.ndarray, n_components: int) -> LayerStats:
    """Mean and Ledoit-Wolf covariance of ``x`` [n, d], kept as its top ``n_components`` eigenvectors and one
    variance for the other directions (their mean eigenvalue)."""
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    lam = s**2 / n  # eigenvalues of the sample covariance (the others are 0)
    m = max(float(lam.sum()) / d, 1e-12)
    norm2 = float(np.sum(lam**2))
    d2 = norm2 - d * m * m  # ||S - m I||^2
    b2 = (float(np.sum(np.sum(xc**2, axis=1) ** 2)) - n * norm2) / n**2
    alpha = 1.0 if d2 <= 1e-30 else min(max(b2, 0.0), d2) / d2  # Ledoit & Wolf (2004)
    k = int(min(n_components, d - 1, int(np.count_nonzero(lam > 1e-12 * m)))) if d > 1 else 0
    variances = (1 - alpha) * lam[:k] + alpha * m
    rest = d - k
    residual = ((1 - alpha) * float(lam[k:].sum()) + alpha * m * rest) / rest if rest else 1.0
    return LayerStats(name, mean, vt[:k], np.maximum(variances, 1e-12), max(residual, 1e-12), 1.0)


def scored(layers: Sequence[LayerStats], features: Sequence[np.ndarray]) -> np.ndarray:
    """Per-layer distances, each divided by its layer's scale."""
    return np.array([st.distance(f) / st.scale for st, f in zip(layers, features)])


def fit_record(names: Sequence[str], train: Sequence[Sequence[np.ndarray]], heldout: Sequence[Sequence[np.ndarray]],
               *, pool: str = POOL, windows: int = WINDOWS, router: int = 0, n_components: int = N_COMPONENTS,
               quantile: float = QUANTILE, margin: float = MARGIN, folds: int = FOLDS) -> dict[str, Any] | None:
    """The ``trained_on["features"]`` record from the features (``image_features``) of training images and of
    held-out training-site images; None with fewer than ``MIN_CASES`` training images."""
    n = len(train)
    if n < MIN_CASES:
        return None
    stacks = [np.stack([f[i] for f in train]) for i in range(len(names))]
    layers = [_fit_layer(name, x, n_components) for name, x in zip(names, stacks)]
    raw = [scored(layers, f) for f in heldout]
    folds = min(folds, n)
    for fold in range(folds):  # each training image scored by statistics fitted without it
        keep = np.arange(n) % folds != fold
        fitted = [_fit_layer(name, x[keep], n_components) for name, x in zip(names, stacks)]
        raw += [scored(fitted, [x[i] for x in stacks]) for i in np.flatnonzero(~keep)]
    raw_arr = np.stack(raw)
    scales = np.maximum(np.median(raw_arr, axis=0), 1e-12)
    combined = (raw_arr / scales).mean(1)
    threshold = float(np.quantile(combined, quantile)) * (1 + margin)
    out_layers = [{"name": st.name, "mean": _round(st.mean), "components": [_round(c) for c in st.components],
                   "variances": _round(st.variances), "residual": _num(st.residual), "scale": _num(sc)}
                  for st, sc in zip(layers, scales)]
    return {"method": METHOD, "pool": pool, "windows": windows, "router": router, "layers": out_layers,
            "threshold": _num(threshold), "quantile": quantile, "margin": margin, "n_train": n,
            "n_heldout": len(raw), "n_validation": len(heldout),
            "heldout_scores": {k: _num(v) for k, v in (("median", np.median(combined)),
                                                       ("q99", np.quantile(combined, 0.99)),
                                                       ("max", combined.max()))}}


def _num(v: float) -> float:
    return float(f"{float(v):.{DIGITS}g}")


def _round(a: np.ndarray) -> list[float]:
    return [_num(v) for v in np.asarray(a).ravel()]


# -- reading a record (data from a model file: every size bounded, every value checked) ---------------------------
def record_field(where: str, problem: str) -> RecordError:
    return RecordError(f"{where}: {problem}; the record of the training images is damaged: re-record it (dmoe "
                       "train, or sample_data/record_trained_on.py for the demo models) or use another model file")


def _vector(value: Any, where: str, length: int | None = None, positive: bool = False) -> np.ndarray:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_DIM:
        raise record_field(where, f"expected a list of 1 to {MAX_DIM} numbers")
    if length is not None and len(value) != length:
        raise record_field(where, f"{len(value)} values, expected {length}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise record_field(where, "holds something other than numbers")
    try:
        out = np.asarray(value, dtype=np.float64)
    except OverflowError:  # an integer beyond any float
        out = np.array([np.inf])
    if not np.isfinite(out).all() or (positive and (out <= 0).any()):
        raise record_field(where, "holds values that are not " + ("finite and positive" if positive else "finite"))
    return out


def _scalar(value: Any, where: str, low: float = 0.0, high: float = math.inf, integer: bool = False) -> float:
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if ok and not integer:
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            ok = False
    if not ok or not (low <= value <= high) or (not integer and not math.isfinite(value)):
        what = "an integer" if integer else "a number"
        raise record_field(where, f"{str(value)[:40]} is not {what} in [{low:g}, {high:g}]")
    return value


def parse_record(rec: Any, where: str = "trained_on.features") -> Record:
    """The checked record; RecordError naming the field for anything missing, mis-sized or out of range."""
    if not isinstance(rec, Mapping):
        raise record_field(where, "expected an object")
    if rec.get("method") != METHOD:
        raise record_field(f"{where}.method", f"{str(rec.get('method'))[:40]!r} is not {METHOD!r}")
    if rec.get("pool") not in POOLS:
        raise record_field(f"{where}.pool", f"expected one of {list(POOLS)}")
    layers = rec.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise record_field(f"{where}.layers", f"expected a list of 1 to {MAX_LAYERS} layers")
    total, out = 0, []
    for i, layer in enumerate(layers):
        at = f"{where}.layers[{i}]"
        if not isinstance(layer, Mapping) or not isinstance(layer.get("name"), str) or len(layer["name"]) > 100:
            raise record_field(at, "expected an object with a name")
        comps = layer.get("components")
        if not isinstance(comps, list) or len(comps) > MAX_COMPONENTS:
            raise record_field(f"{at}.components", f"expected a list of at most {MAX_COMPONENTS} vectors")
        mean = _vector(layer.get("mean"), f"{at}.mean")
        total += len(mean) * (len(comps) + 1)
        if total > MAX_NUMBERS:
            raise record_field(f"{at}.components", f"more than {MAX_NUMBERS} numbers in all")
        rows = [_vector(c, f"{at}.components[{j}]", len(mean)) for j, c in enumerate(comps)]
        comp = np.stack(rows) if rows else np.zeros((0, len(mean)))
        var = _vector(layer.get("variances"), f"{at}.variances", len(rows), positive=True) if rows else np.zeros(0)
        out.append(LayerStats(layer["name"], mean, comp, var, _scalar(layer.get("residual"), f"{at}.residual", 1e-30),
                              _scalar(layer.get("scale"), f"{at}.scale", 1e-30)))
    return Record(out, _scalar(rec.get("threshold"), f"{where}.threshold", 1e-30), rec["pool"],
                  int(_scalar(rec.get("windows"), f"{where}.windows", 1, MAX_WINDOWS, integer=True)),
                  int(_scalar(rec.get("router"), f"{where}.router", 0, 4096, integer=True)))
