"""``dmoe import-official``: convert an official dMoE checkpoint (.pth) into a napari-dmoe model file."""
from __future__ import annotations

import argparse
import math
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-official", help="convert an official dMoE checkpoint into a napari-dmoe model",
        description="Convert a checkpoint released with the official dMoE code (tvseg/dMoE) into one "
        "self-describing .safetensors model. The attribute vocabulary and class names are not stored in the "
        "official file, so give them in the order the model was trained with.",
    )
    p.add_argument("src", metavar="SRC", help="official checkpoint (.pth)")
    # the importer refuses networks it has no official layout for (model/official.py ARCHES) and names them
    p.add_argument("--arch", required=True,
                   help="network of the checkpoint, e.g. transunet2d (an unknown name lists the ones read)")
    p.add_argument("--attribute-name", required=True, help="patient attribute the routers follow, e.g. race")
    p.add_argument("--attribute-values", required=True, type=_csv,
                   help="comma-separated vocabulary in router order, e.g. Asian,Black,White")
    p.add_argument("--class-names", required=True, type=_csv,
                   help="comma-separated class names, background first, e.g. background,rim,cup")
    p.add_argument("--heads", type=int, default=None,
                   help="2D only: attention heads (not stored in the file; default hidden size / 64)")
    p.add_argument("--in-channels", type=int, default=None,
                   help="2D only: channels of the input images, e.g. 1 for grey (default: as the checkpoint)")
    p.add_argument("--out", required=True, help="where to write the model (.safetensors)")
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help="replace --out if it exists (never SRC: the source checkpoint is an input)")
    p.set_defaults(func=run)


def _csv(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated non-empty names, e.g. A,B,C")
    return values


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.io.checkpoint import CheckpointError, save_model
    from napari_dmoe.cli.info import format_spec

    src, out = Path(args.src), Path(args.out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file; give the path of the official .pth file")
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {out}: model files end in .safetensors, e.g. {out.with_suffix('.safetensors')}")
    from napari_dmoe.io.outputs import check_single

    check_single([out], [src], args.overwrite, what="--out")  # never the source, even with --overwrite
    from napari_dmoe.model.official import import_official  # after the cheap checks: it imports the networks

    network, spec = import_official(src, args.arch, args.attribute_name, args.attribute_values, args.class_names,
                                    heads=args.heads, in_channels=args.in_channels)
    path = save_model(out, network, spec)
    n_params = sum(math.prod(p.shape) for p in network.state_dict().values())
    print(f"imported {src} -> {path}")
    print(format_spec(spec, n_params=n_params))
    return 0
