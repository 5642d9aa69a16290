"""
Reading and checking ``params.yaml``, and the ``--set KEY=VALUE`` / ``dvc exp run -S`` overrides;
the study rows merged into the top level (:func:`study_rows`) and the Slurm profiles
``launcher.profile`` names (:func:`load_profile`). The bottom layer of ``pipeline``: it imports no
other part of it (tests/test_layers.py).

Every stage checks the whole file the same way, through :func:`check`, before doing any work: a
YAML syntax error, an unknown key, or a value outside its allowed set raises :class:`ParamError`
with one line naming the file given (``--params``), such as
``params.yaml: loss='focal': allowed values: softmax, sigmoid, eql, fedloss`` or
``my.yaml:12:3: YAML syntax error: found character '\\t' that cannot start any token``.
"""
import copy
import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

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
FINAL_DTYPES = ("float16", "float32")  # train.final_dtype
PRECISIONS = ("float32", "bfloat16")  # train.precision
# What a run does when its params leave one of these train keys out (a partial params dict, as the
# tests build): params.yaml's values, which tests/test_params_dvc.py holds equal to these.
TRAIN_RUN_DEFAULTS = {"log_period": 20, "keep_checkpoints": 0, "final_dtype": "float16", "precision": "float32"}
# Keys added after runs and references were recorded, at the value every one of those trained with:
# a run at that value keeps its run-store key (runs/spec.py) and a reference's settings.json without
# the key compares as that value (report/reference.py).
ADDED_KEYS = {"train.precision": "float32"}
# data.synthetic (pipeline/data/synthetic.py): each setting's type and bounds, (int | float | "open"
# (a float above lo), lo, hi). The caps keep a typo from filling the disk (120k images of at most
# 512 px: about 6 GB of PNG) or memory.
SYNTHETIC_LIMITS = {
    "num_train": (int, 20, 120_000),
    "num_val": (int, 1, 20_000),
    "num_classes": (int, 3, 192),  # every (shape, colour, pattern) of the generator: 8 x 8 x 3
    "image_size": (int, 64, 512),
    "seed": (int, 0, 2**32 - 1),
    "head_fraction": ("open", 0, 1),
    "tail_exponent": (float, 0, 10),
    "p_unlabeled": (float, 0, 1),
    "p_not_exhaustive": (float, 0, 1),
    "max_neg": (int, 0, 100),
    "max_instances": (int, 2, 20),
    "val_min_images": (int, 1, 1000),
    "min_object_size": (float, 4, 409),  # at most 0.8 x the 512-px side cap; synthetic.py checks image_size
}
# Study and row names become file names (results/studies/<study>.json) and MLflow experiment, run
# and artifact names: letters, digits, '_', '.', '-', not starting with '.' or '-'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# detectron2 config keys the pipeline sets from params.yaml (runspec.build_cfg): ``train.opts`` may
# not set them; the error says what to set instead. A key ending in "." stands for all keys under it.
OWNED_OPTS = {
    "OUTPUT_DIR": "the run store (runs/<settings>/seed<k>) holds every run; no parameter moves one run",
    "DATASETS.": "use data.name and data.annotations instead",
    "MODEL.WEIGHTS": "use train.weights instead",
    "SEED": "use seeds instead",
    "MODEL.DEVICE": "use train.device instead",
    "MODEL.ROI_BOX_HEAD.CLS_LOSS": "use loss instead",
    "MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH": "use data.name instead (the prepare stage writes its cat_info.json)",
    "MODEL.ROI_HEADS.NUM_CLASSES": "use data.name instead (the dataset's categories)",
    "MODEL.CENTERNET.NUM_CLASSES": "use data.name instead (the dataset's categories)",
    "SOLVER.MAX_ITER": "use train.max_iter instead",
    "SOLVER.IMS_PER_BATCH": "use train.ims_per_batch instead",
    "SOLVER.BASE_LR": "use train.base_lr instead",
    "SOLVER.CHECKPOINT_PERIOD": "use train.checkpoint_period instead",
    "DATALOADER.NUM_WORKERS": "use train.num_workers instead",
    "DATALOADER.REPEAT_THRESHOLD": "use train.repeat_threshold instead",
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": "use train.fed_loss_num_classes instead",
}


class ParamError(ValueError):
    """A wrong key or value in params.yaml (or a --set/-S override)."""


def load(path: Path = PARAMS_FILE) -> Dict[str, Any]:
    """The parsed file (not checked: see :func:`check`); a YAML syntax error is one line with the
    file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: file not found")
    try:
        with open(path) as f:
            params = yaml.safe_load(f) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ParamError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ParamError(f"{path}: not a YAML file ({str(e).splitlines()[0]})") from None
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


def _range(lo, hi, lo_open: bool = False) -> str:
    if hi is None:
        return "" if lo is None else f" {'>' if lo_open else '>='} {lo}"
    return f" in {'(' if lo_open else '['}{lo}, {hi}]"


def _int(lo: int = None, nullable: bool = False, hi: int = None) -> Callable:
    def check(v):
        if v is None and nullable:
            return None
        if (isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo)
                or (hi is not None and v > hi)):
            return f"must be an integer{_range(lo, hi)}{' or null' if nullable else ''}"
    return check


def _number(lo: float = None, nullable: bool = False, hi: float = None, lo_open: bool = True) -> Callable:
    def check(v):
        if v is None and nullable:
            return None
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v
                or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi)):
            return f"must be a number{_range(lo, hi, lo_open)}{' or null' if nullable else ''}"
    return check


def _name(v) -> Optional[str]:
    if not isinstance(v, str) or not NAME_PATTERN.fullmatch(v):
        return f"must be a name of letters, digits, '_', '.', '-' (regex {NAME_PATTERN.pattern})"


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
    if not isinstance(v, list) or len(v) % 2 or not all(isinstance(k, str) for k in v[0::2]):
        return "must be a flat list [KEY, VALUE, ...] of detectron2 config overrides"
    for key in v[0::2]:
        for owned, instead in OWNED_OPTS.items():
            if key == owned or (owned.endswith(".") and key.startswith(owned)):
                return f"{key} is set by the pipeline: {instead}"


def _image_size(lo: int, hi: int) -> Callable:
    def check(v):
        if (not isinstance(v, (list, tuple)) or len(v) != 2 or _int(lo, hi=hi)(v[0]) or _int(lo, hi=hi)(v[1])
                or v[0] > v[1]):
            return f"must be [min, max] side in pixels, integers with {lo} <= min <= max <= {hi}"
    return check


def _synthetic_schema():
    """``data.synthetic``: each value's type and bounds (``SYNTHETIC_LIMITS``)."""
    rules = {}
    for key, (kind, lo, hi) in SYNTHETIC_LIMITS.items():
        if key == "image_size":
            rules[key] = _image_size(lo, hi)
        elif kind is int:
            rules[key] = _int(lo, hi=hi)
        else:
            rules[key] = _number(lo, hi=hi, lo_open=kind == "open")
    return rules


def _studies(v):
    if not isinstance(v, dict):
        return "must be a mapping of study name to rows"
    for study, rows in v.items():
        if _name(study):
            return f"study name {study!r}: {_name(study)}"
        if not isinstance(rows, dict):
            return f"study {study!r} must be a mapping of row name to settings"
        for row in rows:
            if _name(row):
                return f"row name {study}.{row!r}: {_name(row)}"


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
                  "checkpoint_period": _int(1, True), "keep_checkpoints": _int(0),
                  "final_dtype": _choice(*FINAL_DTYPES), "precision": _choice(*PRECISIONS),
                  "repeat_threshold": _number(0, True, hi=1, lo_open=False),
                  "fed_loss_num_classes": _int(1, True), "log_period": _int(1), "num_workers": _int(0, True),
                  "weights": _str(),
                  "device": _choice(*DEVICES), "opts": _opts},
        "eval": {"warmup": _int(0), "max_images": _int(1, True), "score_thresh": _number(0, True, hi=1, lo_open=False),
                 "detections_per_image": _int(1, True, hi=10000)},
        "pretrain": {"num_images": _int(10, hi=1_000_000), "image_size": _int(32, hi=512), "max_iter": _int(1),
                     "batch_size": _int(1, hi=4096), "base_lr": _number(0), "weight_decay": _number(0, lo_open=False),
                     "seed": _int(0)},
        "tracking": {"uri": _str()},
        "studies": _studies,
        "run_studies": lambda v: None if isinstance(v, list) and not any(_name(x) for x in v)
        else f"must be a list of study names ({NAME_PATTERN.pattern})",
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
                if problem:  # a mapping (studies) is not repeated in the message: its problem names the part
                    shown = "" if isinstance(value, dict) else f"={value!r}"
                    raise ParamError(f"{source}: {prefix}{key}{shown}: {problem}")

    walk(params, schema(), "")
    _check_opts_keys(params, source)


@functools.lru_cache(maxsize=16)
def _base_config(detector: str, scale: str, switches: Tuple[str, ...]):
    """The detector's config at a scale with the switches, as training builds it (without the dataset)."""
    from model import get_model_cfg

    return get_model_cfg(detector, scale, switches=switches)


def _check_opts_keys(params: Dict[str, Any], source: str) -> None:
    """``train.opts`` merged into the detectron2 config it will be merged into: an unknown key or a
    value of the wrong type is refused here, before any job starts."""
    opts = get(params, "train.opts") or []
    if not opts:
        return
    detector, scale = params.get("detector", "centernet2_agnostic"), params.get("scale", "synthetic")
    switches = tuple(params.get("switches") or ())
    try:
        cfg = _base_config(detector, scale, switches).clone()
    except ValueError as e:  # switches in an impossible order
        raise ParamError(f"{source}: switches={list(switches)}: {e}") from None
    cfg.defrost()
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        detail = e.args[0] if e.args else type(e).__name__
        raise ParamError(f"{source}: train.opts={opts!r}: {detail} (detector {detector}, scale {scale})") from None


# --- studies -------------------------------------------------------------------------------------

ROW_KEYS = ("detector", "loss", "seeds", "scale", "data", "train", "switches")
# What a row never inherits: the main experiment's detector, loss and Table 3 steps. A row names its
# own detector and loss and lists its own switches (none when it lists none); the rest (data, scale,
# seeds, train, eval, tracking, launcher) comes from the top level unless the row overrides it.
ROW_ONLY = {"detector": None, "loss": None, "switches": []}


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` with ``update`` merged in, mapping by mapping (a row's ``data`` overrides single keys)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else copy.deepcopy(v)
    return out


def study_rows(params: Dict[str, Any], study: str) -> Dict[str, Dict[str, Any]]:
    """The rows of ``studies.<study>``, each checked and merged into the top-level params (all but
    ``ROW_ONLY``, which the row alone sets)."""
    studies = params.get("studies") or {}
    if study not in studies:
        raise ParamError(f"params.yaml: studies.{study}: no such study; allowed: {', '.join(studies) or '(none)'}")
    rows = {}
    for name, row in (studies[study] or {}).items():
        prefix = f"studies.{study}.{name}"
        if not isinstance(row, dict):
            raise ParamError(f"params.yaml: {prefix} must be a mapping with keys: {', '.join(ROW_KEYS)}")
        check_keys(row, ROW_KEYS, f"{prefix}.")
        for required in ("detector", "loss"):
            if required not in row:
                raise ParamError(f"params.yaml: {prefix}: missing key '{required}'")
        inherited = {k: v for k, v in params.items() if k not in ROW_ONLY and k != "studies"}
        merged = _merge(inherited, {"switches": list(ROW_ONLY["switches"]), **row})
        try:
            validate(merged, source=f"params.yaml ({prefix})")
        except ParamError as e:
            raise ParamError(str(e).replace(f"params.yaml ({prefix}): ", f"params.yaml: {prefix}.")) from None
        rows[name] = merged
    return rows


# --- Slurm profiles (launcher.profile) -------------------------------------------------------

SLURM_DIR = ROOT / "slurm"
# Profile keys and the submitit parameters they set.
PROFILE_KEYS = {
    "partition": "slurm_partition",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "nodes": "nodes",
    "constraint": "slurm_constraint",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "additional_parameters": "slurm_additional_parameters",
    "setup": "slurm_setup",
}


def load_profile(name: Optional[str]) -> Dict[str, Any]:
    """The Slurm profile ``launcher.profile`` names (a file of slurm/, or a path holding '/'), its keys
    checked against ``PROFILE_KEYS``."""
    allowed = ", ".join(sorted(p.name for p in SLURM_DIR.glob("*.yaml")))
    if not name:
        raise ParamError(f"params.yaml: launcher.profile is null; launcher.cluster=slurm needs a profile, "
                         f"allowed: {allowed}")
    # Profiles are executable configuration (their `setup` lines run as shell): a bare name is a file
    # of slurm/ only (never one that happens to lie in the working directory); anything else must be
    # an explicit path (holding a '/').
    path = Path(name) if "/" in name or os.sep in name else SLURM_DIR / name
    if not path.is_file():
        raise ParamError(f"params.yaml: launcher.profile={name!r}: not found; allowed: {allowed}, or a path "
                         f"holding '/' (e.g. ./my-profile.yaml)")
    profile = yaml.safe_load(path.read_text()) or {}
    check_keys(profile, PROFILE_KEYS, "", source=str(path))
    return profile


def check(params: Dict[str, Any], source: Path = "params.yaml") -> None:
    """
    The check every stage runs on the whole file before any work: every key and value (including
    ``train.opts`` against the detectron2 config), every study row merged into the top level,
    ``run_studies`` naming studies, and the Slurm profile when ``launcher.cluster`` is slurm.
    Messages name ``source`` (the file given by ``--params``).
    """
    try:
        validate(params)
        studies = params.get("studies") or {}
        for study in studies:
            study_rows(params, study)
        for study in params.get("run_studies") or []:
            if study not in studies:
                raise ParamError(f"params.yaml: run_studies: {study!r} is not a study; allowed: "
                                 f"{', '.join(studies)}")
        if get(params, "launcher.cluster", "local") == "slurm":
            load_profile(get(params, "launcher.profile"))
    except ParamError as e:
        message = str(e)
        # The checks above (and runspec's, launch's) write "params.yaml"; name the file actually given.
        if str(source) != "params.yaml" and message.startswith("params.yaml"):
            message = f"{source}{message[len('params.yaml'):]}"
        raise ParamError(message) from None


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
