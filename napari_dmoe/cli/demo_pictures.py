"""`dmoe demo`: segment the bundled samples with the bundled demo models and draw what came out.

Headless (matplotlib Agg figures, no Qt), so it runs on a server or in CI. With no trained demo model in the
package it falls back to a randomly initialised tiny model and says so loudly: the pictures then show that the
pipeline runs, not that the model is any good.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from napari_dmoe.io.files import atomic_write

MODELS_DIR = Path(__file__).parent.parent / "assets" / "models"
SAMPLE_SEED = 2025  # the seed of the napari sample data, so the demo and File > Open Sample show the same case


@dataclass
class DemoCase:
    name: str
    image: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, ...]
    attribute: dict[str, str]
    model_file: str
    rgb: bool = False


def demo_cases() -> list[DemoCase]:
    from napari_dmoe.synthetic import make_fundus, make_prostate, make_skin

    fundus = make_fundus(SAMPLE_SEED, race="Black", size=224)
    cases = [DemoCase("fundus", fundus.image, fundus.classes, (1.0, 1.0), {"race": fundus.race}, "fundus-dmoe")]
    prostate = make_prostate(SAMPLE_SEED, stage="T3")
    image, label, spacing = prostate.napari_order()
    cases.append(DemoCase("prostate", image, label, tuple(spacing), {"stage": prostate.stage}, "prostate-dmoe"))
    skin = make_skin(SAMPLE_SEED, age_group="80+")  # the napari skin sample
    cases.append(DemoCase("skin", skin.image, (skin.mask > 0).astype(np.uint8), (1.0, 1.0), {"age": skin.age_group},
                          "skin-dmoe", rgb=True))
    return cases


def _untrained_model(case: DemoCase):
    """A randomly initialised small model with the vocabulary of the case (used only when no demo model ships)."""
    from napari_dmoe.io.checkpoint import Model
    from napari_dmoe.model import build_network, make_spec

    from napari_dmoe.synthetic import AGE_GROUPS

    name, value = next(iter(case.attribute.items()))
    if case.rgb:
        spec = make_spec("transunet2d-small", name, list(AGE_GROUPS), ["background", "lesion"], in_channels=3)
    elif case.image.ndim == 2:
        values = ["Asian", "Black", "White"]
        spec = make_spec("transunet2d-small", name, values, ["background", "rim", "cup"])
    else:
        values = ["T1", "T2", "T3", "T4"]
        spec = make_spec("resunet3d-tiny", name, values, ["background", "CTV"],
                         normalization={"kind": "window", "low": -200.0, "high": 300.0}, input_size=[64, 64, 64])
    network = build_network(spec).eval()
    return Model(spec=spec, network=network, path=None)


def load_demo_model(case: DemoCase):
    """The bundled trained model for a case, or (None-trained) a random one; returns (model, trained?)."""
    from napari_dmoe.io.checkpoint import load_model

    path = MODELS_DIR / f"{case.model_file}.safetensors"
    if path.is_file():
        return load_model(path), True
    return _untrained_model(case), False


def _middle(volume: np.ndarray, rgb: bool = False) -> np.ndarray:
    """The middle z-plane of a volume; a 2D (or RGB) image as it is."""
    return volume[volume.shape[0] // 2] if volume.ndim == 3 and not rgb else volume


def draw_overlay(case: DemoCase, labels: np.ndarray, title: str, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image, truth, pred = _middle(case.image, case.rgb), _middle(case.truth), _middle(labels)
    fig = Figure(figsize=(9, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    aspect = case.spacing[1] / case.spacing[2] if len(case.spacing) == 3 else 1.0
    for ax, (label, heading) in zip(fig.subplots(1, 3), [(None, "image"), (truth, "ground truth"), (pred, "dMoE")]):
        ax.imshow(image, cmap="gray", aspect=aspect)
        if label is not None:
            ax.imshow(np.ma.masked_equal(label, 0), cmap="autumn", alpha=0.5, vmin=0, vmax=max(2, label.max()),
                      aspect=aspect, interpolation="nearest")
        ax.set_title(heading)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def draw_routing(routing: dict[str, np.ndarray], dominant: np.ndarray, title: str, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mean = routing["mean"].astype(np.float32)
    n_experts = mean.shape[0]
    fig = Figure(figsize=(2.2 * (n_experts // 2 + 1), 4.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n_experts // 2 + 1).ravel()
    for e in range(n_experts):
        im = axes[e].imshow(_middle(mean[e]), cmap="magma", vmin=0, vmax=1)
        axes[e].set_title(f"expert {e}", fontsize=8)
    axes[n_experts].imshow(_middle(dominant), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    axes[n_experts].set_title("dominant expert", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), shrink=0.6, label="mean gate weight")
    fig.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def run_demo(out_dir: str | Path, device: str = "auto", say: Callable[[str], None] = print) -> list[Path]:
    """Segment every demo case, write overlay and routing PNGs into ``out_dir``, return the files written."""
    from napari_dmoe.evaluation.metrics import image_metrics
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.model.spec import attribute_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for case in demo_cases():
        model, trained = load_demo_model(case)
        if not trained:
            say(f"NOTE: no trained demo model '{case.model_file}' is installed: using a RANDOMLY INITIALISED "
                f"{model.spec.arch} model. The mask below shows that the pipeline runs, not a real segmentation.")
        result = segment(model, case.image, case.attribute, spacing=case.spacing, device=device, rgb=case.rgb)
        scores = image_metrics(result.labels, case.truth, model.spec.n_classes, spacing=case.spacing,
                               class_names=model.spec.class_names)
        dice = ", ".join(f"{c} Dice {m['dice']:.3f}" for c, m in scores.items())
        attr = attribute_text(case.attribute)
        kind = "trained demo model" if trained else "UNTRAINED random model"
        title = f"{case.name} (synthetic), {attr}, {kind}: {dice}"
        say(f"{case.name}: {attr}; {dice}; device {result.device}; "
            f"{sum(result.timings.values()):.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in result.timings.items())})")
        written.append(draw_overlay(case, result.labels, title, out / f"{case.name}_overlay.png"))
        if result.routing:
            written.append(draw_routing(result.routing, result.dominant_expert, title,
                                        out / f"{case.name}_routing.png"))
    return written
