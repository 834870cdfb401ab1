"""The 3D Slicer module's logic without Slicer (slicer/DMoESegment/DMoESegmentLib/logic.py): geometry with parent
transforms, 2D images, per-expert volumes, the background job with cancel, error texts; against a real server."""
from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_dmoe.cli.main import main
from napari_dmoe.client import ClientError, RemoteSegmentation, ServerError, geometry_from_ijk_to_ras

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slicer" / "DMoESegment"))
from DMoESegmentLib import logic  # noqa: E402  (how Slicer imports it: the module folder is on its path)
from test_server import TOKEN, models, running_server  # noqa: E402,F401  (the tiny models and the real server)

AFFINE = np.array([[0, 0, -3.0, 10], [-1.2, 0, 0, 5], [0, 1.5, 0, -7], [0, 0, 0, 1]])  # permuted, flipped
ROTATE = np.array([[0, -1.0, 0, 20], [1.0, 0, 0, -4], [0, 0, 1, 2], [0, 0, 0, 1]])  # 90 degrees about S, shifted


def test_logic_imports_neither_slicer_nor_qt_and_shell_is_thin():
    source = (ROOT / "slicer" / "DMoESegment" / "DMoESegmentLib" / "logic.py").read_text()
    imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)
                for a in n.names} | {n.module.split(".")[0] for n in ast.walk(ast.parse(source))
                                     if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"slicer", "qt", "vtk", "ctk", "torch", "napari_dmoe"}, imported
    shell = ast.parse((ROOT / "slicer" / "DMoESegment" / "DMoESegment.py").read_text())
    classes = {n.name for n in shell.body if isinstance(n, ast.ClassDef)}
    assert {"DMoESegment", "DMoESegmentWidget", "DMoESegmentLogic", "DMoESegmentTest"} <= classes
    assert logic.load_leaf("client").__file__ == str((ROOT / "napari_dmoe" / "client.py").resolve()) or \
        Path(logic.load_leaf("client").__file__).resolve() == (ROOT / "napari_dmoe" / "client.py").resolve()


def test_parent_transform_is_composed_as_a_matrix():
    volume = logic.VolumeInput(np.zeros((12, 30, 40), np.float32), AFFINE, parent_to_world=ROTATE)
    request = logic.build_request(volume)
    spacing, origin, direction = geometry_from_ijk_to_ras(ROTATE @ AFFINE)
    np.testing.assert_allclose(request.spacing, spacing)
    np.testing.assert_allclose(request.origin, origin)
    np.testing.assert_allclose(request.direction, direction, atol=1e-12)
    assert not request.two_d and request.image.shape == (12, 30, 40)
    own = logic.build_request(logic.VolumeInput(volume.array, AFFINE))
    assert not np.allclose(own.direction, request.direction)  # the parent does move it
    shear = np.eye(4)
    shear[0, 1] = 0.5
    with pytest.raises(logic.LogicError, match="shears"):
        logic.build_request(logic.VolumeInput(volume.array, AFFINE, parent_to_world=shear))
    perspective = np.eye(4)
    perspective[3, 0] = 0.1
    with pytest.raises(logic.LogicError, match="not affine"):
        logic.build_request(logic.VolumeInput(volume.array, AFFINE, parent_to_world=perspective))


def test_a_one_slice_volume_is_sent_as_a_2d_image():
    grey = logic.build_request(logic.VolumeInput(np.zeros((1, 40, 50), np.uint8), np.diag([-0.5, -0.4, 1, 1])))
    assert grey.two_d and grey.image.shape == (40, 50) and not grey.rgb and grey.direction is None
    np.testing.assert_allclose(grey.spacing, [0.4, 0.5])
    colour = logic.build_request(logic.VolumeInput(np.zeros((1, 40, 50, 3), np.uint8), np.eye(4)))
    assert colour.two_d and colour.image.shape == (40, 50, 3) and colour.rgb
    with pytest.raises(logic.LogicError, match="shape"):
        logic.build_request(logic.VolumeInput(np.zeros((40, 50), np.uint8), np.eye(4)))


def _reply(shape, n_experts=3, dominant=True):
    rng = np.random.default_rng(0)
    mean = rng.random((n_experts, *shape)).astype(np.float16)
    return RemoteSegmentation(labels=rng.integers(0, 3, shape).astype(np.uint8), routing={"mean": mean},
                              dominant_expert=mean.argmax(0).astype(np.uint8) if dominant else None,
                              attribute={"race": "Black"}, device="cpu", timings={"infer": 0.5},
                              class_names=["background", "rim", "cup"])


def test_outputs_give_one_volume_per_expert_and_expert_0_is_not_background():
    """Findings 11 and 12: expert e is label e + 1 (label 0 is transparent in Slicer); one float volume per
    expert, shown with a colour map on the window 0-1."""
    request = logic.build_request(logic.VolumeInput(np.zeros((1, 6, 7), np.float32), np.eye(4)))
    reply = _reply((6, 7))
    out = logic.outputs(reply, request)
    assert out.labels.shape == (1, 6, 7) and out.dominant.shape == (1, 6, 7)  # back on the one-slice grid
    np.testing.assert_array_equal(out.dominant[0], reply.dominant_expert + 1)
    assert out.dominant.min() >= 1 and out.dominant.dtype == np.uint8
    assert [c[:2] for c in out.expert_colors] == [(1, "expert 0"), (2, "expert 1"), (3, "expert 2")]
    assert [name for name, _ in out.experts] == ["expert 0", "expert 1", "expert 2"]
    np.testing.assert_allclose(out.experts[2][1][0], reply.routing["mean"][2].astype(np.float32))
    assert out.experts[0][1].dtype == np.float32 and out.window == (0.0, 1.0) and "Viridis" in out.colormap
    assert [s[:2] for s in out.segments] == [(1, "rim"), (2, "cup")]
    plain = logic.outputs(_reply((6, 7), dominant=False), request)
    assert plain.dominant is None and plain.experts == []


def test_every_error_is_one_line_for_a_dialog():
    assert "check the token" in logic.error_text(ServerError(401, "missing or wrong token"))
    fit = logic.error_text(ServerError(422, "the image does not fit the model 'm3' (spacing)"))
    assert "Segment even if" in fit
    assert "Segment even if" not in logic.error_text(ServerError(422, "stage='T9' is not in the vocabulary"))
    assert "busy" in logic.error_text(ServerError(503, "3 requests are already waiting"))
    assert logic.error_text(ClientError("cannot reach the dMoE server")) == "cannot reach the dMoE server"
    assert logic.error_text(logic.LogicError("harden it")) == "harden it"
    assert logic.error_text(KeyError("labels")) == "Unexpected error (KeyError): 'labels'"


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("slicer_server") / "server.log"
    with running_server(models, log, "--log-level", "info") as client:
        client.log = log
        yield client


def _finish(job: logic.SegmentJob, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while job.poll() in ("running", "cancelling") and time.monotonic() < deadline:
        job.wait(0.1)
    return job.poll()


@pytest.mark.slow
def test_a_registered_volume_is_segmented_where_it_is_shown(server, models, tmp_path):
    """Finding 13: a volume under a (rotating) parent transform gives `dmoe segment`'s mask of the hardened file."""
    data = np.random.default_rng(1).random((40, 30, 12)).astype(np.float32)  # file order (i, j, k)
    hardened = tmp_path / "hardened.nii.gz"
    nib.save(nib.Nifti1Image(data, ROTATE @ AFFINE), hardened)
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(models[1]), str(hardened), "-a", "T3", "-o", str(out), "-q"]) == 0
    cli = np.asarray(nib.load(out).dataobj).transpose(2, 1, 0)
    request = logic.build_request(logic.VolumeInput(data.transpose(2, 1, 0), AFFINE, parent_to_world=ROTATE))
    job = logic.SegmentJob(server.url, TOKEN, "m3", request, attribute="T3", routing=True).start()
    assert _finish(job) == "done", job.error
    out = logic.outputs(job.result, request)
    np.testing.assert_array_equal(out.labels, cli)
    assert len(out.experts) == 8 and out.dominant.min() >= 1 and out.experts[0][1].shape == cli.shape
    assert "Done on cpu" in logic.summary(job.result)


@pytest.mark.slow
def test_a_2d_image_needs_no_force(server):
    """Finding 16: a one-slice volume goes as 2D, so the 2D model's fit check passes without force."""
    yy, xx = np.mgrid[:70, :90]
    image = ((np.sin(xx / 5) + np.cos(yy / 7) + 2) * 60).astype(np.uint8)
    request = logic.build_request(logic.VolumeInput(image[None], np.diag([-1.0, -1.0, 1.0, 1.0])))
    job = logic.SegmentJob(server.url, TOKEN, "m2", request, attribute="Black").start()
    assert _finish(job) == "done", job.error
    direct = server.segment("m2", image, attribute="Black")
    np.testing.assert_array_equal(logic.outputs(job.result, request).labels, direct.labels[None])
    assert not job.result.forced
    probe = type(server)(server.url, TOKEN)  # the stage the job's progress line shows follows the upload only
    probe.health()
    assert probe.stage == ""
    probe.segment("m2", image, attribute="Black")
    assert probe.stage == "waiting"


@pytest.mark.slow
def test_cancel_stops_the_job_and_the_server_drops_it(server):
    """Finding 14: the request runs in the background; Cancel ends it at once, and the server stops the work."""
    volume = np.random.default_rng(2).random((160, 256, 256)).astype(np.float32)  # seconds of CPU work
    request = logic.build_request(logic.VolumeInput(volume, np.eye(4)))
    job = logic.SegmentJob(server.url, TOKEN, "m3", request, attribute="T2", force=True).start()
    deadline = time.monotonic() + 30  # cancelled before the body went, the server would never have seen it
    while not job.sent and job.poll() == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert job.poll() == "running" and "Waiting for the server" in job.progress_text()
    t0 = time.monotonic()
    job.cancel()
    assert _finish(job, 10) == "cancelled" and time.monotonic() - t0 < 3 and job.result is None
    deadline = time.monotonic() + 30
    while "went away" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "went away" in server.log.read_text()


@pytest.mark.slow
def test_a_failed_job_carries_its_error_for_the_dialog(server):
    request = logic.build_request(logic.VolumeInput(np.zeros((8, 8, 8), np.float32), np.eye(4)))
    job = logic.SegmentJob(server.url, "wrong", "m3", request).start()
    assert _finish(job) == "failed" and type(job.error).__name__ == "ServerError"  # the client loaded by path
    assert "check the token" in logic.error_text(job.error)
    job = logic.SegmentJob("http://127.0.0.1:9", None, "m3", request, timeout=5).start()
    assert _finish(job) == "failed" and "cannot reach" in logic.error_text(job.error)
