"""How far an image, as the model sees it, lies from the model's training images in its own features.

The out-of-distribution score of Lee et al. (2018, "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks"): a Mahalanobis distance of the model's pooled encoder features from their mean
over the training images, per layer, combined over layers.

- Input: the image goes through the engine's own preparation (``engine._prepare``: sanitising, channel
  conversion, bit depth, normalisation, resampling to the model's voxel size, resizing to its input, padding);
  at most ``WINDOWS`` of the engine's windows (or slices, for a 2D model on a volume) are run.
- Features: the outputs of a few encoder layers (``feature_layers``: TransUNet blocks and the final encoder
  norm; the 3D UNet's five encoder stages), pooled over the part of each window that lies on the image (mean and
  standard deviation per channel), averaged over windows. Router 0 routes every image, at recording and at
  checking alike, so the score does not depend on the attribute the user picks.
- Statistics (``fit_record``): per layer, the mean and a Ledoit-Wolf shrunk covariance over the training images
  (few images suffice), stored compactly as its top principal directions and one variance for the rest.
- Score: per layer the squared distance divided by its median over held-out training-site images, averaged over
  layers, so an image like the training images scores about 1.
- Threshold: the ``QUANTILE`` of the held-out scores (the validation split, plus cross-fitted scores of the
  training images themselves) times ``1 + MARGIN``.

The record sits in ``spec.trained_on["features"]`` (written by ``dmoe train``); ``parse_record`` checks every size
and value in it before use, so a damaged or tampered record is refused with ``RecordError``, naming the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from napari_dmoe.inference.fit import Finding
from napari_dmoe.inference.plan import InferenceError

METHOD = "mahalanobis-lw-pca"
POOLS = ("mean", "mean_std")
POOL = "mean_std"
N_COMPONENTS = 16  # principal directions kept per layer (the rest share one variance)
WINDOWS = 8  # windows (or slices) of one image that enter its features, evenly spread
MAX_BLOCKS = 4  # transformer blocks used, evenly spread, besides the final encoder norm
FOLDS = 5  # cross-fitting of the training images' own held-out scores
QUANTILE, MARGIN = 0.99, 0.25  # threshold = QUANTILE of the held-out scores x (1 + MARGIN); BENCHMARKS.md
MIN_CASES = 4  # fewer training images give no record
OVERLAP = 0.25  # the engine's default window overlap: the same windows as a segmentation
# bounds on what a model file may state (far above any record we write)
MAX_LAYERS, MAX_DIM, MAX_COMPONENTS, MAX_WINDOWS, MAX_NUMBERS = 16, 8192, 64, 64, 2**21
DIGITS = 4  # significant digits stored


class RecordError(ValueError):
    """The feature record of a model cannot be used; the message names the field and what to do."""


@dataclass(frozen=True)
class Score:
    """``value``: the image's score (about 1 for training-like images); flagged above ``threshold``."""

    value: float
    threshold: float
    layers: dict[str, float]

    @property
    def flagged(self) -> bool:
        return self.value > self.threshold


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


# -- features ----------------------------------------------------------------------------------------------------
def _evenly(n: int, most: int) -> list[int]:
    """At most ``most`` indices of range(n), evenly spread, the last one included."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)}) if most > 1 else [n - 1]


def feature_layers(network: torch.nn.Module) -> list[tuple[str, torch.nn.Module]] | None:
    """(name, module) of the encoder layers whose outputs are the features, in forward order; None for a network
    we do not know (a registered network may say with a ``feature_layers()`` method)."""
    own = getattr(network, "feature_layers", None)
    if callable(own):
        return list(own())
    from napari_dmoe.model.resunet3d import ResUNet3D
    from napari_dmoe.model.transunet import TransUNet

    if isinstance(network, TransUNet):
        encoder = network.transformer.encoder
        blocks = [(f"block{i}", encoder.layer[i]) for i in _evenly(len(encoder.layer), MAX_BLOCKS)]
        return [*blocks, ("encoder", encoder.encoder_norm)]
    if isinstance(network, ResUNet3D):
        stages = (network.encoder1, network.encoder2, network.encoder3, network.encoder4, network.encoder10)
        return [(f"stage{i}", m) for i, m in enumerate(stages)]
    return None


class _Enough(Exception):
    """Raised by the last hook: the decoder need not run."""


def _layer_outputs(network: torch.nn.Module, layers: Sequence[tuple[str, torch.nn.Module]], x: torch.Tensor,
                   router: int) -> list[torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def keep(module: Any, args: Any, out: Any) -> None:
            outs.setdefault(name, out[0] if isinstance(out, tuple) else out)
            if len(outs) == len(layers):
                raise _Enough

        return keep

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    attr = torch.full((x.shape[0],), router, dtype=torch.long, device=x.device)
    try:
        network(x, attr)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, _ in layers if n not in outs]
    if missing:
        raise RecordError(f"the network did not run the feature layers {missing}")
    return [outs[n] for n, _ in layers]


def _pool(out: torch.Tensor, frac: Sequence[float], pool: str) -> torch.Tensor:
    """One window's layer output -> [D]: mean (and std) per channel over the part of the window on the image
    (``frac``: that share of the window along each axis). Tokens [N, C] on a square grid count as a 2D map."""
    if out.dim() == 2:  # tokens [N, C]
        g = math.isqrt(out.shape[0])
        out = out.T.reshape(out.shape[1], g, g) if g * g == out.shape[0] and len(frac) == 2 else out.T
    if out.dim() - 1 == len(frac):
        out = out[(slice(None), *(slice(0, max(1, math.ceil(f * s - 1e-6))) for f, s in zip(frac, out.shape[1:])))]
    flat = out.flatten(1).float()
    mean = flat.mean(1)
    return mean if pool == "mean" else torch.cat([mean, flat.std(1, unbiased=False)])


def image_features(model: Any, image: Any, spacing: Sequence[float] | None = None, rgb: bool | None = None, *,
                   pool: str = POOL, windows: int = WINDOWS, router: int = 0) -> list[np.ndarray]:
    """Pooled features of ``image`` (napari layout, raw intensities), one vector per ``feature_layers`` entry.
    Raises ``InferenceError`` for an image the engine would refuse."""
    from napari_dmoe.inference.engine import _prepare  # the engine's own preparation of its input
    from napari_dmoe.inference.windows import window

    network, spec = model.network, model.spec
    layers = feature_layers(network)
    if layers is None:
        raise RecordError(f"no feature layers known for the network {type(network).__name__}")
    prep = _prepare(spec, image, None, spacing, rgb, "cpu", None, OVERLAP, "auto", "average")
    plan = prep.plan
    planes = 1 if prep.source is not None else prep.work.shape[0]
    units = [(z, s) for z in range(planes) for s in plan.starts]
    units = [units[i] for i in _evenly(len(units), windows)]

    def read(z: int, start: tuple[int, ...]) -> torch.Tensor:
        if prep.source is not None:
            return prep.source.window(start, plan.roi)
        return prep.work[(z, slice(None), *window(start, plan.roi))]

    first = next(network.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    modes = [(m, m.training) for m in network.modules()]  # training may hold frozen norms in eval: restore each
    network.eval()
    sums: list[torch.Tensor | None] = [None] * len(layers)
    try:
        with torch.inference_mode():
            for z, start in units:
                outs = _layer_outputs(network, layers, read(z, start)[None].to(device), router)
                frac = [max(0, min(s + r, w) - s) / r for s, r, w in zip(start, plan.roi, plan.work)]
                for i, out in enumerate(outs):
                    v = _pool(out[0], frac, pool).cpu()
                    sums[i] = v if sums[i] is None else sums[i] + v
    finally:
        for m, mode in modes:
            m.training = mode
    return [(s / len(units)).double().numpy() for s in sums]


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


def _scored(layers: Sequence[LayerStats], features: Sequence[np.ndarray]) -> np.ndarray:
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
    raw = [_scored(layers, f) for f in heldout]
    folds = min(folds, n)
    for fold in range(folds):  # each training image scored by statistics fitted without it
        keep = np.arange(n) % folds != fold
        fitted = [_fit_layer(name, x[keep], n_components) for name, x in zip(names, stacks)]
        raw += [_scored(fitted, [x[i] for x in stacks]) for i in np.flatnonzero(~keep)]
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


def describe_features(model: Any, train: Iterable[tuple[Any, Any, bool]], heldout: Iterable[tuple[Any, Any, bool]],
                      **options: Any) -> dict[str, Any] | None:
    """``fit_record`` from (image, spacing, rgb) triples of training and held-out images; None for a network
    without known feature layers."""
    layers = feature_layers(model.network)
    if layers is None:
        return None
    keys = ("pool", "windows", "router")
    kw = {k: options[k] for k in keys if k in options}
    train_f = [image_features(model, im, sp, rgb, **kw) for im, sp, rgb in train]
    held_f = [image_features(model, im, sp, rgb, **kw) for im, sp, rgb in heldout]
    return fit_record([n for n, _ in layers], train_f, held_f, **options)


# -- reading a record (data from a model file: every size bounded, every value checked) ---------------------------
def _field(where: str, problem: str) -> RecordError:
    return RecordError(f"{where}: {problem}; the record of the training images is damaged: re-record it "
                       "(dmoe train, or sample_data/record_trained_on.py for the demo models) or use another model file")


def _vector(value: Any, where: str, length: int | None = None, positive: bool = False) -> np.ndarray:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_DIM:
        raise _field(where, f"expected a list of 1 to {MAX_DIM} numbers")
    if length is not None and len(value) != length:
        raise _field(where, f"{len(value)} values, expected {length}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _field(where, "holds something other than numbers")
    out = np.asarray(value, dtype=np.float64)
    if not np.isfinite(out).all() or (positive and (out <= 0).any()):
        raise _field(where, "holds " + ("values that are not finite and positive" if positive else "non-finite values"))
    return out


def _scalar(value: Any, where: str, low: float = 0.0, high: float = math.inf, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not (low <= value <= high) or not math.isfinite(value):
        raise _field(where, f"{value!r:.40} is not {'an integer' if integer else 'a number'} in [{low:g}, {high:g}]")
    return value


def parse_record(rec: Any, where: str = "trained_on.features") -> Record:
    """The checked record; RecordError naming the field for anything missing, mis-sized or out of range."""
    if not isinstance(rec, Mapping):
        raise _field(where, "expected an object")
    if rec.get("method") != METHOD:
        raise _field(f"{where}.method", f"{str(rec.get('method'))[:40]!r} is not {METHOD!r}")
    if rec.get("pool") not in POOLS:
        raise _field(f"{where}.pool", f"expected one of {list(POOLS)}")
    layers = rec.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise _field(f"{where}.layers", f"expected a list of 1 to {MAX_LAYERS} layers")
    total, out = 0, []
    for i, layer in enumerate(layers):
        at = f"{where}.layers[{i}]"
        if not isinstance(layer, Mapping) or not isinstance(layer.get("name"), str) or len(layer["name"]) > 100:
            raise _field(at, "expected an object with a name")
        comps = layer.get("components")
        if not isinstance(comps, list) or len(comps) > MAX_COMPONENTS:
            raise _field(f"{at}.components", f"expected a list of at most {MAX_COMPONENTS} vectors")
        mean = _vector(layer.get("mean"), f"{at}.mean")
        total += len(mean) * (len(comps) + 1)
        if total > MAX_NUMBERS:
            raise _field(f"{at}.components", f"more than {MAX_NUMBERS} numbers in all")
        rows = [_vector(c, f"{at}.components[{j}]", len(mean)) for j, c in enumerate(comps)]
        comp = np.stack(rows) if rows else np.zeros((0, len(mean)))
        var = _vector(layer.get("variances"), f"{at}.variances", len(rows), positive=True) if rows else np.zeros(0)
        out.append(LayerStats(layer["name"], mean, comp, var, _scalar(layer.get("residual"), f"{at}.residual", 1e-30),
                              _scalar(layer.get("scale"), f"{at}.scale", 1e-30)))
    return Record(out, _scalar(rec.get("threshold"), f"{where}.threshold", 1e-30), rec["pool"],
                  int(_scalar(rec.get("windows"), f"{where}.windows", 1, MAX_WINDOWS, integer=True)),
                  int(_scalar(rec.get("router"), f"{where}.router", 0, 4096, integer=True)))


# -- scoring an image --------------------------------------------------------------------------------------------
def score(model: Any, image: Any, spacing: Sequence[float] | None = None, rgb: bool | None = None) -> Score | None:
    """The score of ``image`` against the model's record; None when the model has no record or no known layers.
    Raises RecordError for a damaged record, InferenceError for an image the engine refuses."""
    rec = (getattr(model.spec, "trained_on", None) or {}).get("features")
    if rec is None:
        return None
    parsed = parse_record(rec)
    known = feature_layers(model.network)
    if known is None:
        return None
    names = [n for n, _ in known]
    if [st.name for st in parsed.layers] != names:
        raise _field("trained_on.features.layers", f"names {[st.name for st in parsed.layers]}, the network's "
                                                   f"feature layers are {names}")
    n_routers = max(1, int(getattr(model.spec, "n_routers", 1) or 1))
    if parsed.router >= n_routers:
        raise _field("trained_on.features.router", f"{parsed.router} is not one of the model's {n_routers} routers")
    feats = image_features(model, image, spacing, rgb, pool=parsed.pool, windows=parsed.windows,
                           router=parsed.router)
    for st, f in zip(parsed.layers, feats):
        if f.shape != st.mean.shape:
            raise _field(f"trained_on.features.layers[{st.name}].mean",
                         f"{st.mean.size} values, the network's layer gives {f.size}")
    per_layer = _scored(parsed.layers, feats)
    return Score(float(per_layer.mean()), parsed.threshold, {st.name: float(v) for st, v in zip(parsed.layers, per_layer)})


def describe_score(s: Score) -> str:
    verdict = "above" if s.flagged else "within"
    return (f"feature distance {s.value:.3g}, {verdict} the threshold {s.threshold:.3g} set on held-out images of "
            "the training sites (about 1 for an image like the training images)")


def feature_findings(model: Any, image: Any, spacing: Sequence[float] | None, rgb: bool | None) -> list[Finding]:
    """``check_fit``'s finding on the features: the image unlike the training images as the model sees them, or
    a damaged record. An image the engine refuses gets no finding here (the engine says why)."""
    try:
        s = score(model, image, spacing, rgb)
    except RecordError as err:
        return [Finding("record", f"the image cannot be compared with the training images: {err}")]
    except InferenceError:
        return []
    if s is None or not s.flagged:
        return []
    return [Finding("features", f"unlike the training images as the model sees them: {describe_score(s)}")]
