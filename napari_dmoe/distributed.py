"""Process group set-up for torchrun: one code path for 1 process and for N.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them we run as a single process and never touch
``torch.distributed``. NCCL on CUDA, Gloo on CPU. Only rank 0 writes files and events.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from napari_dmoe.devices import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    device_reason: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistInfo:
    """Read the torchrun environment, pick the device, init the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev, reason = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local)  # one GPU per process
        torch.cuda.set_device(dev)
        reason = f"{reason}; rank {rank} uses cuda:{local}"
    info = DistInfo(rank, world, local, dev, reason)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> float:
    """Mean of a scalar over all processes (the loss of the global batch, for logging)."""
    if not info.enabled:
        return float(value.detach())
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return float(t) / info.world_size


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's boolean, on every rank (e.g. "stop now")."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())
