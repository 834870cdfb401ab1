"""3D residual UNet from MONAI blocks with a separate dMoE after every encoder stage (voxels are tokens).

Attribute names mirror the official ``ContextUNETR`` in dMoE's ``dmoeunet.py`` (``encoder1..4, encoder10,
decoder4..1, out``), so official weights load after renaming only the MoE keys.
"""
from __future__ import annotations

from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import Tensor, nn

from napari_dmoe.model.moe import DMoE
from napari_dmoe.model.registry import InputRule, Preset
from napari_dmoe.model.routers import default_attr
from napari_dmoe.model.spec import InputShapeError

N_STAGES = 5
# every stage halves the grid; instance norm needs more than one voxel at the bottom stage
RULE = InputRule(divisor=2**N_STAGES, min_size=2 ** (N_STAGES + 1))


def nearest_valid_sizes(size: int) -> tuple[int, int]:
    """The valid sizes (multiples of 32, at least 64) just below and above ``size``."""
    return RULE.nearest(size)


class OutUpBlock(nn.Module):
    """Final x2 transposed conv to full resolution, without bias, as the official ``UnetOutUpBlock``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.transp_conv = get_conv_layer(3, in_channels, out_channels, kernel_size=2, stride=2, conv_only=True,
                                          is_transposed=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.transp_conv(x)


class ResUNet3D(nn.Module):
    """``forward(x [B, C, D, H, W], attr [B]) -> logits [B, n_classes, D, H, W]``.

    Spatial sizes must be multiples of 32 and at least 64 (instance norm needs 2 voxels at the bottom stage).

    Args:
        in_channels: image channels.
        n_classes: output classes, background included.
        n_routers: routers of each stage's dMoE (one per attribute value or combination); 1 is plain MoE, 0 none.
        n_experts: experts of each stage's dMoE (8).
        top_k: experts each voxel is routed to (2).
        feature_size: F, the first stage's channels; stages have F, F, 2F, 4F, 8F (24 in the paper).
        norm_name: MONAI norm of the residual blocks ("instance").
        noisy_eval: keep the router noise at inference, as the official code does (default: deterministic).
    """

    spatial_dims = 3
    presets = {
        "paper": Preset(dict(feature_size=24), input_size=(96, 96, 96)),
        "small": Preset(dict(feature_size=8), input_size=(96, 96, 64)),
        "tiny": Preset(dict(feature_size=4), input_size=(64, 64, 64)),
    }

    @classmethod
    def input_rule(cls, arch_kwargs: dict) -> InputRule:
        return RULE

    @classmethod
    def routing_positions(cls, arch_kwargs: dict) -> list[str]:
        return [f"stage{i}" for i in range(N_STAGES)]

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        n_routers: int = 0,
        n_experts: int = 8,
        top_k: int = 2,
        feature_size: int = 24,
        norm_name: str = "instance",
        noisy_eval: bool = False,
    ) -> None:
        super().__init__()
        f = feature_size
        self.in_channels, self.n_classes = in_channels, n_classes
        channels = [f, f, 2 * f, 4 * f, 8 * f]

        def down(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=2, norm_name=norm_name, res_block=True)

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                                res_block=True)

        self.encoder1 = down(in_channels, channels[0])
        self.encoder2 = down(channels[0], channels[1])
        self.encoder3 = down(channels[1], channels[2])
        self.encoder4 = down(channels[2], channels[3])
        self.encoder10 = down(channels[3], channels[4])
        self.decoder4 = up(channels[4], channels[3])
        self.decoder3 = up(channels[3], channels[2])
        self.decoder2 = up(channels[2], channels[1])
        self.decoder1 = up(channels[1], channels[0])
        # Final x2 transposed conv to full resolution, no bias (as the official UnetOutUpBlock).
        self.out = OutUpBlock(f, n_classes)
        self.moe = None
        if n_routers > 0:
            self.moe = nn.ModuleList([DMoE(c, n_routers, n_experts, top_k, noisy_eval=noisy_eval) for c in channels])

    def _check(self, x: Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise InputShapeError(
                f"ResUNet3D expects volumes [B, {self.in_channels}, D, H, W], got shape {tuple(x.shape)}"
            )
        bad = [s for s in x.shape[2:] if RULE.problem([s])]
        if bad:
            hints = ", ".join(f"{s} -> {nearest_valid_sizes(s)[0]} or {nearest_valid_sizes(s)[1]}" for s in bad)
            raise InputShapeError(
                f"ResUNet3D needs every spatial size divisible by {RULE.divisor} and at least {RULE.min_size}, "
                f"got {tuple(x.shape[2:])} "
                f"(nearest valid sizes: {hints}); pad or crop the volume, or use a sliding window"
            )

    def _moe(self, h: Tensor, attr: Tensor, stage: int) -> Tensor:
        if self.moe is None:
            return h
        b, c, *grid = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # [B, voxels, C]
        update = self.moe[stage](tokens, attr, position=f"stage{stage}", grid=grid)
        return h + update.transpose(1, 2).reshape(h.shape)

    def forward(self, x: Tensor, attr: Tensor | None = None) -> Tensor:
        self._check(x)
        attr = default_attr(attr, x, self.moe)
        enc0 = self._moe(self.encoder1(x), attr, 0)
        enc1 = self._moe(self.encoder2(enc0), attr, 1)
        enc2 = self._moe(self.encoder3(enc1), attr, 2)
        enc3 = self._moe(self.encoder4(enc2), attr, 3)
        bottom = self._moe(self.encoder10(enc3), attr, 4)
        dec = self.decoder4(bottom, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        dec = self.decoder1(dec, enc0)
        return self.out(dec)
