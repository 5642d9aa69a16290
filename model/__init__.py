"""CenterNet2 on detectron2. Importing this package applies ``model.compat`` before detectron2 loads."""
from . import compat  # noqa: F401  (must stay first: patches numpy/PIL and registers detectron2._C)
