"""Save and load a model as ONE self-describing ``.safetensors`` file.

The weights are plain safetensors; the JSON ``ModelSpec`` sits in the header metadata under ``"dmoe_spec"``,
so a model is one file to move around and loading never unpickles anything.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from napari_dmoe.io.files import atomic_write

from napari_dmoe.model.spec import FORMAT_VERSION, ModelSpec, SpecError

FORMAT_NAME = "napari-dmoe"
SPEC_KEY = "dmoe_spec"
SUFFIX = ".safetensors"
_MAX_NAMES = 5  # how many offending tensor names an error message lists

# Magic bytes of what a PyTorch checkpoint starts with: torch.save's zip container, or a bare pickle
# (protocol 2+ begins with 0x80 then the protocol number).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = range(2, 6)


class CheckpointError(ValueError):
    """A model file cannot be read or written; the message names the file and the problem."""


@dataclass
class Model:
    """A loaded model: its spec, its network (eval mode, on the chosen device) and where it came from."""

    spec: ModelSpec
    network: torch.nn.Module
    path: Path | None = None


# -- writing -----------------------------------------------------------------------------------------------
def save_model(path: str | os.PathLike, network: torch.nn.Module, spec: ModelSpec) -> Path:
    """Write ``network``'s weights and ``spec`` to ``path`` (``*.safetensors``) atomically; return the path.

    The file is written next to its destination, fsynced and then renamed over it, so an interrupted save
    never leaves a half-written model at ``path`` (the previous file, if any, stays intact).
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise CheckpointError(f"{path}: model files must end in {SUFFIX}; choose a name like {path.stem}{SUFFIX}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give a file name ending in {SUFFIX}")
    if not isinstance(spec, ModelSpec):
        raise CheckpointError(f"{path}: spec must be a ModelSpec, got {type(spec).__name__}")
    spec.validate()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        SPEC_KEY: json.dumps(spec.to_dict()),
    }
    tensors = _unique_tensors(network.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a state dict, keeping one name per shared tensor.

    A module used at several places (the TransUNet's one dMoE shared by all blocks) appears under several
    names with the same storage; safetensors refuses shared storage, and one copy is all we need.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    storages: set[int] = set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.device)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:  # a different view of a saved storage: store its own copy
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# -- reading -----------------------------------------------------------------------------------------------
def read_spec(path: str | os.PathLike) -> ModelSpec:
    """The spec of a model file, read from the header only (no weights, no network)."""
    path = _check_file(Path(path))
    metadata = _read_metadata(path)
    return _spec_from_metadata(path, metadata)


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor stored in a model file, from the header only."""
    path = _check_file(Path(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as err:
        raise _corrupt(path, err) from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Model:
    """Rebuild the network described by the file's spec and load its weights (strict, bit-exact)."""
    path = _check_file(Path(path))
    spec = _spec_from_metadata(path, _read_metadata(path))
    # before anything is allocated: the header is data from elsewhere
    network: torch.nn.Module | None = _check_network_size(path, spec)
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise _corrupt(path, err) from None
    _check_finite(path, tensors)
    network = _fill_meta(network, tensors)  # the network built once, its weights the file's tensors
    if network is None:  # the meta build could not take the file's tensors: build for real, name any mismatch
        from napari_dmoe.model import build_network

        network = build_network(spec)
        network.load_state_dict(_match_weights(path, network, tensors), strict=True)
    network.to(torch.device(device)).eval()
    return Model(spec=spec, network=network, path=path)


def _check_file(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: no such model file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a model file; give the {SUFFIX} file inside it")
    if not path.is_file():  # a pipe or a device would hang the reader
        raise CheckpointError(f"{path}: not a regular file (a pipe, socket or device); give a {SUFFIX} model file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS):
        raise CheckpointError(
            f"{path}: this looks like a PyTorch pickle (.pth); napari-dmoe never unpickles files; if it is an "
            "official dMoE checkpoint, convert it with `dmoe import-official`"
        )
    return path


def _corrupt(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable safetensors model file (truncated or corrupt: {err}); re-copy or re-save it"
    )


def _read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as err:
        raise _corrupt(path, err) from None


def _spec_from_metadata(path: Path, metadata: dict[str, str]) -> ModelSpec:
    if metadata.get("format") != FORMAT_NAME or SPEC_KEY not in metadata:
        raise CheckpointError(
            f"{path}: a safetensors file without a napari-dmoe model spec (no '{SPEC_KEY}' in its header); "
            "it holds bare weights, not a napari-dmoe model. Official dMoE checkpoints are converted with "
            "`dmoe import-official`"
        )
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: model file format version {version!r} is not supported (this napari-dmoe reads version "
            f"{FORMAT_VERSION}); upgrade napari-dmoe or re-export the model"
        )
    from napari_dmoe.model.bounds import MAX_SPEC_BYTES

    if len(metadata[SPEC_KEY]) > MAX_SPEC_BYTES:
        raise CheckpointError(f"{path}: the model spec in the header is {len(metadata[SPEC_KEY])} characters, more "
                              f"than a spec ever needs ({MAX_SPEC_BYTES}); the file is not a napari-dmoe model")
    try:
        data: Any = json.loads(metadata[SPEC_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the model spec in the header is not valid JSON ({err})") from None
    from napari_dmoe.text import clean_tree

    data = clean_tree(data)  # names and provenance reach terminals and the GUI: no escape sequences
    try:
        return ModelSpec.from_dict(data)
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError) as err:  # a field of the wrong form
        raise CheckpointError(f"{path}: invalid model spec: a field has the wrong form ({type(err).__name__}: "
                              f"{err}); the file was not written by napari-dmoe or was edited") from None
    except SpecError as err:
        raise CheckpointError(f"{path}: invalid model spec: {err}") from None


class _SkipInit(torch.overrides.TorchFunctionMode):
    """No ``torch.nn.init`` calls while counting on the meta device: they only cost time there, and a meta
    ``normal_`` imports ``torch._dynamo`` (about a second of every first mask)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def _check_network_size(path: Path, spec: ModelSpec) -> torch.nn.Module:
    """Bound the spec's sizes, then count the parameters of the network it describes on torch's meta device
    (no memory): more values than the file stores means the header lies, and building it could exhaust memory.
    Returns that meta network (no weights yet) for ``_fill_meta``."""
    from napari_dmoe.model import build_network
    from napari_dmoe.model.bounds import check_bounds

    try:
        check_bounds(spec)
    except SpecError as err:
        raise CheckpointError(f"{path}: invalid model spec: {err}") from None
    try:
        with torch.device("meta"), _SkipInit():
            network = build_network(spec)
    except SpecError as err:  # a valid-looking spec whose sizes the network code rejects
        raise CheckpointError(f"{path}: the spec does not describe a buildable network: {err}") from None
    needed = sum(p.numel() for p in network.parameters()) + sum(b.numel() for b in network.buffers())
    stored = sum(math.prod(shape) for shape in tensor_shapes(path).values())
    if needed > 2 * stored + 2**20:  # small differences are named tensor by tensor after the (cheap) build
        raise CheckpointError(f"{path}: the spec describes a network of {needed} values but the file stores {stored}; "
                              "the header does not match the weights, re-save the model with napari-dmoe")
    return network


def _fill_meta(network: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module | None:
    """The meta network with the file's tensors as its weights (no second build, no copy), or None where it cannot
    take them: names, shapes or dtypes that differ, or a tensor the constructor made that is not in the file (a
    non-persistent buffer). The caller then builds for real, which also names any mismatch."""
    # torch's own allocations are 64-byte aligned, a file's tensors need not be: kernels then take other paths
    # and outputs differ in the last bits from a network that loaded by copying
    tensors = {k: t if t.data_ptr() % 64 == 0 else t.clone() for k, t in tensors.items()}
    try:
        state = _match_weights(Path(), network, tensors)
    except CheckpointError:
        return None
    expected = network.state_dict(keep_vars=True)
    if any(state[name].dtype != t.dtype for name, t in expected.items()):
        return None
    network.load_state_dict(state, strict=True, assign=True)
    for module in network.modules():
        for value in [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]:
            if isinstance(value, torch.Tensor) and value.is_meta:
                return None
    return network


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """NaN or infinite weights make every output NaN, which argmax turns into background without a word."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - _MAX_NAMES} more" if len(bad) > _MAX_NAMES else ""
        raise CheckpointError(f"{path}: weights hold NaN or infinite values ({', '.join(bad[:_MAX_NAMES])}{more}); "
                              "the model diverged or the file is damaged, use another checkpoint")


def _match_weights(path: Path, network: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The full state dict for ``network`` from the file's tensors, or a CheckpointError naming the mismatch."""
    expected = network.state_dict(keep_vars=True)
    # names that share storage in the network: the file holds one of each group (see _unique_tensors); on the
    # meta device (no storage) the names of one shared tensor object
    groups: dict[tuple, list[str]] = {}
    for name, t in expected.items():
        if t.is_meta:
            key: tuple = ("meta", id(t))
        else:
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else (name,)
        groups.setdefault(key, []).append(name)
    state: dict[str, Any] = {}
    missing: list[str] = []
    for names in groups.values():
        stored = [n for n in names if n in tensors]
        if stored:
            for n in names:
                state[n] = tensors[stored[0]]
        else:
            missing.extend(names)
    unexpected = [n for n in tensors if n not in expected]
    wrong_shape = [
        f"{n} {tuple(state[n].shape)} vs {tuple(expected[n].shape)}"
        for n in state if tuple(state[n].shape) != tuple(expected[n].shape)
    ]
    problems = []
    kinds = (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs spec)", wrong_shape))
    for label, names in kinds:
        if names:
            more = f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
            problems.append(f"{label}: {', '.join(names[:_MAX_NAMES])}{more}")
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not match the architecture in its spec ({'; '.join(problems)}); "
            "the file was edited or written by another tool; re-save the model with napari-dmoe"
        )
    return state
