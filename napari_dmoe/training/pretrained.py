"""Initial weights: a local pretrained ViT (timm safetensors or Google's ViT-B_16.npz) or one of our models.

Nothing is downloaded; the user points ``model.init_from`` at a file they have. The ``.npz`` is read with
``allow_pickle=False``. The ViT maps onto the TransUNet encoder (our names follow the official TransUNet);
position embeddings are resized (bicubic, as TransUNet's ``load_from``) when the token grid differs, the class
token is dropped, and extra pretrained blocks beyond our depth are ignored.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InitError(ValueError):
    """Initial weights cannot be used; the message names the file and the problem."""


def _timm_to_ours(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {"transformer.embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
           "transformer.embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
           "transformer.embeddings.position_embeddings": sd["pos_embed"],
           "transformer.encoder.encoder_norm.weight": sd["norm.weight"],
           "transformer.encoder.encoder_norm.bias": sd["norm.bias"]}
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    for i in blocks:
        src, dst = f"blocks.{i}.", f"transformer.encoder.layer.{i}."
        for a, b in (("norm1", "attention_norm"), ("norm2", "ffn_norm"), ("mlp.fc1", "ffn.fc1"),
                     ("mlp.fc2", "ffn.fc2"), ("attn.proj", "attn.out")):
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):  # timm fuses q, k, v into one projection
            q, k, v = sd[f"{src}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{dst}attn.query.{p}"], out[f"{dst}attn.key.{p}"], out[f"{dst}attn.value.{p}"] = q, k, v
    return out


def _npz_to_ours(npz: Any) -> dict[str, Tensor]:
    t = lambda key: torch.from_numpy(np.asarray(npz[key], dtype=np.float32))  # noqa: E731
    out = {"transformer.embeddings.patch_embeddings.weight": t("embedding/kernel").permute(3, 2, 0, 1),  # HWIO->OIHW
           "transformer.embeddings.patch_embeddings.bias": t("embedding/bias"),
           "transformer.embeddings.position_embeddings": t("Transformer/posembed_input/pos_embedding"),
           "transformer.encoder.encoder_norm.weight": t("Transformer/encoder_norm/scale"),
           "transformer.encoder.encoder_norm.bias": t("Transformer/encoder_norm/bias")}
    blocks = sorted({int(k.split("/")[1].rsplit("_", 1)[1]) for k in npz.files if "/encoderblock_" in k})
    for i in blocks:
        src, dst = f"Transformer/encoderblock_{i}/", f"transformer.encoder.layer.{i}."
        for a, b in (("LayerNorm_0", "attention_norm"), ("LayerNorm_2", "ffn_norm")):
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = t(f"{src}{a}/scale"), t(f"{src}{a}/bias")
        for j, b in ((0, "ffn.fc1"), (1, "ffn.fc2")):
            out[f"{dst}{b}.weight"] = t(f"{src}MlpBlock_3/Dense_{j}/kernel").t()
            out[f"{dst}{b}.bias"] = t(f"{src}MlpBlock_3/Dense_{j}/bias")
        att = f"{src}MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            kernel = t(f"{att}{name}/kernel")  # [hidden, heads, head_dim]
            out[f"{dst}attn.{name}.weight"] = kernel.reshape(kernel.shape[0], -1).t()
            out[f"{dst}attn.{name}.bias"] = t(f"{att}{name}/bias").reshape(-1)
        kernel = t(f"{att}out/kernel")  # [heads, head_dim, hidden]
        out[f"{dst}attn.out.weight"] = kernel.reshape(-1, kernel.shape[-1]).t()
        out[f"{dst}attn.out.bias"] = t(f"{att}out/bias")
    return out


def read_pretrained_vit(path: str | Path) -> dict[str, Tensor]:
    """A local ViT checkpoint as a TransUNet-encoder state dict (names ours, layouts converted)."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return _npz_to_ours(npz)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _timm_to_ours(load_file(str(path)))
    except KeyError as err:
        raise InitError(f"{path}: key {err} missing; expected a ViT checkpoint in timm (safetensors) or Google "
                        "(ViT-B_16.npz) layout") from None
    except Exception as err:  # SafetensorError, zipfile.BadZipFile, torch/numpy errors on odd shapes: garbage in
        raise InitError(f"model.init_from={path}: not a readable ViT checkpoint ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}); expected timm (safetensors) or Google (ViT-B_16.npz) "
                        "weights") from None
    raise InitError(f"{path}: expected a .safetensors (timm) or .npz (Google ViT) file")


def _resize_pos_embed(pos: Tensor, n_tokens: int) -> Tensor:
    """[1, N(+1 cls), C] -> [1, n_tokens, C]: drop a class token, resize the grid bicubically."""
    grid_old = math.isqrt(pos.shape[1])
    if grid_old * grid_old != pos.shape[1]:
        pos = pos[:, 1:]  # class token first (ViT); TransUNet has none
        grid_old = math.isqrt(pos.shape[1])
    grid_new = math.isqrt(n_tokens)
    if grid_old == grid_new:
        return pos
    g = pos.reshape(1, grid_old, grid_old, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(grid_new, grid_new), mode="bicubic", align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(1, n_tokens, -1)


def load_pretrained_vit(network: nn.Module, path: str | Path) -> dict[str, Any]:
    """Copy a pretrained ViT into a TransUNet's encoder; returns what was loaded (for provenance)."""
    if not hasattr(network, "transformer"):
        raise InitError(f"model.init_from={path}: a pretrained ViT only fits the 2D TransUNet presets")
    theirs = read_pretrained_vit(path)
    ours = network.state_dict()
    key = "transformer.embeddings.position_embeddings"
    try:
        theirs[key] = _resize_pos_embed(theirs[key], ours[key].shape[1])
    except (RuntimeError, ValueError, IndexError) as err:
        raise InitError(f"model.init_from={path}: its position embeddings of shape {tuple(theirs[key].shape)} "
                        f"cannot be fitted to this model ({err})") from None
    loaded, skipped = {}, []
    for name, value in theirs.items():
        if name not in ours:
            skipped.append(name)  # pretrained blocks beyond our depth
            continue
        if tuple(value.shape) != tuple(ours[name].shape):
            raise InitError(f"{path}: {name} has shape {tuple(value.shape)}, this model needs "
                            f"{tuple(ours[name].shape)}; pick the preset matching the checkpoint (e.g. "
                            "transunet2d-paper for ViT-B/16)")
        loaded[name] = value
    network.load_state_dict(loaded, strict=False)
    return {"init_from": str(path), "tensors_loaded": len(loaded), "tensors_skipped": len(skipped)}


def load_base_model(network: nn.Module, path: str | Path) -> dict[str, Any]:
    """Fine-tune start: copy every tensor of one of our models whose name and shape match (e.g. a baseline's
    encoder/decoder into a dMoE network, whose MoE layers stay freshly initialised)."""
    from napari_dmoe.io.checkpoint import load_model

    base = load_model(path)
    theirs, ours = base.network.state_dict(), network.state_dict()
    same = {k: v for k, v in theirs.items() if k in ours and tuple(v.shape) == tuple(ours[k].shape)}
    if not same:
        raise InitError(f"model.base_model={path}: no tensor fits this network ({base.spec.arch} "
                        f"{base.spec.arch_kwargs}); choose a model with the same preset")
    network.load_state_dict(same, strict=False)
    return {"base_model": str(path), "tensors_loaded": len(same), "tensors_new": len(ours) - len(same)}


def set_trainable(network: nn.Module, mode: str) -> int:
    """``all`` or ``routers_experts`` (only the dMoE layers learn); returns the number of trainable parameters."""
    from napari_dmoe.model.moe import DMoE

    if mode == "routers_experts":
        moe = [m for m in network.modules() if isinstance(m, DMoE)]
        if not moe:
            raise InitError("trainable=routers_experts needs a model with MoE layers (method moe, dmoe, dmoe+febs)")
        for p in network.parameters():
            p.requires_grad_(False)
        for m in moe:
            for p in m.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in network.parameters() if p.requires_grad)
