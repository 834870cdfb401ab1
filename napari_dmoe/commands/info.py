"""``dmoe info MODEL``: print what a model file holds (its spec), read from the header only."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show a model's architecture, vocabulary, classes and provenance",
                              description="Print the spec of a napari-dmoe model file (.safetensors).")
    p.add_argument("model", metavar="MODEL", help="model file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the spec as JSON (machine-readable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.checkpoint import read_spec, tensor_shapes

    spec = read_spec(args.model)
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2))
        return 0
    n_params = sum(math.prod(s) for s in tensor_shapes(args.model).values())
    print(format_spec(spec, title=str(args.model), n_params=n_params))
    return 0


def format_spec(spec: Any, title: str = "", n_params: int | None = None) -> str:
    """Human-readable summary of a ModelSpec, one fact a line."""
    per = "attribute value" if len(spec.attributes) == 1 else "combination of attribute values"
    routing = {"dmoe": f"dMoE (one router per {per})", "moe": "plain MoE (one router)",
               "none": "no MoE (baseline)"}[spec.routing]
    lines = [title] if title else []
    lines += [
        f"  architecture : {spec.arch} ({spec.spatial_dims}D) {_kv(spec.arch_kwargs)}".rstrip(),
        f"  routing      : {routing}",
    ]
    if spec.routing != "none":
        lines.append(f"  experts      : {spec.n_experts} (top-{spec.top_k}), {spec.n_routers} router(s)")
    for attr in spec.attributes:
        lines.append(f"  attribute    : {attr.name} = {', '.join(attr.values)}")
    lines += [
        f"  classes      : {', '.join(f'{i} {c}' for i, c in enumerate(spec.class_names))}",
        f"  input        : {spec.in_channels} channel(s), size {' x '.join(map(str, spec.input_size))}",
        f"  normalisation: {_kv(spec.normalization)}",
        f"  spacing      : {' x '.join(map(str, spec.spacing)) if spec.spacing else 'not set'}",
    ]
    if n_params is not None:
        lines.append(f"  parameters   : {n_params:,}")
    lines.append(f"  provenance   : {_kv(spec.provenance) or 'none recorded'}")
    metrics = [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in spec.metrics.items()]
    lines.append(f"  metrics      : {metrics[0] if metrics else 'not evaluated'}")
    lines += [f"                 {m}" for m in metrics[1:]]  # one metric a line: per-group dicts are long
    return "\n".join(lines)


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in d.items())
