"""Resume state in safe formats: ``resume.safetensors`` (model, optimizer tensors, torch RNG states) and
``resume.json`` (step, epoch, scheduler, optimizer scalars, numpy/Python RNG, best metric). Nothing is pickled.

Both files are written atomically (temp file in the same folder, fsync, ``os.replace``); the JSON goes last and
both carry the step, so a kill between the two writes is detected instead of silently mixing two states.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from napari_dmoe.io.files import atomic_write

TENSORS, SCALARS = "resume.safetensors", "resume.json"


class ResumeError(ValueError):
    """A resume state cannot be used; the message names the file and what to do."""


def has_state(folder: Path) -> bool:
    return (folder / SCALARS).is_file() and (folder / TENSORS).is_file()


def peek(folder: Path) -> dict[str, Any]:
    """The scalars of a resume state (to check it belongs to this config before loading anything)."""
    try:
        return json.loads((folder / SCALARS).read_text())
    except (OSError, ValueError) as err:
        raise ResumeError(f"{folder / SCALARS}: unreadable ({err}); delete it and {TENSORS} to start over") from None


def save_state(folder: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scalars: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write the resume state of ``network`` and ``optimizer``; ``scalars`` must hold ``step``. ``extra``: more
    tensors to keep (the weight average's, ``ema.*``), returned by ``load_state`` under ``meta["extra"]``."""
    tensors: dict[str, torch.Tensor] = dict(extra or {})
    for k, v in network.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().clone().contiguous()  # clone: no shared storage in the file
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        **scalars,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "rng": {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "python": [py_state[0], list(py_state[1]), py_state[2]]},
    }
    step = str(scalars["step"])
    # Two files, each atomic; a failure between them (a full disk) must not leave a mismatched pair: the old
    # tensors are kept under a hard link (no extra space) and put back when the scalars cannot be written.
    tensor_path, backup = folder / TENSORS, folder / f".{TENSORS}.previous"
    backup.unlink(missing_ok=True)
    had = tensor_path.is_file()
    if had:
        os.link(tensor_path, backup)
    try:
        atomic_write(tensor_path, lambda p: save_file(tensors, str(p), metadata={"step": step}))
        atomic_write(folder / SCALARS, lambda p: p.write_text(json.dumps(meta)))
    except BaseException:
        if had:
            os.replace(backup, tensor_path)
        raise
    finally:
        backup.unlink(missing_ok=True)


def load_state(folder: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore network, optimizer and RNG states; return the scalars (step, epoch, scheduler, ...)."""
    json_path, tensor_path = folder / SCALARS, folder / TENSORS
    try:
        meta = json.loads(json_path.read_text())
        with safe_open(str(tensor_path), framework="pt") as f:
            tensor_step = (f.metadata() or {}).get("step")
        tensors = load_file(str(tensor_path))
    except (OSError, ValueError, SafetensorError) as err:
        raise ResumeError(f"{folder}: resume state unreadable ({err}); delete {SCALARS} and {TENSORS} to start "
                          "over, or choose another output_dir") from None
    if str(meta.get("step")) != tensor_step:
        raise ResumeError(f"{folder}: {SCALARS} (step {meta.get('step')}) and {TENSORS} (step {tensor_step}) "
                          "disagree (killed while saving?); delete both to start over")
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        network.load_state_dict(model, strict=True)
    except RuntimeError as err:
        raise ResumeError(f"{folder}: the saved model does not fit this config's network "
                          f"({str(err).splitlines()[0]}); use another output_dir") from None
    opt_meta = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in opt_meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np_state = meta["rng"]["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = meta["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    meta["extra"] = {k: v for k, v in tensors.items() if not k.startswith(("model.", "optim.", "rng."))}
    return meta
