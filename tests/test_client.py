"""The torch-free client on its own (what 3D Slicer loads by path): wire format, geometry, front-end helpers."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_dmoe import client as c

ROOT = Path(__file__).resolve().parents[1]


def test_client_loads_by_path_without_torch_or_the_package():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('dmoe_client', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['dmoe_client'] = m; spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules and 'napari_dmoe' not in sys.modules, sorted(sys.modules); "
            "print(m.segment_table(['background', 'prostate'])[0][1])")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "napari_dmoe" / "client.py")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "prostate"


def test_wire_round_trip_and_refusals():
    arrays = {"a": np.arange(12, dtype=">i4").reshape(3, 4), "b": np.ones((2, 2), bool)}
    header, back = c.decode(c.encode({"x": 1}, arrays))
    assert header["x"] == 1 and [a["name"] for a in header["arrays"]] == ["a", "b"]
    np.testing.assert_array_equal(back["a"], arrays["a"])  # big-endian in, little-endian on the wire
    assert back["a"].dtype.str == "<i4" and back["b"].dtype == bool
    with pytest.raises(c.WireError, match="numeric"):
        c.encode({}, {"o": np.array(["text"], dtype=object)})
    body = c.encode({}, {"a": np.zeros(4, np.float32)})
    with pytest.raises(c.WireError, match="after the last array"):
        c.decode(body + b"xx")
    with pytest.raises(c.WireError, match="dtype"):
        c.decode(body.replace(b'"<f4"', b'"|O8"'))


def test_slicer_geometry_conversion_is_exact_and_matches_our_convention():
    # an axis-aligned LPS volume (what our reader gives) has the identity direction and our origin/spacing
    spacing, origin, direction = (3.0, 0.8, 0.7), (-40.0, 20.0, 15.0), np.eye(3)
    ras = c.ijk_to_ras_from_geometry(spacing, origin, direction)
    np.testing.assert_allclose(ras @ [0, 0, 0, 1], [-15.0, -20.0, -40.0, 1])  # LPS (15, 20, -40) in RAS
    np.testing.assert_allclose(ras @ [1, 0, 0, 1] - ras @ [0, 0, 0, 1], [-0.7, 0, 0, 0])  # i: towards L
    got = c.geometry_from_ijk_to_ras(ras)
    np.testing.assert_allclose(got[0], spacing)
    np.testing.assert_allclose(got[1], origin)
    np.testing.assert_allclose(got[2], direction, atol=1e-12)


def test_front_end_helpers():
    assert c.segment_table(["background", "rim", ""]) == [(1, "rim", c.SEGMENT_COLORS[0]),
                                                          (2, "label 2", c.SEGMENT_COLORS[1])]
    assert c.attribute_request({"race": "unknown", "age": "60-79"}) == {"age": "60-79"}
    assert c.attribute_request({"race": "unknown"}) is None
    info = {"spatial_dims": 3, "class_names": ["background", "CTV"], "trained_on": {"modality": "CT",
            "spacing": [3.0, 1.5, 1.5]}, "training": {"data": {"train": {"n": 120}}}}
    assert c.describe_model(info) == "3D; classes: CTV; trained on CT; voxels 3 x 1.5 x 1.5 mm; 120 training cases"


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(c.ClientError, match="cannot reach the dMoE server"):
        c.Client("127.0.0.1:9", timeout=5).health()


def test_slicer_module_is_valid_python_and_thin():
    source = (ROOT / "slicer" / "DMoESegment" / "DMoESegment.py").read_text()
    tree = ast.parse(source)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"DMoESegment", "DMoESegmentWidget", "DMoESegmentLogic"} <= classes
    assert "urllib" not in source and "json" not in source  # the client does the talking
