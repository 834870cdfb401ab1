"""Import of official dMoE checkpoints: keys and shapes written here from the official code (tvseg/dMoE),
logits compared with an independent re-implementation of the official forward pass."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock
from torch import nn

from napari_dmoe.model.official import OfficialImportError, convert_official_state_dict, import_official

# A tiny official-style 2D config: ViT hidden 32, 2 layers, 2 heads (head dim 16), MLP 48, patch 16, 64x64 input.
H, DEPTH, HEADS, MLP, P, GRID, E, R, K = 32, 2, 2, 48, 16, 4, 8, 3, 3
HEAD_CH, DEC = 16, [16, 8, 8, 4]


def official_2d_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of the official VisionTransformer with dMoE."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "transformer.embeddings.patch_embeddings.weight": w(H, 3, P, P, std=0.02),
        "transformer.embeddings.patch_embeddings.bias": w(H),
        "transformer.embeddings.position_embeddings": w(1, GRID * GRID, H),
        "transformer.encoder.encoder_norm.weight": 1 + w(H),
        "transformer.encoder.encoder_norm.bias": w(H),
    }
    for i in range(DEPTH):
        pre = f"transformer.encoder.layer.{i}."
        for norm in ("attention_norm", "ffn_norm"):
            sd[pre + norm + ".weight"], sd[pre + norm + ".bias"] = 1 + w(H), w(H)
        for lin in ("query", "key", "value", "out"):
            sd[pre + f"attn.{lin}.weight"], sd[pre + f"attn.{lin}.bias"] = w(H, H, std=0.2), w(H)
        sd[pre + "ffn.fc1.weight"], sd[pre + "ffn.fc1.bias"] = w(MLP, H, std=0.2), w(MLP)
        sd[pre + "ffn.fc2.weight"], sd[pre + "ffn.fc2.bias"] = w(H, MLP, std=0.2), w(H)
    moe = "transformer.encoder.sparseMoE."
    for r in range(R):
        for lin in ("topkroute_linear", "noise_linear"):
            sd[moe + f"router.{r}.{lin}.weight"], sd[moe + f"router.{r}.{lin}.bias"] = w(E, H, std=0.5), w(E)
    for e in range(E):
        sd[moe + f"experts.{e}.net.0.weight"], sd[moe + f"experts.{e}.net.0.bias"] = w(4 * H, H, std=0.5), w(4 * H)
        sd[moe + f"experts.{e}.net.2.weight"], sd[moe + f"experts.{e}.net.2.bias"] = w(H, 4 * H, std=0.5), w(H)

    def conv_bn(pre, cin, cout):
        sd[pre + ".0.weight"] = w(cout, cin, 3, 3, std=1 / math.sqrt(9 * cin))
        sd[pre + ".1.weight"], sd[pre + ".1.bias"] = 1 + w(cout), w(cout)
        sd[pre + ".1.running_mean"], sd[pre + ".1.running_var"] = w(cout), 1 + w(cout).abs()
        sd[pre + ".1.num_batches_tracked"] = torch.tensor(7)

    conv_bn("decoder.conv_more", H, HEAD_CH)
    for i, (cin, cout) in enumerate(zip([HEAD_CH, *DEC[:-1]], DEC)):
        conv_bn(f"decoder.blocks.{i}.conv1", cin, cout)
        conv_bn(f"decoder.blocks.{i}.conv2", cout, cout)
    sd["segmentation_head.0.weight"], sd["segmentation_head.0.bias"] = w(K, DEC[-1], 3, 3), w(K)
    return sd


def official_2d_forward(sd, x, attr):
    """The official VisionTransformer forward in eval mode without routing noise, written with functional ops."""
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
    h = F.conv2d(x, sd["transformer.embeddings.patch_embeddings.weight"],
                 sd["transformer.embeddings.patch_embeddings.bias"], stride=P)
    h = h.flatten(2).transpose(-1, -2) + sd["transformer.embeddings.position_embeddings"]
    b, n, _ = h.shape

    def lin(t, name):
        return F.linear(t, sd[name + ".weight"], sd[name + ".bias"])

    def ln(t, name):
        return F.layer_norm(t, (H,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    for i in range(DEPTH):
        pre = f"transformer.encoder.layer.{i}."
        y = ln(h, pre + "attention_norm")
        q, k, v = (lin(y, pre + "attn." + s).view(b, n, HEADS, H // HEADS).permute(0, 2, 1, 3)
                   for s in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(H // HEADS), dim=-1)
        h = h + lin((probs @ v).permute(0, 2, 1, 3).reshape(b, n, H), pre + "attn.out")
        h = h + lin(F.gelu(lin(ln(h, pre + "ffn_norm"), pre + "ffn.fc1")), pre + "ffn.fc2")
        h = h + official_sparse_moe(sd, "transformer.encoder.sparseMoE.", h, attr)
    h = ln(h, "transformer.encoder.encoder_norm")

    def conv_bn_relu(t, pre):
        t = F.conv2d(t, sd[pre + ".0.weight"], padding=1)
        t = F.batch_norm(t, sd[pre + ".1.running_mean"], sd[pre + ".1.running_var"], sd[pre + ".1.weight"],
                         sd[pre + ".1.bias"], training=False)
        return F.relu(t)

    t = conv_bn_relu(h.permute(0, 2, 1).reshape(b, H, GRID, GRID), "decoder.conv_more")
    for i in range(len(DEC)):
        t = F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)  # nn.UpsamplingBilinear2d
        t = conv_bn_relu(conv_bn_relu(t, f"decoder.blocks.{i}.conv1"), f"decoder.blocks.{i}.conv2")
    return F.conv2d(t, sd["segmentation_head.0.weight"], sd["segmentation_head.0.bias"], padding=1)


def official_sparse_moe(sd, pre, x, attr, top_k=2):
    """Official SparseMoE.forward: per-sample router, -inf scatter + softmax, one boolean mask per expert."""
    gates, indices = [], []
    for x_b, a in zip(x, attr.tolist()):
        logits = F.linear(x_b, sd[pre + f"router.{a}.topkroute_linear.weight"],
                          sd[pre + f"router.{a}.topkroute_linear.bias"])
        top, idx = logits.topk(top_k, dim=-1)
        gates.append(torch.softmax(torch.full_like(logits, float("-inf")).scatter(-1, idx, top), dim=-1))
        indices.append(idx)
    gates, indices = torch.stack(gates), torch.stack(indices)
    out = torch.zeros_like(x)
    flat_x, flat_g = x.reshape(-1, x.shape[-1]), gates.reshape(-1, gates.shape[-1])
    for i in range(E):
        mask = (indices == i).any(-1)
        flat = mask.view(-1)
        if flat.any():
            e = pre + f"experts.{i}.net."
            y = F.linear(F.relu(F.linear(flat_x[flat], sd[e + "0.weight"], sd[e + "0.bias"])),
                         sd[e + "2.weight"], sd[e + "2.bias"])
            out[mask] += y * flat_g[flat, i].unsqueeze(1)
    return out


def test_2d_official_checkpoint_imports_with_identical_logits(tmp_path):
    sd = official_2d_state_dict()
    path = tmp_path / "epoch_99.pth"
    torch.save(sd, path)
    net, spec = import_official(path, "transunet2d", "race", ["Asian", "Black", "White"], ["bg", "rim", "cup"],
                                in_channels=1, heads=HEADS)
    assert spec.arch_kwargs == dict(img_size=64, patch_size=16, hidden=H, depth=DEPTH, heads=HEADS, mlp_dim=MLP,
                                    head_channels=HEAD_CH, decoder_channels=DEC)
    assert (spec.n_routers, spec.n_experts, spec.top_k, spec.in_channels, spec.input_size) == (3, 8, 2, 1, [64, 64])
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    attr = torch.tensor([2, 0, 1])
    with torch.no_grad():
        ours, reference = net(x, attr), official_2d_forward(sd, x, attr)
        wrong_router = net(x, torch.tensor([0, 0, 1]))
    assert reference.abs().max() > 0.1  # a meaningful comparison, not two near-zero maps
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert (wrong_router - reference).abs().max() > 5e-4  # the comparison is sensitive to routing


def test_dataparallel_prefix_and_wrapped_dict(tmp_path):
    sd = {f"module.{k}": v for k, v in official_2d_state_dict().items()}
    path = tmp_path / "dp.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    net, _ = import_official(path, "transunet2d", "race", ["A", "B", "W"], ["bg", "rim", "cup"], heads=HEADS)
    converted = convert_official_state_dict(sd, "transunet2d", heads=HEADS)[0]
    assert "transformer.encoder.moe.0.routers.2.noise.weight" in converted
    assert "segmentation_head.weight" in converted and not any(k.startswith("module.") for k in converted)
    torch.testing.assert_close(net.segmentation_head.weight, sd["module.segmentation_head.0.weight"])


def test_mismatched_vocabulary_and_classes_are_clear_errors(tmp_path):
    path = tmp_path / "m.pth"
    torch.save(official_2d_state_dict(), path)
    with pytest.raises(OfficialImportError, match="3 routers but 2 attribute values"):
        import_official(path, "transunet2d", "race", ["A", "B"], ["bg", "rim", "cup"], heads=HEADS)
    with pytest.raises(OfficialImportError, match="predicts 3 classes but 2"):
        import_official(path, "transunet2d", "race", ["A", "B", "W"], ["bg", "fg"], heads=HEADS)
    with pytest.raises(OfficialImportError, match="missing"):
        import_official(path, "resunet3d", "race", ["A", "B", "W"], ["bg", "rim", "cup"])


class _Pickled:  # any non-tensor object: weights_only loading must refuse it
    pass


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Pickled()}, evil)
    with pytest.raises(OfficialImportError, match="not a loadable torch checkpoint"):
        import_official(evil, "transunet2d", "race", ["A"], ["bg", "fg"])
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(OfficialImportError, match="notes.pth"):
        import_official(text, "transunet2d", "race", ["A"], ["bg", "fg"])
    with pytest.raises(OfficialImportError, match="no such file"):
        import_official(tmp_path / "absent.pth", "transunet2d", "race", ["A"], ["bg", "fg"])


# ---- 3D: a test-local replica of the official ContextUNETR module layout (dmoeunet.py) -----------------------
class _Router(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.topkroute_linear, self.noise_linear = nn.Linear(c, E), nn.Linear(c, E)


class _Expert(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(c, 4 * c), nn.ReLU(), nn.Linear(4 * c, c), nn.Dropout(0.1))


class _SparseMoE(nn.Module):
    def __init__(self, c, n_routers=5):
        super().__init__()
        self.router = nn.ModuleList([_Router(c) for _ in range(n_routers)])
        self.experts = nn.ModuleList([_Expert(c) for _ in range(E)])


class _OfficialUNet(nn.Module):
    def __init__(self, f=4, n_classes=3):
        super().__init__()
        chans = [f, f, 2 * f, 4 * f, 8 * f]
        names = ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"]
        for name, cin, cout in zip(names, [1, *chans[:-1]], chans):
            setattr(self, name, UnetrBasicBlock(3, cin, cout, 3, 2, "instance", res_block=True))
        for name, cin, cout in zip(["decoder4", "decoder3", "decoder2", "decoder1"], chans[:0:-1], chans[-2::-1]):
            setattr(self, name, UnetrUpBlock(3, cin, cout, 3, 2, "instance", res_block=True))
        self.out = nn.Module()
        self.out.transp_conv = nn.Module()
        self.out.transp_conv.conv = nn.ConvTranspose3d(f, n_classes, 2, 2, bias=False)
        self.sparseMoE = nn.Sequential(*[_SparseMoE(c) for c in chans])

    def forward(self, x, attr):
        def dmoe(t, i):
            tok = t.flatten(2).permute(0, 2, 1)
            sd = self.sparseMoE[i].state_dict()
            return (tok + official_sparse_moe(sd, "", tok, attr)).transpose(1, 2).reshape(t.shape)

        e0 = dmoe(self.encoder1(x), 0)
        e1 = dmoe(self.encoder2(e0), 1)
        e2 = dmoe(self.encoder3(e1), 2)
        e3 = dmoe(self.encoder4(e2), 3)
        d4 = dmoe(self.encoder10(e3), 4)
        d = self.decoder1(self.decoder2(self.decoder3(self.decoder4(d4, e3), e2), e1), e0)
        return self.out.transp_conv.conv(d)


def test_3d_official_checkpoint_imports_with_identical_logits(tmp_path):
    torch.manual_seed(0)
    official = _OfficialUNet().eval()
    path = tmp_path / "model_final.pt"
    torch.save({"model": official.state_dict()}, path)
    values = ["T1", "T2", "T3", "T4", "unused"]  # the official 3D model always has 5 routers
    net, spec = import_official(path, "resunet3d", "stage", values, ["bg", "a", "b"])
    assert (spec.arch_kwargs, spec.n_routers, spec.in_channels) == ({"feature_size": 4}, 5, 1)
    x, attr = torch.randn(2, 1, 64, 64, 64), torch.tensor([3, 0])
    with torch.no_grad():
        reference = official(x, attr)
        torch.testing.assert_close(net(x, attr), reference, atol=1e-4, rtol=1e-4)
        assert (net(x, torch.tensor([1, 0])) - reference).abs().max() > 5e-4  # sensitive to routing
