import json

import pytest

from napari_dmoe.model.spec import FORMAT_VERSION, Attribute, ModelSpec, SpecError


def make(**kw):
    base = dict(
        arch="transunet2d",
        class_names=["background", "rim", "cup"],
        attributes=[Attribute("race", ["Asian", "Black", "White"])],
    )
    base.update(kw)
    return ModelSpec(**base)


def test_json_round_trip_is_exact():
    spec = make(spacing=[0.5, 0.5], provenance={"seed": 1234}, metrics={"dice": 0.8})
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.attributes[0] == Attribute("race", ["Asian", "Black", "White"])


def test_router_index_single_attribute():
    spec = make()
    assert [spec.router_index(v) for v in ["Asian", "Black", "White"]] == [0, 1, 2]
    assert spec.n_routers == 3
    with pytest.raises(SpecError, match=r"'Martian'.*\['Asian', 'Black', 'White'\]"):
        spec.router_index("Martian")


def test_router_index_intersectional_is_mixed_radix_and_invertible():
    spec = make(attributes=[Attribute("age", ["young", "old"]), Attribute("race", ["A", "B", "W"])])
    assert spec.n_routers == 6
    seen = set()
    for age in ["young", "old"]:
        for race in ["A", "B", "W"]:
            i = spec.router_index({"race": race, "age": age})
            assert spec.router_values(i) == [age, race]
            seen.add(i)
    assert seen == set(range(6))
    with pytest.raises(SpecError, match="no value given"):
        spec.router_index({"age": "old"})


def test_moe_and_baseline_router_counts():
    assert make(routing="moe").n_routers == 1
    assert make(routing="moe").router_index("White") == 0
    assert make(routing="none").n_routers == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch": "unet9d"}, "arch='unet9d'"),
        ({"routing": "sometimes"}, "routing="),
        ({"class_names": ["only"]}, "at least two"),
        ({"top_k": 9}, "top_k=9"),
        ({"input_size": [1, 2, 3]}, "input_size"),
        ({"normalization": {"kind": "window"}}, "'low' and 'high'"),
        ({"attributes": [Attribute("race", ["A", "A"])]}, "repeated"),
    ],
)
def test_invalid_specs_name_the_field(change, message):
    with pytest.raises(SpecError, match=message):
        make(**change)


def test_from_dict_rejects_unknown_version_and_fields():
    data = make().to_dict()
    with pytest.raises(SpecError, match="format version 99"):
        ModelSpec.from_dict({**data, "format_version": 99})
    with pytest.raises(SpecError, match="unknown spec field"):
        ModelSpec.from_dict({**data, "colour": "blue"})
    data.pop("arch")
    with pytest.raises(SpecError, match="missing"):
        ModelSpec.from_dict(data)
    assert FORMAT_VERSION == 1
