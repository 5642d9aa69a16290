"""
The four Table 1 detectors by name, and the scales they run at.

A scale is a set of config overrides applied on top of a detector's yaml, so each detector has
exactly one config file:

- ``paper``: the yaml as written — the report's settings (ImageNet-initialised R50, 1x schedule).
- ``synthetic``: the demo on the built-in dataset, on 2 CPU cores: 128-192 px images, ResNet-18
  started from the pretrain stage's backbone (``pipeline/runs/pretrain.py``, the stand-in for ImageNet;
  stem and res2 frozen as the report's), 64 FPN channels, 128 training proposals, 32 RoIs per image
  (pooled with 2x2 samples per bin), FC 256. The strides do not shrink with the images, so the sizes
  that must match them do not either: CenterNet's sizes of interest, minimum Gaussian radius and
  initial box distances stay the official ones, the RPN's anchors shrink x0.4 (see ``_sizes``);
  test-time proposal counts stay the report's (CascadeRCNN 1000, CenterNet2 256), so the runtime
  comparison is the report's. Each detector keeps its yaml's learning rate and warm-up factor
  (CenterNet-FPN 0.01, the others 0.02), with the scale's shorter warm-up.
- ``smoke``: the tests: 64-96 px images (anchors x0.2) and the smallest widths, from scratch;
  seconds per run.

Where the time goes at the synthetic scale on a CPU (``benchmarks/train_speed.py``, torch.profiler):
the ResNet's convolutions and RoIAlign's backward (torchvision's CPU kernel is ~6x its forward and
linear in RoIs and samples per bin). Hence fewer RoIs, a fixed 2x2 sampling (adaptive sampling pools
early, image-sized proposals with up to 6x6 samples per bin) and the frozen stem: 1.07 -> 0.79 s per
iteration at batch 4 on 2 threads, 2.57 s before (measured 2026-11-30).

detectron2's ImageNet-oriented defaults (frozen BN, pixel std 1) give degenerate boxes without
ImageNet weights, so these scales use trainable BN in the ResNet (res3-res5 at the synthetic scale,
all of it at smoke), GN in the FPN and heads, and a real pixel std, and clip gradients.
"""
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
from detectron2.config import CfgNode, get_cfg

from . import backbone, centernet, meta_arch, roi_heads  # noqa: F401  (registers what the configs name)
from .config import add_centernet2_config
from .switches import apply_switches

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The training recipe's version, part of every run's identity (pipeline/runs/spec.py): the run store
# keys runs by their params, so without it a change to model/, a preset or the training code that
# changes what the same params train would reuse runs trained before it. Bump it with such a change
# (2: repeat threshold per dataset, box bias and anchors scaled, pretrain without frozen layers;
# 3: CenterNet's sizes of interest, minimum radius and box bias back to the official ones;
# 4: FedLoss's |S| on the synthetic set 30 of 40 instead of the scaled 2, pipeline/runs/spec.py;
# 5: the synthetic set's smallest object 16 px instead of 10, data.synthetic.min_object_size -- a
# dataset change, bumped because a params.yaml from before the key names the same data as before).
RECIPE = 5

# params.yaml's detector names -> config files (Table 1 rows).
DETECTORS = {
    "centernet": "CenterNet-FPN.yaml",
    "cascadercnn": "CascadeRCNN.yaml",
    "centernet2_specific": "CenterNet2-specific.yaml",
    "centernet2_agnostic": "CenterNet2-agnostic.yaml",
}

_ANCHOR_BASE = [32, 64, 128, 256, 512]


def _sizes(anchor_factor: float) -> Dict[str, object]:
    """
    The overrides of the sizes in pixels for images smaller than COCO's: the RPN's anchors, shrunk
    by ``anchor_factor``. CenterNet's sizes of interest, minimum Gaussian radius and initial box
    distances are not overridden: they keep model/config.py's official values.

    What these sizes must match is the strides, which do not shrink with the images. CenterNet's
    sizes of interest put an object on the levels where it spans a few strides (P3's 0-80 px
    half-diagonal: 0-10 strides), and its Gaussian radius (at least 4 px, half a P3 stride) and box
    bias (8 strides) are in the same units. The official code keeps them for smaller images too
    (``configs/CenterNet2_DLA-BiFPN-P5_640_16x.yaml``: 608-640 px, default SOI and radius). Scaled
    with the images (x0.2: P3's objects 0-16 px, at most 2 strides on every level; a radius of 0.1
    stride, so a lone-cell Gaussian) the one-stage detector could not place its boxes: at 800
    iterations, seed 0, all 200 val images, box AP CenterNet-FPN 10.33 -> 16.94, CenterNet2-agnostic
    19.32 -> 20.64, CenterNet2-specific 19.47 -> 21.37 with the official sizes (2026-12-01;
    CenterNet-FPN 16.75 with the box bias alone still scaled, 1.6). At 160 px, 989 of the 1010
    validation boxes fall in P3's range and 95 in P4's (a box may train both).

    The anchors shrink by ``anchor_factor``, not the images' 0.2: anchors of 0.8 strides (32 px x
    0.2 at stride 8) leave most objects without a good anchor. The synthetic objects are 10 px to
    0.8 x the image side, relatively larger than COCO's; on the 818 validation boxes at the 160-px
    test size, the best anchor's IoU is >= 0.5 for 41 % of them at x0.2, 79 % at x0.3, 91 % at x0.4,
    90 % at x0.5 and 64 % at x1 (>= 0.7: 7, 17, 27, 35, 52 %). At x0.2 the RPN's 1000 proposals
    covered 77 of 122 boxes at IoU 0.5 (30 images) and CascadeRCNN reached box AP 1.4 after 300
    iterations; at x0.4, 5.5 (all 200 val images, 2026-11-30).
    """
    anchors = [[round(b * anchor_factor * 2 ** (k / 3), 2) for k in range(3)] for b in _ANCHOR_BASE]
    return {"MODEL.ANCHOR_GENERATOR.SIZES": anchors}


_FROM_SCRATCH = {
    "MODEL.WEIGHTS": "",
    "MODEL.PIXEL_STD": [57.375, 57.120, 58.395],
    "MODEL.RESNETS.NORM": "BN",
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.FPN.NORM": "GN",
    "MODEL.RESNETS.DEPTH": 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
    "DATALOADER.NUM_WORKERS": 1,
    # From scratch at LR 0.02, single bad batches spike the loss (seen: NaN at iteration 26 of a
    # smoke run); clipping each parameter's gradient norm at 1 keeps training smooth.
    "SOLVER.CLIP_GRADIENTS.ENABLED": True,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "norm",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 1.0,
}

SCALES: Dict[str, Dict[str, object]] = {
    "paper": {},
    "synthetic": {
        **_FROM_SCRATCH,
        **_sizes(anchor_factor=0.4),
        # The runs start from the pretrain stage's backbone (MODEL.WEIGHTS is set by the pipeline:
        # pipeline/runs/spec.py); like the report's ImageNet-initialised runs, stem and res2 stay frozen.
        "MODEL.BACKBONE.FREEZE_AT": 2,
        "MODEL.FPN.OUT_CHANNELS": 64,
        "MODEL.ROI_BOX_HEAD.FC_DIM": 256,
        "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 2,
        # The mask heads (switches mask, pointrend) run on up to 100 detections an image: at 256
        # channels a 160-px inference took 445 ms instead of 91, at 128 it takes 267
        # (benchmarks/latency.py --table3, 2 CPU threads).
        "MODEL.ROI_MASK_HEAD.CONV_DIM": 128,
        "MODEL.POINT_HEAD.FC_DIM": 128,
        # A synthetic image holds about 5 objects: 32 RoIs (8 positive) per image are plenty.
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 1000,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 128,
        "MODEL.CENTERNET.PRE_NMS_TOPK_TRAIN": 1000,
        "MODEL.CENTERNET.POST_NMS_TOPK_TRAIN": 128,
        "INPUT.MIN_SIZE_TRAIN": (128, 144, 160, 176, 192),
        "INPUT.MAX_SIZE_TRAIN": 320,
        "INPUT.MIN_SIZE_TEST": 160,
        "INPUT.MAX_SIZE_TEST": 320,
        "SOLVER.IMS_PER_BATCH": 8,
        "SOLVER.MAX_ITER": 3000,
        "SOLVER.STEPS": (2000, 2600),
        "SOLVER.WARMUP_ITERS": 200,
        "SOLVER.CHECKPOINT_PERIOD": 500,
        "TEST.DETECTIONS_PER_IMAGE": 100,
    },
    "smoke": {
        **_FROM_SCRATCH,
        **_sizes(anchor_factor=0.2),
        "MODEL.FPN.OUT_CHANNELS": 64,
        "MODEL.ROI_BOX_HEAD.FC_DIM": 128,
        "MODEL.ROI_MASK_HEAD.CONV_DIM": 64,
        "MODEL.POINT_HEAD.FC_DIM": 64,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64,
        "MODEL.CENTERNET.NUM_CLS_CONVS": 2,
        "MODEL.CENTERNET.NUM_BOX_CONVS": 2,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 500,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 128,
        "MODEL.CENTERNET.PRE_NMS_TOPK_TRAIN": 500,
        "MODEL.CENTERNET.POST_NMS_TOPK_TRAIN": 128,
        "INPUT.MIN_SIZE_TRAIN": (64, 80, 96),
        "INPUT.MAX_SIZE_TRAIN": 160,
        "INPUT.MIN_SIZE_TEST": 96,
        "INPUT.MAX_SIZE_TEST": 160,
        "SOLVER.IMS_PER_BATCH": 4,
        "SOLVER.MAX_ITER": 20,
        "SOLVER.STEPS": (15,),
        "SOLVER.WARMUP_ITERS": 5,
        "SOLVER.CHECKPOINT_PERIOD": 10,
        "TEST.DETECTIONS_PER_IMAGE": 100,
    },
}


def get_model_cfg(detector: str, scale: str = "paper", num_classes: Optional[int] = None,
                  overrides: Iterable = (), switches: Iterable[str] = ()) -> CfgNode:
    """
    The detectron2 config of a Table 1 detector at a scale.

    Args:
        detector: a key of ``DETECTORS``; scale: a key of ``SCALES``.
        num_classes: categories of the dataset (sets the RoI heads' and the heatmaps').
        overrides: flat [KEY, VALUE, ...] applied last.
        switches: Table 3 steps (``model/switches.py``), applied before ``overrides``.
    ``MODEL.DEVICE`` is "cuda" when a GPU is visible, else "cpu" (an override can still set it).
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector={detector!r}; allowed: {', '.join(DETECTORS)}")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; allowed: {', '.join(SCALES)}")
    cfg = add_centernet2_config(get_cfg())
    cfg.merge_from_file(str(CONFIG_DIR / DETECTORS[detector]), allow_unsafe=False)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.merge_from_list([x for kv in SCALES[scale].items() for x in kv])
    if num_classes is not None:
        cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", num_classes,
                             "MODEL.CENTERNET.NUM_CLASSES", num_classes])
    apply_switches(cfg, switches)
    cfg.merge_from_list(list(overrides))
    return cfg


def set_test_limits(cfg: CfgNode, score_thresh: Optional[float] = None, per_image: Optional[int] = None) -> CfgNode:
    """
    Set, in ``cfg`` (unfrozen), the score threshold and the number per image of a detector's final
    detections; None keeps the config's value. Returns ``cfg``.

    The two-stage detectors (CascadeRCNN, CenterNet2) end in their RoI heads:
    ``ROI_HEADS.SCORE_THRESH_TEST`` (applied to CenterNet2's sqrt(proposal x classification) score)
    and ``TEST.DETECTIONS_PER_IMAGE``; CenterNet2's proposal settings stay as trained. CenterNet-FPN's
    final detections are its heatmap peaks: ``CENTERNET.SCORE_THRESH`` and ``POST_NMS_TOPK_TEST``.
    """
    one_stage = cfg.MODEL.META_ARCHITECTURE == "CenterNetDetector"
    if score_thresh is not None:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_thresh)
        if one_stage:
            cfg.MODEL.CENTERNET.SCORE_THRESH = float(score_thresh)
    if per_image is not None:
        cfg.TEST.DETECTIONS_PER_IMAGE = int(per_image)
        if one_stage:
            cfg.MODEL.CENTERNET.POST_NMS_TOPK_TEST = int(per_image)
    return cfg
