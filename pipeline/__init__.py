"""The DVC stages of the CenterNet2 pipeline. Importing it applies ``model.compat`` first (numpy and PIL
only: detectron2 loads where a stage needs it)."""
import model  # noqa: F401  (applies model.compat before detectron2 loads; cheap, the model loads on use)
