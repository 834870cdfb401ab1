"""Training configs: YAML checked against a schema before anything starts, plus ``--set key.sub=value`` overrides.

A config is a nested dict. Every key is declared in ``SCHEMA`` with its type and default; an unknown (typo'd)
key, a value of the wrong type or a path that does not exist is a ``ConfigError`` naming the key path, e.g.
``config key 'recipe.lr': expected a number, got 'fast'``. Relative paths are resolved against the config file's
folder. Recipe defaults (optimizer, lr, schedule) are filled in by ``optim.resolve_recipe``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

FORMATS = ("fairseg", "ham10000", "nifti", "folder", "nnunet")  # nnunet: nnU-Net raw / Decathlon + CSV
METHODS = {  # method -> (routing, loss)
    "baseline": ("none", "dice_ce"),
    "moe": ("moe", "dice_ce"),
    "dmoe": ("dmoe", "dice_ce"),
    "febs": ("none", "febs"),
    "dmoe+febs": ("dmoe", "febs"),
}
RECIPES = ("paper2d", "3d")

# Vocabularies used when a config names an attribute without listing its values (DESIGN.md section 2).
DEFAULT_VALUES = {
    "race": ["Asian", "Black", "White"],
    "gender": ["Female", "Male"],
    "ethnicity": ["Non-Hispanic", "Hispanic"],
    "language": ["English", "Spanish", "Others"],
    "age": ["0-19", "20-39", "40-59", "60-79", "80+"],
    "stage": ["T1", "T2", "T3", "T4"],
}
DEFAULT_CLASSES = {"fairseg": ["background", "rim", "cup"], "ham10000": ["background", "lesion"]}


class ConfigError(ValueError):
    """A training config is invalid; the message names the key path and what is expected."""


@dataclass(frozen=True)
class Field:
    """One config key: ``kind`` in int, number, str, bool, path, dir, list, dict, any; ``choices`` for str."""

    kind: str
    default: Any = None
    choices: Sequence[str] | None = None
    optional: bool = True  # None allowed


REQUIRED = object()

SCHEMA: dict[str, Any] = {
    "name": Field("str", "run"),
    "notes": Field("str"),  # why this recipe: kept in every saved model's provenance (config), shown by dmoe info
    "seed": Field("int", 1234, optional=False),
    "output_dir": Field("str", REQUIRED),
    "method": Field("str", "dmoe", choices=tuple(METHODS), optional=False),
    "febs_gamma": Field("number", 1.0, optional=False),
    "aux_loss": Field("number", 0.0, optional=False),  # load-balancing weight; the paper trains without
    "router_smoothing": Field("number", 0.0, optional=False),  # dMoE: weight of losses.router_spread. 0: off
    # all | routers_experts | group_local (training/local.py: only adapt_groups change, every other group bitwise)
    "trainable": Field("str", "all", choices=("all", "routers_experts", "group_local"), optional=False),
    "adapt_groups": Field("list"),  # group_local: groups ("Black", "Black/Female") to adapt; None: those trained on
    "local_experts": Field("int", 1, optional=False),  # group_local: private expert copies per router and dMoE layer
    "fallback_min_cases": Field("int", 5, optional=False),  # intersectional routers with fewer cases fall back
    "data": {
        "format": Field("str", REQUIRED, choices=FORMATS),
        "root": Field("dir", REQUIRED),
        "attributes": Field("any", REQUIRED),  # "race" | [race, gender] | {race: [Asian, Black, White], ...}
        "class_names": Field("list"),
        "train_list": Field("str"),  # fairseg name lists (relative to root)
        "test_list": Field("str"),
        "csv": Field("str"),  # nifti, nnunet: attributes CSV (default attributes.csv); folder: the pairs CSV
        "split_column": Field("str"),  # nifti/folder: CSV column holding train/val/test
        "val_fraction": Field("number", 0.1, optional=False),
        "test_fraction": Field("number", 0.1, optional=False),
        "size": Field("list"),  # 3D: resize volumes (optional); 2D items always take the model's input size
        "crop": Field("int", 512),  # fairseg centre crop before resizing
        "label_map": Field("dict"),  # folder: raw mask value -> class
        "normalization": Field("dict"),
        "in_channels": Field("int"),
        "modality": Field("str"),  # what the images are ("CT", "fundus photo"); recorded in the model's trained_on
    },
    "model": {
        "preset": Field("str", REQUIRED),
        "overrides": Field("dict", {}, optional=False),
        "n_experts": Field("int", 8, optional=False),
        "top_k": Field("int", 2, optional=False),
        # dMoE: weight of a router every group shares, mixed into each group's logits (issue 26). 0: off
        "router_mix": Field("number", 0.0, optional=False),
        "init_from": Field("path"),  # local pretrained ViT: timm safetensors or ViT-B_16.npz
        "base_model": Field("path"),  # one of our .safetensors models to fine-tune from
    },
    "recipe": {
        "name": Field("str", "paper2d", choices=RECIPES, optional=False),
        "lr": Field("number"),  # None: recipe default
        "optimizer": Field("str", choices=("sgd", "adamw")),  # None: the recipe's (paper2d SGD, 3d AdamW)
        "weight_decay": Field("number"),
        "momentum": Field("number", 0.9, optional=False),
        "poly_power": Field("number", 0.9, optional=False),
        "warmup_steps": Field("int"),
        "steps": Field("int"),
        "epochs": Field("int"),
        "batch_size": Field("int", 24, optional=False),
        "amp": Field("bool", True, optional=False),
        "grad_clip": Field("number"),
        "val_every": Field("int"),  # steps; None: once per epoch
        # also validate the starting weights (step 0): a later step is kept only if it beats them (fine-tunes)
        "validate_first": Field("bool", False, optional=False),
        "checkpoint_every": Field("int"),  # steps; None: at every validation
        "num_workers": Field("int", 0, optional=False),
        "sw_overlap": Field("number", 0.25, optional=False),
        "ema": Field("number", 0.0, optional=False),  # per-step decay of a weight average (training/ema.py). 0: off
    },
    # choose the number of steps (and whether to keep the base) by k-fold cross-validation over every training
    # case, then train on all of them (training/crossval.py; the group-local fine-tune's default). 0: off
    "crossval": {
        "folds": Field("int", 0, optional=False),
        "steps": Field("list"),  # candidate step counts; None: recipe.steps only
        "keep_base": Field("bool", True, optional=False),  # the base (0 steps) is a candidate: kept unless beaten
    },
    "augment": {
        "flip": Field("bool", True, optional=False),
        "rotate90": Field("bool", False, optional=False),
        "rotate_degrees": Field("number", 0.0, optional=False),
        "intensity": Field("number", 0.0, optional=False),  # random shift/scale of intensities, fraction
        "prob": Field("number", 0.5, optional=False),
        # Site robustness (scanner and clinic), MONAI array transforms; 0 / null = off. Each applies with ``prob``.
        "contrast": Field("number", 0.0, optional=False),  # scale intensities about their mean by 1 +- this
        "gamma": Field("list"),  # [low, high] gamma range (MONAI RandAdjustContrast), e.g. [0.7, 1.5]
        "blur": Field("number", 0.0, optional=False),  # Gaussian blur, sigma up to this (pixels)
        "noise": Field("number", 0.0, optional=False),  # Gaussian noise, std up to this (normalised units)
        "bias_field": Field("number", 0.0, optional=False),  # smooth multiplicative bias field, coefficient range
        "low_res": Field("number", 0.0, optional=False),  # resolution loss: down to this zoom (0.5) and back up
        "colour": Field("number", 0.0, optional=False),  # RGB: per-channel gain 1 +- this (colour jitter)
        "zoom": Field("number", 0.0, optional=False),  # field of view: zoom image and label by 1 +- this
        "site_prob": Field("number", 0.25, optional=False),  # probability of each site transform above
    },
    "sampling": {
        # 0: every image equally often; 1: every group equally often; 0.5: groups in proportion to sqrt(count)
        "group_balance": Field("number", 0.0, optional=False),
        # dMoE: each training image goes through a router drawn at random (any group's) with this probability,
        # so a rare group's router also learns from the other groups' images and the averaged "unknown" path is
        # trained too (issue 26). 0: off; refused for group-local fine-tunes (other groups must stay unchanged)
        "router_dropout": Field("number", 0.0, optional=False),
    },
}

_KIND_WORDS = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false",
               "path": "a path", "dir": "a folder path", "list": "a list", "dict": "a mapping", "any": "a value"}


def load_config(path: str | Path, overrides: Sequence[str] = (), training: bool = True) -> dict[str, Any]:
    """Read a YAML config, apply ``key.sub=value`` overrides, validate; return the full config with defaults.

    ``training=False`` (``dmoe evaluate``): only the data section matters; output_dir and steps may be left out.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys to values")
    apply_overrides(raw, overrides)
    if not training:
        raw.setdefault("output_dir", ".")
        recipe = raw.setdefault("recipe", {})
        if isinstance(recipe, dict) and recipe.get("steps") is None and recipe.get("epochs") is None:
            recipe["steps"] = 1
    return validate(raw, base_dir=path.parent)


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``a.b=value`` entries in place; values are parsed as YAML (``0.02``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = config
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: config key {'.'.join(parts[: i + 1])!r} is not a section")
        node[parts[-1]] = value
    return config


def validate(raw: Mapping[str, Any], base_dir: str | Path = ".") -> dict[str, Any]:
    """Check ``raw`` against SCHEMA (unknown keys, types, choices, existing paths); fill defaults."""
    config = _check_section(raw, SCHEMA, "", Path(base_dir))
    _check_semantics(config)
    return config


def _check_section(raw: Any, schema: Mapping[str, Any], prefix: str, base: Path) -> dict[str, Any]:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key {where!r}: expected a section (mapping), got {raw!r}")
    unknown = [k for k in raw if k not in schema]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"config key {key!r} is not known; valid keys here: {sorted(schema)}")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        if isinstance(spec, dict):
            out[key] = _check_section(raw.get(key), spec, f"{name}.", base)
        else:
            out[key] = _check_value(raw[key] if key in raw else spec.default, spec, name, base)
    return out


def _check_value(value: Any, spec: Field, name: str, base: Path) -> Any:
    if value is REQUIRED:
        raise ConfigError(f"config key {name!r} is required ({_KIND_WORDS[spec.kind]})")
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"config key {name!r}: expected {_KIND_WORDS[spec.kind]}, got nothing (null)")
    kind = spec.kind
    if kind == "number" and isinstance(value, str):
        value = _number_text(value, name)  # PyYAML reads 1e-3 (no dot) as a string
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "path": isinstance(value, str),
        "dir": isinstance(value, str),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
        "any": True,
    }[kind]
    if not ok:
        raise ConfigError(f"config key {name!r}: expected {_KIND_WORDS[kind]}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"config key {name!r}: {value!r} is not one of {list(spec.choices)}")
    if kind == "number":
        return float(value)
    if kind in ("path", "dir"):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (base / path)
        exists = path.is_dir() if kind == "dir" else path.is_file()
        if not exists:
            raise ConfigError(f"config key {name!r}: {'folder' if kind == 'dir' else 'file'} {path} not found")
        return str(path.resolve())
    return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


def _number_text(text: str, name: str) -> Any:
    """A number written as text (``1e-3``: YAML 1.1 wants ``1.0e-3``); other text is returned for the type error."""
    try:
        number = float(text.strip())
    except ValueError:
        return text
    if not math.isfinite(number):
        raise ConfigError(f"config key {name!r}: expected a finite number, got {text!r}")
    return number


def parse_label_map(value: Any) -> dict[int, int]:
    """``data.label_map``: raw mask value -> class, both integers (``{0: 0, 255: 1}``; keys may be quoted)."""
    out: dict[int, int] = {}
    for key, cls in value.items():
        try:
            raw = int(str(key).strip())
            ok = not isinstance(cls, bool) and isinstance(cls, int) and cls >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"config key 'data.label_map': entry {key!r}: {cls!r} is not 'mask value: class' with "
                              "two integers and a class of 0 or more; write e.g. {0: 0, 255: 1}")
        out[raw] = cls
    return out


def _check_semantics(config: dict[str, Any]) -> None:
    """Checks across keys and value ranges."""
    from napari_dmoe.training.ranges import out_of_range

    problem = out_of_range(config)
    if problem:
        raise ConfigError(problem)
    recipe, data = config["recipe"], config["data"]
    folds, candidates = config["crossval"]["folds"], config["crossval"]["steps"]
    if folds < 0 or folds == 1 or (candidates is not None and not all(isinstance(s, int) and s >= 0
                                                                      for s in candidates)):
        raise ConfigError("config key 'crossval': folds must be 0 (off) or at least 2, and steps a list of step "
                          f"counts (0 or more), got folds={folds}, steps={candidates}")
    for key in ("batch_size", "steps", "epochs", "val_every", "checkpoint_every"):
        if recipe[key] is not None and recipe[key] < 1:
            raise ConfigError(f"config key 'recipe.{key}': must be at least 1, got {recipe[key]}")
    if recipe["steps"] is None and recipe["epochs"] is None:
        raise ConfigError("config key 'recipe.steps': give recipe.steps or recipe.epochs (how long to train)")
    if recipe["lr"] is not None and recipe["lr"] <= 0:
        raise ConfigError(f"config key 'recipe.lr': must be positive, got {recipe['lr']}")
    if recipe["num_workers"] < 0:
        raise ConfigError("config key 'recipe.num_workers': must be 0 or more")
    for key in ("val_fraction", "test_fraction"):
        if not 0 <= data[key] < 1:
            raise ConfigError(f"config key 'data.{key}': must be in [0, 1), got {data[key]}")
    if config["model"]["top_k"] > config["model"]["n_experts"]:
        raise ConfigError("config key 'model.top_k': must not exceed model.n_experts")
    config["data"]["attributes"] = attribute_vocabularies(data["attributes"])
    _check_augment(config["augment"], config["sampling"])
    if config["sampling"]["router_dropout"] and config["trainable"] == "group_local":
        raise ConfigError("config key 'sampling.router_dropout': must be 0 for a group-local fine-tune (it would "
                          "route the adapted group's images through other groups' routers)")
    if config["model"]["router_mix"] and config["trainable"] == "group_local":
        raise ConfigError("config key 'model.router_mix': must be 0 for a group-local fine-tune (it keeps the base "
                          "model's mix; a new one would change every group's routing)")
    if recipe["ema"] and (config["trainable"] == "group_local" or folds):
        raise ConfigError("config key 'recipe.ema': must be 0 for a group-local fine-tune or a cross-validated run "
                          "(their result is the trained model itself; an average would be a second, unchecked one)")
    if data["label_map"] is not None:
        data["label_map"] = parse_label_map(data["label_map"])
    if data["size"] is not None and not all(isinstance(s, int) and s > 0 for s in data["size"]):
        raise ConfigError(f"config key 'data.size': expected a list of positive integers, got {data['size']}")
    if data["class_names"] is not None and (len(data["class_names"]) < 2
                                            or not all(isinstance(c, str) for c in data["class_names"])):
        raise ConfigError("config key 'data.class_names': expected at least two names, background first")


def _check_augment(augment: Mapping[str, Any], sampling: Mapping[str, Any]) -> None:
    if not 0 <= augment["zoom"] < 1:
        raise ConfigError(f"config key 'augment.zoom': a fraction in [0, 1) (0 = off), got {augment['zoom']}")
    for key in ("contrast", "blur", "noise", "bias_field", "colour", "intensity"):
        if augment[key] < 0:
            raise ConfigError(f"config key 'augment.{key}': must be 0 (off) or more, got {augment[key]}")
    if not 0 <= augment["low_res"] < 1:
        raise ConfigError(f"config key 'augment.low_res': the smallest zoom, in [0, 1) (0 = off), "
                          f"got {augment['low_res']}")
    if not 0 <= augment["site_prob"] <= 1:
        raise ConfigError(f"config key 'augment.site_prob': a probability in [0, 1], got {augment['site_prob']}")
    gamma = augment["gamma"]
    if gamma is not None and (len(gamma) != 2 or not all(isinstance(g, (int, float)) and g > 0 for g in gamma)
                              or gamma[0] > gamma[1]):
        raise ConfigError(f"config key 'augment.gamma': expected [low, high] with 0 < low <= high, got {gamma}")
    if not 0 <= sampling["group_balance"] <= 1:
        raise ConfigError("config key 'sampling.group_balance': must be in [0, 1] (0 = as the data come, 1 = every "
                          f"group equally often), got {sampling['group_balance']}")


def attribute_vocabularies(value: Any) -> list[dict[str, Any]]:
    """``"race"`` | ``[race, gender]`` | ``{race: [...], age: null}`` -> ``[{"name", "values"}, ...]``."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        bad = [name for name in value if not isinstance(name, str)]
        if bad:
            raise ConfigError(f"config key 'data.attributes': attribute name {bad[0]!r} must be a string")
        if len(set(value)) != len(value):
            raise ConfigError(f"config key 'data.attributes': an attribute is listed twice in {value}")
        value = {name: None for name in value}
    if not isinstance(value, dict) or not value:
        raise ConfigError("config key 'data.attributes': expected an attribute name, a list of names, or a "
                          "mapping name -> list of values")
    out = []
    for name, values in value.items():
        if not isinstance(name, str):
            raise ConfigError(f"config key 'data.attributes': attribute name {name!r} must be a string")
        if values is None:
            if name not in DEFAULT_VALUES:
                raise ConfigError(f"config key 'data.attributes.{name}': no default vocabulary for {name!r}; "
                                  f"list its values, e.g. {{{name}: [A, B]}}")
            values = DEFAULT_VALUES[name]
        if (not isinstance(values, list) or len(values) < 1
                or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values)):
            raise ConfigError(f"config key 'data.attributes.{name}': expected a list of values (names or "
                              f"numbers), got {values!r}")
        names = [str(v) for v in values]
        if len(set(names)) != len(names):
            raise ConfigError(f"config key 'data.attributes.{name}': a value is listed twice in {names}")
        out.append({"name": name, "values": names})
    return out


def method_routing(method: str) -> tuple[str, str]:
    """``method`` -> (spec routing, loss name)."""
    return METHODS[method]
