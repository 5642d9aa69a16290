import os

import pytest
import torch

import model  # noqa: F401  (applies model.compat before any test imports detectron2)

# Tests must give the same numbers on a laptop and in CI: fixed, small thread count.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
