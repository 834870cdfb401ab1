"""Issue 12, obscure messages made clear: YAML numbers written as 1e-3, label_map typos, a garbage init_from,
an all-NaN training image, and escape sequences in a model header."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile
import yaml

from napari_dmoe.cli.main import main
from napari_dmoe.io.checkpoint import read_spec, save_model
from napari_dmoe.model import build_network, make_spec
from napari_dmoe.training.config import ConfigError, load_config

from training_data import tiny_config, write_fairseg, write_folder


def _config(tmp_path, **changes):
    data = {"format": "fairseg", "root": str(write_fairseg(tmp_path / "fs", n_train=6, n_test=2)), "attributes": "race"}
    path = tiny_config(tmp_path / "c.yaml", tmp_path / "run", data)
    config = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        config[section][leaf] = value
    path.write_text(yaml.safe_dump(config))
    return path


def test_yaml_number_without_a_dot_is_a_number(tmp_path):
    path = _config(tmp_path)
    path.write_text(path.read_text().replace("recipe:\n", "recipe:\n  lr: 1e-3\n"))
    assert yaml.safe_load(path.read_text())["recipe"]["lr"] == "1e-3"  # what PyYAML makes of it
    assert load_config(path)["recipe"]["lr"] == pytest.approx(0.001)
    assert load_config(path, ["recipe.weight_decay=5e-5"])["recipe"]["weight_decay"] == pytest.approx(5e-5)
    path.write_text(path.read_text().replace("lr: 1e-3", "lr: fast"))
    with pytest.raises(ConfigError, match="'recipe.lr': expected a number, got 'fast'"):
        load_config(path)


@pytest.mark.parametrize("label_map, message", [({"x": 1}, "entry 'x'"), ({0: "disc"}, "entry 0: 'disc'"),
                                                ({255: -1}, "entry 255: -1")])
def test_label_map_errors_name_the_entry(tmp_path, label_map, message):
    path = _config(tmp_path, **{"data.label_map": label_map})
    with pytest.raises(ConfigError, match=f"'data.label_map': {message}"):
        load_config(path)


def test_label_map_keys_may_be_quoted(tmp_path):
    path = _config(tmp_path, **{"data.label_map": {"0": 0, "255": 1}})
    assert load_config(path)["data"]["label_map"] == {0: 0, 255: 1}


@pytest.mark.parametrize("name, data", [("vit.safetensors", b"\x00" * 64), ("vit.npz", b"PK\x03\x04garbage"),
                                        ("vit.npz", b"not a zip at all")])
def test_garbage_init_from_is_a_clear_error(tmp_path, name, data):
    from napari_dmoe.training.pretrained import InitError, load_pretrained_vit

    spec = make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], ["background", "rim"])
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InitError, match=r"model.init_from=.*not a readable ViT checkpoint"):
        load_pretrained_vit(build_network(spec), tmp_path / name)


@pytest.mark.slow
def test_all_nan_training_image_is_named_not_blamed_on_the_learning_rate(tmp_path, capsys):
    root = write_folder(tmp_path / "folder")
    tifffile.imwrite(root / "img_003.tif", np.full((32, 32), np.nan, np.float32))
    csv = root / "dataset.csv"
    csv.write_text(csv.read_text().replace("img_003.png,", "img_003.tif,"))
    data = {"format": "folder", "root": str(root), "split_column": "split", "class_names": ["background", "disc"],
            "attributes": {"sex": ["F", "M"]}}
    config = tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, recipe={"steps": 2, "batch_size": 7})
    assert main(["train", str(config), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "img_003" in err and "NaN or infinite values" in err and "lower recipe.lr" not in err


def test_escape_sequences_in_a_model_header_never_reach_the_terminal(tmp_path, capsys):
    evil = "\x1b]0;pwned\x07\x1b[2J\x1b[31mrim"
    spec = make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], ["background", evil])
    spec = dataclasses.replace(spec, provenance={"command": "dmoe train \x1b[8mhidden\x1b[0m x.yaml", "note\x07": 1})
    path = save_model(tmp_path / "m.safetensors", build_network(spec), spec)
    assert read_spec(path).class_names == ["background", "rim"]
    assert main(["info", str(path)]) == 0
    assert main(["info", str(path), "--json"]) == 0
    out = capsys.readouterr()
    assert "\x1b" not in out.out + out.err and "\x07" not in out.out + out.err
    assert "rim" in out.out and "hidden" in out.out
