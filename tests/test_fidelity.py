"""
The re-implementation against the official CenterNet2 code (github.com/xingyizhou/CenterNet2, last
commit; "official" below), one test per difference of issue 13, each on hand-made inputs with the
official numbers worked out in its docstring. Each docstring names the deliberate break tried and
seen to fail the test.
"""
import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances

from model import get_model_cfg
from model.centernet import CenterNet, CenterNetHead, assign_levels, heatmap_focal_loss, ltrb_giou_loss


def _net(detector="centernet2_agnostic", strides=(8,), soi=((0, 100000),), num_classes=3, **keys):
    """The detector's CenterNet (paper scale: its loss weights, MIN_RADIUS 4 px...) on a few levels of 32 channels."""
    cfg = get_model_cfg(detector, "paper", num_classes=num_classes)
    c = cfg.MODEL.CENTERNET
    c.IN_FEATURES = [f"p{3 + i}" for i in range(len(strides))]
    c.FPN_STRIDES, c.SOI = list(strides), [list(s) for s in soi]
    for k, v in keys.items():
        c[k] = v
    return CenterNet(cfg, {f: ShapeSpec(channels=32, stride=s) for f, s in zip(c.IN_FEATURES, strides)})


def _gt(boxes, classes=None, size=64):
    gt = Instances((size, size))
    gt.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    gt.gt_classes = torch.tensor(classes if classes is not None else [0] * len(boxes))
    return gt


def _targets(net, gt, shapes):
    locations, strides, levels = net._locations(shapes, None)
    return net.targets_for_image(gt, locations, strides, levels, shapes)


# --- 1. the agnostic head ----------------------------------------------------------------------

def test_1_agnostic_head_has_the_official_parameter_count():
    """
    Official ``CenterNetHead`` with ONLY_PROPOSAL and WITH_AGN_HM at R50 / FPN 256 channels: no
    classification tower; the box tower (4 x [3x3 conv 256->256 with bias, GN]) feeds ``bbox_pred``
    and the one-channel ``agn_hm``; one scale per level (5):
        4 x (256*256*9 + 256 + 2*256) = 4 x 590,592 = 2,362,368
        bbox_pred 256*4*9 + 4 = 9,220;  agn_hm 256*9 + 1 = 2,305;  scales 5
        total 2,373,898.
    Breaks tried, each fails: building the classification tower again -> 4,736,266;
    convs without bias under GN -> 2,372,874.
    """
    cfg = get_model_cfg("centernet2_agnostic", "paper")
    shapes = [ShapeSpec(channels=256, stride=s) for s in (8, 16, 32, 64, 128)]
    head = CenterNetHead(cfg, shapes)
    assert sum(p.numel() for p in head.parameters()) == 2_373_898
    assert not hasattr(head, "cls_tower")
    # The heatmap reads the box tower: zeroing the box tower's last conv changes the heatmap.
    x = [torch.randn(1, 256, 4, 4)]
    before = head(x)[0][0].clone()
    with torch.no_grad():
        head.box_tower[-2].weight.zero_()
    assert not torch.allclose(head(x)[0][0], before)


# --- 2. heatmap loss weighting ------------------------------------------------------------------

def test_2_heatmap_loss_of_a_known_map_with_alpha_and_ignored_high_fp():
    """
    CenterNet2-agnostic's config (official Base-CenterNet2.yaml: HM_FOCAL_ALPHA 0.25, POS_WEIGHT =
    NEG_WEIGHT = 0.5, IGNORE_HIGH_FP 0.85, LOSS_GAMMA 2, REG_WEIGHT 1), one 4x4 level at stride 8, one
    object [4, 4, 20, 20] (centre (12, 12): cell 5). MIN_RADIUS 1 so that the Gaussian is a lone
    peak: r^2 = max(2 (1/9)^2 * 256, 1) = 6.32, a neighbour at d^2 = 64 gets exp(-10.1) < 1e-4 -> 0.
    Logits 0 (p = .5) everywhere but cell 0 (p = .25) and cell 15 (p = .9, a high false positive).

        pos = .25 * (1 - .5)^2 ln 2                      = 0.04332169
        neg = .75 * (13 * .5^2 ln 2 + .25^2 ln(4/3))      (cell 15 ignored: p >= 0.85)
            = .75 * (2.25272837 + 0.01798013)             = 1.70303137
        loss_centernet_hm = (.5 pos + .5 neg) / 1 positive = 0.87317653
    Box: predicted distances .5 stride on each side at the centre, target 1 stride: in strides,
    IoU = (1 + 1) / (4 + 1) = 0.4, enclosing box = target -> GIoU loss 0.6 (official IOULoss: stride
    units, smoothed IoU; in pixels unsmoothed it would be 0.75), REG_WEIGHT 1.
    Breaks tried, each fails: alpha dropped (pos and neg x 1); IGNORE_HIGH_FP dropped (+ .5 * .75 *
    .9^2 ln 10 = +0.6994); the IoU unsmoothed.
    """
    net = _net(MIN_RADIUS=1.0)
    logits = torch.zeros(1, 1, 4, 4)
    logits[0, 0, 0, 0] = -math.log(3)
    logits[0, 0, 3, 3] = math.log(9)
    losses = net.losses([logits], [torch.full((1, 4, 4, 4), 0.5)], [(4, 4)], [_gt([[4, 4, 20, 20]], size=32)])
    assert losses["loss_centernet_hm"].item() == pytest.approx(0.87317653, rel=1e-5)
    assert losses["loss_centernet_reg"].item() == pytest.approx(0.6, rel=1e-5)


def test_2_focal_loss_pieces_by_hand():
    """
    heatmap_focal_loss on 4 cells, p = .5, .9, .75, .5 and Y = 1 (listed positive), 0, .5, 1 (a
    centre not listed as positive: an object's centre on a level it is not assigned to):
        pos = .25 * .5^2 ln 2                 = 0.04332169
        neg = .75 * (.5^4 .75^2 ln 4)         = .75 * 0.04873691 = 0.03655268   (cell 1 ignored, cells 0 and 3 Y = 1)
    Without the ignore (ignore_high_fp = -1): neg += .75 * .9^2 ln 10 = 1.39882044.
    With alpha = -1 (no balance): pos = 0.17328680.
    Breaks tried, each fails: the ignore dropped; alpha dropped.
    """
    logits = torch.tensor([0.0, math.log(9), math.log(3), 0.0])
    targets = torch.tensor([1.0, 0.0, 0.5, 1.0])
    pos, neg = heatmap_focal_loss(logits, targets, torch.tensor([0]), alpha=0.25, ignore_high_fp=0.85)
    assert (pos.item(), neg.item()) == pytest.approx((0.04332170, 0.03655268), rel=1e-5)
    _, neg = heatmap_focal_loss(logits, targets, torch.tensor([0]), alpha=0.25)
    assert neg.item() == pytest.approx(0.03655268 + 1.39882044, rel=1e-5)
    pos, _ = heatmap_focal_loss(logits, targets, torch.tensor([0]), alpha=-1)
    assert pos.item() == pytest.approx(0.17328680, rel=1e-5)


def test_2_loss_weights_per_detector():
    """Official Base-CenterNet2.yaml and Base-CenterNet-FPN.yaml (+ CenterNet-FPN_R50_1x.yaml)."""
    c2 = get_model_cfg("centernet2_agnostic").MODEL.CENTERNET
    assert (c2.HM_FOCAL_ALPHA, c2.POS_WEIGHT, c2.NEG_WEIGHT, c2.IGNORE_HIGH_FP) == (0.25, 0.5, 0.5, 0.85)
    fpn = get_model_cfg("centernet").MODEL.CENTERNET
    assert (fpn.HM_FOCAL_ALPHA, fpn.POS_WEIGHT, fpn.NEG_WEIGHT, fpn.IGNORE_HIGH_FP) == (0.25, 1.0, 1.0, -1.0)


# --- 3. regression locations ---------------------------------------------------------------------

def test_3_regression_at_3x3_centre_cells_inside_the_box_nearest_wins():
    """
    One level, stride 8, 8x8 map (cell centres 4, 12, ..., 60), three objects:
      A [4, 4, 36, 28], centre (20, 16): centre cell (2, 2) at (20, 20); of its 3x3 cells (x, y in
        1..3, centres 12/20/28) strictly inside: x all, y in {12, 20} -> flat y*8+x = 9 10 11 17 18 19.
      C [12, 12, 44, 44], centre (28, 28): cell (3, 3); all 9 cells (centres 20/28/36) inside
        -> 18 19 20 26 27 28 34 35 36.
      B [40, 40, 46, 46], centre (43, 43): cell (5, 5) at (44, 44); neighbours at 36 / 52 are
        outside -> 45 only.
    Shared cells, nearest in d^2 / r^2 (r^2 = max(2 w h / 81, 16)) wins:
      18 = (20, 20): A's own centre cell (d = 0) -> A; target (16, 16, 16, 8) / 8 = (2, 2, 2, 1).
      19 = (28, 20): A: 80 / (2*768/81 = 18.963) = 4.22; C: 64 / (2*1024/81 = 25.284) = 2.53 -> C;
        target (28-12, 20-12, 44-28, 44-20) / 8 = (2, 1, 2, 3).
    14 locations. Loss with every predicted distance 0: per location 1 - 1 / (U + 1), U = the box's
    area in strides^2 (A 4x3 = 12, C 4x4 = 16, B .75x.75 = .5625), unit weights (NOT_NORM_REG)
    averaged over the 14: (5 * 12/13 + 8 * 16/17 + .36) / 14 = 0.89319977, x REG_WEIGHT 1.
    Breaks tried, each fails: the first object winning instead of the nearest (19 goes to A);
    heatmap-weighted locations (NOT_NORM_REG off).
    """
    net = _net()
    gt = _gt([[4, 4, 36, 28], [12, 12, 44, 44], [40, 40, 46, 46]])
    _, _, _, reg_target, reg_mask = _targets(net, gt, [(8, 8)])
    assert reg_mask.nonzero().flatten().tolist() == [9, 10, 11, 17, 18, 19, 20, 26, 27, 28, 34, 35, 36, 45]
    assert reg_target[18].tolist() == [2, 2, 2, 1]
    assert reg_target[19].tolist() == [2, 1, 2, 3]
    losses = net.losses([torch.zeros(1, 1, 8, 8)], [torch.zeros(1, 4, 8, 8)], [(8, 8)], [gt])
    assert losses["loss_centernet_reg"].item() == pytest.approx(0.89319977, rel=1e-5)


def test_3_regression_only_on_assigned_levels():
    """
    Two levels (stride 8: SOI [0, 12]; stride 16: [12, 1e5]); box [4, 4, 20, 20] (half-diagonal
    11.31) trains level 0 only. Level 0: of the 3x3 cells around (12, 12) (centres 4 / 12 / 20) only
    (12, 12) is strictly inside -> cell 5. Level 1 (flat 16..19): cell (8, 8) is inside the box and
    is the centre's own cell there, but the level is not assigned -> no regression.
    Break tried: dropping the level condition -> [5, 16], fails.
    """
    net = _net(strides=(8, 16), soi=((0, 12), (12, 100000)))
    _, _, _, _, mask = _targets(net, _gt([[4, 4, 20, 20]], size=32), [(4, 4), (2, 2)])
    assert mask.nonzero().flatten().tolist() == [5]


# --- 4. level assignment ---------------------------------------------------------------------------

def test_4_levels_by_half_diagonal_at_the_soi_borders():
    """
    Official assign_fpn_level: sqrt(w^2 + h^2) / 2 against [lo, hi] inclusive, SOI [0, 80], [64, 160],
    [128, 320], [256, 640], [512, inf]. Boxes w x h (half-diagonal): 96x128 (80: border of levels 0
    and 1 -> both), 97x128 (80.30 -> 1), 192x256 (160 -> 1, 2), 384x512 (320 -> 2, 3), 768x1024
    (640 -> 3, 4), 30x40 (25 -> 0), 20x300 (150.33 -> 1, 2).
    sqrt(w h) would give 110.9 -> {1}, 111.4 -> {1}, 221.7 -> {2}, 443.4 -> {3}, 886.8 -> {4},
    34.6 -> {0}, 77.5 -> {0, 1}.
    Break tried: sqrt(w h) as the size -> fails on 5 of 7 rows.
    """
    soi = torch.tensor([[0, 80], [64, 160], [128, 320], [256, 640], [512, 100000]], dtype=torch.float32)
    wh = [(96, 128), (97, 128), (192, 256), (384, 512), (768, 1024), (30, 40), (20, 300)]
    boxes = torch.tensor([[0, 0, w, h] for w, h in wh], dtype=torch.float32)
    levels = [set(col.nonzero().flatten().tolist()) for col in assign_levels(boxes, soi).T]
    assert levels == [{0, 1}, {1}, {1, 2}, {2, 3}, {3, 4}, {0}, {1, 2}]


# --- 5. heatmap targets ------------------------------------------------------------------------------

def test_5_heatmap_on_every_level_with_min_radius():
    """
    Levels stride 8 (4x4, SOI [0, 10]) and 16 (2x2, SOI [10, 1e5]); box [8, 8, 16, 16]: centre
    (12, 12), area 64, half-diagonal 5.66 -> assigned to level 0 only. r^2 = max(2 (0.2/1.8)^2 64,
    MIN_RADIUS^2 = 16) = max(1.58, 16) = 16.
      level 0: centre cell (12, 12) = 1; (20, 12), (4, 12), (12, 4), (12, 20): exp(-64/16) = exp(-4);
               diagonals: exp(-128/16) = exp(-8); (28, 12): exp(-16) < 1e-4 -> 0.
      level 1 (not assigned): its centre cell (8, 8) is the object's peak there -> d = 0 -> 1;
               (24, 8): exp(-(144 + 16)/16) = exp(-10) < 1e-4 -> 0.
    The single positive is level 0's cell 5; level 1's 1 is ignored by the loss (Y = 1, not listed).
    Breaks tried, each fails: zeroing the Gaussian on levels the object is not assigned to (the old
    rule) -> flat 16 is 0; no MIN_RADIUS floor -> exp(-64/1.58) < 1e-4 -> 0 at the neighbours.
    """
    net = _net(strides=(8, 16), soi=((0, 10), (10, 100000)))
    heat, pos_loc, _, _, _ = _targets(net, _gt([[8, 8, 16, 16]], size=32), [(4, 4), (2, 2)])
    e4, e8 = math.exp(-4), math.exp(-8)
    assert heat[0, :16].tolist() == pytest.approx([e8, e4, e8, 0, e4, 1, e4, 0, e8, e4, e8, 0, 0, 0, 0, 0], abs=1e-7)
    assert heat[0, 16:].tolist() == [1, 0, 0, 0]
    assert pos_loc.tolist() == [5]


def test_5_radius_from_delta_and_peak_at_the_centre_cell():
    """
    Stride 8, 12x12 map, box [12, 12, 84, 84]: centre (48, 48), area 5184, r^2 = max(2 * 5184 / 81,
    16) = 128. The centre lies on a cell corner; its cell (6, 6) at (52, 52) is the peak (1). Cell
    (5, 5) at (44, 44): d^2 = 32 -> exp(-0.25) = 0.77880; cell (7, 6) at (60, 52): d^2 = 144 + 16 = 160
    -> exp(-1.25) = 0.28650.
    Break tried: sigma = 0.1 sqrt(w h) (the old rule) -> exp(-32 / (2 * 51.84)) = 0.7345, fails.
    """
    net = _net()
    heat = _targets(net, _gt([[12, 12, 84, 84]], size=96), [(12, 12)])[0][0]
    assert heat[6 * 12 + 6].item() == 1.0
    assert heat[5 * 12 + 5].item() == pytest.approx(0.77880078, rel=1e-5)
    assert heat[6 * 12 + 7].item() == pytest.approx(0.28650480, rel=1e-5)


# --- 6. proposal score ---------------------------------------------------------------------------------

def test_6_proposal_score_is_sqrt_of_the_heatmap():
    """
    One agnostic proposal at heatmap probability p = 0.64 (every other cell p ~ 0): official
    predict_single_level stores sqrt(p) = 0.8 as its score, so sigmoid(objectness_logits) = 0.8.
    Class-specific proposals (no agnostic heatmap) keep p.
    Break tried: storing p (the old rule) -> 0.64, fails.
    """
    net = _net().eval()
    hm = torch.full((1, 1, 4, 4), -20.0)
    hm[0, 0, 1, 1] = math.log(0.64 / 0.36)
    (props,) = net.inference([hm], [torch.ones(1, 4, 4, 4)], [(32, 32)])
    assert props.objectness_logits.sigmoid().tolist() == pytest.approx([0.8], rel=1e-5)
    spec = _net("centernet2_specific", num_classes=1).eval()
    (props,) = spec.inference([hm], [torch.ones(1, 4, 4, 4)], [(32, 32)])
    assert props.objectness_logits.sigmoid().tolist() == pytest.approx([0.64], rel=1e-5)


def _logit(p):
    return math.log(p / (1 - p))


def test_6_class_specific_proposals_with_the_agnostic_heatmap():
    """
    Official predict_single_level with AS_PROPOSAL and WITH_AGN_HM (CENTERNET.WITH_AGN_HM here): a
    location is a candidate when its class p exceeds SCORE_THRESH (1e-4), and is then scored
    sqrt(class p * agnostic p). One 4x4 level, 2 categories, ltrb 1 stride:
        cell (1, 1) class 0 p = .64, agnostic .25  -> sqrt(.16)     = 0.4
        cell (2, 2) class 1 p = .5,  agnostic .81  -> sqrt(.405)    = 0.63640
        cell (0, 0) class 0 p = .001, agnostic .01 -> sqrt(1e-5)    = 0.00316  (kept: the class p
                                                      passes the threshold, the product does not)
        cell (3, 3) class 0 p = 5e-5, agnostic .99 -> not a candidate
    Boxes 16 px wide around centres 8 px apart overlap at IoU .14 < NMS .9: all three kept.
    Breaks tried, each fails: thresholding the product (drops cell (0, 0)); no sqrt (.405, .16, 1e-5);
    ranking by class p alone.
    """
    net = _net("centernet2_specific", num_classes=2, WITH_AGN_HM=True).eval()
    assert net.head.with_agn_hm and hasattr(net.head, "cls_tower") and hasattr(net.head, "agn_hm")
    hm = torch.full((1, 2, 4, 4), -20.0)
    agn = torch.full((1, 1, 4, 4), -20.0)
    for (c, y, x), p_cls, p_agn in (((0, 1, 1), .64, .25), ((1, 2, 2), .5, .81), ((0, 0, 0), .001, .01),
                                    ((0, 3, 3), 5e-5, .99)):
        hm[0, c, y, x], agn[0, 0, y, x] = _logit(p_cls), _logit(p_agn)
    (props,) = net.inference([hm], [torch.ones(1, 4, 4, 4)], [(32, 32)], [agn])
    assert props.objectness_logits.sigmoid().tolist() == pytest.approx([0.63640, 0.4, 0.0031623], rel=1e-4)
    assert props.proposal_boxes.tensor.tolist() == [[12, 12, 28, 28], [4, 4, 20, 20], [-4, -4, 12, 12]]


def test_6_class_agnostic_nms_keeps_one_proposal_per_place():
    """
    Official ml_nms runs per category, so a class-specific head proposes one box several times, once
    per category that peaks at its location. NMS_CLASS_AGNOSTIC (not official; opt-in) suppresses the
    copies. One 4x4 level, 2 categories, ltrb 1 stride (boxes 16 px):
        cell (1, 1) class 0 p = .64 and class 1 p = .5 -> the same box [4, 4, 20, 20] twice
        cell (2, 2) class 1 p = .3                     -> [12, 12, 28, 28], IoU 64 / 448 = .14 < .9
    Per category (default): .64, .5, .3. Class-agnostic: .64, .3 (the copy, IoU 1 > .9, dropped).
    The key is for proposals only: CenterNet-FPN's final detections keep the official per-category
    NMS, so the same map gives .64, .5, .3 with classes 0, 1, 1 whatever the key.
    Breaks tried, each fails: grouping by class in both cases (three proposals); the key applied to
    one-stage detections too (two detections).
    """
    hm = torch.full((1, 2, 4, 4), -20.0)
    for (c, y, x), p in (((0, 1, 1), .64), ((1, 1, 1), .5), ((1, 2, 2), .3)):
        hm[0, c, y, x] = _logit(p)
    expected = {False: ([.64, .5, .3], [[4, 4, 20, 20]] * 2 + [[12, 12, 28, 28]]),
                True: ([.64, .3], [[4, 4, 20, 20], [12, 12, 28, 28]])}
    for agnostic_nms, (scores, boxes) in expected.items():
        net = _net("centernet2_specific", num_classes=2, NMS_CLASS_AGNOSTIC=agnostic_nms).eval()
        (props,) = net.inference([hm], [torch.ones(1, 4, 4, 4)], [(32, 32)])
        assert props.objectness_logits.sigmoid().tolist() == pytest.approx(scores, rel=1e-4)
        assert props.proposal_boxes.tensor.tolist() == boxes
        one_stage = _net("centernet", num_classes=2, NMS_CLASS_AGNOSTIC=agnostic_nms).eval()
        (dets,) = one_stage.inference([hm], [torch.ones(1, 4, 4, 4)], [(32, 32)])
        assert dets.scores.tolist() == pytest.approx([.64, .5, .3], rel=1e-4)
        assert dets.pred_classes.tolist() == [0, 1, 1]


def test_2_agnostic_heatmap_loss_of_a_class_specific_head():
    """
    Official ``losses`` with WITH_AGN_HM beside the class heatmaps: the agnostic heatmap is trained
    on the categories' maximum at the same positives and normaliser. Test 2's level and object, now
    of category 1 of 2 (its peak on channel 1): the agnostic target is test 2's map, so with test
    2's logits loss_centernet_agn_hm = 0.87317653. The class heatmaps at logit -20 (p clamped to
    1e-4): pos = .25 (1 - 1e-4)^2 ln 1e4 = 9.20850 / 4, negatives ~1e-12, so
    loss_centernet_hm = .5 * 2.30212460 = 1.15106230, whatever the agnostic logits.
    Breaks tried, each fails: the agnostic target from channel 0 (no peak); no agnostic loss.
    """
    net = _net("centernet2_specific", num_classes=2, MIN_RADIUS=1.0, WITH_AGN_HM=True)
    agn = torch.zeros(1, 1, 4, 4)
    agn[0, 0, 0, 0] = -math.log(3)
    agn[0, 0, 3, 3] = math.log(9)
    gt = _gt([[4, 4, 20, 20]], classes=[1], size=32)
    ltrb = [torch.full((1, 4, 4, 4), 0.5)]
    losses = net.losses([torch.full((1, 2, 4, 4), -20.0)], ltrb, [(4, 4)], [gt], [agn])
    assert losses["loss_centernet_agn_hm"].item() == pytest.approx(0.87317653, rel=1e-5)
    assert losses["loss_centernet_hm"].item() == pytest.approx(1.15106230, rel=1e-5)
    assert "loss_centernet_agn_hm" not in net.losses([torch.full((1, 2, 4, 4), -20.0)], ltrb, [(4, 4)], [gt])


def _set_stage_probs(model, stage_probs):
    """Each cascade stage predicts fixed softmax probabilities (whatever the features) and no box change."""
    for predictor, probs in zip(model.roi_heads.box_predictor, stage_probs):
        with torch.no_grad():
            predictor.cls_score.weight.zero_()
            predictor.cls_score.bias.copy_(torch.tensor(probs).log())
            predictor.bbox_pred.weight.zero_()
            predictor.bbox_pred.bias.zero_()


def test_6_final_score_inside_the_model_averages_stages_and_takes_sqrt():
    """
    CenterNet2-agnostic at test, one proposal [8, 8, 40, 40] from the agnostic heatmap at p = 0.64
    (proposal score sqrt(.64) = .8), 2 categories; the three stages' softmax probabilities
    (cat 0, cat 1, background) are (.3, .1, .6), (.45, .1, .45), (.6, .1, .3): averaged, cat 0 .45
    and cat 1 .1. Official CustomCascadeROIHeads: score = (s * proposal score)^0.5:
        cat 0: sqrt(.45 * .8) = 0.6;  cat 1: sqrt(.1 * .8) = 0.28284.
    Breaks tried: the sqrt(p s) call removed -> .45 / .1, fails; only the last stage's
    probabilities -> sqrt(.6 * .8) = .69282, fails; p instead of sqrt(p) -> sqrt(.45 * .64) = .53666, fails.
    """
    cfg = get_model_cfg("centernet2_agnostic", "smoke", num_classes=2)
    model = build_model(cfg).eval()
    _set_stage_probs(model, [(0.3, 0.1, 0.6), (0.45, 0.1, 0.45), (0.6, 0.1, 0.3)])
    images = ImageList.from_tensors([torch.zeros(3, 64, 64)], 32)
    net = _net(strides=(8, 16, 32, 64, 128), soi=[(0, 100000)] * 5).eval()
    heat = [torch.full((1, 1, 64 // s, 64 // s), -20.0) for s in (8, 16, 32, 64, 128)]
    heat[0][0, 0, 3, 3] = math.log(0.64 / 0.36)  # cell centre (28, 28)
    ltrb = [torch.full((1, 4, 64 // s, 64 // s), 20.0 / 8) for s in (8, 16, 32, 64, 128)]
    (props,) = net.inference(heat, ltrb, [(64, 64)])
    assert props.proposal_boxes.tensor.tolist() == [[8.0, 8.0, 48.0, 48.0]]
    with torch.no_grad():
        features = model.backbone(images.tensor)
        (inst,), _ = model.roi_heads(images, features, [props])
    order = inst.scores.argsort(descending=True)
    assert inst.pred_classes[order].tolist() == [0, 1]
    assert inst.scores[order].tolist() == pytest.approx([0.6, math.sqrt(0.08)], rel=1e-5)


# --- 7. loss weights and solver --------------------------------------------------------------------

def test_7_solver_and_regression_weight_per_detector():
    """
    Official Base-CenterNet-FPN.yaml + CenterNet-FPN_R50_1x.yaml: LR 0.01, 4000 warm-up iterations
    from 2.5e-4, gradient clipping (detectron2's default: value, 1.0), REG_WEIGHT 2 (config default),
    MORE_POS on. Base-CenterNet2.yaml: LR 0.02, the same warm-up and clipping, REG_WEIGHT 1.
    Break tried: the old REG_WEIGHT 0.5 in CenterNet2-agnostic.yaml -> fails.
    """
    fpn = get_model_cfg("centernet")
    assert (fpn.SOLVER.BASE_LR, fpn.SOLVER.WARMUP_ITERS, fpn.SOLVER.WARMUP_FACTOR) == (0.01, 4000, 0.00025)
    assert fpn.SOLVER.CLIP_GRADIENTS.ENABLED and fpn.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "value"
    assert fpn.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 1.0
    assert (fpn.MODEL.CENTERNET.REG_WEIGHT, fpn.MODEL.CENTERNET.MORE_POS) == (2.0, True)
    for name in ("centernet2_agnostic", "centernet2_specific"):
        c2 = get_model_cfg(name)
        assert (c2.SOLVER.BASE_LR, c2.SOLVER.WARMUP_ITERS, c2.SOLVER.WARMUP_FACTOR) == (0.02, 4000, 0.00025)
        assert c2.SOLVER.CLIP_GRADIENTS.ENABLED
        assert (c2.MODEL.CENTERNET.REG_WEIGHT, c2.MODEL.CENTERNET.MORE_POS) == (1.0, False)
    # The from-scratch scales keep each detector's LR.
    assert get_model_cfg("centernet", "synthetic").SOLVER.BASE_LR == 0.01
    assert get_model_cfg("centernet2_agnostic", "synthetic").SOLVER.BASE_LR == 0.02


def test_7_more_pos_adds_centre_neighbours_with_a_small_loss():
    """
    Official _add_more_pos on one level (stride 8, 8x8 map), box A [4, 4, 36, 28] (centre cell 18; of
    its 3x3 cells 9 10 11 17 18 19 are inside, 25 26 27 are not -> loss INF). Predicted distances are
    0 everywhere (GIoU loss 1 - 1/13 = .923 in strides) except the exact targets at 10 ((20, 12):
    (16, 8, 16, 16) / 8 = (2, 1, 2, 2)) and 17 ((12, 20): (1, 2, 3, 1)), loss 0. The centre's loss
    is set to 0. Threshold min(9th smallest = INF, 0.2) = 0.2: positives 10, 17, 18.
    Break tried: keeping only the centre cell as positive -> [18], fails.
    """
    net = _net("centernet")
    pred = torch.zeros(64, 4)
    pred[10] = torch.tensor([2.0, 1.0, 2.0, 2.0])
    pred[17] = torch.tensor([1.0, 2.0, 3.0, 1.0])
    loc, cls = net._more_positives(_gt([[4, 4, 36, 28]], classes=[2]), pred, [(8, 8)])
    assert sorted(loc.tolist()) == [10, 17, 18] and cls.tolist() == [2, 2, 2]


# --- 8. test settings -------------------------------------------------------------------------------

def test_8_test_settings_and_pooler_levels():
    """
    Official LVIS configs (LVIS_CenterNet2_R50_1x.yaml): score threshold 0.02, NMS 0.5, 300
    detections; RoI pooler on P3-P7 (Base-CenterNet2.yaml). CenterNet-FPN: INFERENCE_TH 0.05, 100
    after NMS 0.6. CascadeRCNN's RPN: detectron2's FPN values, 1000 per level before NMS at test.
    The built smoke model pools from 5 levels.
    Break tried: RPN PRE_NMS_TOPK_TEST left at detectron2's 6000 -> fails; IN_FEATURES p3-p5 -> fails.
    """
    for name in ("cascadercnn", "centernet2_agnostic", "centernet2_specific"):
        c = get_model_cfg(name)
        assert (c.MODEL.ROI_HEADS.SCORE_THRESH_TEST, c.MODEL.ROI_HEADS.NMS_THRESH_TEST) == (0.02, 0.5)
        assert c.TEST.DETECTIONS_PER_IMAGE == 300
        assert list(c.MODEL.ROI_HEADS.IN_FEATURES) == ["p3", "p4", "p5", "p6", "p7"]
    fpn = get_model_cfg("centernet").MODEL.CENTERNET
    assert (fpn.SCORE_THRESH, fpn.POST_NMS_TOPK_TEST, fpn.NMS_THRESH_TEST) == (0.05, 100, 0.6)
    assert get_model_cfg("centernet2_agnostic").MODEL.CENTERNET.SCORE_THRESH == 0.0001
    rpn = get_model_cfg("cascadercnn").MODEL.RPN
    assert (rpn.PRE_NMS_TOPK_TRAIN, rpn.PRE_NMS_TOPK_TEST, rpn.POST_NMS_TOPK_TEST) == (2000, 1000, 1000)
    model = build_model(get_model_cfg("centernet2_agnostic", "smoke", num_classes=2))
    assert len(model.roi_heads.box_pooler.level_poolers) == 5


# --- 9. the small ones --------------------------------------------------------------------------------

def test_9_bbox_bias_and_giou_in_strides():
    """
    Official centernet_head.py: bbox_pred bias 8 (strides). IOULoss("giou") in strides with
    (I + 1) / (U + 1): pred (1, 1, 1, 1) vs target (2, 2, 2, 2): I = 4, U = 16, IoU = 5/17, the
    enclosing box is the target -> loss 1 - 5/17 = 0.70588; pred (1, 1, 1, 1) vs (0, 0, 2, 2): I = 1,
    U = 4 + 4 - 1 = 7 -> IoU 2/8, enclosing 3 x 3 = 9 -> GIoU .25 - 2/9 = 0.02778 -> loss 0.97222.
    Break tried: the unsmoothed IoU (I / U) -> fails.
    """
    net = _net()
    assert net.head.bbox_pred.bias.tolist() == [8.0] * 4
    loss = ltrb_giou_loss(torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1]]), torch.tensor([[2.0, 2, 2, 2], [0, 0, 2, 2]]))
    assert loss.tolist() == pytest.approx([1 - 5 / 17, 1 - (0.25 - 2 / 9)], rel=1e-5)
