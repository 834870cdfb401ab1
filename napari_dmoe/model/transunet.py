"""2D TransUNet (ViT encoder + CUP decoder, no skips) with a dMoE residual step after every transformer block.

Module names follow the official dMoE / FairSeg ``VisionTransformer`` so an official state dict maps onto this
one by renaming the MoE keys and the head only (see ``napari_dmoe.model.official``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_dmoe.model.moe import DMoE
from napari_dmoe.model.registry import InputRule, Preset
from napari_dmoe.model.routers import default_attr
from napari_dmoe.model.spec import InputShapeError


class Embeddings(nn.Module):
    """16x16 patch embedding conv plus learned position embeddings (no cls token)."""

    def __init__(self, in_channels: int, hidden: int, img_size: int, patch_size: int, dropout: float) -> None:
        super().__init__()
        self.grid = img_size // patch_size
        self.patch_embeddings = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embeddings(x).flatten(2).transpose(1, 2)  # [B, N, hidden]
        return self.dropout(x + self.position_embeddings)


class Attention(nn.Module):
    """Multi-head self-attention with separate query/key/value/out projections, as the official code."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.proj_dropout = nn.Dropout(attn_dropout)

    def _split(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        # Same maths as softmax(QK^T / sqrt(d)) V, in PyTorch's fused kernel.
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        h = h.transpose(1, 2).reshape(x.shape)
        return self.proj_dropout(self.out(h))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, hidden: int, heads: int, mlp_dim: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.attn = Attention(hidden, heads, attn_dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn = Mlp(hidden, mlp_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Encoder(nn.Module):
    """Transformer blocks, each followed by ``h = h + dmoe(h, attr)``, then a final LayerNorm."""

    def __init__(self, hidden: int, depth: int, heads: int, mlp_dim: int, dropout: float, attn_dropout: float,
                 moe: nn.ModuleList | None) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Block(hidden, heads, mlp_dim, dropout, attn_dropout) for _ in range(depth)])
        self.encoder_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.moe = moe  # one shared DMoE (official) or one per block

    def forward(self, h: Tensor, attr: Tensor, grid: tuple[int, int]) -> Tensor:
        for i, block in enumerate(self.layer):
            h = block(h)
            if self.moe is not None:
                moe = self.moe[i if len(self.moe) > 1 else 0]
                h = h + moe(h, attr, position=f"block{i}", grid=grid)
        return self.encoder_norm(h)


class Transformer(nn.Module):
    def __init__(self, embeddings: Embeddings, encoder: Encoder) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.encoder = encoder


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """Bilinear x2 upsampling (align_corners, like nn.UpsamplingBilinear2d) then two conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv2(self.conv1(x))


class DecoderCup(nn.Module):
    def __init__(self, hidden: int, head_channels: int, decoder_channels: Sequence[int]) -> None:
        super().__init__()
        self.conv_more = ConvBNReLU(hidden, head_channels)
        ins = [head_channels, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList([DecoderBlock(i, o) for i, o in zip(ins, decoder_channels)])

    def forward(self, h: Tensor, grid: tuple[int, int]) -> Tensor:
        x = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], *grid)
        x = self.conv_more(x)
        for block in self.blocks:
            x = block(x)
        return x


class TransUNet(nn.Module):
    """``forward(x [B, C, H, W], attr [B]) -> logits [B, n_classes, H, W]`` with H = W = img_size.

    Args:
        in_channels: image channels (grey images are repeated to 3 by the official code; ours take 1).
        n_classes: output classes, background included.
        n_routers: dMoE routers (one per attribute value or combination); 1 is plain MoE, 0 no MoE at all.
        n_experts: shared experts of the dMoE layer (8 in the paper).
        top_k: experts each token is routed to (2).
        img_size: input height and width; the position embeddings are learned for this grid.
        patch_size: ViT patch size; must equal 2 ** len(decoder_channels) (the decoder upsamples x2 a block).
        hidden: ViT token width (768 in ViT-B/16).
        depth: transformer blocks (12); a dMoE residual step follows each.
        heads: attention heads (12).
        mlp_dim: width of each block's MLP (3072).
        head_channels: channels of the 3x3 conv at the token grid that starts the CUP decoder (512).
        decoder_channels: channels of the four upsampling blocks ((256, 128, 64, 16)).
        dropout: dropout of embeddings, MLPs and experts (0.1).
        attn_dropout: dropout of the attention weights (0).
        moe_per_block: one dMoE per block instead of the released models' one instance shared by all blocks.
        noisy_eval: keep the router noise at inference, as the official code does (default: deterministic).
    """

    spatial_dims = 2
    # "paper" = the released models; "small" runs on a laptop CPU; "tiny" is for tests
    presets = {
        "paper": Preset(dict(img_size=224, patch_size=16, hidden=768, depth=12, heads=12, mlp_dim=3072,
                             head_channels=512, decoder_channels=[256, 128, 64, 16])),
        "small": Preset(dict(img_size=128, patch_size=16, hidden=192, depth=4, heads=3, mlp_dim=768,
                             head_channels=128, decoder_channels=[64, 32, 16, 16])),
        "tiny": Preset(dict(img_size=64, patch_size=16, hidden=32, depth=2, heads=2, mlp_dim=64,
                            head_channels=16, decoder_channels=[16, 8, 8, 8])),
    }

    @classmethod
    def input_rule(cls, arch_kwargs: dict) -> InputRule:
        """Exactly img_size x img_size: the position embeddings are learned for one token grid."""
        size = int(arch_kwargs.get("img_size", 224))
        return InputRule(fixed=(size, size))

    @classmethod
    def routing_positions(cls, arch_kwargs: dict) -> list[str]:
        return [f"block{i}" for i in range(int(arch_kwargs.get("depth", 12)))]

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        n_routers: int = 0,
        n_experts: int = 8,
        top_k: int = 2,
        img_size: int = 224,
        patch_size: int = 16,
        hidden: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        moe_per_block: bool = False,
        noisy_eval: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if 2 ** len(decoder_channels) != patch_size:
            raise ValueError(
                f"the decoder upsamples x2 per block: patch_size={patch_size} needs "
                f"{int(math.log2(patch_size))} decoder_channels entries, got {list(decoder_channels)}"
            )
        self.in_channels, self.n_classes, self.img_size = in_channels, n_classes, img_size
        # The official model takes 3 channels and repeats grey input; keep that so official weights load.
        embed_channels = 3 if in_channels == 1 else in_channels
        moe = None
        if n_routers > 0:
            n_moe = depth if moe_per_block else 1
            moe = nn.ModuleList(
                [DMoE(hidden, n_routers, n_experts, top_k, noisy_eval=noisy_eval) for _ in range(n_moe)]
            )
        self.transformer = Transformer(
            Embeddings(embed_channels, hidden, img_size, patch_size, dropout),
            Encoder(hidden, depth, heads, mlp_dim, dropout, attn_dropout, moe),
        )
        self.decoder = DecoderCup(hidden, head_channels, list(decoder_channels))
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], n_classes, kernel_size=3, padding=1)

    def forward(self, x: Tensor, attr: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise InputShapeError(
                f"TransUNet expects images [B, C, {self.img_size}, {self.img_size}], got {tuple(x.shape)}: "
                f"resize or tile the image to {self.img_size}x{self.img_size}"
            )
        embed_channels = self.transformer.embeddings.patch_embeddings.in_channels
        if x.shape[1] == 1 and embed_channels != 1:
            x = x.repeat(1, embed_channels, 1, 1)
        if x.shape[1] != embed_channels:
            raise InputShapeError(f"TransUNet expects {self.in_channels} input channel(s), got {x.shape[1]}")
        attr = default_attr(attr, x, self.transformer.encoder.moe)
        grid = (self.transformer.embeddings.grid,) * 2
        h = self.transformer.encoder(self.transformer.embeddings(x), attr, grid)
        return self.segmentation_head(self.decoder(h, grid))
