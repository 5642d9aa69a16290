"""The four classification losses of Table 2."""
import json

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from scipy import stats

from model import get_model_cfg
from model.losses import build_cls_loss
from tests.test_model import _batch

C = 10
# Image counts 1, 4, 9, ..., 100: sqrt(count) = 1..10.
COUNTS = [(k + 1) ** 2 for k in range(C)]


@pytest.fixture
def cat_info(tmp_path):
    path = tmp_path / "cat_info.json"
    path.write_text(json.dumps([{"id": k + 1, "image_count": n} for k, n in enumerate(COUNTS)]))
    return str(path)


def _loss(name, cat_info_path="", **keys):
    cfg = get_model_cfg("centernet2_agnostic", "smoke", num_classes=C)
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS = name
    cfg.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH = cat_info_path
    for k, v in keys.items():
        cfg.MODEL.ROI_BOX_HEAD[k] = v
    return build_cls_loss(cfg)


# --- fedloss -----------------------------------------------------------------------------------

def test_fedloss_set_holds_positives_and_has_the_configured_size(cat_info):
    loss = _loss("fedloss", cat_info, FED_LOSS_NUM_CLASSES=4)
    for _ in range(50):
        gt = torch.tensor([2, 7, 7, C, C])  # two categories present, background RoIs
        s = loss.sample_classes(gt)
        assert {2, 7} <= set(s.tolist()) and len(s) == 4 and len(set(s.tolist())) == 4
    many = torch.tensor([0, 1, 2, 3, 4, 5])  # more positives than |S|: all kept
    assert loss.sample_classes(many).tolist() == [0, 1, 2, 3, 4, 5]
    assert len(_loss("fedloss", cat_info, FED_LOSS_NUM_CLASSES=50).sample_classes(gt)) == C
    # Default: the LVIS fraction 50/1203 of C, at least 1.
    assert _loss("fedloss", cat_info).set_size == max(1, round(C * 50 / 1203))


def test_fedloss_negatives_follow_sqrt_frequency(cat_info):
    loss = _loss("fedloss", cat_info, FED_LOSS_NUM_CLASSES=1)
    loss.generator = torch.Generator().manual_seed(0)
    draws = 20000
    observed = np.bincount([loss.sample_classes(torch.tensor([C])).item() for _ in range(draws)], minlength=C)
    sqrt = np.sqrt(COUNTS)
    assert stats.chisquare(observed, draws * sqrt / sqrt.sum()).pvalue > 1e-3
    # The same draws are far from a wrong exponent (count^1 or count^0).
    for wrong in (np.array(COUNTS, float), np.ones(C)):
        assert stats.chisquare(observed, draws * wrong / wrong.sum()).pvalue < 1e-12


def test_fedloss_gradient_is_zero_outside_the_set(cat_info):
    loss = _loss("fedloss", cat_info, FED_LOSS_NUM_CLASSES=3)
    loss.generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, C + 1, requires_grad=True)
    gt = torch.tensor([4, 4, 9, C, C, C])
    loss.generator.manual_seed(1)
    chosen = loss.sample_classes(gt)
    loss.generator.manual_seed(1)
    loss(logits, gt).backward()
    outside = [k for k in range(C + 1) if k not in chosen.tolist()]
    assert (logits.grad[:, outside] == 0).all()
    assert (logits.grad[:, chosen] != 0).all()


# --- eql ---------------------------------------------------------------------------------------

def test_eql_drops_tail_negatives_of_foreground_rois_only(cat_info):
    loss = _loss("eql", cat_info, EQL_KEEP_TOPK=3)  # frequent: categories 7, 8, 9
    logits = torch.zeros(2, C + 1, requires_grad=True)
    gt = torch.tensor([1, C])  # a foreground RoI of rare category 1, and a background RoI
    loss(logits, gt).backward()
    fg, bg = logits.grad[0], logits.grad[1]
    assert fg[0] == 0 and fg[5] == 0  # other tail categories: no negative gradient
    assert fg[1] != 0  # its own class
    assert (fg[7:10] != 0).all()  # frequent categories keep their negatives
    assert (bg[:C] != 0).all()  # background RoIs: every category
    assert _loss("eql", cat_info).keep == max(1, round(C * 200 / 1203))


# --- softmax vs sigmoid --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_both_drive_the_correct_logit_up(name):
    cfg = get_model_cfg("cascadercnn", "smoke", num_classes=2)
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS = name
    loss = build_cls_loss(cfg)
    logits = torch.zeros(4, 3, requires_grad=True)
    gt = torch.tensor([0, 0, 1, 2])
    optimizer = torch.optim.SGD([logits], lr=1.0)
    before = loss.probs(logits.detach())
    for _ in range(20):
        optimizer.zero_grad()
        loss(logits, gt).backward()
        optimizer.step()
    after = loss.probs(logits.detach())
    assert after[0, 0] > before[0, 0] and after[2, 1] > before[2, 1]
    assert after[0, 0] > after[0, 1] and after[2, 1] > after[2, 0]


def test_sigmoid_bias_starts_at_the_prior():
    cfg = get_model_cfg("cascadercnn", "smoke", num_classes=3)
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS = "sigmoid"
    model = build_model(cfg)
    for predictor in model.roi_heads.box_predictor:
        assert predictor.cls_score.bias[:3].sigmoid().tolist() == pytest.approx([0.01] * 3, rel=1e-4)


def test_fedloss_without_cat_info_names_the_key():
    with pytest.raises(ValueError, match="CAT_FREQ_PATH"):
        _loss("fedloss")


# --- one training step with each loss on both Table 2 detectors ---------------------------------

@pytest.mark.parametrize("detector", ["centernet2_agnostic", "cascadercnn"])
@pytest.mark.parametrize("name", ["softmax", "sigmoid", "eql", "fedloss"])
def test_one_training_step(detector, name, tmp_path):
    path = tmp_path / "cat_info.json"
    path.write_text(json.dumps([{"id": k + 1, "image_count": 10 * (k + 1)} for k in range(5)]))
    cfg = get_model_cfg(detector, "smoke", num_classes=5, overrides=[
        "MODEL.ROI_BOX_HEAD.CLS_LOSS", name, "MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH", str(path)])
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(_batch(num_classes=5))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for stage in model.roi_heads.box_predictor:
        assert stage.cls_score.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([{k: v for k, v in _batch(1)[0].items() if k != "instances"}])
    scores = out[0]["instances"].scores
    assert ((scores >= 0) & (scores <= 1)).all()
