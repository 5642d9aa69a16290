"""
CenterNet on FPN levels (Zhou, Wang, Krähenbühl, "Objects as Points", 2019), the first stage of
CenterNet2 (report section 2) and, alone, the one-stage CenterNet-FPN of Table 1.

An object is a peak of a Gaussian "center heatmap" (one channel per category, or one shared channel
when category-agnostic); at each location a box is regressed as distances (left, top, right, bottom)
to its sides. Objects are assigned to FPN levels by size. Training: the penalty-reduced focal loss on
the heatmaps (CenterNet eq. 1) and a GIoU loss on the boxes. Inference: per-level top-k of the
heatmap scores, boxes decoded at those locations, NMS over all levels.

Registered as ``PROPOSAL_GENERATOR`` "CenterNet": with ``MODEL.CENTERNET.ONLY_PROPOSAL`` it returns
proposals (``proposal_boxes``, ``objectness_logits`` = logit of the heatmap peak) for RoI heads;
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
from torchvision.ops import generalized_box_iou_loss

__all__ = ["CenterNet", "CenterNetHead", "heatmap_focal_loss", "gaussian_targets", "assign_levels",
           "level_locations"]


# --- the pieces, each testable on its own -------------------------------------------------------

def level_locations(height: int, width: int, stride: int, device=None) -> torch.Tensor:
    """Image coordinates of the cell centres of an (height, width) feature map: (H*W, 2) as (x, y)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def assign_levels(sizes: torch.Tensor, soi: torch.Tensor) -> torch.Tensor:
    """
    Args:
        sizes: (G,) object sizes sqrt(w * h).
        soi: (L, 2) [lo, hi] size range of each level.
    Returns:
        (L, G) bool: object g trains level l when lo <= size <= hi.
    """
    return (sizes[None, :] >= soi[:, :1]) & (sizes[None, :] <= soi[:, 1:])


def gaussian_targets(locations: torch.Tensor, centers: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """
    CenterNet's Gaussian splat: Y = exp(-||p - c||^2 / (2 sigma^2)) (Zhou et al. 2019, section 3).

    Args:
        locations: (M, 2) points p; centers: (G, 2) object centres c; sigmas: (G,) in pixels.
    Returns:
        (G, M) target values in (0, 1].
    """
    d2 = ((locations[None, :, :] - centers[:, None, :]) ** 2).sum(dim=2)
    return torch.exp(-d2 / (2 * sigmas[:, None] ** 2))


def heatmap_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_pos: float,
                       alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """
    Penalty-reduced pixel-wise focal loss, CenterNet eq. 1:

        L = -1/N sum { (1 - p)^alpha log(p)                    if Y = 1
                     { (1 - Y)^beta p^alpha log(1 - p)         otherwise

    with p = sigmoid(logits) and N the number of positives (Y = 1).

    Args:
        logits, targets: same shape, any; targets Y in [0, 1], exactly 1 at object centres.
        num_pos: N (already reduced over workers, >= 1).
    """
    pos = targets == 1
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    p = log_p.exp()
    pos_loss = ((1 - p) ** alpha * log_p)[pos].sum()
    neg_loss = ((1 - targets) ** beta * p ** alpha * log_1mp)[~pos].sum()
    return -(pos_loss + neg_loss) / num_pos


class _Scale(nn.Module):
    """A learnable scalar per FPN level for the box branch (as in FCOS / CenterNet2)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(init))

    def forward(self, x):
        return x * self.scale


class CenterNetHead(nn.Module):
    """
    The head shared by all levels: a classification tower ending in the heatmap logits and a box
    tower ending in ltrb distances, in units of the level's stride.
    """

    @configurable
    def __init__(self, *, in_channels: int, num_levels: int, num_heatmaps: int, num_cls_convs: int,
                 num_box_convs: int, norm: str, prior_prob: float):
        super().__init__()

        def tower(n):
            layers = []
            for _ in range(n):
                layers += [Conv2d(in_channels, in_channels, 3, padding=1, bias=not norm,
                                  norm=get_norm(norm, in_channels)), nn.ReLU()]
            return nn.Sequential(*layers)

        self.cls_tower = tower(num_cls_convs)
        self.box_tower = tower(num_box_convs)
        self.heatmap = nn.Conv2d(in_channels, num_heatmaps, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.scales = nn.ModuleList(_Scale() for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - prior_prob) / prior_prob))
        # Start from boxes two strides to each side, so ReLU does not zero most outputs at init.
        nn.init.constant_(self.bbox_pred.bias, 2.0)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        assert len(channels) == 1, f"CenterNet needs equal channels on every level, got {channels}"
        c = cfg.MODEL.CENTERNET
        return {"in_channels": channels.pop(), "num_levels": len(input_shape),
                "num_heatmaps": 1 if c.AGNOSTIC else c.NUM_CLASSES, "num_cls_convs": c.NUM_CLS_CONVS,
                "num_box_convs": c.NUM_BOX_CONVS, "norm": c.NORM, "prior_prob": c.PRIOR_PROB}

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            features: per level (N, C, Hl, Wl).
        Returns:
            heatmap logits per level (N, K, Hl, Wl) with K = 1 (agnostic) or #classes;
            ltrb per level (N, 4, Hl, Wl), >= 0, in strides.
        """
        heatmaps, ltrbs = [], []
        for scale, x in zip(self.scales, features):
            heatmaps.append(self.heatmap(self.cls_tower(x)))
            ltrbs.append(F.relu(scale(self.bbox_pred(self.box_tower(x)))))
        return heatmaps, ltrbs


# --- the proposal generator / detector ----------------------------------------------------------

@PROPOSAL_GENERATOR_REGISTRY.register()
class CenterNet(nn.Module):
    """CenterNet as a proposal generator (CenterNet2) or as a complete one-stage detector."""

    @configurable
    def __init__(self, *, head: CenterNetHead, in_features: List[str], strides: List[int],
                 soi: List[List[float]], num_classes: int, agnostic: bool, only_proposal: bool,
                 hm_alpha: float, hm_beta: float, sigma_ratio: float, reg_thresh: float,
                 hm_weight: float, reg_weight: float, score_thresh: float,
                 pre_nms_topk: Tuple[int, int], post_nms_topk: Tuple[int, int],
                 nms_thresh: Tuple[float, float]):
        """
        ``pre_nms_topk``, ``post_nms_topk`` and ``nms_thresh`` are (train, test) pairs; see
        ``model/config.py`` for every argument's config key and meaning.
        """
        super().__init__()
        self.head = head
        self.in_features = in_features
        self.strides = strides
        self.register_buffer("soi", torch.tensor(soi, dtype=torch.float32), persistent=False)
        self.num_classes = num_classes
        self.agnostic = agnostic
        self.only_proposal = only_proposal
        self.hm_alpha, self.hm_beta = hm_alpha, hm_beta
        self.sigma_ratio = sigma_ratio
        self.reg_thresh = reg_thresh
        self.hm_weight, self.reg_weight = hm_weight, reg_weight
        self.score_thresh = score_thresh
        self.pre_nms_topk, self.post_nms_topk, self.nms_thresh = pre_nms_topk, post_nms_topk, nms_thresh

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
            "hm_alpha": c.HM_FOCAL_ALPHA, "hm_beta": c.HM_FOCAL_BETA, "sigma_ratio": c.SIGMA_RATIO,
            "reg_thresh": c.REG_GAUSSIAN_THRESH, "hm_weight": c.HM_WEIGHT, "reg_weight": c.REG_WEIGHT,
            "score_thresh": c.SCORE_THRESH,
            "pre_nms_topk": (c.PRE_NMS_TOPK_TRAIN, c.PRE_NMS_TOPK_TEST),
            "post_nms_topk": (c.POST_NMS_TOPK_TRAIN, c.POST_NMS_TOPK_TEST),
            "nms_thresh": (c.NMS_THRESH_TRAIN, c.NMS_THRESH_TEST),
        }

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor],
                gt_instances: Optional[List[Instances]] = None):
        """
        Returns:
            (list[Instances], dict): per image, proposals (ONLY_PROPOSAL) or detections, in the
            resized image's coordinates; the losses in training.
        """
        feats = [features[f] for f in self.in_features]
        heatmaps, ltrbs = self.head(feats)
        shapes = [tuple(h.shape[-2:]) for h in heatmaps]
        losses = {}
        if self.training:
            losses = self.losses(heatmaps, ltrbs, shapes, gt_instances)
            if not self.only_proposal:
                return [], losses  # a one-stage detector needs no boxes to train
        with torch.no_grad():
            results = self.inference(heatmaps, ltrbs, images.image_sizes)
        return results, losses

    # ---- training ----

    def _locations(self, shapes, device):
        """All levels' locations (M, 2), each location's stride (M,) and level index (M,)."""
        locs, strides, levels = [], [], []
        for lvl, ((h, w), s) in enumerate(zip(shapes, self.strides)):
            locs.append(level_locations(h, w, s, device))
            strides.append(torch.full((h * w,), float(s), device=device))
            levels.append(torch.full((h * w,), lvl, device=device, dtype=torch.long))
        return torch.cat(locs), torch.cat(strides), torch.cat(levels)

    @torch.no_grad()
    def targets_for_image(self, gt: Instances, locations, levels, shapes):
        """
        Args:
            gt: the image's ground truth (gt_boxes XYXY, gt_classes).
            locations (M, 2), levels (M,): all levels' locations and their level index, flattened.
        Returns:
            heatmap targets (K, M); regression mask (M,) bool; box targets (M, 4) XYXY;
            regression weights (M,).
        """
        num_maps = 1 if self.agnostic else self.num_classes
        m = locations.shape[0]
        heat = locations.new_zeros((num_maps, m))
        boxes = gt.gt_boxes.tensor
        if len(boxes) == 0:
            return heat, torch.zeros(m, dtype=torch.bool, device=heat.device), locations.new_zeros((m, 4)), \
                locations.new_zeros(m)
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
        sizes = (wh[:, 0] * wh[:, 1]).sqrt()
        centers = (boxes[:, :2] + boxes[:, 2:]) / 2
        on_level = assign_levels(sizes, self.soi)  # (L, G)
        gauss = gaussian_targets(locations, centers, self.sigma_ratio * sizes)  # (G, M)
        gauss = gauss * on_level[levels].T  # zero on levels the object is not assigned to
        # The cell containing the centre is the object's positive (Y = 1) on each assigned level.
        offset = 0
        for lvl, ((h, w), s) in enumerate(zip(shapes, self.strides)):
            g = on_level[lvl].nonzero().squeeze(1)
            cx = (centers[g, 0] / s).long().clamp(0, w - 1)
            cy = (centers[g, 1] / s).long().clamp(0, h - 1)
            gauss[g, offset + cy * w + cx] = 1.0
            offset += h * w
        classes = torch.zeros_like(gt.gt_classes) if self.agnostic else gt.gt_classes
        heat.scatter_reduce_(0, classes[:, None].expand_as(gauss), gauss, "amax")
        # Regression: inside the box (or the centre cell itself), where the Gaussian is high enough.
        inside = ((locations[None, :, 0] > boxes[:, None, 0]) & (locations[None, :, 0] < boxes[:, None, 2])
                  & (locations[None, :, 1] > boxes[:, None, 1]) & (locations[None, :, 1] < boxes[:, None, 3]))
        value = torch.where(inside | (gauss == 1.0), gauss, torch.zeros_like(gauss))
        weight, match = value.max(dim=0)
        mask = weight >= self.reg_thresh
        return heat, mask, boxes[match], weight

    def losses(self, heatmaps, ltrbs, shapes, gt_instances):
        device = heatmaps[0].device
        locations, strides, levels = self._locations(shapes, device)
        # (N, K, M) and (N, M, 4), levels concatenated in the same order as the locations.
        hm_logits = torch.cat([h.flatten(2) for h in heatmaps], dim=2)
        ltrb = torch.cat([r.flatten(2) for r in ltrbs], dim=2).permute(0, 2, 1)
        heat_t, masks, box_t, weights = zip(*[self.targets_for_image(gt, locations, levels, shapes)
                                              for gt in gt_instances])
        heat_t = torch.stack(heat_t)
        num_pos = (heat_t == 1).sum().float()
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num_pos)
            num_pos = num_pos / comm.get_world_size()
        loss_hm = heatmap_focal_loss(hm_logits, heat_t, max(num_pos.item(), 1.0), self.hm_alpha, self.hm_beta)

        mask = torch.stack(masks)  # (N, M)
        weight = torch.stack(weights)[mask]
        pred = ltrb[mask] * strides[None, :, None].expand_as(ltrb)[mask]
        loc = locations[None].expand(len(gt_instances), -1, -1)[mask]
        pred_boxes = torch.cat([loc - pred[:, :2], loc + pred[:, 2:]], dim=1)
        target = torch.stack(box_t)[mask]
        if len(target):
            giou = generalized_box_iou_loss(pred_boxes, target, reduction="none")
            loss_reg = (giou * weight).sum() / weight.sum().clamp(min=1e-6)
        else:
            loss_reg = ltrb.sum() * 0.0
        return {"loss_centernet_hm": loss_hm * self.hm_weight, "loss_centernet_reg": loss_reg * self.reg_weight}

    # ---- inference ----

    def inference(self, heatmaps, ltrbs, image_sizes) -> List[Instances]:
        phase = 0 if self.training else 1
        results = []
        for i, image_size in enumerate(image_sizes):
            boxes, scores, classes = [], [], []
            for hm, ltrb, s in zip(heatmaps, ltrbs, self.strides):
                h, w = hm.shape[2:]
                prob = hm[i].sigmoid().flatten()  # (K*H*W,), class-major
                candidates = (prob > self.score_thresh).nonzero().squeeze(1)
                top = prob[candidates].topk(min(self.pre_nms_topk[phase], len(candidates)))
                idx = candidates[top.indices]
                loc_idx = idx % (h * w)
                loc = level_locations(h, w, s, hm.device)[loc_idx]
                d = ltrb[i].flatten(1)[:, loc_idx].T * s  # (n, 4)
                boxes.append(torch.cat([loc - d[:, :2], loc + d[:, 2:]], dim=1))
                scores.append(top.values)
                classes.append(idx // (h * w))
            result = self._select(torch.cat(boxes), torch.cat(scores), torch.cat(classes), image_size, phase)
            results.append(result)
        return results

    def _select(self, boxes, scores, classes, image_size, phase) -> Instances:
        """Clip, drop empty boxes, NMS (per class when class-specific), keep the top post-NMS."""
        boxes = Boxes(boxes)
        boxes.clip(image_size)
        keep = boxes.nonempty()
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        keep = batched_nms(boxes.tensor, scores, classes, self.nms_thresh[phase])[: self.post_nms_topk[phase]]
        out = Instances(image_size)
        if self.only_proposal:
            out.proposal_boxes = boxes[keep]
            out.objectness_logits = torch.logit(scores[keep], eps=1e-6)
        else:
            out.pred_boxes = boxes[keep]
            out.scores = scores[keep]
            out.pred_classes = classes[keep]
        return out
