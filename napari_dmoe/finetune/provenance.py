"""What a fine-tuned model file may say about how it was tuned: counts and settings, never case names or paths."""
from __future__ import annotations

from pathlib import Path
from typing import Any

RUN_FOLDER = "<fine-tune run folder>"


def shareable(provenance: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The provenance a fine-tuned model file carries, safe to share with another site.

    Models travel; the names of the cases they were tuned on must not. Case names come from layer names, which
    often hold patient names or IDs, and local folders may too. So the model keeps how many cases per split and
    per attribute value, the settings and the base model's file name; the case list and the full paths stay in
    the run folder (``provenance.json``, ``pairs.csv``), which never leaves the machine."""
    out = _replace_paths(provenance, str(run_dir), RUN_FOLDER)
    base = str((provenance.get("finetune") or {}).get("base_model") or "")
    if base:  # the engine records the base model's full path too (config, init)
        for form in {base, str(Path(base).resolve())}:
            out = _replace_paths(out, form, Path(base).name)
    tune = dict(out.get("finetune") or {})
    data = dict(tune.get("data") or {})
    for split in ("train", "val"):
        if isinstance(data.get(split), list):
            data[f"n_{split}"] = len(data.pop(split))
    data.pop("csv_path", None)
    tune["data"] = data
    for key in ("base_model", "config"):
        if tune.get(key):
            tune[key] = Path(str(tune[key])).name
    out["finetune"] = tune
    return out


def _replace_paths(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _replace_paths(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_paths(v, old, new) for v in value]
    return value.replace(old, new) if isinstance(value, str) else value
