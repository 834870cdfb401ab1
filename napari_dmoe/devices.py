"""Pick the compute device and say why, so a user who expected a GPU learns what is missing."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device was asked for that this machine or this torch build cannot provide."""


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support (a CPU-only wheel)"
    if not torch.cuda.is_available():
        return (
            "torch has CUDA support but no CUDA device is visible (no NVIDIA GPU, driver missing or too old, "
            "or CUDA_VISIBLE_DEVICES hides it)"
        )
    return None


def mps_problem() -> str | None:
    """Why Apple MPS cannot be used here, or None when it can."""
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_built():
        return "this torch build has no MPS (Apple GPU) support"
    if not mps.is_available():
        return "MPS is built in but not available (needs macOS 12.3+ on Apple silicon)"
    return None


def resolve_device(name: str | torch.device = "auto") -> tuple[torch.device, str]:
    """Turn "auto", "cpu", "cuda", "cuda:N" or "mps" into a device plus a one-line reason.

    "auto" prefers CUDA, then MPS, then CPU. Asking for a device that is not usable raises DeviceError.
    """
    text = str(name).strip().lower()
    if text == "auto":
        cuda, mps = cuda_problem(), mps_problem()
        if cuda is None:
            return torch.device("cuda"), f"CUDA GPU found ({torch.cuda.get_device_name(0)})"
        if mps is None:
            return torch.device("mps"), "Apple MPS GPU found"
        return torch.device("cpu"), f"no GPU: {cuda}"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"device {name!r} is not understood; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cpu":
        return device, "CPU requested"
    if device.type == "cuda":
        problem = cuda_problem()
        if problem:
            raise DeviceError(f"device {name!r} is not usable: {problem}. Use device='cpu' or 'auto'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"device {name!r} does not exist: {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})"
            )
        return device, "CUDA requested"
    if device.type == "mps":
        problem = mps_problem()
        if problem:
            raise DeviceError(f"device {name!r} is not usable: {problem}. Use device='cpu' or 'auto'")
        return device, "MPS requested"
    raise DeviceError(f"device {name!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
