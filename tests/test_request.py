"""The one engine request: every front end builds a SegmentRequest, the result carries its provenance, and the
patient attribute is one type parsed in one place."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from inference_models import tiny
from napari_dmoe.inference.fit import FitError
from napari_dmoe.inference.plan import InferenceError
from napari_dmoe.inference.request import WIRE_SETTINGS, EngineSettings, SegmentRequest, run
from napari_dmoe.model.routers import PatientAttribute, all_groups, group_name, group_values

ROOT = Path(__file__).resolve().parents[1] / "napari_dmoe"
FRONT_ENDS = ["cli/segment.py", "server/app.py", "plugin/widgets/jobs.py", "plugin/widgets/remote.py",
              "plugin/widgets/segment_widget.py"]


def test_front_ends_call_the_facade_not_the_engine():
    """No front end reaches past the request object into the engine (the widget, remote, CLI and server used to
    assemble the engine's keywords each their own way)."""
    for rel in FRONT_ENDS:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "napari_dmoe.inference.engine":
                pytest.fail(f"{rel} imports the engine directly ({[a.name for a in node.names]}): use "
                            "inference.request")


def test_result_records_model_attribute_and_settings():
    model = tiny("transunet2d-tiny")
    settings = EngineSettings(device="cpu", overlap=0.5, routing="mean")
    result = run(model, SegmentRequest(np.random.default_rng(0).random((48, 48), np.float32), "Black",
                                       settings=settings))
    prov = result.provenance
    assert result.labels.shape == (48, 48) and set(result.routing) == {"mean"}
    assert prov.attribute == {"race": "Black"} and prov.attribute_text == "race=Black"
    assert prov.forced is False and prov.fit_findings == [] and prov.device == "cpu"
    assert prov.settings["overlap"] == 0.5 and prov.to_dict()["model"] == "model"


def test_unfit_image_is_refused_with_its_findings_and_forced_is_recorded():
    model = tiny("transunet2d-tiny")
    model.spec.trained_on = {"spatial_dims": 2, "channels": 1}
    colour = np.random.default_rng(1).random((40, 40, 3), np.float32)
    with pytest.raises(FitError, match="scan.png: does not fit the model.*colour") as err:
        run(model, SegmentRequest(colour, "Asian", rgb=True, source="scan.png"))
    assert [f.kind for f in err.value.findings] == ["channels"]
    assert "send force=true" in str(err.value.hint("send force=true"))
    forced = run(model, SegmentRequest(colour, "Asian", rgb=True, force=True))
    assert forced.provenance.forced and "colour" in forced.provenance.fit_findings[0]


def test_wire_round_trip_keeps_the_request_and_refuses_other_settings():
    request = SegmentRequest(np.zeros((8, 8), np.float32), {"race": None}, (0.5, 0.5), force=True,
                             settings=EngineSettings(overlap=0.4, routing="none", device="cuda"))
    header, arrays = request.to_wire("fundus")
    assert header["attribute"] == {"race": "unknown"} and header["routing"] is False
    assert set(header["settings"]) == set(WIRE_SETTINGS) and "device" not in header["settings"]

    class Header:  # what the server's pydantic model gives
        attribute, spacing, rgb, modality, force, routing = header["attribute"], header["spacing"], None, None, True, False
        settings = header["settings"]

    back = SegmentRequest.from_wire(Header, arrays["image"], EngineSettings(device="cpu"))
    assert back.settings == EngineSettings(device="cpu", overlap=0.4, routing="none") and back.force
    Header.settings = {"device": "cuda:7"}  # a client may not pick the server's device
    with pytest.raises(InferenceError, match=r"unknown engine setting\(s\) \['device'\]"):
        SegmentRequest.from_wire(Header, arrays["image"], EngineSettings())
    for bad, message in (({"overlap": "0.5"}, "'overlap': '0.5' is not a valid float"),
                         ({"window_batch": True}, "'window_batch': True is not a valid int"),
                         ({"blend": 3}, "'blend': 3 is not a valid str")):
        Header.settings = bad  # a third-party client's JSON: a clear refusal, not a TypeError deep in the engine
        with pytest.raises(InferenceError, match=message):
            SegmentRequest.from_wire(Header, arrays["image"], EngineSettings())


def test_patient_attribute_is_parsed_in_one_place():
    spec = tiny("transunet2d-tiny").spec
    forms = ["Black", {"race": "Black"}, ["race=Black"], ["Black"], PatientAttribute((("race", "Black"),))]
    assert {PatientAttribute.parse(f, spec) for f in forms} == {PatientAttribute((("race", "Black"),))}
    for unknown in (None, "unknown", " Unknown ", [], ["unknown"], {"race": None}):
        parsed = PatientAttribute.parse(unknown, spec)
        assert not parsed.known and parsed.text == "race=unknown" and parsed.group == "unknown"
    with pytest.raises(ValueError, match=r"race='Martian' is not in this model's vocabulary"):
        PatientAttribute.parse("Martian", spec)
    with pytest.raises(ValueError, match="has no attribute 'age'"):
        PatientAttribute.parse(["age=20-39"], spec)


def test_groups_follow_router_order():
    from napari_dmoe.model import Attribute, make_spec

    spec = make_spec("transunet2d-tiny", "race", ["Asian", "Black"], ["bg", "fg"])
    spec.attributes.append(Attribute("sex", ["F", "M"]))
    groups = all_groups(spec)
    assert groups == ["Asian/F", "Asian/M", "Black/F", "Black/M"]
    assert [group_name(spec.router_values(i)) for i in range(spec.n_routers)] == groups
    assert all(spec.router_index(group_values(g)) == i for i, g in enumerate(groups))
