"""Config keys this project adds to detectron2's defaults. Every new key is commented here."""
from detectron2.config import CfgNode as CN


def add_centernet2_config(cfg: CN) -> CN:
    """Add the CenterNet / CenterNet2 keys to ``cfg`` (in place) and return it."""
    _C = cfg

    # ---- CenterNet head: as the proposal generator of CenterNet2 or as a one-stage detector ------
    _C.MODEL.CENTERNET = CN()
    # Heatmap channels when class-specific: one per category (set from the dataset).
    _C.MODEL.CENTERNET.NUM_CLASSES = 80
    # One category-agnostic heatmap, like an RPN (CenterNet2-agnostic; official WITH_AGN_HM with
    # ONLY_PROPOSAL); False: one per category, from a classification tower.
    _C.MODEL.CENTERNET.AGNOSTIC = False
    # Class-specific heatmaps (AGNOSTIC False) plus the one-channel agnostic heatmap on the box
    # tower, trained on the categories' maximum; a proposal's score is sqrt(class p * agnostic p).
    # This is the official code's class-specific proposal path (AS_PROPOSAL with the WITH_AGN_HM that
    # its Base-CenterNet2.yaml sets); False: a proposal's score is its class heatmap's p alone (the
    # default: with it CenterNet2-specific scored lower, reports/reference/experiments.md).
    _C.MODEL.CENTERNET.WITH_AGN_HM = False
    # True: output proposals for RoI heads (CenterNet2); False: output final detections (CenterNet-FPN).
    _C.MODEL.CENTERNET.ONLY_PROPOSAL = False
    # FPN levels the head runs on, and their strides.
    _C.MODEL.CENTERNET.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    _C.MODEL.CENTERNET.FPN_STRIDES = [8, 16, 32, 64, 128]
    # Sizes of interest: an object of half-diagonal sqrt(w^2 + h^2) / 2 (official
    # ``assign_fpn_level``) trains every level whose [lo, hi] contains it (ranges overlap, so a
    # borderline object trains two levels). In pixels of the resized image.
    _C.MODEL.CENTERNET.SOI = [[0, 80], [64, 160], [128, 320], [256, 640], [512, 100000]]
    # Convolutions in the classification and box towers, shared across levels. The agnostic head
    # (AGNOSTIC) has no classification tower: its heatmap reads the box tower (official ONLY_PROPOSAL).
    _C.MODEL.CENTERNET.NUM_CLS_CONVS = 4
    _C.MODEL.CENTERNET.NUM_BOX_CONVS = 4
    # Normalisation in the towers ("GN" as in CenterNet-FPN, "" for none).
    _C.MODEL.CENTERNET.NORM = "GN"
    # Initial heatmap probability, sets the output bias (focal-loss practice).
    _C.MODEL.CENTERNET.PRIOR_PROB = 0.01
    # Initial bias of the box distances, in strides (official: 8).
    _C.MODEL.CENTERNET.BBOX_PRED_BIAS = 8.0
    # Heatmap focal loss, official names and defaults (centernet/config.py): HM_FOCAL_ALPHA balances
    # positives (x alpha) against negatives (x (1 - alpha)), -1: no balance; LOSS_GAMMA is the focal
    # exponent (CenterNet eq. 1's alpha); HM_FOCAL_BETA the penalty reduction near centres.
    _C.MODEL.CENTERNET.HM_FOCAL_ALPHA = 0.25
    _C.MODEL.CENTERNET.LOSS_GAMMA = 2.0
    _C.MODEL.CENTERNET.HM_FOCAL_BETA = 4.0
    # Heatmap probabilities are clamped to [this, 1 - this] in the loss.
    _C.MODEL.CENTERNET.SIGMOID_CLAMP = 1e-4
    # Negatives whose probability is >= this get no loss (tolerates unlabelled objects); -1: off.
    # Official default -1, 0.85 in the CenterNet2 configs.
    _C.MODEL.CENTERNET.IGNORE_HIGH_FP = -1.0
    # Gaussian heatmap targets exp(-d^2 / r^2), r^2 = max(2 delta^2 w h, MIN_RADIUS^2) with
    # delta = (1 - HM_MIN_OVERLAP) / (1 + HM_MIN_OVERLAP) (0.2 / 1.8); MIN_RADIUS in pixels.
    _C.MODEL.CENTERNET.HM_MIN_OVERLAP = 0.8
    _C.MODEL.CENTERNET.MIN_RADIUS = 4.0
    # Heatmap loss: positive and negative sums times these, over the number of positives
    # (official POS_WEIGHT / NEG_WEIGHT: 1 in CenterNet-FPN, 0.5 in CenterNet2 - the report's
    # "CenterNet loss weights 0.5"). HM_WEIGHT: one more factor on both (not in the official code: 1).
    _C.MODEL.CENTERNET.POS_WEIGHT = 1.0
    _C.MODEL.CENTERNET.NEG_WEIGHT = 1.0
    _C.MODEL.CENTERNET.HM_WEIGHT = 1.0
    # Weight of the GIoU box loss (official: 2 in CenterNet-FPN, 1 in CenterNet2; the report's
    # "loss weights 0.5" are the heatmap's only).
    _C.MODEL.CENTERNET.REG_WEIGHT = 2.0
    # True: every regression location weighs 1 and the loss is averaged over locations (official
    # NOT_NORM_REG); False: weighted by the heatmap target there.
    _C.MODEL.CENTERNET.NOT_NORM_REG = True
    # Official MORE_POS: besides the centre cells, those of the 3x3 cells around each centre whose
    # GIoU loss is below min(the MORE_POS_TOPK-th smallest, MORE_POS_THRESH) are heatmap positives.
    _C.MODEL.CENTERNET.MORE_POS = False
    _C.MODEL.CENTERNET.MORE_POS_THRESH = 0.2
    _C.MODEL.CENTERNET.MORE_POS_TOPK = 9
    # Candidates with heatmap probability <= this are dropped before top-k (official INFERENCE_TH).
    _C.MODEL.CENTERNET.SCORE_THRESH = 0.05
    # Per-level top-k before NMS, and the number kept after NMS over all levels, train / test.
    _C.MODEL.CENTERNET.PRE_NMS_TOPK_TRAIN = 1000
    _C.MODEL.CENTERNET.PRE_NMS_TOPK_TEST = 1000
    _C.MODEL.CENTERNET.POST_NMS_TOPK_TRAIN = 100
    _C.MODEL.CENTERNET.POST_NMS_TOPK_TEST = 100
    # IoU threshold of the NMS over candidates (official NMS_TH_*; 0.9 for CenterNet2 proposals).
    _C.MODEL.CENTERNET.NMS_THRESH_TRAIN = 0.6
    _C.MODEL.CENTERNET.NMS_THRESH_TEST = 0.6
    # True: the proposal NMS runs over all candidates whatever their category, so a class-specific
    # CenterNet2 proposes one box per place instead of one per (place, category). Not in the official
    # code (its ml_nms is per category, so a class-specific CenterNet2's top-k proposals are copies
    # of a few boxes under several categories): measured +2.6 AP for CenterNet2-specific at the
    # synthetic scale, from training on distinct proposals (reports/reference/experiments.md sec.
    # 3-4). Proposals only: no effect on agnostic heads, nor on CenterNet-FPN's final detections,
    # whose NMS stays per category as official (so one train.opts setting can serve every detector).
    # Off here, as the official code; params.yaml's default train.opts turns it on for the pipeline.
    _C.MODEL.CENTERNET.NMS_CLASS_AGNOSTIC = False

    # ---- Cascade RoI heads ------------------------------------------------------------------------
    # At test, final score = sqrt(proposal score * classification score) (report sec. 4).
    _C.MODEL.ROI_HEADS.MULT_PROPOSAL_SCORE = False
    # Classification loss of the box head: softmax | sigmoid | eql | fedloss (model/losses.py).
    _C.MODEL.ROI_BOX_HEAD.CLS_LOSS = "softmax"
    # cat_info.json of the training set (per-category training image counts, written by the
    # prepare stage): needed by eql and fedloss.
    _C.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH = ""
    # Initial class probability of the sigmoid losses; sets the class logits' bias (focal-loss practice).
    _C.MODEL.ROI_BOX_HEAD.PRIOR_PROB = 0.01
    # fedloss: |S|, the classes that get a loss per iteration (report sec. 3: 50 on LVIS v1). As in
    # the official get_fed_loss_inds, the background index counts when background RoIs exist, so
    # S then holds |S| - 1 categories (49 on LVIS). -1: round(C * 50 / 1203), i.e. 50 on LVIS v1
    # and the same fraction of C elsewhere. The pipeline sets it from params.yaml's
    # train.fed_loss_num_classes: on the synthetic set 30 of 40, since the scaled 2 leaves rare
    # categories a tenth of LVIS's negatives per positive (pipeline/runs/spec.py).
    _C.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES = -1
    # fedloss: negatives are drawn with probability proportional to image_count ** this (report: 0.5).
    _C.MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER = 0.5
    # eql: negatives of foreground RoIs are kept only for the N most frequent categories by
    # training image count (and any tied with the N-th). N = 200 on LVIS v1 as the official
    # EQL_FREQ_CAT; the report's text says "ignore the 900 tail categories" (303 kept), the
    # authors' LVIS v0.5 setting: the official code wins. -1: round(C * 200 / 1203), the same
    # fraction of C (7 of the synthetic set's 40, no ties there).
    _C.MODEL.ROI_BOX_HEAD.EQL_KEEP_TOPK = -1

    # ---- PointRend mask head (model/point_rend.py; Table 3 "+ PointRend") ----------------------
    _C.MODEL.POINT_HEAD = CN()
    # FPN maps the point head samples fine-grained features from, and their strides (the finest level).
    _C.MODEL.POINT_HEAD.IN_FEATURES = ["p3"]
    _C.MODEL.POINT_HEAD.FEATURE_STRIDES = [8]
    # The point MLP: width and number of hidden layers.
    _C.MODEL.POINT_HEAD.FC_DIM = 256
    _C.MODEL.POINT_HEAD.NUM_FC = 3
    # Training points per RoI (N), oversampling factor (k) and the uncertain share (beta) (paper sec. 3.1).
    _C.MODEL.POINT_HEAD.TRAIN_NUM_POINTS = 196
    _C.MODEL.POINT_HEAD.OVERSAMPLE_RATIO = 3.0
    _C.MODEL.POINT_HEAD.IMPORTANCE_RATIO = 0.75
    # Inference: 2x upsampling steps from the coarse 28x28 mask, and cells re-predicted per step.
    _C.MODEL.POINT_HEAD.SUBDIVISION_STEPS = 2
    _C.MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS = 784
    # Weight of the point loss beside the coarse mask loss.
    _C.MODEL.POINT_HEAD.LOSS_WEIGHT = 1.0
    return cfg
