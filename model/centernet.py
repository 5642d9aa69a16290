"""
CenterNet on FPN levels (Zhou, Wang, Krähenbühl, "Objects as Points", 2019), the first stage of
CenterNet2 (report section 2) and, alone, the one-stage CenterNet-FPN of Table 1.

An object is a peak of a Gaussian "center heatmap" (one channel per category, or one shared
channel when category-agnostic); at each location a box is regressed as distances (left, top,
right, bottom) to its sides, in units of the level's stride. Objects are assigned to FPN levels by
size. Training: the penalty-reduced focal loss on the heatmaps (CenterNet eq. 1, with the
official code's alpha balancing) and a GIoU loss on the boxes at the 3x3 cells around each centre.
Inference: per-level top-k of the heatmap scores, boxes decoded at those locations, NMS over all
levels.

Everything here follows the official implementation (github.com/xingyizhou/CenterNet2,
``centernet/modeling/dense_heads/centernet.py`` and ``centernet_head.py``, "the official code"
below), which produced the report's numbers; where the report's text summarises it differently,
the code is followed and the comment says so.

Registered as ``PROPOSAL_GENERATOR`` "CenterNet": with ``MODEL.CENTERNET.ONLY_PROPOSAL`` it returns
proposals (``proposal_boxes``, ``objectness_logits`` = logit of the proposal score) for RoI heads;
without, it returns detections (``pred_boxes``, ``scores``, ``pred_classes``), which is what the
``CenterNetDetector`` meta-architecture outputs.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, batched_nms, get_norm
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from torch import nn

__all__ = ["CenterNet", "CenterNetHead", "heatmap_focal_loss", "ltrb_giou_loss", "assign_levels",
           "level_locations"]

INF = float("inf")


# --- the pieces, each testable on its own -------------------------------------------------------

def level_locations(height: int, width: int, stride: int, device=None) -> torch.Tensor:
    """Image coordinates of the cell centres of an (height, width) feature map: (H*W, 2) as (x, y)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def assign_levels(boxes: torch.Tensor, soi: torch.Tensor) -> torch.Tensor:
    """
    Which levels an object trains: its half-diagonal sqrt(w^2 + h^2) / 2 against each level's
    [lo, hi] size of interest, inclusive (official ``assign_fpn_level``; ranges overlap, so a
    borderline object trains two levels).

    Args:
        boxes: (G, 4) XYXY; soi: (L, 2).
    Returns:
        (L, G) bool.
    """
    wh = boxes[:, 2:] - boxes[:, :2]
    crit = (wh ** 2).sum(dim=1).sqrt() / 2
    return (crit[None, :] >= soi[:, :1]) & (crit[None, :] <= soi[:, 1:])


def heatmap_focal_loss(logits: torch.Tensor, targets: torch.Tensor, pos_index: torch.Tensor,
                       alpha: float = 0.25, beta: float = 4.0, gamma: float = 2.0,
                       sigmoid_clamp: float = 1e-4, ignore_high_fp: float = -1.0
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Penalty-reduced pixel-wise focal loss, CenterNet eq. 1, as the official code computes it
    (``heatmap_focal_loss.py``), unnormalised:

        pos = -alpha       * sum_{positives}  (1 - p)^gamma log(p)
        neg = -(1 - alpha) * sum_{all cells}  (1 - Y)^beta p^gamma log(1 - p) [p < ignore_high_fp]

    with p = sigmoid(logits) clamped to [sigmoid_clamp, 1 - sigmoid_clamp]. Cells with Y = 1 get
    no negative loss, so a centre that is not a listed positive (an object's centre on a level it
    is not assigned to) is ignored. ``alpha`` < 0 disables the balance (both factors 1);
    ``ignore_high_fp`` <= 0 keeps every negative.

    Args:
        logits, targets: (P,) flattened, the same layout; targets Y in [0, 1].
        pos_index: (N,) indices into the flattened logits of the positives (repeats count twice).
    Returns:
        (pos, neg) sums, each >= 0.
    """
    p = logits.sigmoid().clamp(min=sigmoid_clamp, max=1 - sigmoid_clamp)
    p_pos = p[pos_index]
    pos = -(torch.log(p_pos) * (1 - p_pos) ** gamma).sum()
    neg_terms = torch.log(1 - p) * p ** gamma * (1 - targets) ** beta
    if ignore_high_fp > 0:
        neg_terms = neg_terms * (p < ignore_high_fp).to(neg_terms.dtype)
    neg = -neg_terms.sum()
    if alpha >= 0:
        pos, neg = alpha * pos, (1 - alpha) * neg
    return pos, neg


def ltrb_giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """
    1 - GIoU of boxes given as distances (l, t, r, b) >= 0 from the same point, as the official
    ``IOULoss("giou")``: the IoU is smoothed, (I + 1) / (U + 1), and the distances are in strides,
    so the +1 is one stride squared.

    Args:
        pred, target: (n, 4).
    Returns:
        (n,) losses.
    """
    pl, pt, pr, pb = pred.unbind(dim=1)
    tl, tt, tr, tb = target.unbind(dim=1)
    pred_area = (pl + pr) * (pt + pb)
    target_area = (tl + tr) * (tt + tb)
    inter = (torch.min(pl, tl) + torch.min(pr, tr)) * (torch.min(pt, tt) + torch.min(pb, tb))
    enclosing = (torch.max(pl, tl) + torch.max(pr, tr)) * (torch.max(pt, tt) + torch.max(pb, tb))
    union = pred_area + target_area - inter
    iou = (inter + 1.0) / (union + 1.0)
    giou = iou - (enclosing - union) / enclosing
    return 1 - giou


class _Scale(nn.Module):
    """A learnable scalar per FPN level for the box branch (as in FCOS / CenterNet2)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(init))

    def forward(self, x):
        return x * self.scale


class CenterNetHead(nn.Module):
    """
    The head shared by all levels (official ``CenterNetHead``). Class-specific: a classification
    tower ending in the per-category heatmap logits (``cls_logits``) and a box tower ending in the
    ltrb distances (``bbox_pred``). Category-agnostic (CenterNet2's ONLY_PROPOSAL mode): no
    classification tower at all; the one-channel heatmap (``agn_hm``) reads the box tower too.
    Class-specific with ``with_agn_hm``: both, the per-category heatmap and ``agn_hm`` on the box
    tower (official CenterNetHead with WITH_AGN_HM and without ONLY_PROPOSAL).
    At R50 / 256 channels the agnostic head has 2,373,898 parameters, as the official one.
    """

    @configurable
    def __init__(self, *, in_channels: int, num_levels: int, num_classes: int, agnostic: bool,
                 num_cls_convs: int, num_box_convs: int, norm: str, prior_prob: float,
                 bbox_bias: float, with_agn_hm: bool = False):
        super().__init__()
        self.agnostic = agnostic
        self.with_agn_hm = with_agn_hm and not agnostic  # agnostic: agn_hm is the only heatmap

        def tower(n):
            # Convolutions keep their bias under GN, as in the official head.
            layers = []
            for _ in range(n):
                layers += [Conv2d(in_channels, in_channels, 3, padding=1, bias=True,
                                  norm=get_norm(norm, in_channels)), nn.ReLU()]
            return nn.Sequential(*layers)

        self.box_tower = tower(num_box_convs)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        if agnostic or self.with_agn_hm:
            self.agn_hm = nn.Conv2d(in_channels, 1, 3, padding=1)
        if not agnostic:
            self.cls_tower = tower(num_cls_convs)
            self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.scales = nn.ModuleList(_Scale() for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0.0)
        for name in ("agn_hm", "cls_logits"):
            if hasattr(self, name):
                nn.init.constant_(getattr(self, name).bias, -math.log((1 - prior_prob) / prior_prob))
        # Boxes start ``bbox_bias`` strides to each side (official: 8).
        nn.init.constant_(self.bbox_pred.bias, bbox_bias)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        assert len(channels) == 1, f"CenterNet needs equal channels on every level, got {channels}"
        c = cfg.MODEL.CENTERNET
        return {"in_channels": channels.pop(), "num_levels": len(input_shape), "num_classes": c.NUM_CLASSES,
                "agnostic": c.AGNOSTIC, "num_cls_convs": c.NUM_CLS_CONVS, "num_box_convs": c.NUM_BOX_CONVS,
                "norm": c.NORM, "prior_prob": c.PRIOR_PROB, "bbox_bias": c.BBOX_PRED_BIAS,
                "with_agn_hm": c.WITH_AGN_HM}

    def forward(self, features: List[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor], Optional[List[torch.Tensor]]]:
        """
        Args:
            features: per level (N, C, Hl, Wl).
        Returns:
            heatmap logits per level (N, K, Hl, Wl) with K = 1 (agnostic) or #classes;
            ltrb per level (N, 4, Hl, Wl), >= 0, in strides;
            with ``with_agn_hm``, the agnostic heatmap logits per level (N, 1, Hl, Wl), else None.
        """
        heatmaps, ltrbs, agn = [], [], []
        for scale, x in zip(self.scales, features):
            box = self.box_tower(x)
            heatmaps.append(self.agn_hm(box) if self.agnostic else self.cls_logits(self.cls_tower(x)))
            if self.with_agn_hm:
                agn.append(self.agn_hm(box))
            ltrbs.append(F.relu(scale(self.bbox_pred(box))))
        return heatmaps, ltrbs, (agn if self.with_agn_hm else None)


# --- the proposal generator / detector ----------------------------------------------------------

@PROPOSAL_GENERATOR_REGISTRY.register()
class CenterNet(nn.Module):
    """CenterNet as a proposal generator (CenterNet2) or as a complete one-stage detector."""

    @configurable
    def __init__(self, *, head: nn.Module, in_features: List[str], strides: List[int],
                 soi: List[List[float]], num_classes: int, agnostic: bool, only_proposal: bool,
                 hm_alpha: float = 0.25, hm_beta: float = 4.0, hm_gamma: float = 2.0,
                 sigmoid_clamp: float = 1e-4, ignore_high_fp: float = -1.0, min_overlap: float = 0.8,
                 min_radius: float = 4.0, pos_weight: float = 1.0, neg_weight: float = 1.0,
                 hm_weight: float = 1.0, reg_weight: float = 2.0, not_norm_reg: bool = True,
                 more_pos: bool = False, more_pos_thresh: float = 0.2, more_pos_topk: int = 9,
                 score_thresh: float = 0.05, pre_nms_topk: Tuple[int, int] = (1000, 1000),
                 post_nms_topk: Tuple[int, int] = (100, 100), nms_thresh: Tuple[float, float] = (0.6, 0.6),
                 nms_class_agnostic: bool = False):
        """
        ``pre_nms_topk``, ``post_nms_topk`` and ``nms_thresh`` are (train, test) pairs; see
        ``model/config.py`` for every argument's config key and meaning. Defaults: the official
        code's defaults (its CenterNet-FPN).
        """
        super().__init__()
        self.head = head
        self.in_features = in_features
        self.strides = strides
        self.register_buffer("soi", torch.tensor(soi, dtype=torch.float32), persistent=False)
        self.num_classes = num_classes
        self.agnostic = agnostic
        self.only_proposal = only_proposal
        self.hm_alpha, self.hm_beta, self.hm_gamma = hm_alpha, hm_beta, hm_gamma
        self.sigmoid_clamp, self.ignore_high_fp = sigmoid_clamp, ignore_high_fp
        # Official "delta for rendering heatmap": the Gaussian's radius^2 is 2 delta^2 w h.
        self.delta = (1 - min_overlap) / (1 + min_overlap)
        self.min_radius = min_radius
        self.pos_weight, self.neg_weight, self.hm_weight = pos_weight, neg_weight, hm_weight
        self.reg_weight, self.not_norm_reg = reg_weight, not_norm_reg
        self.more_pos, self.more_pos_thresh, self.more_pos_topk = more_pos, more_pos_thresh, more_pos_topk
        self.score_thresh = score_thresh
        self.pre_nms_topk, self.post_nms_topk, self.nms_thresh = pre_nms_topk, post_nms_topk, nms_thresh
        self.nms_class_agnostic = nms_class_agnostic

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        c = cfg.MODEL.CENTERNET
        assert len(c.IN_FEATURES) == len(c.FPN_STRIDES) == len(c.SOI), \
            "MODEL.CENTERNET.IN_FEATURES, FPN_STRIDES and SOI need one entry per level"
        for f, s in zip(c.IN_FEATURES, c.FPN_STRIDES):
            assert input_shape[f].stride == s, f"{f} has stride {input_shape[f].stride}, config says {s}"
        return {
            "head": CenterNetHead(cfg, [input_shape[f] for f in c.IN_FEATURES]),
            "in_features": list(c.IN_FEATURES), "strides": list(c.FPN_STRIDES), "soi": [list(s) for s in c.SOI],
            "num_classes": c.NUM_CLASSES, "agnostic": c.AGNOSTIC, "only_proposal": c.ONLY_PROPOSAL,
            "hm_alpha": c.HM_FOCAL_ALPHA, "hm_beta": c.HM_FOCAL_BETA, "hm_gamma": c.LOSS_GAMMA,
            "sigmoid_clamp": c.SIGMOID_CLAMP, "ignore_high_fp": c.IGNORE_HIGH_FP,
            "min_overlap": c.HM_MIN_OVERLAP, "min_radius": c.MIN_RADIUS,
            "pos_weight": c.POS_WEIGHT, "neg_weight": c.NEG_WEIGHT, "hm_weight": c.HM_WEIGHT,
            "reg_weight": c.REG_WEIGHT, "not_norm_reg": c.NOT_NORM_REG,
            "more_pos": c.MORE_POS, "more_pos_thresh": c.MORE_POS_THRESH, "more_pos_topk": c.MORE_POS_TOPK,
            "score_thresh": c.SCORE_THRESH,
            "pre_nms_topk": (c.PRE_NMS_TOPK_TRAIN, c.PRE_NMS_TOPK_TEST),
            "post_nms_topk": (c.POST_NMS_TOPK_TRAIN, c.POST_NMS_TOPK_TEST),
            "nms_thresh": (c.NMS_THRESH_TRAIN, c.NMS_THRESH_TEST),
            "nms_class_agnostic": c.NMS_CLASS_AGNOSTIC,
        }

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor],
                gt_instances: Optional[List[Instances]] = None):
        """
        Returns:
            (list[Instances], dict): per image, proposals (ONLY_PROPOSAL) or detections, in the
            resized image's coordinates; the losses in training.
        """
        feats = [features[f] for f in self.in_features]
        heatmaps, ltrbs, agn_heatmaps = self.head(feats)
        shapes = [tuple(h.shape[-2:]) for h in heatmaps]
        losses = {}
        if self.training:
            losses = self.losses(heatmaps, ltrbs, shapes, gt_instances, agn_heatmaps)
            if not self.only_proposal:
                return [], losses  # a one-stage detector needs no boxes to train
        with torch.no_grad():
            results = self.inference(heatmaps, ltrbs, images.image_sizes, agn_heatmaps)
        return results, losses

    # ---- training targets ----

    def _locations(self, shapes, device):
        """All levels' locations (M, 2), each location's stride (M,) and level index (M,)."""
        locs, strides, levels = [], [], []
        for lvl, ((h, w), s) in enumerate(zip(shapes, self.strides)):
            locs.append(level_locations(h, w, s, device))
            strides.append(torch.full((h * w,), float(s), device=device))
            levels.append(torch.full((h * w,), lvl, device=device, dtype=torch.long))
        return torch.cat(locs), torch.cat(strides), torch.cat(levels)

    def _center_cells(self, centers: torch.Tensor, shapes) -> torch.Tensor:
        """(L, G) flat index (over all levels' locations) of the cell holding each centre, per level."""
        out, offset = [], 0
        for (h, w), s in zip(shapes, self.strides):
            cx = torch.div(centers[:, 0], s, rounding_mode="floor").long().clamp(0, w - 1)
            cy = torch.div(centers[:, 1], s, rounding_mode="floor").long().clamp(0, h - 1)
            out.append(offset + cy * w + cx)
            offset += h * w
        return torch.stack(out)

    @torch.no_grad()
    def targets_for_image(self, gt: Instances, locations, strides, levels, shapes):
        """
        The official ``_get_ground_truth`` and ``_get_label_inds`` for one image.

        Heatmap: every object's Gaussian exp(-d^2 / r^2), r^2 = max(2 delta^2 w h, MIN_RADIUS^2), on
        every level (not only its assigned ones), with d = 0 at the cell holding its centre; the
        maximum over objects (per category when class-specific); values < 1e-4 set to 0.
        Positives: the centre cell on each assigned level. Regression: at the 3x3 cells around the
        centre cell whose centre lies strictly inside the box, on assigned levels; where objects
        compete, the one nearest in d^2 / r^2 wins.

        Args:
            gt: the image's ground truth (gt_boxes XYXY, gt_classes).
            locations (M, 2), strides (M,), levels (M,): all levels' locations, flattened.
        Returns:
            heat (K, M) targets; pos_loc (P,) location index and pos_cls (P,) channel of each
            positive; reg_target (M, 4) ltrb in strides; reg_mask (M,) bool.
        """
        num_maps = 1 if self.agnostic else self.num_classes
        m = locations.shape[0]
        boxes = gt.gt_boxes.tensor
        classes = torch.zeros_like(gt.gt_classes) if self.agnostic else gt.gt_classes
        if len(boxes) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=locations.device)
            return (locations.new_zeros((num_maps, m)), empty, empty, locations.new_zeros((m, 4)),
                    torch.zeros(m, dtype=torch.bool, device=locations.device))
        centers = (boxes[:, :2] + boxes[:, 2:]) / 2
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        on_level = assign_levels(boxes, self.soi)  # (L, G)
        cells = self._center_cells(centers, shapes)  # (L, G)
        pos_loc, pos_cls = cells[on_level], classes[None, :].expand_as(cells)[on_level]

        # (M, G): the centre's cell at each location's own level.
        s = strides[:, None, None]
        center_cell = torch.floor(centers[None] / s) * s + s / 2  # (M, G, 2)
        offset = locations[:, None, :] - center_cell
        is_peak = (offset == 0).all(dim=2)
        d2 = ((locations[:, None, :] - centers[None]) ** 2).sum(dim=2)
        d2[is_peak] = 0
        radius2 = (2 * self.delta ** 2 * area).clamp(min=self.min_radius ** 2)
        dist = d2 / radius2[None, :]  # (M, G)

        min_dist = dist.new_full((num_maps, m), INF)
        min_dist.scatter_reduce_(0, classes[:, None].expand(-1, m), dist.T, "amin")
        heat = torch.exp(-min_dist)
        heat[heat < 1e-4] = 0

        ltrb = torch.cat([locations[:, None, :] - boxes[None, :, :2], boxes[None, :, 2:] - locations[:, None, :]],
                         dim=2)  # (M, G, 4)
        inside = ltrb.min(dim=2).values > 0
        center3x3 = (offset.abs() <= s).all(dim=2)
        reg_ok = inside & center3x3 & on_level[levels]
        min_reg, match = torch.where(reg_ok, dist, torch.full_like(dist, INF)).min(dim=1)
        reg_mask = min_reg < INF
        reg_target = ltrb[torch.arange(m, device=ltrb.device), match] / strides[:, None]
        return heat, pos_loc, pos_cls, reg_target, reg_mask

    @torch.no_grad()
    def _more_positives(self, gt: Instances, ltrb_pred: torch.Tensor, shapes):
        """
        Official ``_add_more_pos`` (MORE_POS) for one image: the positives are, per object, its centre
        cell on each assigned level plus those of the 3x3 cells around its centre cell, on any level,
        inside the box, whose current GIoU loss is below min(the MORE_POS_TOPK-th smallest of them,
        MORE_POS_THRESH).

        Args:
            ltrb_pred: (M, 4) this image's predicted distances, in strides.
        Returns:
            pos_loc (P,), pos_cls (P,).
        """
        boxes = gt.gt_boxes.tensor
        classes = torch.zeros_like(gt.gt_classes) if self.agnostic else gt.gt_classes
        g, num_levels = len(boxes), len(self.strides)
        if g == 0:
            empty = torch.zeros(0, dtype=torch.long, device=ltrb_pred.device)
            return empty, empty
        centers = (boxes[:, :2] + boxes[:, 2:]) / 2
        on_level = assign_levels(boxes, self.soi).T  # (G, L)
        dy, dx = torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing="ij")
        dx, dy = dx.reshape(-1).to(boxes.device), dy.reshape(-1).to(boxes.device)  # 9 cells, row-major
        locs, losses, offset = [], [], 0
        for lvl, ((h, w), s) in enumerate(zip(shapes, self.strides)):
            cx = torch.div(centers[:, 0], s, rounding_mode="floor").long()
            cy = torch.div(centers[:, 1], s, rounding_mode="floor").long()
            x, y = cx[:, None] + dx, cy[:, None] + dy  # (G, 9)
            px, py = (x.float() + 0.5) * s, (y.float() + 0.5) * s
            target = torch.stack([px - boxes[:, None, 0], py - boxes[:, None, 1],
                                  boxes[:, None, 2] - px, boxes[:, None, 3] - py], dim=2) / s  # (G, 9, 4)
            valid = (x >= 0) & (x < w) & (y >= 0) & (y < h) & (target.min(dim=2).values >= 0)
            loc = offset + y.clamp(0, h - 1) * w + x.clamp(0, w - 1)
            loss = ltrb_giou_loss(ltrb_pred[loc.reshape(-1)], target.reshape(-1, 4).clamp(min=0)).view(g, 9)
            loss[~valid] = INF
            center_ok = on_level[:, lvl] & (target[:, 4].min(dim=1).values >= 0)
            loss[center_ok, 4] = 0  # the real centre on an assigned level is always positive
            locs.append(loc)
            losses.append(loss)
            offset += h * w
        locs, losses = torch.cat(locs, dim=1), torch.cat(losses, dim=1)  # (G, 9 L)
        k = min(self.more_pos_topk, 9 * num_levels)
        thresh = losses.kthvalue(k, dim=1).values.clamp(max=self.more_pos_thresh)
        new_pos = losses < thresh[:, None]
        return locs[new_pos], classes[:, None].expand_as(locs)[new_pos]

    # ---- losses ----

    def losses(self, heatmaps, ltrbs, shapes, gt_instances, agn_heatmaps=None):
        """
        The heatmap focal loss (``loss_centernet_hm``), the GIoU loss of the boxes
        (``loss_centernet_reg``) and, with ``agn_heatmaps`` (per level (N, 1, Hl, Wl)), the
        agnostic heatmap's focal loss (``loss_centernet_agn_hm``) against the maximum of the
        categories' targets at the same positives and normaliser (official ``losses`` with
        WITH_AGN_HM).
        """
        device = heatmaps[0].device
        locations, strides, levels = self._locations(shapes, device)
        m = locations.shape[0]
        # (N, K, M) and (N, M, 4), levels concatenated in the same order as the locations.
        hm_logits = torch.cat([h.flatten(2) for h in heatmaps], dim=2)
        ltrb = torch.cat([r.flatten(2) for r in ltrbs], dim=2).permute(0, 2, 1)
        heat_t, pos_locs, pos_clss, reg_t, reg_masks = zip(
            *[self.targets_for_image(gt, locations, strides, levels, shapes) for gt in gt_instances])
        if self.more_pos:
            pos_locs, pos_clss = zip(*[self._more_positives(gt, ltrb[i].detach(), shapes)
                                       for i, gt in enumerate(gt_instances)])
        num_maps = hm_logits.shape[1]
        # Flat index of each positive in the (N, K, M) logits.
        pos_index = torch.cat([(i * num_maps + c) * m + loc for i, (loc, c) in enumerate(zip(pos_locs, pos_clss))])
        heat_t = torch.stack(heat_t)
        # The official normaliser: positives averaged over workers, at least 1.
        num_pos = max(self._mean_over_workers(float(len(pos_index)), device), 1.0)

        def focal(logits, targets, index):
            pos, neg = heatmap_focal_loss(logits.float().reshape(-1), targets.reshape(-1), index, self.hm_alpha,
                                          self.hm_beta, self.hm_gamma, self.sigmoid_clamp, self.ignore_high_fp)
            return (self.pos_weight * pos + self.neg_weight * neg) / num_pos * self.hm_weight

        out = {"loss_centernet_hm": focal(hm_logits, heat_t, pos_index)}
        if agn_heatmaps is not None:
            agn_logits = torch.cat([h.flatten(2) for h in agn_heatmaps], dim=2)  # (N, 1, M)
            agn_pos_index = torch.cat([i * m + loc for i, loc in enumerate(pos_locs)])
            out["loss_centernet_agn_hm"] = focal(agn_logits, heat_t.max(dim=1).values, agn_pos_index)

        mask = torch.stack(reg_masks)  # (N, M)
        pred, target = ltrb[mask], torch.stack(reg_t)[mask]
        if self.not_norm_reg:
            weight = torch.ones(len(pred), device=device)
        else:  # the heatmap value at the location (all categories' maximum)
            weight = heat_t.max(dim=1).values[mask]
        reg_norm = max(self._mean_over_workers(weight.sum().item(), device), 1.0)
        loss_reg = (ltrb_giou_loss(pred, target) * weight).sum() / reg_norm if len(pred) else ltrb.sum() * 0.0
        out["loss_centernet_reg"] = loss_reg * self.reg_weight
        return out

    @staticmethod
    def _mean_over_workers(value: float, device) -> float:
        """The mean of ``value`` over the training processes (the official reduce_sum / world size)."""
        if comm.get_world_size() == 1:
            return value
        t = torch.tensor([value], device=device)
        torch.distributed.all_reduce(t)
        return t.item() / comm.get_world_size()

    # ---- inference ----

    def inference(self, heatmaps, ltrbs, image_sizes, agn_heatmaps=None) -> List[Instances]:
        """Per image, the top-scoring boxes of all levels after NMS (``_select``); with
        ``agn_heatmaps`` a location's class probabilities are multiplied by its agnostic one."""
        phase = 0 if self.training else 1
        results = []
        sqrt_score = self.agnostic or agn_heatmaps is not None
        agn_heatmaps = agn_heatmaps or [None] * len(heatmaps)
        for i, image_size in enumerate(image_sizes):
            boxes, scores, classes = [], [], []
            for hm, agn, ltrb, s in zip(heatmaps, agn_heatmaps, ltrbs, self.strides):
                h, w = hm.shape[2:]
                prob = hm[i].sigmoid()  # (K, H, W)
                candidates = (prob.flatten() > self.score_thresh).nonzero().squeeze(1)
                if agn is not None:
                    # Official predict_single_level: candidates by the class p alone, then ranked
                    # (and scored) by class p * agnostic p.
                    prob = prob * agn[i].sigmoid()
                prob = prob.flatten()  # (K*H*W,), class-major
                top = prob[candidates].topk(min(self.pre_nms_topk[phase], len(candidates)))
                idx = candidates[top.indices]
                loc_idx = idx % (h * w)
                loc = level_locations(h, w, s, hm.device)[loc_idx]
                d = ltrb[i].flatten(1)[:, loc_idx].T * s  # (n, 4)
                box = torch.cat([loc - d[:, :2], loc + d[:, 2:]], dim=1)
                # As the official code: no empty box reaches the RoI heads.
                box[:, 2:] = torch.max(box[:, 2:], box[:, :2] + 0.01)
                boxes.append(box)
                scores.append(top.values)
                classes.append(idx // (h * w))
            scores = torch.cat(scores)
            if sqrt_score:
                # Official predict_single_level: with the agnostic heatmap the proposal score is
                # sqrt(sigmoid) (sqrt(class p * agnostic p) with both), so the CenterNet2 test score
                # sqrt(s * score) is (s * sqrt(p))^0.5.
                scores = scores.sqrt()
            results.append(self._select(torch.cat(boxes), scores, torch.cat(classes), image_size, phase))
        return results

    def _select(self, boxes, scores, classes, image_size, phase) -> Instances:
        """NMS (per class when class-specific, as official ``ml_nms``, unless NMS_CLASS_AGNOSTIC and
        these are proposals), keep the top post-NMS."""
        agnostic = self.nms_class_agnostic and self.only_proposal
        groups = torch.zeros_like(classes) if agnostic else classes
        keep = batched_nms(boxes, scores, groups, self.nms_thresh[phase])[: self.post_nms_topk[phase]]
        out = Instances(image_size)
        if self.only_proposal:
            out.proposal_boxes = Boxes(boxes[keep])
            out.objectness_logits = torch.logit(scores[keep], eps=1e-6)
        else:
            out.pred_boxes = Boxes(boxes[keep])
            out.scores = scores[keep]
            out.pred_classes = classes[keep]
        return out
