"""
Reading and checking ``params.yaml``, and the ``--set KEY=VALUE`` / ``dvc exp run -S`` overrides.

Every stage checks the whole file before doing any work: an unknown key, or a value outside its
allowed set, raises :class:`ParamError` with one line such as
``params.yaml: loss='focal': allowed values: softmax, sigmoid, eql, fedloss``.
"""
import copy
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"

DATASETS = ("synthetic", "lvis_v1", "coco_2017")
ANNOTATIONS = ("lvis", "coco")
SCALE_NAMES = ("smoke", "synthetic", "paper")
DETECTOR_NAMES = ("centernet", "cascadercnn", "centernet2_specific", "centernet2_agnostic")
LOSS_NAMES = ("softmax", "sigmoid", "eql", "fedloss")
CLUSTERS = ("local", "slurm", "debug")
DEVICES = ("auto", "cpu", "cuda")


class ParamError(ValueError):
    """A wrong key or value in params.yaml (or a --set/-S override)."""


def load(path: Path = PARAMS_FILE) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: file not found")
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise ParamError(f"{path}: top level must be a mapping of keys")
    return params


def check_keys(section: Dict[str, Any], allowed: Iterable[str], prefix: str,
               source: str = "params.yaml") -> None:
    """Raise ParamError on a key of ``section`` outside ``allowed``."""
    allowed = list(allowed)
    for key in section:
        if key not in allowed:
            raise ParamError(f"{source}: unknown key '{prefix}{key}'; allowed keys: {', '.join(allowed)}")


def check_choice(value: Any, allowed: Iterable[str], key: str, source: str = "params.yaml") -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ParamError(f"{source}: {key}={value!r}: allowed values: {', '.join(allowed)}")


# --- the schema ---------------------------------------------------------------------------------
# A leaf is a checker: value -> None when fine, else what is allowed (for the error message).

def _choice(*allowed) -> Callable:
    return lambda v: None if v in allowed else f"allowed values: {', '.join(map(str, allowed))}"


def _int(lo: int = None, nullable: bool = False) -> Callable:
    def check(v):
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
            return f"must be an integer{'' if lo is None else f' >= {lo}'}{' or null' if nullable else ''}"
    return check


def _number(lo: float = None, nullable: bool = False) -> Callable:
    def check(v):
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (lo is not None and v <= lo):
            return f"must be a number{'' if lo is None else f' > {lo}'}{' or null' if nullable else ''}"
    return check


def _str(nullable: bool = True) -> Callable:
    return lambda v: None if isinstance(v, str) or (v is None and nullable) else "must be a string or null"


def _seeds(v):
    if not isinstance(v, list) or not v or not all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        return "must be a non-empty list of integers"
    if len(set(v)) != len(v):
        return "must not repeat a seed"


def _switches(v):
    from model.switches import SWITCHES

    if not isinstance(v, list) or any(name not in SWITCHES for name in v):
        return f"must be a list of switch names from: {', '.join(SWITCHES)}"


def _opts(v):
    if not isinstance(v, list) or len(v) % 2:
        return "must be a flat list [KEY, VALUE, ...] of detectron2 config overrides"


def _synthetic_schema():
    from pipeline.synthetic import SyntheticSpec

    return {f.name: (lambda v: None) for f in fields(SyntheticSpec)}  # SyntheticSpec.validate checks values


def schema() -> Dict[str, Any]:
    return {
        "data": {"name": _choice(*DATASETS), "root": _str(), "annotations": _choice(*ANNOTATIONS),
                 "synthetic": _synthetic_schema()},
        "scale": _choice(*SCALE_NAMES),
        "detector": _choice(*DETECTOR_NAMES),
        "loss": _choice(*LOSS_NAMES),
        "seeds": _seeds,
        "switches": _switches,
        "train": {"max_iter": _int(1, True), "ims_per_batch": _int(1, True), "base_lr": _number(0, True),
                  "checkpoint_period": _int(1, True), "log_period": _int(1), "num_workers": _int(0, True),
                  "device": _choice(*DEVICES), "opts": _opts},
        "eval": {"warmup": _int(0), "max_images": _int(1, True)},
        "tracking": {"uri": _str()},
        "studies": lambda v: None if isinstance(v, dict) else "must be a mapping of study name to rows",
        "run_studies": lambda v: None if isinstance(v, list) and all(isinstance(x, str) for x in v)
        else "must be a list of study names",
        "launcher": {"cluster": _choice(*CLUSTERS), "profile": _str(), "timeout_min": _int(1),
                     "parallel": _int(1)},
    }


def validate(params: Dict[str, Any], source: str = "params.yaml") -> None:
    """Check every key and value of ``params`` against the schema; raise ParamError on the first problem."""

    def walk(node, spec, prefix):
        check_keys(node, spec, prefix, source)
        for key, value in node.items():
            rule = spec[key]
            if isinstance(rule, dict):
                if not isinstance(value, dict):
                    raise ParamError(f"{source}: {prefix}{key} must be a mapping with keys: {', '.join(rule)}")
                walk(value, rule, f"{prefix}{key}.")
            else:
                problem = rule(value)
                if problem:
                    raise ParamError(f"{source}: {prefix}{key}={value!r}: {problem}")

    walk(params, schema(), "")


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(params: Dict[str, Any], overrides: List[str], source: str = "--set") -> Dict[str, Any]:
    """
    ``["loss=eql", "data.root=/x", "seeds=[0,1]"]`` applied to a copy of ``params``. Values are YAML.
    The key must already exist in the schema (as ``dvc exp run -S`` requires it in params.yaml).
    """
    params = copy.deepcopy(params)
    spec = schema()
    for item in overrides:
        if "=" not in item:
            raise ParamError(f"{source}: {item!r}: expected KEY=VALUE")
        key, text = item.split("=", 1)
        node, rule, parts = params, spec, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(rule, dict) or part not in rule:
                allowed = ", ".join(rule) if isinstance(rule, dict) else "(none: not a section)"
                raise ParamError(f"{source}: unknown key '{key}'; allowed keys at '{'.'.join(parts[:i]) or '.'}': "
                                 f"{allowed}")
            rule = rule[part]
            if i < len(parts) - 1:
                node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(text)
    return params


def get(params: Dict[str, Any], key: str, default: Optional[Any] = None) -> Any:
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
