"""``dmoe info MODEL``: print what a model file holds (its spec), read from the header only."""
from __future__ import annotations

import argparse
import json
import math
import textwrap
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show a model's architecture, vocabulary, classes and provenance",
                              description="Print the spec of a napari-dmoe model file (.safetensors).")
    p.add_argument("model", metavar="MODEL", help="model file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the spec as JSON (machine-readable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.io.checkpoint import read_spec, tensor_shapes

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
        local = sum(len(layer) for layer in spec.local_experts or [])
        lines.append(f"  experts      : {spec.n_experts} (top-{spec.top_k}), {spec.n_routers} router(s)"
                     + (f", {local} local expert(s) (private copies of adapted groups)" if local else "")
                     + (f", a shared router mixed in at {spec.router_mix:g}" if spec.router_mix else ""))
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
    prov = spec.provenance if isinstance(spec.provenance, dict) else {}
    metrics = spec.metrics if isinstance(spec.metrics, dict) else {}
    lines += _block("provenance   : ", _safe("provenance", _provenance, prov) or ["none recorded"])
    lines += _block("validation   : ", _safe("metrics", _metrics, metrics) or ["not evaluated"])
    if isinstance(metrics.get("finetune_groups"), list):
        lines += _block("before/after : ", _safe("metrics.finetune_groups", _finetune_groups,
                                                 metrics["finetune_groups"]) or ["none"])
    test = metrics.get("test")
    if isinstance(test, dict):
        lines += _block(f"{'test (n=' + str(test.get('n', '?')) + ')':<13}: ", _safe("metrics.test", _test, test)
                        or ["none"])
    if prov or metrics:
        lines.append("  (everything recorded: dmoe info MODEL --json)")
    return "\n".join(lines)


def _safe(field: str, render: Any, value: Any) -> list[str]:
    """``render(value)``, or one line saying the field has a form this version cannot show: a file's header can hold
    anything, and ``dmoe info`` is how one looks at a suspicious file (issue 28: tracebacks on tampered headers)."""
    try:
        return render(value)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError):
        return [f"(the header's {field} has an unexpected form; `dmoe info MODEL --json` shows it as stored)"]


# Provenance keys shown as one line each, in this order; the rest (config, router tables...) only with --json.
_SHOWN = ("method", "source", "file", "command", "seed", "step", "git_commit", "world_size", "loss",
          "benchmark_command")


def _provenance(prov: dict) -> list[str]:
    out = [f"{k}={prov[k]}" for k in _SHOWN if k in prov and not isinstance(prov[k], (dict, list))]
    for split, info in (prov.get("data") or {}).items():
        if isinstance(info, dict) and "n" in info:
            groups = ", ".join(f"{g} {n}" for g, n in (info.get("groups") or {}).items())
            out.append(f"{split} cases: {info['n']}" + (f" ({groups})" if groups else ""))
    notes = (prov.get("config") or {}).get("notes")  # the training config's "why this recipe"
    if isinstance(notes, str) and notes.strip():
        out += textwrap.wrap(f"recipe notes: {notes}", 100, subsequent_indent="  ")
    choice = prov.get("recipe_choice")  # sample_data/record_recipe_choice.py: why this recipe shipped
    if isinstance(choice, dict) and isinstance(choice.get("ranking"), list):
        ranked = [f"{r.get('candidate')} {r.get('mean')}" for r in choice["ranking"][:4] if isinstance(r, dict)]
        if ranked:
            out += textwrap.wrap(f"recipe chosen on {choice.get('on', '?')}: {ranked[0]} over {', '.join(ranked[1:])}"
                                 " (mean worst-group Dice)", 100, subsequent_indent="  ")
        if choice.get("tests"):
            out += textwrap.wrap(f"tests beside it: {choice['tests']}", 100, subsequent_indent="  ")
    tune = prov.get("finetune")
    if isinstance(tune, dict):
        out.append(f"fine-tuned from {tune.get('base_model', '?')}")
    out += _adaptation(prov.get("adaptation"))
    return out


def _adaptation(record: Any) -> list[str]:
    """Which groups a fine-tune adapted and how (``training/local.py`` writes the record)."""
    if not isinstance(record, dict):
        return []
    groups = ", ".join(map(str, record.get("groups") or [])) or "?"
    mode = record.get("mode", "?")
    if mode == "group_local":
        how = f"group_local: their routers + {record.get('local_experts_per_layer', '?')} local expert(s) per dMoE layer"
        others = ", ".join(map(str, record.get("unchanged_groups") or [])) or "none"
        return [f"adapted: {groups} ({how})", f"  other groups bitwise unchanged: {others}"]
    what = {"all": "all weights", "routers_experts": "every router and the shared experts"}.get(mode, mode)
    return [f"adapted: {groups} ({mode}: {what}; norm layers {record.get('norm_layers', '?')})",
            "  other groups: may have changed (shared weights were trained)"]


def _finetune_groups(rows: list) -> list[str]:
    """The fine-tune's per-group comparison (``finetune.compare.group_rows``), one group a line."""
    out = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        text = (f"{r.get('group')}: Dice {_num(r.get('before'))} -> {_num(r.get('after'))} "
                f"({r.get('source')}, n={r.get('n')})" if r.get("before") is not None else f"{r.get('group')}: no labels")
        if r.get("agreement") is not None:
            text += f", masks agree {_num(r['agreement'])}"
        out.append(text + (" (corrected)" if r.get("corrected") else "") + (f" [{r['flag'].upper()}]" if r.get("flag") else ""))
    return out


def _metrics(metrics: dict) -> list[str]:
    """The validation summary of the saved step: overall line, then one line per class with its groups."""
    head = ", ".join(f"{k}={_num(metrics[k])}" for k in ("split", "step", "n", "dice", "es_dice") if k in metrics)
    out = [head] if head else []
    for name, row in (metrics.get("classes") or {}).items():
        if isinstance(row, dict):
            groups = ", ".join(f"{g} {_num(v)}" for g, v in (row.get("groups") or {}).items())
            out.append(f"{name}: Dice {_num(row.get('dice'))}, ES-Dice {_num(row.get('es_dice'))}"
                       + (f"; groups {groups}" if groups else ""))
    other = [k for k in metrics if k not in ("split", "step", "n", "dice", "es_dice", "classes", "groups", "test",
                                             "finetune_groups")]
    out += [f"{k}={_num(metrics[k]) if not isinstance(metrics[k], (dict, list)) else json.dumps(metrics[k])}"
            for k in other]
    return out


def _test(test: dict) -> list[str]:
    """Held-out test results with bootstrap CIs, per class: overall, ES-Dice, worst group, every group."""
    out = []
    for name, row in (test.get("classes") or {}).items():
        out.append(f"{name}: Dice {_num(row.get('dice'))} {_ci(row.get('dice_ci'))}, ES-Dice "
                   f"{_num(row.get('es_dice'))} {_ci(row.get('es_dice_ci'))}, worst group {row.get('worst_group')} "
                   f"{_num(row.get('worst_group_dice'))}")
        groups = row.get("groups") or {}
        out.append("  " + ", ".join(f"{g} {_num(v.get('dice'))} (n={v.get('n')})" for g, v in groups.items()))
    return out


def _block(label: str, rows: list[str]) -> list[str]:
    return [f"  {label}{rows[0]}"] + [f"  {' ' * len(label)}{r}" for r in rows[1:]]


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _ci(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "(no CI)"


def _kv(d: Any) -> str:
    if not isinstance(d, dict):  # a tampered header: show what it holds, do not fail on it
        return json.dumps(d)
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in d.items())
