"""train.precision: the allowed values, the run key and the reference comparison (a bfloat16 run's
training: tests/test_run.py)."""
import copy

import pytest
import torch

from pipeline import params as P
from pipeline.report import reference as R
from pipeline.runs import train as tr
from pipeline.runs.spec import resolve


def test_autocast_for_allows_the_listed_precisions_only():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with tr.autocast_for("bfloat16", "cpu"):
        assert conv(x).dtype == torch.bfloat16
    with tr.autocast_for("float32", "cpu"):
        assert conv(x).dtype == torch.float32
    with pytest.raises(ValueError, match="allowed values: float32, bfloat16"):
        tr.autocast_for("float16", "cpu")


def test_a_wrong_precision_is_refused_before_work_with_the_allowed_values():
    params = P.load()
    with pytest.raises(P.ParamError, match=r"train\.precision.*allowed values: float32, bfloat16"):
        P.check({**params, "train": {**params["train"], "precision": "fp16"}})


def test_float32_keeps_the_run_keys_of_runs_trained_before_the_key():
    """float32 is what every run trained before ``train.precision`` existed: a params dict without
    the key and one with float32 name the same run; bfloat16 trains other weights, so another run."""
    params = P.load()
    before = copy.deepcopy(params)
    del before["train"]["precision"]
    assert params["train"]["precision"] == "float32"
    assert resolve(params).key() == resolve(before).key()
    assert resolve(params, ["train.precision=bfloat16"]).key() != resolve(params).key()


def test_a_reference_recorded_before_the_key_ran_in_float32():
    """A reference's settings.json from before ``train.precision`` has no such key: comparing a
    float32 run with it lists no difference, a bfloat16 run lists the key."""
    ref = P.load()
    del ref["train"]["precision"]
    assert R.row_differences(P.load(), ref, "table1")["centernet"] == []
    yours = P.load()
    yours["train"]["precision"] = "bfloat16"
    assert R.row_differences(yours, ref, "table1")["centernet"] == [("train.precision", "bfloat16", "float32")]
