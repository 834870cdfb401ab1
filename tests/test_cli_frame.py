"""The ``dmoe`` frame: registry, --version, error handling, and the `info` and `import-official` commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from napari_dmoe import __version__
from napari_dmoe.checkpoint import save_model
from napari_dmoe.cli import build_parser, main
from napari_dmoe.commands import COMMANDS
from napari_dmoe.model.spec import Attribute, ModelSpec


def tiny_model_file(path):
    """A real model file written with save_model (a tiny conv net; `info` reads only the header)."""
    spec = ModelSpec(
        arch="resunet3d", class_names=["background", "prostate"],
        attributes=[Attribute("stage", ["T1", "T2", "T3", "T4"])], input_size=[32, 32, 32],
        normalization={"kind": "window", "low": -200, "high": 300}, spacing=[1.0, 1.0, 2.5],
        provenance={"seed": 1234, "command": "dmoe train x.yaml"}, metrics={"es_dice": 0.71},
    )
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(2, 2, 1))
    return save_model(path, net, spec), spec


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "napari_dmoe.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(stderr, command, *fragments):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"dmoe {command}: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


# -- frame --------------------------------------------------------------------------------------------------
def test_registry_builds_every_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"info", "import-official"} <= set(sub.choices)
    assert len(sub.choices) == len(COMMANDS)
    for name, p in sub.choices.items():
        assert callable(p.get_default("func")), name


def test_version_and_no_command(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dmoe (napari-dmoe) {__version__}"
    assert main([]) == 2
    assert "usage: dmoe" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "gone.safetensors"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, "info", str(missing), "no such model file")
    for argv in (["--debug", "info", str(missing)], ["info", str(missing), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "CheckpointError" in err


# -- info ---------------------------------------------------------------------------------------------------
def test_info_text_and_json(tmp_path, capsys):
    path, spec = tiny_model_file(tmp_path / "prostate.safetensors")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for fragment in ("resunet3d (3D)", "dMoE", "8 (top-2), 4 router(s)", "stage = T1, T2, T3, T4",
                     "0 background, 1 prostate", "32 x 32 x 32", "kind=window, low=-200, high=300",
                     "1.0 x 1.0 x 2.5", "seed=1234", "es_dice=0.71", f"parameters   : {2 * 27 + 2 + 4 + 2}"):
        assert fragment in out, (fragment, out)
    assert main(["info", str(path), "--json"]) == 0
    assert ModelSpec.from_dict(json.loads(capsys.readouterr().out)) == spec


def test_info_as_a_real_process(tmp_path):
    path, spec = tiny_model_file(tmp_path / "m.safetensors")
    done = run_cli("info", path, "--json")
    assert done.returncode == 0, done.stderr
    assert ModelSpec.from_dict(json.loads(done.stdout)) == spec

    pickle_file = tmp_path / "official.safetensors"
    torch.save({"w": torch.zeros(2)}, pickle_file)
    done = run_cli("info", pickle_file)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "info", "looks like a PyTorch pickle", "dmoe import-official")


# -- import-official ----------------------------------------------------------------------------------------
IMPORT_ARGS = ["--arch", "transunet2d", "--attribute-name", "race", "--attribute-values", "Asian,Black,White",
               "--class-names", "background,rim,cup"]


def test_import_official_bad_input(tmp_path, capsys):
    src = tmp_path / "official.pth"
    assert main(["import-official", str(src), *IMPORT_ARGS, "--out", str(tmp_path / "m.safetensors")]) == 2
    assert_one_line_error(capsys.readouterr().err, "import-official", str(src), "no such checkpoint file")

    torch.save({"w": torch.zeros(2)}, src)
    assert main(["import-official", str(src), *IMPORT_ARGS, "--out", str(tmp_path / "m.pt")]) == 2
    assert_one_line_error(capsys.readouterr().err, "import-official", "end in .safetensors")

    existing, _ = tiny_model_file(tmp_path / "there.safetensors")
    before = existing.read_bytes()
    assert main(["import-official", str(src), *IMPORT_ARGS, "--out", str(existing)]) == 2
    assert_one_line_error(capsys.readouterr().err, "import-official", "exists", "--force")
    assert existing.read_bytes() == before

    args = [str(src), *IMPORT_ARGS, "--out", str(tmp_path / "m.safetensors")]
    args[args.index("Asian,Black,White")] = "Asian,,White"
    assert main(["import-official", *args]) == 2
    assert "expected comma-separated non-empty names" in capsys.readouterr().err


def test_import_official_missing_required_options_as_a_real_process(tmp_path):
    done = run_cli("import-official", tmp_path / "x.pth", "--arch", "transunet2d")
    assert done.returncode == 2
    assert "the following arguments are required: --attribute-name" in done.stderr
    assert "Traceback" not in done.stderr
