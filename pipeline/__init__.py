"""The DVC stages of the CenterNet2 pipeline. Importing it applies ``model.compat`` first."""
import model  # noqa: F401  (patches numpy/PIL and registers detectron2._C before detectron2 loads)
