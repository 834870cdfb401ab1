"""An exponential moving average of the weights (``recipe.ema``), kept beside the trained network (issue 26).

torch's ``AveragedModel`` does the averaging (parameters and buffers alike); this module only gives it a place in
the run: updated after every optimizer step, saved in the resume state so a resumed run averages what an unbroken
one would, and written as ``ema.safetensors`` at the end. A checkpoint chosen on a handful of validation images can
be noise; the average of the last few hundred steps does not depend on them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from napari_dmoe.io.checkpoint import save_model
from napari_dmoe.training.validate import validate

PREFIX = "ema."  # the average's tensors in the resume state


class WeightAverage:
    """``decay`` per step: 0.995 averages roughly the last 200 steps."""

    def __init__(self, network: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.averaged = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    @property
    def network(self) -> torch.nn.Module:
        return self.averaged.module

    def update(self, network: torch.nn.Module) -> None:
        self.averaged.update_parameters(network)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {PREFIX + k: v.detach().cpu().clone().contiguous() for k, v in self.network.state_dict().items()}
        out[PREFIX + "n_averaged"] = self.averaged.n_averaged.detach().cpu().clone()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Restore from a resume state's tensors; False when they hold no average (the run had none)."""
        if PREFIX + "n_averaged" not in tensors:
            return False
        own = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX) and k != PREFIX + "n_averaged"}
        self.network.load_state_dict(own, strict=True)
        self.averaged.n_averaged.copy_(tensors[PREFIX + "n_averaged"])
        return True

    def save(self, run: Any, out: Path, step: int, from_step: int, device: torch.device,
             recipe: Mapping[str, Any]) -> tuple[Path, float | None]:
        """Write ``out/ema.safetensors``, validated like a checkpoint and with its own fit-check features; return
        (its path, its validation ES-Dice or None). ``run``: the engine's ``RunParts``."""
        metrics = None
        if run.val_items is not None and len(run.val_items):
            metrics = validate(self.network, run.val_items, run.spec, device, run.to_router,
                               overlap=recipe["sw_overlap"], amp=bool(recipe["amp"]))
        path = out / "ema.safetensors"
        record = {"decay": self.decay, "from_step": from_step}
        save_model(path, self.network, run.spec_for(step, metrics, network=self.network, ema=record))
        return path, metrics["es_dice"] if metrics else None
