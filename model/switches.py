"""
The steps of the report's challenge model (Table 3) as named config switches.

A switch edits a detectron2 config that already has its scale and schedule, so each step keeps the
scale's proportions (``larger_input`` raises whatever input size the scale uses by the report's
ratio). Study rows list them cumulatively (``switches: [mask, sched2x, ...]``), in this order:

- ``mask``: a Mask R-CNN mask head (detectron2's ``MaskRCNNConvUpsampleHead``) on the cascade.
- ``sched2x``: the schedule doubled (iterations and LR steps).
- ``fpn_p2p6``: FPN P2-P6 instead of P3-P7 for proposals and RoI heads.
- ``x101``: ResNeXt-101 32x8d backbone.
- ``dcn``: modulated deformable convolutions (DCNv2, torchvision) in res3-res5.
- ``pointrend``: the PointRend mask head (needs ``mask``).
- ``larger_input``: input sizes x1.2 (report: 800x1333 -> 960x1600, following AutoAssign).
- ``tta``: test-time augmentation, scales 400-1200 step 100 (relative to 800) and horizontal flip.
"""
from typing import Callable, Dict, Iterable

from detectron2.config import CfgNode

SWITCHES: Dict[str, Callable[[CfgNode], None]] = {}
# Switches that change only inference: a run with them evaluates the weights of the same run without
# them (the report's "+ test-aug" row is the "+ larger input" model, tested with augmentation).
EVAL_ONLY = ("tta",)
COCO_TEST_SIZE = 800  # the report's test size, to which TTA's 400-1200 scales are relative


def _switch(name: str):
    def deco(fn):
        SWITCHES[name] = fn
        return fn
    return deco


@_switch("mask")
def _mask(cfg):
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14


@_switch("sched2x")
def _sched2x(cfg):
    cfg.SOLVER.MAX_ITER *= 2
    cfg.SOLVER.STEPS = tuple(2 * s for s in cfg.SOLVER.STEPS)


@_switch("fpn_p2p6")
def _fpn_p2p6(cfg):
    cfg.MODEL.BACKBONE.NAME = "build_p2p6_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.CENTERNET.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.CENTERNET.FPN_STRIDES = [4, 8, 16, 32, 64]
    # One level finer everywhere: sizes of interest and anchors halve.
    cfg.MODEL.CENTERNET.SOI = [[lo / 2, hi / 2 if hi < 100000 else hi] for lo, hi in cfg.MODEL.CENTERNET.SOI]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[s / 2 for s in sizes] for sizes in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.POINT_HEAD.IN_FEATURES = ["p2"]
    cfg.MODEL.POINT_HEAD.FEATURE_STRIDES = [4]


@_switch("x101")
def _x101(cfg):
    cfg.MODEL.RESNETS.DEPTH = 101
    cfg.MODEL.RESNETS.NUM_GROUPS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    if cfg.MODEL.WEIGHTS:  # ImageNet-initialised (paper scale): FAIR's X101 weights and their pixel std
        cfg.MODEL.WEIGHTS = "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"
        cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]


@_switch("dcn")
def _dcn(cfg):
    if cfg.MODEL.RESNETS.DEPTH < 50:
        raise ValueError(f"switch 'dcn' needs a bottleneck ResNet (depth >= 50; this config has "
                         f"{cfg.MODEL.RESNETS.DEPTH}): put 'x101' before it, as Table 3 does")
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, True, True]
    cfg.MODEL.RESNETS.DEFORM_MODULATED = True


@_switch("pointrend")
def _pointrend(cfg):
    if not cfg.MODEL.MASK_ON:
        raise ValueError("switch 'pointrend' needs 'mask' before it (PointRend is a mask head)")
    cfg.MODEL.ROI_MASK_HEAD.NAME = "CN2PointRendMaskHead"


@_switch("larger_input")
def _larger_input(cfg):
    ratio = 960 / 800
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(round(s * ratio) for s in cfg.INPUT.MIN_SIZE_TRAIN)
    cfg.INPUT.MAX_SIZE_TRAIN = round(cfg.INPUT.MAX_SIZE_TRAIN * ratio)
    cfg.INPUT.MIN_SIZE_TEST = round(cfg.INPUT.MIN_SIZE_TEST * ratio)
    cfg.INPUT.MAX_SIZE_TEST = round(cfg.INPUT.MAX_SIZE_TEST * ratio)


@_switch("tta")
def _tta(cfg):
    factor = cfg.INPUT.MIN_SIZE_TEST / COCO_TEST_SIZE
    cfg.TEST.AUG.ENABLED = True
    cfg.TEST.AUG.MIN_SIZES = tuple(round(s * factor) for s in range(400, 1201, 100))
    cfg.TEST.AUG.MAX_SIZE = round(cfg.INPUT.MAX_SIZE_TEST * 1200 / COCO_TEST_SIZE)
    cfg.TEST.AUG.FLIP = True


def apply_switches(cfg: CfgNode, names: Iterable[str]) -> CfgNode:
    """Apply the named switches in order (``cfg`` must not be frozen)."""
    for name in names:
        if name not in SWITCHES:
            raise ValueError(f"switch {name!r}; allowed: {', '.join(SWITCHES)}")
        SWITCHES[name](cfg)
    return cfg
