"""The four classification losses of Table 2."""
import json
import math

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from scipy import stats

from model import get_model_cfg
from model.losses import build_cls_loss
from tests.test_model import _batch

C = 10
# Image counts 1, 4, 9, ..., 100: sqrt(count) = 1..10.
COUNTS = [(k + 1) ** 2 for k in range(C)]


def _write_cat_info(path, counts) -> str:
    """A cat_info.json with categories 1..len(counts) and these training image counts."""
    path.write_text(json.dumps([{"id": k + 1, "image_count": n} for k, n in enumerate(counts)]))
    return str(path)


@pytest.fixture
def cat_info(tmp_path):
    return _write_cat_info(tmp_path / "cat_info.json", COUNTS)


def _loss(name, cat_info_path="", num_classes=C, **keys):
    cfg = get_model_cfg("centernet2_agnostic", "smoke", num_classes=num_classes)
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS = name
    cfg.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH = cat_info_path
    for k, v in keys.items():
        cfg.MODEL.ROI_BOX_HEAD[k] = v
    return build_cls_loss(cfg)


# --- fedloss -----------------------------------------------------------------------------------

def test_fedloss_set_holds_positives_and_has_the_configured_size(cat_info):
    """
    Official get_fed_loss_inds: the labels present, background index included, count towards |S|.
    |S| = 4 with labels {2, 7, background}: one negative category -> 3 categories; without
    background RoIs, two negatives -> 4. Break tried: background not counted -> 4 with background,
    fails.
    """
    loss = _loss("fedloss", cat_info, FED_LOSS_NUM_CLASSES=4)
    for _ in range(50):
        gt = torch.tensor([2, 7, 7, C, C])  # two categories present, background RoIs
        s = loss.sample_classes(gt)
        assert {2, 7} <= set(s.tolist()) and len(s) == 3 and len(set(s.tolist())) == 3
        s = loss.sample_classes(torch.tensor([2, 7, 7]))
        assert {2, 7} <= set(s.tolist()) and len(s) == 4 and len(set(s.tolist())) == 4
    many = torch.tensor([0, 1, 2, 3, 4, 5])  # more positives than |S|: all kept
    assert loss.sample_classes(many).tolist() == [0, 1, 2, 3, 4, 5]
    assert len(_loss("fedloss", cat_info, FED_LOSS_NUM_CLASSES=50).sample_classes(gt)) == C
    # Default: the LVIS fraction 50/1203 of C = 10 is round(0.416) = 0, at least 1.
    assert _loss("fedloss", cat_info).set_size == 1


def test_fedloss_negatives_follow_sqrt_frequency(cat_info):
    # |S| = 2 with only background RoIs: background and one sampled category.
    loss = _loss("fedloss", cat_info, FED_LOSS_NUM_CLASSES=2)
    loss.generator = torch.Generator().manual_seed(0)
    draws = 20000
    observed = np.bincount([loss.sample_classes(torch.tensor([C])).item() for _ in range(draws)], minlength=C)
    sqrt = np.sqrt(COUNTS)
    assert stats.chisquare(observed, draws * sqrt / sqrt.sum()).pvalue > 1e-3
    # The same draws are far from a wrong exponent (count^1 or count^0).
    for wrong in (np.array(COUNTS, float), np.ones(C)):
        assert stats.chisquare(observed, draws * wrong / wrong.sum()).pvalue < 1e-12


def test_fedloss_gradient_is_zero_outside_the_set(cat_info):
    loss = _loss("fedloss", cat_info, FED_LOSS_NUM_CLASSES=4)  # {4, 9, background} + one negative
    loss.generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, C + 1, requires_grad=True)
    gt = torch.tensor([4, 4, 9, C, C, C])
    loss.generator.manual_seed(1)
    chosen = loss.sample_classes(gt)
    loss.generator.manual_seed(1)
    loss(logits, gt).backward()
    outside = [k for k in range(C + 1) if k not in chosen.tolist()]
    assert (logits.grad[:, outside] == 0).all()
    assert (logits.grad[:, chosen] != 0).all() and len(chosen) == 3


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
    assert _loss("eql", cat_info).keep == 2  # round(10 * 200 / 1203) = round(1.66)


def test_eql_keeps_categories_tied_with_the_nth_count_frequent(tmp_path):
    """Official ``_load_class_freq``: tail = count < kthvalue(counts, C - N + 1). Counts (5, 3, 3, 1),
    N = 2: the 3rd smallest count is 3, so only the count-1 category is tail -- both 3s are kept
    (a top-N pick keeps one of them)."""
    path = _write_cat_info(tmp_path / "cat_info.json", [5, 3, 3, 1])
    assert _loss("eql", path, num_classes=4, EQL_KEEP_TOPK=2).tail.tolist() == [0.0, 0.0, 0.0, 1.0]
    # N = 1, threshold 5: the three others are tail.
    assert _loss("eql", path, num_classes=4, EQL_KEEP_TOPK=1).tail.tolist() == [0.0, 1.0, 1.0, 1.0]


# --- the four losses' values on a hand-made example ----------------------------------------------

# 2 RoIs x 3 categories (+ background, last): RoI 0 is category 1, RoI 1 background.
LOGITS = [[0.0, math.log(3), 0.0, 0.0], [0.0, 0.0, 0.0, math.log(5)]]
GT = [1, 3]


def _three_class_loss(name, tmp_path, counts=(1, 100, 10), **keys):
    loss = _loss(name, _write_cat_info(tmp_path / "cat_info_3.json", counts), num_classes=3, **keys)
    return loss(torch.tensor(LOGITS), torch.tensor(GT)).item()


def test_softmax_ce_value(tmp_path):
    """
    Row 0: exp = (1, 3, 1, 1), target 1: -ln(3/6) = ln 2 = 0.69314718; row 1: exp = (1, 1, 1, 5),
    target background (3): -ln(5/8) = 0.47000363. Mean over the R = 2 RoIs: 0.58157540.
    Break tried: background target taken as category 0 -> fails.
    """
    assert _three_class_loss("softmax", tmp_path) == pytest.approx(0.58157540, rel=1e-6)


def test_sigmoid_ce_value(tmp_path):
    """
    BCE on the 3 category logits (background logit unused); targets row 0 (0, 1, 0), row 1 (0, 0, 0):
        row 0: ln 2 + ln(1 + 1/3) + ln 2 = 1.67397643;   row 1: 3 ln 2 = 2.07944154
    sum / R = 3.75341797 / 2 = 1.87670899 (the mean over R * C would be 0.62556966).
    Break tried: mean over R * C -> fails.
    """
    assert _three_class_loss("sigmoid", tmp_path) == pytest.approx(1.87670899, rel=1e-6)


def test_eql_value(tmp_path):
    """
    Image counts (1, 100, 10), EQL_KEEP_TOPK 1: category 1 frequent, 0 and 2 tail (T = 1). The
    foreground RoI keeps its own term and the frequent category's: w = (0, 1, 0) -> ln(4/3) =
    0.28768207; the background RoI keeps all: 3 ln 2 = 2.07944154. Sum / 2 = 1.18356181.
    Break tried: the background RoI also losing tail negatives -> fails.
    """
    assert _three_class_loss("eql", tmp_path, EQL_KEEP_TOPK=1) == pytest.approx(1.18356181, rel=1e-6)


def test_fedloss_value(tmp_path):
    """
    |S| = 2 with labels {1, background}: no category is sampled, S = {1}:
        row 0: ln(4/3) = 0.28768207; row 1: ln 2 = 0.69314718; sum / 2 = 0.49041462.
    |S| = 3, image counts (0, 100, 9): one negative, drawn from the categories with weight > 0
    (sqrt(count): 0, -, 3) -> S = {1, 2}: row 0 + ln 2, row 1 + ln 2: 1.18356181.
    Breaks tried, each fails: background not counted in |S| (a negative joins the first); mean over
    R * C.
    """
    assert _three_class_loss("fedloss", tmp_path, FED_LOSS_NUM_CLASSES=2) == pytest.approx(0.49041462, rel=1e-6)
    assert _three_class_loss("fedloss", tmp_path, counts=(0, 100, 9), FED_LOSS_NUM_CLASSES=3) == \
        pytest.approx(1.18356181, rel=1e-6)


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
    for k in range(3):  # every cascade stage has its classification loss, and it is not zero
        assert losses[f"loss_cls_stage{k}"] > 0
    sum(losses.values()).backward()
    for stage in model.roi_heads.box_predictor:
        assert stage.cls_score.weight.grad.abs().sum() > 0
    # Each stage scores as its loss: sigmoid of the 5 category logits (sigmoid family) or the
    # softmax over all 6. (Break tried: sigmoid-family heads scoring with softmax -> fails.)
    logits = torch.randn(4, 6)
    boxes = Instances((96, 96), proposal_boxes=Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4)))
    for stage in model.roi_heads.box_predictor:
        (probs,) = stage.predict_probs((logits, torch.zeros(4, 4)), [boxes])
        if name == "softmax":
            assert torch.allclose(probs, torch.softmax(logits, dim=1))
        else:
            assert torch.allclose(probs[:, :5], torch.sigmoid(logits[:, :5]))
    model.eval()
    with torch.no_grad():
        out = model([{k: v for k, v in _batch(1)[0].items() if k != "instances"}])
    scores = out[0]["instances"].scores
    assert ((scores >= 0) & (scores <= 1)).all()
