"""Run the shipped 2D demo model on the real fundus photograph of scikit-image; save docs/images/retina_demo.png.

    python sample_data/retina_demo.py [--model napari_dmoe/assets/models/fundus-dmoe.safetensors] [--out PNG]

The photo (``skimage.data.retina()``, colour, 1411 x 1411) is prepared like the synthetic sample: grey, the
square around the bright field of view, resized to 224 x 224, 0..255. It has no ground truth and no recorded
race, so the figure shows the mask for each router of the model. The model was trained on synthetic images only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def retina_as_sample(size: int = 224) -> np.ndarray:
    """skimage's retina photo as a grey (size, size) float image in 0..255, cropped to its field of view."""
    from skimage import data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    grey = rgb2gray(data.retina())
    rows, cols = np.nonzero(grey > 0.05)  # the dark surround outside the circular field of view
    cy, cx = (rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2
    half = max(rows.max() - rows.min(), cols.max() - cols.min()) // 2
    crop = grey[max(0, cy - half):cy + half, max(0, cx - half):cx + half]
    return (resize(crop, (size, size), anti_aliasing=True) * 255).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.inference.engine import segment

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "napari_dmoe/assets/models/fundus-dmoe.safetensors")
    p.add_argument("--out", type=Path, default=ROOT / "docs/images/retina_demo.png")
    args = p.parse_args(argv)

    model = load_model(args.model)
    image = retina_as_sample()
    attr = model.spec.attributes[0]
    fig = Figure(figsize=(3.0 * (len(attr.values) + 1), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(attr.values) + 1)
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("skimage retina (grey, 224 px)", fontsize=9)
    for ax, value in zip(axes[1:], attr.values):
        labels = segment(model, image, {attr.name: value}, device="cpu").labels
        ax.imshow(image, cmap="gray")
        ax.imshow(np.ma.masked_equal(labels, 0), cmap="autumn", alpha=0.55, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"{attr.name}={value}: " + ", ".join(
            f"{c} {int((labels == k).sum())} px" for k, c in enumerate(model.spec.class_names) if k), fontsize=8)
        print(f"{attr.name}={value}: " + ", ".join(f"{c} {int((labels == k).sum())} px"
                                                  for k, c in enumerate(model.spec.class_names)))
    for ax in axes:
        ax.axis("off")
    fig.suptitle("Demo model trained on SYNTHETIC fundus images only, applied to a real photograph "
                 "(no ground truth): not a validated segmentation", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
