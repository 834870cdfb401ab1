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
- Statistics, score and threshold (``ood_record.py``): per layer, the mean and a Ledoit-Wolf shrunk covariance over
  the training images (few images suffice), kept as its top principal directions and one variance for the rest;
  per layer the squared distance divided by its median over held-out training-site images, averaged over layers
  (about 1 for an image like the training images); flagged above the ``QUANTILE`` of the held-out scores (the
  validation split, plus cross-fitted scores of the training images) times ``1 + MARGIN``.

The record sits in ``spec.trained_on["features"]`` (written by ``dmoe train``); ``parse_record`` checks every size
and value in it before use, so a damaged or tampered record is refused with ``RecordError``, naming the field.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from napari_dmoe.inference.fit import Finding
from napari_dmoe.inference.ood_record import (  # noqa: F401 (re-exported: the record's fitting and reading)
    MARGIN, MAX_DIM, METHOD, MIN_CASES, N_COMPONENTS, POOL, POOLS, QUANTILE, WINDOWS, Record, RecordError,
    fit_record, parse_record, record_field, scored,
)

MAX_BLOCKS = 4  # transformer blocks used, evenly spread, besides the final encoder norm
OVERLAP = 0.25  # the engine's default window overlap: the same windows as a segmentation


@dataclass(frozen=True)
class Score:
    """``value``: the image's score (about 1 for training-like images); flagged above ``threshold``."""

    value: float
    threshold: float
    layers: dict[str, float]

    @property
    def flagged(self) -> bool:
        return self.value > self.threshold


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
    owner = threading.get_ident()  # a segmentation running the same network on another thread is left alone

    def hook(name: str) -> Any:
        def keep(module: Any, args: Any, out: Any) -> None:
            if threading.get_ident() != owner:
                return
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


def _windows(model: Any, image: Any, spacing: Sequence[float] | None, rgb: bool | None, windows: int
             ) -> list[tuple[torch.Tensor, list[float]]]:
    """The model's input windows ``[C, *roi]`` for ``image`` (at most ``windows``, evenly spread) with the share
    of each window, per axis, that lies on the image. Raises ``InferenceError`` for an image the engine refuses."""
    from napari_dmoe.inference.engine import _prepare  # the engine's own preparation of its input
    from napari_dmoe.inference.windows import window

    prep = _prepare(model.spec, image, None, spacing, rgb, "cpu", None, OVERLAP, "auto", "average")
    plan = prep.plan
    planes = 1 if prep.source is not None else prep.work.shape[0]
    units = [(z, s) for z in range(planes) for s in plan.starts]
    out = []
    for z, start in (units[i] for i in _evenly(len(units), windows)):
        x = prep.source.window(start, plan.roi) if prep.source is not None else \
            prep.work[(z, slice(None), *window(start, plan.roi))]
        out.append((x, [max(0, min(s + r, w) - s) / r for s, r, w in zip(start, plan.roi, plan.work)]))
    return out


def _pooled(network: torch.nn.Module, layers: Sequence[tuple[str, torch.nn.Module]],
            items: Sequence[tuple[torch.Tensor, list[float]]], pool: str, router: int, batch: int
            ) -> list[list[torch.Tensor]]:
    """Per window, the pooled output of each layer; windows of one shape run ``batch`` at a time."""
    first = next(network.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    modes = [(m, m.training) for m in network.modules()]  # training may hold frozen norms in eval: restore each
    network.eval()
    out: list[list[torch.Tensor]] = []
    try:
        with torch.inference_mode():
            i = 0
            while i < len(items):
                j = i + 1
                while j < len(items) and j - i < batch and items[j][0].shape == items[i][0].shape:
                    j += 1
                x = torch.stack([t for t, _ in items[i:j]]).to(device)
                outs = _layer_outputs(network, layers, x, router)
                out += [[_pool(o[b], items[i + b][1], pool).cpu() for o in outs] for b in range(j - i)]
                i = j
    finally:
        for m, mode in modes:
            m.training = mode
    return out


def features_of(model: Any, images: Iterable[tuple[Any, Any, bool]], *, pool: str = POOL, windows: int = WINDOWS,
                router: int = 0, batch: int = 16) -> list[list[np.ndarray]]:
    """Pooled features of each (image, spacing, rgb) in napari layout with raw intensities: per image, one vector
    per ``feature_layers`` entry, averaged over its windows. Windows of several images share a batch."""
    layers = feature_layers(model.network)
    if layers is None:
        raise RecordError(f"no feature layers known for the network {type(model.network).__name__}")
    result: list[list[np.ndarray]] = []
    pending: list[list[tuple[torch.Tensor, list[float]]]] = []

    def flush() -> None:
        flat = _pooled(model.network, layers, [w for ws in pending for w in ws], pool, router, batch)
        k = 0
        for ws in pending:
            per_window = flat[k:k + len(ws)]
            k += len(ws)
            result.append([(sum(v[i] for v in per_window) / len(ws)).double().numpy() for i in range(len(layers))])
        pending.clear()

    for image, spacing, rgb in images:
        pending.append(_windows(model, image, spacing, rgb, windows))
        if sum(map(len, pending)) >= batch:
            flush()
    if pending:
        flush()
    return result


def image_features(model: Any, image: Any, spacing: Sequence[float] | None = None, rgb: bool | None = None, *,
                   pool: str = POOL, windows: int = WINDOWS, router: int = 0) -> list[np.ndarray]:
    """``features_of`` one image."""
    return features_of(model, [(image, spacing, rgb)], pool=pool, windows=windows, router=router)[0]


def describe_features(model: Any, train: Iterable[tuple[Any, Any, bool]], heldout: Iterable[tuple[Any, Any, bool]],
                      **options: Any) -> dict[str, Any] | None:
    """``fit_record`` from (image, spacing, rgb) triples of training and held-out images; None for a network
    without known feature layers."""
    layers = feature_layers(model.network)
    if layers is None:
        return None
    keys = ("pool", "windows", "router")
    kw = {k: options[k] for k in keys if k in options}
    train_f, held_f = features_of(model, train, **kw), features_of(model, heldout, **kw)
    return fit_record([n for n, _ in layers], train_f, held_f, **options)


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
    where = "trained_on.features"
    if [st.name for st in parsed.layers] != names:
        raise record_field(f"{where}.layers", f"names {[st.name for st in parsed.layers]}, the network's feature "
                                              f"layers are {names}")
    n_routers = max(1, int(getattr(model.spec, "n_routers", 1) or 1))
    if parsed.router >= n_routers:
        raise record_field(f"{where}.router", f"{parsed.router} is not one of the model's {n_routers} routers")
    feats = image_features(model, image, spacing, rgb, pool=parsed.pool, windows=parsed.windows,
                           router=parsed.router)
    for st, f in zip(parsed.layers, feats):
        if f.shape != st.mean.shape:
            raise record_field(f"{where}.layers[{st.name}].mean",
                               f"{st.mean.size} values, the network's layer gives {f.size}")
    per_layer = scored(parsed.layers, feats)
    return Score(float(per_layer.mean()), parsed.threshold,
                 {st.name: float(v) for st, v in zip(parsed.layers, per_layer)})


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
    except ValueError:  # InferenceError, InputShapeError: the engine refuses the image itself, saying why
        return []
    if s is None or not s.flagged:
        return []
    return [Finding("features", f"unlike the training images as the model sees them: {describe_score(s)}")]
