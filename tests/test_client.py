"""The torch-free client on its own (what 3D Slicer loads by path): wire format, geometry, front-end helpers."""
from __future__ import annotations

import ast
import contextlib
import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_dmoe import client as c

ROOT = Path(__file__).resolve().parents[1]


def test_client_loads_by_path_without_torch_or_the_package():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('dmoe_client', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['dmoe_client'] = m; spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules and 'napari_dmoe' not in sys.modules, sorted(sys.modules); "
            "print(m.attribute_request({'stage': 'T2'})['stage'])")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "napari_dmoe" / "client.py")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "T2"


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
    from napari_dmoe.colors import SEGMENT_COLORS, segment_table

    assert segment_table(["background", "rim", ""]) == [(1, "rim", SEGMENT_COLORS[0]), (2, "label 2", SEGMENT_COLORS[1])]
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


def test_wire_refuses_big_endian_deep_json_and_absurd_shapes():
    """Findings 5 and 6 at the wire level: a declared '>f4' is refused (not read as '<f4'), deep nesting is a
    WireError (not a RecursionError), sizes are Python integers (no int64 overflow)."""
    def message(header: dict | bytes, data: bytes = b"") -> bytes:
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        return b"DMOE" + len(text).to_bytes(4, "little") + text + data

    with pytest.raises(c.WireError, match="little-endian"):
        c.decode(message({"arrays": [{"name": "a", "dtype": ">f4", "shape": [2]}]}, bytes(8)))
    with pytest.raises(c.WireError, match="nests deeper"):
        c.decode(message(b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}"))
    with pytest.raises(c.WireError, match="too short"):
        c.decode(message({"arrays": [{"name": "a", "dtype": "<f4", "shape": [2**32, 2**32, 1]}]}))
    for shape in ([2**70], [-1, 2], [2.5], "12", [1] * 9, [True]):
        with pytest.raises(c.WireError, match="shape"):
            c.decode(message({"arrays": [{"name": "a", "dtype": "<f4", "shape": shape}]}))
    with pytest.raises(c.WireError, match="nests deeper"):  # shallow enough for the parser, too deep for us
        c.decode(message(b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}"))
    assert c._depth(json.loads('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[", "b": [[1]]}')) == 3  # strings do not count


def test_timeout_is_proportionate():
    assert c.Client("h:1").timeout_for() == 30  # a listing
    assert c.Client("h:1").timeout_for(512 * 512 * 300) == pytest.approx(60 + 4 * 78.6432)  # a CT on a CPU server
    assert c.Client("h:1", timeout=5).timeout_for(10**9) == 5  # the caller's choice wins


@contextlib.contextmanager
def fake_server(answer):
    """A stdlib HTTP server on localhost whose every answer is ``answer(handler)``: what a dMoE client meets
    when the address is some other service, or a server that never answers."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            answer(self)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            answer(self)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _reply(body: bytes, status: int = 200, ctype: str = "application/json"):
    def answer(handler):
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return answer


def test_every_odd_answer_is_a_client_error():
    """Finding 9: KeyError and WireError no longer escape; each odd answer is a ClientError saying what it met."""
    image = np.zeros((8, 8), np.float32)
    cases = [
        (_reply(b'{"no": "models"}'), lambda cl: cl.list_models(), "did not list models"),
        (_reply(b"[1, 2]"), lambda cl: cl.health(), "JSON object"),
        (_reply(b"<html>hello</html>", ctype="text/html"), lambda cl: cl.health(), "JSON object"),
        (_reply(b"DMOE garbage", ctype=c.CONTENT_TYPE), lambda cl: cl.segment("m", image), "something else"),
        (_reply(c.encode({"x": 1}, {}), ctype=c.CONTENT_TYPE), lambda cl: cl.segment("m", image), "without labels"),
        (_reply(b"oops", status=502, ctype="text/plain"), lambda cl: cl.health(), "502"),
    ]
    for answer, call, words in cases:
        with fake_server(answer) as url:
            with pytest.raises(c.ClientError, match=words):
                call(c.Client(url, "t", timeout=10))


def test_a_silent_server_times_out_and_abort_cancels_at_once():
    release = threading.Event()

    def silent(handler):
        release.wait(30)

    with fake_server(silent) as url:
        t0 = time.monotonic()
        with pytest.raises(c.ClientError, match="no answer .* in time"):
            c.Client(url, timeout=1).health()
        assert time.monotonic() - t0 < 5
        client = c.Client(url, timeout=60)
        threading.Timer(0.5, client.abort).start()
        t0 = time.monotonic()
        with pytest.raises(c.Cancelled):
            client.segment("m", np.zeros((16, 16), np.float32))
        assert time.monotonic() - t0 < 5
        with pytest.raises(c.Cancelled):  # an aborted client stays aborted
            client.health()
        release.set()


def test_bad_addresses_are_client_errors():
    for url in ("http://host:notaport", "  "):
        with pytest.raises(c.ClientError):
            c.Client(url)
