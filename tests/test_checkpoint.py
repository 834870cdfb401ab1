"""Model files: atomic save, bit-exact load, and a clear CheckpointError for every kind of bad file."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import napari_dmoe.io.checkpoint as ckpt
import napari_dmoe.model as model_pkg
from napari_dmoe.io.checkpoint import CheckpointError, Model, load_model, read_spec, save_model, tensor_shapes
from napari_dmoe.model.spec import Attribute, ModelSpec


class SharedNet(torch.nn.Module):
    """Tiny real network with a BatchNorm (buffers) and one module used at two places (shared weights)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, width, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(width)
        self.shared = torch.nn.Conv2d(width, width, 1)
        self.blocks = torch.nn.ModuleList([self.shared, self.shared])
        self.head = torch.nn.Conv2d(width, 3, 1)

    def forward(self, x, attr):
        h = torch.relu(self.norm(self.conv(x)))
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def tiny_spec(**kw) -> ModelSpec:
    base = dict(
        arch="transunet2d", class_names=["background", "rim", "cup"],
        attributes=[Attribute("race", ["Asian", "Black", "White"])], arch_kwargs={"width": 4},
        input_size=[16, 16], provenance={"seed": 1234, "command": "test"}, metrics={"dice": {"Asian": 0.8}},
    )
    base.update(kw)
    return ModelSpec(**base)


@pytest.fixture
def shared_builder(monkeypatch):
    """build_network for the tiny test network, so checkpoint logic is tested apart from the real presets."""
    monkeypatch.setattr(model_pkg, "build_network", lambda spec: SharedNet(**spec.arch_kwargs), raising=False)


def trained(net: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # non-default values everywhere, buffers included
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return net


@pytest.fixture
def saved(tmp_path, shared_builder):
    net, spec = trained(SharedNet()), tiny_spec()
    path = save_model(tmp_path / "m.safetensors", net, spec)
    return path, net, spec


# -- round trip ---------------------------------------------------------------------------------------------
def test_round_trip_is_bit_exact_with_shared_weights(saved):
    path, net, spec = saved
    model = load_model(path)
    assert isinstance(model, Model) and model.path == path
    assert model.spec == spec and model.spec.to_dict() == spec.to_dict()
    assert not model.network.training
    want, got = net.state_dict(), model.network.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # the shared module is still one module after loading
    assert model.network.blocks[0].weight.data_ptr() == model.network.blocks[1].weight.data_ptr()
    x = torch.randn(2, 1, 16, 16)
    net.eval()
    assert torch.equal(net(x, torch.zeros(2, dtype=torch.long)), model.network(x, torch.zeros(2, dtype=torch.long)))


def test_file_is_one_safetensors_with_spec_in_header(saved):
    path, net, spec = saved
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]
    assert read_spec(path) == spec
    shapes = tensor_shapes(path)
    assert shapes["conv.weight"] == (4, 1, 3, 3)
    assert "shared.weight" in shapes and "blocks.0.weight" not in shapes and "blocks.1.weight" not in shapes
    assert len(shapes) < len(net.state_dict())  # the shared weights are stored once


def test_read_spec_does_not_build_the_network(saved, monkeypatch):
    path, _, spec = saved

    def boom(spec):
        raise AssertionError("read_spec must not build a network")

    monkeypatch.setattr(model_pkg, "build_network", boom)
    assert read_spec(str(path)) == spec


def test_loading_never_unpickles(saved, monkeypatch):
    path, _, _ = saved

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert load_model(path).spec == saved[2]


@pytest.mark.parametrize("preset", ["transunet2d-tiny", "resunet3d-tiny"])
def test_round_trip_real_presets(tmp_path, preset):
    from napari_dmoe.model import build_network, make_spec

    spec = make_spec(preset, attribute_name="race", attribute_values=["Asian", "Black", "White"],
                     class_names=["background", "rim", "cup"])
    net = trained(build_network(spec))
    path = save_model(tmp_path / f"{preset}.safetensors", net, spec)
    model = load_model(path)
    assert model.spec == spec
    for name, t in net.state_dict().items():
        assert torch.equal(t, model.network.state_dict()[name]), name
    size = spec.input_size
    x = torch.randn(1, spec.in_channels, *size)
    attr = torch.tensor([spec.router_index("Black")])
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, attr), model.network(x, attr))


# -- atomic write -------------------------------------------------------------------------------------------
def test_failure_mid_write_keeps_previous_file(saved, monkeypatch):
    path, _, spec = saved
    before = path.read_bytes()
    real_save = ckpt.save_file

    def dies_half_way(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        with open(filename, "wb") as f:  # what a crash leaves: the first half of the bytes
            f.write(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        save_model(path, trained(SharedNet()), spec)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temp file left


def test_interrupt_before_rename_keeps_previous_file(saved, monkeypatch):
    path, _, spec = saved
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(path, trained(SharedNet()), spec)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]


def test_save_rejects_bad_destinations(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.pth.*must end in \.safetensors"):
        save_model(tmp_path / "model.pth", SharedNet(), tiny_spec())
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        save_model(tmp_path / "d.safetensors", SharedNet(), tiny_spec())
    path = save_model(tmp_path / "new" / "sub" / "m.safetensors", SharedNet(), tiny_spec())
    assert path.is_file()


# -- bad files ----------------------------------------------------------------------------------------------
def expect_error(path, *fragments):
    for fn in (read_spec, load_model):
        with pytest.raises(CheckpointError) as info:
            fn(path)
        message = str(info.value)
        assert str(path) in message
        for fragment in fragments:
            assert fragment in message, message
    return message


def test_missing_file_and_directory(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "no such model file")
    expect_error(tmp_path, "is a directory")


def test_truncated_file(saved):
    path = saved[0]
    data = path.read_bytes()
    for cut in (4, 40, len(data) - 7):
        path.write_bytes(data[:cut])
        expect_error(path, "truncated or corrupt")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(bytes(range(7, 250)) * 3)
    expect_error(path, "truncated or corrupt")


@pytest.mark.parametrize("zipped", [True, False])
def test_pytorch_pickle_in_disguise(tmp_path, zipped):
    path = tmp_path / "official.safetensors"
    torch.save({"state_dict": SharedNet().state_dict()}, path, _use_new_zipfile_serialization=zipped)
    expect_error(path, "looks like a PyTorch pickle (.pth)", "never unpickles", "dmoe import-official")


def test_safetensors_without_spec(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt._unique_tensors(SharedNet().state_dict()).items()}, str(path))
    expect_error(path, "without a napari-dmoe model spec")


def write_with_metadata(path, **metadata):
    base = {"format": "napari-dmoe", "format_version": "1", "dmoe_spec": json.dumps(tiny_spec().to_dict())}
    base.update(metadata)
    save_file(ckpt._unique_tensors(SharedNet().state_dict()), str(path), metadata=base)
    return path


def test_unknown_format_versions(tmp_path):
    expect_error(write_with_metadata(tmp_path / "a.safetensors", format_version="99"), "format version '99'")
    spec = dict(tiny_spec().to_dict(), format_version=99)
    message = expect_error(write_with_metadata(tmp_path / "b.safetensors", dmoe_spec=json.dumps(spec)),
                           "invalid model spec", "format version 99")
    assert "upgrade napari-dmoe" in message


def test_bad_spec_json_and_fields(tmp_path):
    expect_error(write_with_metadata(tmp_path / "a.safetensors", dmoe_spec="{not json"), "not valid JSON")
    spec = dict(tiny_spec().to_dict(), arch="unet9d")
    expect_error(write_with_metadata(tmp_path / "b.safetensors", dmoe_spec=json.dumps(spec)), "arch='unet9d'")


def test_spec_does_not_match_weights(tmp_path, shared_builder):
    spec = tiny_spec()
    state = ckpt._unique_tensors(SharedNet().state_dict())
    meta = {"format": "napari-dmoe", "format_version": "1", "dmoe_spec": json.dumps(spec.to_dict())}

    missing = dict(state)
    del missing["head.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors.*missing: head\.bias"):
        load_model(tmp_path / "missing.safetensors")

    extra = dict(state, **{"decoder.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"unexpected: decoder\.weight"):
        load_model(tmp_path / "extra.safetensors")

    wider = ckpt._unique_tensors(SharedNet(width=6).state_dict())  # spec says width 4
    save_file(wider, str(tmp_path / "wider.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*conv\.weight \(6, 1, 3, 3\) vs \(4, 1, 3, 3\)"
                       r".* and \d+ more"):
        load_model(tmp_path / "wider.safetensors")


def test_spec_the_real_networks_cannot_build(tmp_path):
    # valid as a spec, but arch_kwargs {"width": 4} belong to the test net, not to the real TransUNet
    path = write_with_metadata(tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: the spec does not describe a buildable network"):
        load_model(path)


def test_saved_files_get_the_usual_permissions(tmp_path, model2d):
    """Atomic writes must not leave a model readable by its owner only (mkstemp's 0600) on a shared server."""
    import os

    from napari_dmoe.io.checkpoint import save_model

    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what the user's umask gives a new file
    path = save_model(tmp_path / "m.safetensors", model2d.network, model2d.spec)
    assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
