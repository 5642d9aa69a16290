"""CenterNet2 on detectron2. Importing this package applies ``model.compat`` before detectron2 loads,
then registers the project's backbone, proposal generator, RoI heads and meta-architecture."""
# isort: off
from . import compat  # noqa: F401  (must stay first: patches numpy/PIL and registers detectron2._C)
from . import backbone, centernet, meta_arch, roi_heads  # noqa: F401,E402  (registrations)
from .config import add_centernet2_config  # noqa: E402
from .presets import SCALES, get_model_cfg  # noqa: E402
# isort: on

__all__ = ["add_centernet2_config", "get_model_cfg", "SCALES"]
