"""
Compatibility layer between detectron2 0.6 and the libraries this project installs beside it.

It must run before detectron2 is imported; ``model/__init__.py`` imports it first, so
``import model`` (or anything under ``model``/``pipeline``) is enough. It does exactly two things:

1. **A stand-in ``detectron2._C``.** detectron2 is installed from its PyPI sdist, which lacks the
   C++/CUDA sources (``detectron2/layers/csrc``), so the extension cannot be compiled. Yet
   ``detectron2/layers/__init__.py`` imports ``_C`` at import time (through ``deform_conv``,
   ``roi_align_rotated``, ``rotated_boxes``). When no compiled ``_C`` can be found, a module is
   registered that answers the version queries (``get_compiler_version``, ``get_cuda_version``,
   ``has_cuda``) and raises ``NotImplementedError`` naming the torchvision replacement for any
   kernel. Nothing this project runs needs those kernels: ``ROIAlign`` and NMS in detectron2 0.6
   already call torchvision, deformable convolution uses ``torchvision.ops.deform_conv2d``, and
   ``COCOEvaluator`` must be built with ``use_fast_impl=False`` (plain pycocotools).
   A user who compiled detectron2 from source keeps their ``_C``: it is looked up on disk first
   and, if present, nothing is registered.

2. **Names removed by newer numpy and Pillow.** ``np.int``/``np.float``/``np.str``/``np.object``
   (removed in numpy 1.24) are used by ``lvis.LVISEval.run`` and by detectron2's class histogram
   (``detectron2/data/build.py``); ``PIL.Image.LINEAR`` (removed in Pillow 10) is a default
   argument in ``detectron2.data.transforms``, so ``import detectron2.modeling`` fails without it.
   Each name is restored only when missing, to the builtin it used to alias.
"""
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Iterable, Optional

import numpy as np
from PIL import Image

__all__ = ["apply", "compiled_extension_path", "STANDIN_MARKER"]

# Attribute set on the stand-in module, so code and tests can tell it from a compiled one.
STANDIN_MARKER = "__centernet2_standin__"

# The kernels of detectron2._C (v0.6) and what replaces each in torchvision.
_TORCHVISION_REPLACEMENTS = {
    "deform_conv_forward": "torchvision.ops.deform_conv2d",
    "deform_conv_backward_input": "torchvision.ops.deform_conv2d",
    "deform_conv_backward_filter": "torchvision.ops.deform_conv2d",
    "modulated_deform_conv_forward": "torchvision.ops.deform_conv2d (with mask=)",
    "modulated_deform_conv_backward": "torchvision.ops.deform_conv2d (with mask=)",
    "roi_align_rotated_forward": "torchvision.ops.roi_align (axis-aligned boxes only)",
    "roi_align_rotated_backward": "torchvision.ops.roi_align (axis-aligned boxes only)",
    "box_iou_rotated": "torchvision.ops.box_iou (axis-aligned boxes only)",
    "nms_rotated": "torchvision.ops.batched_nms (axis-aligned boxes only)",
    "COCOevalAccumulate": "pycocotools COCOeval (COCOEvaluator(..., use_fast_impl=False))",
    "COCOevalEvaluateImages": "pycocotools COCOeval (COCOEvaluator(..., use_fast_impl=False))",
    "InstanceAnnotation": "pycocotools COCOeval (COCOEvaluator(..., use_fast_impl=False))",
    "ImageEvaluation": "pycocotools COCOeval (COCOEvaluator(..., use_fast_impl=False))",
}

# numpy aliases removed in numpy 1.24 (np.bool came back in numpy 2 as np.bool_).
_NUMPY_ALIASES = {"int": int, "float": float, "str": str, "object": object, "bool": bool}


def compiled_extension_path(search_locations: Optional[Iterable[str]] = None) -> Optional[str]:
    """
    Path of a compiled ``detectron2._C`` on disk, or None. Looks, without importing detectron2,
    in ``search_locations`` (default: the installed detectron2 package directories).
    """
    if search_locations is None:
        spec = importlib.util.find_spec("detectron2")
        if spec is None or not spec.submodule_search_locations:
            return None
        search_locations = spec.submodule_search_locations
    found = importlib.machinery.PathFinder.find_spec("_C", list(search_locations))
    if found is None or not isinstance(found.loader, importlib.machinery.ExtensionFileLoader):
        return None
    return found.origin


class _StandInC(types.ModuleType):
    """``detectron2._C`` for installs without the compiled extension."""

    def __init__(self):
        super().__init__("detectron2._C")
        setattr(self, STANDIN_MARKER, True)
        self.__doc__ = "Stand-in for detectron2's C++ extension; see model/compat.py."

    @staticmethod
    def get_compiler_version() -> str:
        return "none (pure-Python detectron2; kernels come from torchvision)"

    @staticmethod
    def get_cuda_version() -> str:
        return "none"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        replacement = _TORCHVISION_REPLACEMENTS.get(name, "a torchvision op")
        raise NotImplementedError(
            f"detectron2._C.{name} is not available: detectron2 was installed without its "
            f"compiled extension (see model/compat.py). Use {replacement} instead, or install "
            f"detectron2 built from source."
        )


def _register_standin_extension() -> bool:
    if "detectron2._C" in sys.modules:
        return False
    if importlib.util.find_spec("detectron2") is None:
        return False  # detectron2 not installed: nothing to patch, its import fails by itself.
    if compiled_extension_path() is not None:
        return False
    sys.modules["detectron2._C"] = _StandInC()
    return True


def _restore_removed_names() -> None:
    for name, builtin in _NUMPY_ALIASES.items():
        # hasattr on numpy's module __getattr__ raises/warns for removed aliases: look in __dict__.
        if name not in np.__dict__:
            setattr(np, name, builtin)
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def apply() -> None:
    """Idempotent; called once by ``model/__init__.py``."""
    # detectron2 0.6 decorates a few helpers with torch.jit.script at import time; torch 2.14
    # warns about each on every import, which says nothing actionable to a user of this project.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    _restore_removed_names()
    _register_standin_extension()


apply()
