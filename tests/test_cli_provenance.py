"""`dmoe segment` saves how each mask was made (issue 23 item 3): model, attribute, and with --force what the fit
check found, in the NIfTI header extension, the .seg.nrrd header and the PNG sidecar. Real subprocesses, real files."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from inference_models import make_image, make_model
from napari_dmoe.io.provenance import read_provenance


def dmoe(*args):
    return subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_masks_carry_the_forced_provenance(tmp_path):
    from napari_dmoe.io.images import write_volume

    model = make_model(tmp_path / "tiny.safetensors")
    Image.fromarray(((make_image((64, 64)) + 2) * 60).astype(np.uint8)).save(tmp_path / "fits.png")
    out = dmoe("segment", model, tmp_path / "fits.png", "-a", "race=Black", "-o", tmp_path / "fits_mask.png",
               "--device", "cpu")
    assert out.returncode == 0, out.stderr
    saved = read_provenance(tmp_path / "fits_mask.png")
    assert saved["attribute"] == {"race": "Black"} and saved["forced"] is False and saved["model"] == "tiny.safetensors"

    write_volume(tmp_path / "stack.nii.gz", np.stack([make_image((64, 64))] * 4), (2.0, 1.0, 1.0))
    refused = dmoe("segment", model, tmp_path / "stack.nii.gz", "-o", tmp_path / "refused.nii.gz", "--device", "cpu")
    assert refused.returncode == 2 and not (tmp_path / "refused.nii.gz").exists()
    for name in ("stack_mask.nii.gz", "stack_mask.seg.nrrd"):
        out = dmoe("segment", model, tmp_path / "stack.nii.gz", "-a", "White", "-o", tmp_path / name, "--device",
                   "cpu", "--force")
        assert out.returncode == 0, out.stderr
        saved = read_provenance(tmp_path / name)
        assert saved["forced"] is True and any("3D volume" in f for f in saved["fit_findings"]), name
        assert saved["attribute"] == {"race": "White"}, name
