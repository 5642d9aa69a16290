"""The installed stack works end to end: detectron2's own CascadeRCNN trains and infers on CPU,
and the official LVIS evaluator returns APs that can be checked by hand."""
import copy
import json

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage


def _cascade_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    # Keep the step cheap on 2 cores; the architecture is unchanged.
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    return cfg


def _batch(n=2, size=128):
    batch = []
    for i in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 70.0, 80.0], [60.0, 50.0, 120.0, 110.0]]))
        inst.gt_classes = torch.tensor([i % 3, 2])
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8).float()
        batch.append({"image": image, "height": size, "width": size, "instances": inst})
    return batch


def test_cascade_rcnn_trains_one_step_and_infers_on_cpu():
    cfg = _cascade_cfg()
    model = build_model(cfg)
    assert type(model.roi_heads).__name__ == "CascadeROIHeads"
    model.train()
    with EventStorage(0):  # the RPN and cascade stages log to it, as under detectron2's trainer
        losses = model(_batch())
    assert {"loss_rpn_cls", "loss_cls_stage2", "loss_box_reg_stage2"} <= set(losses)
    for name, value in losses.items():
        assert torch.isfinite(value), name
    sum(losses.values()).backward()
    # detectron2's default FREEZE_AT=2 freezes the stem and res2; res3 is the first trained stage.
    grad = model.backbone.bottom_up.res3[0].conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        (out,) = model(_batch(n=1))
    inst = out["instances"]
    assert isinstance(inst, Instances) and inst.image_size == (128, 128)
    assert len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
    if len(inst):
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()


# --- LVIS evaluation on a tiny dataset written here -------------------------------------------

def _lvis_gt():
    cats = [
        {"id": 1, "name": "a", "synset": "a.n.01", "frequency": "f", "image_count": 2, "instance_count": 2},
        {"id": 2, "name": "b", "synset": "b.n.01", "frequency": "r", "image_count": 1, "instance_count": 1},
    ]
    images = [
        {"id": 1, "width": 100, "height": 100, "neg_category_ids": [2], "not_exhaustive_category_ids": [],
         "coco_url": "x/1.png"},
        {"id": 2, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": [],
         "coco_url": "x/2.png"},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 40, 20], "area": 800},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [5, 60, 30, 30], "area": 900},
    ]
    for a in anns:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def _lvis_ap(tmp_path, detections):
    from lvis import LVIS, LVISEval, LVISResults

    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(_lvis_gt()))
    gt = LVIS(str(gt_path))
    res = LVISResults(gt, copy.deepcopy(detections))
    ev = LVISEval(gt, res, iou_type="bbox")
    ev.run()
    return ev.get_results()


def _as_detections(gt, score=1.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": score} for a in gt["annotations"]]


def test_lvis_eval_perfect_detections_give_ap_1(tmp_path):
    results = _lvis_ap(tmp_path, _as_detections(_lvis_gt()))
    assert results["AP"] == pytest.approx(1.0)
    assert results["APf"] == pytest.approx(1.0) and results["APr"] == pytest.approx(1.0)


def test_lvis_eval_ap_matches_hand_computation(tmp_path):
    # Category 1 has 2 GT boxes. Ranked detections: a false positive (0.9), then the two hits
    # (0.8, 0.7). Precision at recall 0.5 and 1.0 is 1/2 and 2/3; interpolated precision is the
    # running max from the right: 2/3 on every recall point -> AP(cat 1) = 2/3.
    # Category 2 is found perfectly -> AP 1. A detection of category 2 on image 1 (a verified
    # negative there) is a false positive scored below the hit, so it does not change AP(cat 2).
    gt = _lvis_gt()
    dets = _as_detections(gt, score=0.8)
    dets[1]["score"] = 0.7
    dets.append({"image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "score": 0.9})
    dets.append({"image_id": 1, "category_id": 2, "bbox": [60, 60, 20, 20], "score": 0.1})
    results = _lvis_ap(tmp_path, dets)
    assert results["APf"] == pytest.approx(2 / 3, abs=1e-6)
    assert results["APr"] == pytest.approx(1.0)
    assert results["AP"] == pytest.approx((2 / 3 + 1.0) / 2, abs=1e-6)
