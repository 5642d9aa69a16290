"""
Reading ``params.yaml``, with errors that name the key and the allowed values.

Every section a stage reads is checked before the stage does any work: an unknown key, or a value
outside its allowed set, raises :class:`ParamError` with one line such as
``params.yaml: data.name='lvis': allowed values: synthetic, lvis_v1, coco_2017``.
"""
from pathlib import Path
from typing import Any, Dict, Iterable

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"


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
