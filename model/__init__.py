"""CenterNet2 on detectron2. Importing this package applies ``model.compat`` (cheap: numpy and PIL
only) before anything loads detectron2; the rest loads on first use, so ``import pipeline`` and the
report CLIs that never build a model do not pay detectron2's and torchvision's import (seconds).
``model.presets`` registers the project's backbone, proposal generator, RoI heads and
meta-architecture: every model config comes from its ``get_model_cfg``."""
import importlib

from . import compat  # noqa: F401  (must stay first: patches numpy/PIL and registers detectron2._C)

__all__ = ["add_centernet2_config", "get_model_cfg", "SCALES"]

# Public name -> the submodule that defines it, loaded on first access (PEP 562).
_LAZY = {"add_centernet2_config": "config", "get_model_cfg": "presets", "SCALES": "presets"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
