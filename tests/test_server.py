"""`dmoe serve` end to end: the real server in a subprocess on a free localhost port, driven by the client.

One server (with a token and small limits) serves a tiny 2D and a tiny 3D model for the whole module; start-up
imports torch and MONAI, which takes a while on CI's 2 cores.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from napari_dmoe.client import Client, ClientError, ServerError, encode, geometry_from_ijk_to_ras, \
    ijk_to_ras_from_geometry
from napari_dmoe.cli.main import main
from napari_dmoe.io.images import read_image

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch

    from inference_models import make_model
    from napari_dmoe.io.checkpoint import save_model
    from napari_dmoe.model import build_network, make_spec

    folder = tmp_path_factory.mktemp("models")
    make_model(folder / "m2.safetensors")  # decisive: all three classes appear, masks depend on the attribute
    torch.manual_seed(0)
    spec3 = make_spec("resunet3d-tiny", "stage", ["T1", "T2", "T3", "T4"], ["background", "CTV"],
                      input_size=[64, 64, 64], spacing=[2.0, 2.0, 2.0])
    # the training record names the trainer's folders, as dmoe train writes them: /models must not publish them
    spec3.provenance = {"method": "dmoe", "command": "dmoe train /home/alice/cfg.yaml", "seed": 3, "config": {
        "data": {"root": "/home/alice/patients"}}, "data": {"train": {"n": 4, "root": "/home/alice/patients"}}}
    save_model(folder / "m3.safetensors", build_network(spec3), spec3)
    return folder / "m2.safetensors", folder / "m3.safetensors"


@contextlib.contextmanager
def running_server(model_paths, log, *args: str, token: str | None = TOKEN, host: str = "127.0.0.1"):
    """``dmoe serve MODELS... ARGS`` on a free localhost port in a subprocess; yields a connected Client (with
    the server's ``port`` and ``pid``)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DMOE_SERVE_TOKEN", None)
    if token:
        env["DMOE_SERVE_TOKEN"] = token
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "napari_dmoe.cli.main", "serve", *map(str, model_paths),
                                 "--port", str(port), "--device", "cpu", "--log-level", "warning", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    client = Client(f"http://{'[' + host + ']' if ':' in host else host}:{port}", token, timeout=120)
    client.port, client.pid = port, proc.pid
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"dmoe serve exited: {log.read_text()}")
            try:
                client.health()
                break
            except ClientError:
                time.sleep(0.5)
        else:
            pytest.fail(f"dmoe serve did not answer in 120 s: {log.read_text()}")
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a connection a failed test left open: do not hang the suite on it
            proc.kill()
            proc.wait(timeout=30)
        text = log.read_text()
        assert "Traceback" not in text, text[-4000:]  # no request made the server crash or print a traceback


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(models, log, "--max-request-mb", "2", "--max-voxels", "300000") as client:
        yield client


def test_models_list_vocabularies_and_classes(server):
    listed = {m["id"]: m for m in server.list_models()}
    assert set(listed) == {"m2", "m3"}
    assert listed["m2"]["attributes"] == [{"name": "race", "values": ["Asian", "Black", "White"]}]
    assert listed["m3"]["class_names"] == ["background", "CTV"] and listed["m3"]["spatial_dims"] == 3
    assert "trained_on" in listed["m3"] and listed["m3"]["spec"]["arch"] == "resunet3d"
    assert server.health()["device"] == "cpu"
    request = urllib.request.Request(server.url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as reply:  # the API description, for the token holder
        api = json.loads(reply.read())
    assert {"/health", "/models", "/segment"} <= set(api["paths"])


def test_models_publish_no_local_paths(server):
    """Finding 7: the trainer's data folder and command line stay out of /models; counts and settings remain."""
    with urllib.request.urlopen(urllib.request.Request(
            server.url + "/models", headers={"Authorization": f"Bearer {TOKEN}"}), timeout=30) as reply:
        text = reply.read().decode()
    assert "/home/alice" not in text and "cfg.yaml" not in text
    m3 = {m["id"]: m for m in json.loads(text)["models"]}["m3"]
    assert m3["spec"]["provenance"] == {"method": "dmoe", "seed": 3, "data": {"train": {"n": 4, "root": "<path>"}}}
    assert m3["training"]["data"]["train"]["n"] == 4


def test_2d_equals_dmoe_segment(server, models, tmp_path):
    src = tmp_path / "fundus.png"
    yy, xx = np.mgrid[:70, :90]
    Image.fromarray(((np.sin(xx / 5) + np.cos(yy / 7) + 2) * 60).astype("uint8")).save(src)
    for race in ("Black", "White"):
        out = tmp_path / f"mask_{race}.png"
        assert main(["segment", str(models[0]), str(src), "-a", race, "-o", str(out), "-q"]) == 0
        volume = read_image(src)
        got = server.segment("m2", volume.array, attribute=race, rgb=volume.rgb)  # PNG: spacing unknown, as the CLI
        np.testing.assert_array_equal(got.labels, np.asarray(Image.open(out)))
        assert got.attribute == {"race": race} and got.class_names == ["background", "rim", "cup"]
    assert len(np.unique(got.labels)) == 3


def test_a_site_zoom_travels_to_the_server_and_is_checked_there(server, models):
    """The widget's remote mode sends the engine request it would run locally: a site calibration's zoom too."""
    from napari_dmoe.inference.request import EngineSettings, SegmentRequest, run
    from napari_dmoe.io.checkpoint import load_model

    yy, xx = np.mgrid[:70, :90]
    image = ((np.sin(xx / 5) + np.cos(yy / 7) + 2) * 60).astype("uint8")
    request = SegmentRequest(image, "Black", settings=EngineSettings(device="cpu", zoom=1.2))
    local = run(load_model(models[0]), request)
    got = server.send(*request.to_wire("m2"))
    np.testing.assert_array_equal(got.labels, local.labels)
    assert not np.array_equal(local.labels, run(load_model(models[0]), SegmentRequest(image, "Black")).labels)
    header, arrays = SegmentRequest(image, "Black", settings=EngineSettings(zoom=3.0)).to_wire("m2")
    with pytest.raises(ServerError, match="zoom=3 is outside"):
        server.send(header, arrays)


def _nifti(tmp_path):
    affine = np.array([[0, 0, -3.0, 10], [-1.2, 0, 0, 5], [0, 1.5, 0, -7], [0, 0, 0, 1]])  # permuted, flipped axes
    src = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 30, 12)).astype("float32"), affine), src)
    return src, affine


def test_3d_equals_dmoe_segment_in_napari_and_slicer_geometry(server, models, tmp_path):
    src, affine = _nifti(tmp_path)
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(models[1]), str(src), "-a", "T3", "-o", str(out), "-q"]) == 0
    cli = np.asarray(nib.load(out).dataobj)  # file voxel order (x, y, z)

    # napari: our reader's axis-aligned LPS view, as dmoe segment sees the file
    volume = read_image(src)
    got = server.segment("m3", volume.array, spacing=volume.spacing, origin=volume.origin, attribute="T3",
                         routing=True)
    np.testing.assert_array_equal(got.labels, read_image(out).array)
    assert got.origin == list(volume.origin) and got.spacing == list(volume.spacing)
    mean = got.routing["mean"].astype(np.float32)
    assert mean.shape == (8, *volume.array.shape) and np.abs(mean.sum(0) - 1).max() < 1e-2
    assert got.dominant_expert.shape == volume.array.shape

    # 3D Slicer: the file's own voxel order (k, j, i) with its IJK-to-RAS matrix; the server reorients and back
    spacing, origin, direction = geometry_from_ijk_to_ras(affine)
    np.testing.assert_allclose(ijk_to_ras_from_geometry(spacing, origin, direction), affine, atol=1e-9)
    raw = np.asarray(nib.load(src).dataobj).transpose(2, 1, 0)
    slicer = server.segment("m3", raw, spacing=spacing, origin=origin, direction=direction, attribute="T3",
                            routing=True)
    np.testing.assert_array_equal(slicer.labels, cli.transpose(2, 1, 0))
    back = tmp_path / "dominant.nii.gz"  # the Slicer-grid map, put in the napari view, is the napari-grid map
    nib.save(nib.Nifti1Image(slicer.dominant_expert.transpose(2, 1, 0), affine), back)
    np.testing.assert_array_equal(read_image(back).array, got.dominant_expert)
    assert slicer.routing["mean"].shape == (8, *raw.shape)


def _header(dtype: str, shape: list) -> bytes:
    return json.dumps({"model": "m2", "arrays": [{"name": "image", "dtype": dtype, "shape": shape}]}).encode()


def _raw_message(header: bytes, data: bytes = b"") -> bytes:
    return b"DMOE" + len(header).to_bytes(4, "little") + header + data


def _post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/x-dmoe", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as reply:
            return reply.status, {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        return err.code, json.loads(text) if text.startswith(b"{") else {"text": text.decode()}


def test_token_required_everywhere_but_a_bare_liveness_check(server):
    """Finding 8: without the token only /health answers, and only {"status": "ok"}; no /docs page at all."""
    for token in (None, "wrong"):
        with pytest.raises(ServerError) as err:
            Client(server.url, token).list_models()
        assert err.value.status == 401 and "Authorization: Bearer" in err.value.server_message
        with pytest.raises(ServerError) as err:  # the client's health sends its token: a wrong one is told here
            Client(server.url, token).health()
        assert err.value.status == 401
    code, reply = _post(server.url + "/segment", b"whatever", token="wrong")
    assert code == 401 and reply["status"] == 401
    # a client that sends its whole body before reading the answer (urllib) reads the 401, not a reset
    code, reply = _post(server.url + "/segment", bytes(3 << 19), token="wrong")
    assert code == 401 and reply["status"] == 401
    assert _get(server.url + "/health") == (200, {"status": "ok"})  # liveness publishes nothing
    assert _get(server.url + "/health", "wrong")[0] == 401
    assert _get(server.url + "/health", TOKEN)[1]["models"] == ["m2", "m3"]
    assert _get(server.url + "/openapi.json")[0] == 401
    for page in ("/docs", "/redoc"):  # FastAPI's page loads its scripts from a CDN: blank offline, so none
        assert _get(server.url + page, TOKEN)[0] == 404


def test_wrong_token_with_a_large_volume_is_told_as_such(server):
    """Finding 9: auth is checked before the upload, so a 64 MiB volume and a wrong token read 'wrong token'."""
    with pytest.raises(ServerError) as err:
        Client(server.url, "wrong").segment("m3", np.zeros((256, 256, 256), np.float32))
    assert err.value.status == 401 and "token" in err.value.server_message


def test_non_local_bind_needs_a_token(models):
    env = {k: v for k, v in os.environ.items() if k != "DMOE_SERVE_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", "serve", str(models[0]), "--host",
                             "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2 and "give a token" in result.stderr and "Traceback" not in result.stderr


def test_oversized_and_malformed_requests_get_clean_json(server):
    url = server.url + "/segment"
    image = np.zeros((3 * 2**20 // 4,), np.float32)  # 3 MB > the 2 MB limit
    code, reply = _post(url, encode({"model": "m2"}, {"image": image}))
    assert code == 413 and "--max-request-mb" in reply["error"]
    with pytest.raises(ServerError) as err:  # finding 3: 8x8x8 voxels of 120 mm are 480**3 voxels at 2 mm
        server.segment("m3", np.zeros((8, 8, 8), np.float32), spacing=(120, 120, 120), force=True)
    assert err.value.status == 413 and "resampled" in err.value.server_message
    with pytest.raises(ServerError) as err:  # 400k voxels of uint8: a small body, a volume over the limit
        server.segment("m3", np.zeros((100, 80, 50), np.uint8))
    assert err.value.status == 413 and "--max-voxels" in err.value.server_message
    cases = [
        (b"not a dmoe message", 400, "b'DMOE'"),
        (b"DMOE" + (5).to_bytes(4, "little") + b"{oops", 400, "not valid JSON"),
        (encode({"model": "m2", "spacing": [1, -1]}, {"image": np.zeros((8, 8), np.float32)}), 422, "spacing"),
        (encode({"model": "m2", "colour": 1}, {"image": np.zeros((8, 8), np.float32)}), 422, "colour"),
        (encode({"model": "m2"}, {"image": np.zeros((8, 8), np.float32)})[:-4], 400, "body carries"),
        (encode({"model": "m3", "direction": [[1, 0, 0], [1, 0, 0], [0, 0, 1]]},
                {"image": np.zeros((8, 8, 8), np.float32)}), 422, "degenerate"),
        (encode({"model": "m2", "attribute": "Martian"}, {"image": np.zeros((8, 8), np.float32)}), 422, "Martian"),
        (encode({"model": "m3", "force": True}, {"image": np.zeros((4, 5), np.float32)}), 422, "3D"),
        (encode({"model": "m3"}, {"image": np.zeros((4, 5), np.float32)}), 422, "does not fit"),
        (encode({"model": "nope"}, {"image": np.zeros((8, 8), np.float32)}), 404, "no model 'nope'"),
        # finding 5: deep JSON and sizes beyond int64 are told as such, not a 500
        (_raw_message(b'{"model": "m2", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"), 400, "nests deeper"),
        (_raw_message(_header("<f4", [2**32, 2**32, 1])), 400, "73786976294838206464 bytes"),
        (_raw_message(_header("<f4", [2**70])), 400, "shape"),
        (_raw_message(_header("<f4", [2**20, 2**20, 2**10])), 400, "lists"),
        # finding 6: big-endian bytes would be read as garbage: refused
        (_raw_message(_header(">f4", [8, 8]), bytes(256)), 400, "little-endian"),
        # finding 10: origin of the wrong length, a sheared direction, a 1-D array
        (encode({"model": "m2", "origin": [1, 2, 3]}, {"image": np.zeros((8, 8), np.float32)}), 422, "origin"),
        (encode({"model": "m2", "direction": [[1, 0.5], [0, 1]]}, {"image": np.zeros((8, 8), np.float32)}), 422,
         "orthonormal"),
        (encode({"model": "m2"}, {"image": np.zeros(64, np.float32)}), 422, "1-D"),
    ]
    for body, status, words in cases:
        code, reply = _post(url, body)
        assert (code, reply["status"]) == (status, status), (body[:40], reply)
        assert words in reply["error"] and "Traceback" not in reply["error"], reply
    code, reply = _post(server.url + "/nowhere", b"")
    assert code in (404, 405) and "error" in reply


def test_ten_concurrent_requests_are_all_answered(server):
    yy, xx = np.mgrid[:64, :64]
    images = [(np.sin(xx / (3 + i)) + np.cos(yy / 7)).astype(np.float32) for i in range(10)]
    races = ["Asian", "Black", "White"]
    results: dict[int, np.ndarray] = {}
    errors: list[Exception] = []

    def run(i: int) -> None:
        try:
            results[i] = server.segment("m2", images[i], attribute=races[i % 3]).labels
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and sorted(results) == list(range(10))
    for i in (0, 7):  # each answer is the one for its own request, as a lone request gets it
        np.testing.assert_array_equal(results[i], server.segment("m2", images[i], attribute=races[i % 3]).labels)


def test_models_say_what_they_were_trained_on():
    from pathlib import Path

    from napari_dmoe.io.checkpoint import read_spec
    from napari_dmoe.server.models import ModelStore

    demo = Path(__file__).resolve().parents[1] / "napari_dmoe" / "assets" / "models" / "prostate-dmoe.safetensors"
    [info] = ModelStore([demo, demo], "cpu").describe()  # the same file twice: loaded once
    spec = read_spec(demo)
    assert info["id"] == "prostate-dmoe" and spec.trained_on["modality"]
    # everything but the feature statistics, which stay on the server beside the network (40-210 kB a model)
    published, record = dict(info["trained_on"]), dict(spec.trained_on)
    features = published.pop("features")
    assert published == {k: v for k, v in record.items() if k != "features"}
    assert features == {"method": record["features"]["method"], "threshold": record["features"]["threshold"],
                        "quantile": record["features"]["quantile"], "margin": record["features"]["margin"],
                        "n_train": record["features"]["n_train"], "on_server": True}
    assert "layers" not in json.dumps(info)  # neither in trained_on nor in the published spec
    assert info["attributes"] == [{"name": a.name, "values": list(a.values)} for a in spec.attributes]
    assert info["training"]["method"] == spec.provenance.get("method")


def test_queue_runs_one_at_a_time_and_max_queue_counts_only_the_waiting():
    """--max-queue 1: one request runs while one waits; a third is refused before its body would be read. A
    request whose client has gone is dropped when its turn comes, and a running one stops between batches."""
    import asyncio

    from napari_dmoe.server.work import Busy, DeviceQueue, Gone, drain

    queue, active, peak = DeviceQueue(max_waiting=1), [], [0]

    def job(i: int) -> int:
        active.append(i)
        peak[0] = max(peak[0], len(active))
        time.sleep(0.05)
        active.remove(i)
        return i

    def batches() -> object:  # an engine generator: one yield per window batch
        for _ in range(100):
            time.sleep(0.01)
            yield
        return "finished"

    async def scenario() -> list:
        first = queue.admit()
        running = asyncio.ensure_future(queue.run(first, job, 0))
        await asyncio.sleep(0.01)  # 0 runs: the queue is empty again
        second = queue.admit()
        with pytest.raises(Busy):
            queue.admit()
        gone = threading.Event()
        gone.set()
        dropped = asyncio.ensure_future(queue.run(second, job, 1, cancel=gone))
        await asyncio.wait([dropped])  # dropped at once: it frees its place in the queue
        third = queue.admit()
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        stopped = asyncio.ensure_future(queue.run(third, lambda: drain(batches()), cancel=stop))
        return await asyncio.gather(running, dropped, stopped, return_exceptions=True)

    t0 = time.monotonic()
    results = asyncio.run(scenario())
    assert results[0] == 0 and isinstance(results[1], Gone) and isinstance(results[2], Gone)
    assert peak[0] == 1 and queue.waiting == 0 and time.monotonic() - t0 < 0.9  # the batches stopped early


# -- bounds, against a second server on IPv6 loopback with small limits ---------------------------------------
@pytest.fixture(scope="module")
def bounded(models, tmp_path_factory):
    """32 MiB requests, 64 MiB of bodies at once, 3 waiting, 2 s header and body time limits; on [::1]
    (finding 10: uvicorn crashed on the bracketed address)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    log = tmp_path_factory.mktemp("bounded") / "server.log"
    with running_server(models, log, "--host", "[::1]", "--max-request-mb", "32", "--max-inflight-mb", "64",
                        "--max-queue", "3", "--request-timeout", "2", "--max-connections", "12", "--log-level", "info",
                        host="::1") as client:
        client.log = log
        yield client


def _upload(client, length: int, first: bytes = b"") -> socket.socket:
    """A /segment request opened by hand: the header, then ``first`` bytes of a body of ``length``."""
    s = socket.create_connection(("::1", client.port), timeout=30)
    s.sendall(f"POST /segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: "
              f"application/x-dmoe\r\nContent-Length: {length}\r\n\r\n".encode() + first)
    return s


def _status(s: socket.socket, timeout: float) -> tuple[int, str]:
    s.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else 0), body.decode(errors="replace")


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_bodies_are_bounded_before_they_are_read(bounded):
    """Finding 1: the queue place and the upload budget are taken from Content-Length before the body is read.
    Two stalled 31.5 MiB uploads fill the budget; eight concurrent 31.5 MiB uploads then get 503 without being
    read: the server's memory grows by less than one of them (it grew by twice their size each before)."""
    shape = (126, 256, 256)  # float32: 31.5 MiB
    message = encode({"model": "m3", "force": True}, {"image": np.zeros(shape, np.float32)})
    before = _rss(bounded.pid)
    stalled = [_upload(bounded, len(message), message[:65536]) for _ in range(2)]
    trickling, sent = threading.Event(), [65536]

    def trickle() -> None:  # a byte now and then keeps the stalled bodies inside the 2 s idle limit
        with contextlib.suppress(OSError):
            while not trickling.wait(0.5):
                for s in stalled:
                    s.sendall(message[sent[0] : sent[0] + 1])
                sent[0] += 1

    trickler = threading.Thread(target=trickle)
    trickler.start()
    time.sleep(0.3)
    codes: list[int] = []

    def send() -> None:
        codes.append(_post(bounded.url + "/segment", message)[0])

    threads = [threading.Thread(target=send) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        grown = _rss(bounded.pid) - before
        print(f"server RSS grew by {grown / 2**20:.1f} MiB under 8 concurrent refused 31.5 MiB uploads")
        assert codes == [503] * 8 and grown < 16 * 2**20, (codes, grown / 2**20)
        assert "--max-inflight-mb" in _post(bounded.url + "/segment", message)[1]["error"]
    finally:
        trickling.set()
        trickler.join()
    for s in stalled:  # finding 4: a body that stops arriving is answered 408 after the time limit
        code, body = _status(s, 10)
        s.close()
        assert code == 408 and "too slowly" in body
    assert bounded.segment("m2", np.zeros((16, 16), np.float32)).labels.shape == (16, 16)  # the budget is free


def test_an_incomplete_header_is_not_held(bounded):
    """Finding 4: `POST /segm` and nothing more is closed after the header time limit (2 s here)."""
    for start in (b"POST /segm", b""):
        s = socket.create_connection(("::1", bounded.port), timeout=30)
        s.sendall(start)
        t0 = time.monotonic()
        s.settimeout(15)
        assert s.recv(1024) == b"" and time.monotonic() - t0 < 6  # closed by the server
        s.close()
    assert "no complete request header" in bounded.log.read_text()


def test_connections_are_bounded_and_a_body_needs_its_length(bounded):
    """Finding 1: at most --max-connections are open (12 here); a body without Content-Length is refused (411)."""
    idle = [socket.create_connection(("::1", bounded.port), timeout=30) for _ in range(12)]
    try:
        assert _get(bounded.url + "/health", TOKEN)[0] == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.5)
    assert _get(bounded.url + "/health", TOKEN)[0] == 200
    s = socket.create_connection(("::1", bounded.port), timeout=30)
    s.sendall(f"POST /segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked"
              "\r\n\r\n4\r\nDMOE\r\n0\r\n\r\n".encode())
    code, body = _status(s, 10)
    s.close()
    assert code == 411 and "Content-Length" in body


def test_abandoned_requests_are_dropped(bounded):
    """Finding 2: three clients send a volume and leave; a small request after them waits for at most part of
    one (the one running stops between window batches; the queued ones never start)."""
    volume = np.random.default_rng(0).random((128, 192, 192)).astype(np.float32)
    t0 = time.monotonic()
    bounded.segment("m3", volume, attribute="T2", force=True)
    one = time.monotonic() - t0
    message = encode({"model": "m3", "attribute": "T2", "force": True}, {"image": volume})
    for _ in range(3):
        s = _upload(bounded, len(message), message)
        s.close()  # the client gives up
    time.sleep(0.5)
    t0 = time.monotonic()
    assert bounded.segment("m2", np.zeros((16, 16), np.float32)).labels.shape == (16, 16)
    waited = time.monotonic() - t0
    assert waited < one + 2, (waited, one)  # three runs would take 3 * one
    deadline = time.monotonic() + 10
    while bounded.log.read_text().count("went away") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert bounded.log.read_text().count("went away") >= 3


def test_a_disconnect_mid_upload_is_one_log_line(bounded):
    """Finding 10: no traceback (the fixture checks the whole log at the end), one line naming what happened."""
    message = encode({"model": "m2"}, {"image": np.zeros((256, 256), np.float32)})
    s = _upload(bounded, len(message), message[:4096])
    time.sleep(0.3)
    s.close()
    line = f"after sending 4096 of {len(message)} bytes"
    deadline = time.monotonic() + 10
    while line not in bounded.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert bounded.log.read_text().count(line) == 1


def test_a_bug_is_one_500_and_one_log_record(caplog):
    """Finding 10: Starlette's handler logged a 500 and re-raised it for uvicorn to log again; the guard answers
    the JSON 500 and logs the traceback once."""
    import asyncio
    import logging

    from napari_dmoe.server.guard import ErrorMiddleware

    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/models", "headers": [], "client": ("127.0.0.1", 5)}
    with caplog.at_level(logging.INFO, logger="napari_dmoe.server"):
        asyncio.run(ErrorMiddleware(broken)(scope, receive, send))  # nothing escapes to uvicorn
    assert sent[0]["status"] == 500 and json.loads(sent[1]["body"]) == {
        "error": "internal error (RuntimeError); the server log has the details", "status": 500}
    assert [r.levelname for r in caplog.records] == ["ERROR"] and caplog.records[0].exc_info

