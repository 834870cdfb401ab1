"""The ``dmoe`` frame: registry, --version, error handling, and the `info` and `import-official` commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from napari_dmoe import __version__
from napari_dmoe.io.checkpoint import save_model
from napari_dmoe.cli.main import build_parser, main
from napari_dmoe.cli import COMMANDS
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
    return subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", *map(str, args)],
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


def test_info_shows_the_shipped_models_test_results_readably(capsys):
    from napari_dmoe.cli.demo_pictures import MODELS_DIR

    assert main(["info", str(MODELS_DIR / "prostate-dmoe.safetensors")]) == 0
    out = capsys.readouterr().out
    for fragment in ("test (n=32)  : CTV: Dice", "worst group T4", "T4 ", "(n=2)", "train cases: 104 (T1 ",
                     "validation   : split=val", "dmoe info MODEL --json"):
        assert fragment in out, (fragment, out)
    assert '{"' not in out, "no raw JSON in the text form"


@pytest.mark.slow
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
    assert_one_line_error(capsys.readouterr().err, "import-official", "exists", "--overwrite")
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


# Our key names -> the official dMoE code's (inverse of the renames the importer documents), to write a real
# official-layout .pth from a tiny network.
OFFICIAL_NAMES = [
    (r"^transformer\.encoder\.moe\.0\.", "transformer.encoder.sparseMoE."),
    (r"^moe\.(\d+)\.", r"sparseMoE.\1."),
    (r"\.routers\.(\d+)\.gate\.", r".router.\1.topkroute_linear."),
    (r"\.routers\.(\d+)\.noise\.", r".router.\1.noise_linear."),
    (r"\.experts\.(\d+)\.fc1\.", r".experts.\1.net.0."),
    (r"\.experts\.(\d+)\.fc2\.", r".experts.\1.net.2."),
    (r"^segmentation_head\.", "segmentation_head.0."),
]


def official_checkpoint(path, preset, values, classes, heads=None):
    import re

    from napari_dmoe.model import build_network, make_spec

    overrides = {"heads": heads} if heads else {}
    net = build_network(make_spec(preset, "attr", values, classes, **overrides))
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)  # stay clear of the initial values
    state = {}
    for key, value in net.state_dict().items():
        for pattern, repl in OFFICIAL_NAMES:
            key = re.sub(pattern, repl, key)
        state[f"module.{key}"] = value.clone()  # the official scripts save DataParallel-wrapped models
    torch.save({"state_dict": state, "epoch": 3}, path)
    return net.eval()


@pytest.mark.parametrize("preset,values,classes,heads", [
    ("transunet2d-tiny", "Asian,Black,White", "background,rim,cup", 2),
    ("resunet3d-tiny", "T1,T2,T3,T4", "background,prostate", None),
])
def test_import_official_end_to_end(tmp_path, capsys, preset, values, classes, heads):
    from napari_dmoe.io.checkpoint import load_model

    src, out = tmp_path / "best.pth", tmp_path / "imported.safetensors"
    reference = official_checkpoint(src, preset, values.split(","), classes.split(","), heads)
    arch = preset.split("-")[0]
    argv = ["import-official", str(src), "--arch", arch, "--attribute-name", "race", "--attribute-values", values,
            "--class-names", classes, "--out", str(out)] + (["--heads", str(heads)] if heads else [])
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and f"attribute    : race = {values.replace(',', ', ')}" in printed

    model = load_model(out)
    assert model.spec.arch == arch and model.spec.attributes[0].values == values.split(",")
    assert model.spec.class_names == classes.split(",") and model.spec.provenance["file"] == "best.pth"
    for name, t in reference.state_dict().items():
        assert torch.equal(t, model.network.state_dict()[name]), name
    x = torch.randn(1, model.spec.in_channels, *model.spec.input_size)
    attr = torch.tensor([len(values.split(",")) - 1])
    with torch.no_grad():
        assert torch.equal(reference(x, attr), model.network(x, attr))

    assert main(argv) == 2  # --out now exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0


@pytest.mark.slow
def test_import_official_as_a_real_process(tmp_path):
    src, out = tmp_path / "best.pth", tmp_path / "m.safetensors"
    official_checkpoint(src, "resunet3d-tiny", ["T1", "T2"], ["background", "prostate"])
    done = run_cli("import-official", src, "--arch", "resunet3d", "--attribute-name", "stage",
                   "--attribute-values", "T1,T2,T3", "--class-names", "background,prostate", "--out", out)
    assert done.returncode == 2 and not out.exists()
    assert_one_line_error(done.stderr, "import-official", "2 routers but 3 attribute values")

    done = run_cli("import-official", src, "--arch", "resunet3d", "--attribute-name", "stage",
                   "--attribute-values", "T1,T2", "--class-names", "background,prostate", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout and out.is_file()
