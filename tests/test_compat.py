"""model.compat: the stand-in detectron2._C and the restored numpy / Pillow names."""
import sys

import numpy as np
import pytest
from PIL import Image

from model import compat


def test_standin_extension_registered_and_answers_versions():
    from detectron2 import _C

    assert getattr(_C, compat.STANDIN_MARKER, False)
    assert _C.has_cuda() is False
    assert isinstance(_C.get_compiler_version(), str)
    assert sys.modules["detectron2._C"] is _C


def test_standin_kernel_names_torchvision_replacement():
    from detectron2 import _C

    with pytest.raises(NotImplementedError, match="torchvision.ops.deform_conv2d"):
        getattr(_C, "deform_conv_forward")  # noqa: B009
    with pytest.raises(NotImplementedError, match="use_fast_impl=False"):
        getattr(_C, "COCOevalAccumulate")  # noqa: B009


def test_compiled_extension_is_found_and_kept(tmp_path):
    # A user who built detectron2 has detectron2/_C.<abi>.so next to its __init__.py.
    import importlib.machinery

    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (tmp_path / f"_C{suffix}").write_bytes(b"")
    assert compat.compiled_extension_path([str(tmp_path)]) == str(tmp_path / f"_C{suffix}")
    # A pure-Python module of that name is not a compiled extension.
    other = tmp_path / "py"
    other.mkdir()
    (other / "_C.py").write_text("")
    assert compat.compiled_extension_path([str(other)]) is None


def test_removed_numpy_and_pillow_names_restored():
    assert np.int is int and np.float is float and np.str is str and np.object is object
    assert Image.LINEAR == Image.BILINEAR


def test_detectron2_layers_and_modeling_import():
    import detectron2.layers
    import detectron2.modeling  # noqa: F401  (failed on Pillow >= 10 before compat)

    assert detectron2.layers.ROIAlign is not None


def test_detectron2_class_histogram_runs():
    # detectron2/data/build.py uses np.int: broke with numpy >= 1.24.
    from detectron2.data.build import print_instances_class_histogram

    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1}]}]
    print_instances_class_histogram(dicts, ["a", "b"])
