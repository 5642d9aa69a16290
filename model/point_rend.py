"""
PointRend mask head (Kirillov, Wu, He, Girshick, "PointRend: Image Segmentation as Rendering",
CVPR 2020), the "+ PointRend" step of the report's Table 3.

A coarse head (detectron2's ``MaskRCNNConvUpsampleHead``) predicts an M x M mask per RoI; a point
head — an MLP over, per point, fine-grained FPN features and the coarse prediction — re-predicts
the mask at chosen points:
- training (paper sec. 3.1): oversample k*N random points, keep the beta*N most uncertain under the
  coarse prediction (uncertainty = -|logit|), add (1 - beta)*N uniform random points; BCE against
  the ground-truth mask at those points, besides the coarse head's usual loss;
- inference (sec. 3.1, adaptive subdivision): ``SUBDIVISION_STEPS`` times, upsample the mask 2x
  bilinearly and re-predict its ``SUBDIVISION_NUM_POINTS`` most uncertain cells, so the output is
  M * 2^steps per side.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
    mask_rcnn_inference,
    mask_rcnn_loss,
)
from detectron2.structures import Instances
from torch import nn

try:  # detectron2's own, when its PointRend project is installed (the PyPI sdist installs it)
    from detectron2.projects.point_rend.point_features import point_sample
except ImportError:  # pragma: no cover - a detectron2 built without projects/
    def point_sample(input, point_coords, **kwargs):
        """Bilinear samples of ``input`` (N, C, H, W) at [0, 1] coords (N, P, 2) -> (N, C, P)."""
        return F.grid_sample(input, 2.0 * point_coords.unsqueeze(2) - 1.0, **kwargs).squeeze(3)


def uncertainty(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """-|logit| of each RoI's own class: (R, C, H, W) or (R, 1, H, W) -> (R, 1, H, W)."""
    if logits.shape[1] == 1:
        own = logits
    else:
        own = logits[torch.arange(len(logits), device=logits.device), classes].unsqueeze(1)
    return -own.abs()


def sample_training_points(coarse: torch.Tensor, classes: torch.Tensor, num_points: int,
                           oversample: float, importance: float) -> torch.Tensor:
    """(R, num_points, 2) box-normalised [0, 1] points: the most uncertain of k*N random ones, plus random."""
    r = coarse.shape[0]
    n_sampled = int(num_points * oversample)
    candidates = torch.rand(r, n_sampled, 2, device=coarse.device)
    u = point_sample(uncertainty(coarse, classes), candidates, align_corners=False)[:, 0]  # (R, kN)
    n_uncertain = int(importance * num_points)
    idx = u.topk(n_uncertain, dim=1).indices
    chosen = torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2))
    random = torch.rand(r, num_points - n_uncertain, 2, device=coarse.device)
    return torch.cat([chosen, random], dim=1)


def roi_to_image_points(boxes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Box-normalised points (R, P, 2) of boxes (R, 4) XYXY -> image coordinates (R, P, 2)."""
    wh = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
    return boxes[:, None, :2] + points * wh


def fine_grained_features(features: List[torch.Tensor], strides: List[int], boxes: List[torch.Tensor],
                          points: torch.Tensor, image_sizes) -> torch.Tensor:
    """Per point, the concatenated bilinear samples of each feature map: (R, sum C, P)."""
    out, start = [], 0
    for i, b in enumerate(boxes):
        pts = roi_to_image_points(b, points[start:start + len(b)])  # (Ri, P, 2) in pixels
        per_level = []
        for f, s in zip(features, strides):
            h, w = f.shape[-2:]
            norm = pts / torch.tensor([w * s, h * s], device=pts.device, dtype=pts.dtype)
            per_level.append(point_sample(f[i:i + 1], norm.reshape(1, -1, 2), align_corners=False)
                             .reshape(f.shape[1], len(b), -1).transpose(0, 1))
        out.append(torch.cat(per_level, dim=1))
        start += len(b)
    return torch.cat(out, dim=0)


class PointHead(nn.Module):
    """The point MLP: 1x1 convolutions over [fine features, coarse logits], coarse logits re-fed
    before every layer (paper sec. 4). (R, C_fine + K, P) -> (R, K, P)."""

    def __init__(self, fine_channels: int, num_classes: int, fc_dim: int, num_fc: int):
        super().__init__()
        self.fcs = nn.ModuleList()
        in_ch = fine_channels + num_classes
        for _ in range(num_fc):
            self.fcs.append(nn.Conv1d(in_ch, fc_dim, 1))
            in_ch = fc_dim + num_classes
        self.predictor = nn.Conv1d(in_ch, num_classes, 1)
        for layer in self.fcs:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fine, coarse], dim=1)
        for layer in self.fcs:
            x = torch.cat([F.relu(layer(x)), coarse], dim=1)
        return self.predictor(x)


@ROI_MASK_HEAD_REGISTRY.register()
class CN2PointRendMaskHead(nn.Module):
    """
    A ``ROI_MASK_HEAD``: ``MODEL.ROI_MASK_HEAD.NAME: CN2PointRendMaskHead`` (detectron2's project
    registers its own head under the plain name), configured by ``MODEL.POINT_HEAD``.
    """

    @configurable
    def __init__(self, *, coarse_head: MaskRCNNConvUpsampleHead, point_head: PointHead, in_features: List[str],
                 strides: List[int], num_points: int, oversample: float, importance: float,
                 subdivision_steps: int, subdivision_points: int, point_loss_weight: float):
        super().__init__()
        self.coarse_head, self.point_head = coarse_head, point_head
        self.in_features, self.strides = in_features, strides
        self.num_points, self.oversample, self.importance = num_points, oversample, importance
        self.subdivision_steps, self.subdivision_points = subdivision_steps, subdivision_points
        self.point_loss_weight = point_loss_weight

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        p = cfg.MODEL.POINT_HEAD
        num_classes = 1 if cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES
        return {
            "coarse_head": MaskRCNNConvUpsampleHead(cfg, input_shape),
            "point_head": PointHead(input_shape.channels * len(p.IN_FEATURES), num_classes, p.FC_DIM, p.NUM_FC),
            "in_features": list(p.IN_FEATURES), "strides": list(p.FEATURE_STRIDES),
            "num_points": p.TRAIN_NUM_POINTS, "oversample": p.OVERSAMPLE_RATIO, "importance": p.IMPORTANCE_RATIO,
            "subdivision_steps": p.SUBDIVISION_STEPS, "subdivision_points": p.SUBDIVISION_NUM_POINTS,
            "point_loss_weight": p.LOSS_WEIGHT,
        }

    def forward(self, x: torch.Tensor, instances: List[Instances], features: Dict[str, torch.Tensor] = None):
        """
        Args:
            x: pooled RoI features (R, C, S, S) for the coarse head.
            instances: training: proposals with gt_classes/gt_masks; inference: detections.
            features: the FPN maps by name (fine-grained features).
        Returns:
            training: {"loss_mask", "loss_mask_point"}; inference: ``instances`` with pred_masks
            (R, 1, M * 2^steps, M * 2^steps).
        """
        coarse = self.coarse_head.layers(x)  # (R, K, M, M)
        feats = [features[f] for f in self.in_features]
        image_sizes = [i.image_size for i in instances]
        if self.training:
            loss_mask = mask_rcnn_loss(coarse, instances, self.coarse_head.vis_period) * self.coarse_head.loss_weight
            boxes = [i.proposal_boxes.tensor for i in instances]
            classes = cat([i.gt_classes for i in instances])
            with torch.no_grad():
                points = sample_training_points(coarse, classes, self.num_points, self.oversample, self.importance)
            logits = self._point_logits(feats, boxes, points, coarse, image_sizes, classes)
            # Foreground RoIs only reach the mask head: score each at its own class.
            logits = logits[:, 0] if logits.shape[1] == 1 else logits[torch.arange(len(classes)), classes]
            targets = self._point_targets(instances, points, 4 * coarse.shape[-1])
            loss_point = F.binary_cross_entropy_with_logits(logits, targets, reduction="mean") if len(targets) \
                else logits.sum() * 0
            return {"loss_mask": loss_mask, "loss_mask_point": loss_point * self.point_loss_weight}
        boxes = [i.pred_boxes.tensor for i in instances]
        classes = cat([i.pred_classes for i in instances])
        mask = coarse
        for _ in range(self.subdivision_steps if len(classes) else 0):
            mask = F.interpolate(mask, scale_factor=2, mode="bilinear", align_corners=False)
            r, k, h, w = mask.shape
            n = min(self.subdivision_points, h * w)
            idx = uncertainty(mask, classes).view(r, h * w).topk(n, dim=1).indices
            points = torch.stack([(idx % w).float() + 0.5, (idx // w).float() + 0.5], dim=2) / torch.tensor(
                [w, h], device=mask.device)
            logits = self._point_logits(feats, boxes, points, coarse, image_sizes, classes)
            mask = mask.view(r, k, h * w).scatter(2, idx[:, None, :].expand(-1, k, -1), logits).view(r, k, h, w)
        mask_rcnn_inference(mask, instances)
        return instances

    def _point_logits(self, feats, boxes, points, coarse, image_sizes, classes):
        """(R, K, P) point-head logits at box-normalised ``points`` (R, P, 2)."""
        fine = fine_grained_features(feats, self.strides, boxes, points, image_sizes)
        coarse_at = point_sample(coarse, points, align_corners=False)
        return self.point_head(fine, coarse_at)

    @staticmethod
    def _point_targets(instances, points, resolution: int) -> torch.Tensor:
        """Ground-truth mask values (R, P) at box-normalised ``points`` (R, P, 2)."""
        targets, start = [], 0
        for inst in instances:
            n = len(inst)
            if n == 0:
                continue
            boxes = inst.proposal_boxes.tensor
            # Rasterise each GT mask inside its proposal finely, then sample it at the points.
            fine = inst.gt_masks.crop_and_resize(boxes, resolution).to(points.dtype)
            targets.append(point_sample(fine[:, None], points[start:start + n], align_corners=False)[:, 0])
            start += n
        return cat(targets) if targets else points.new_zeros((0, points.shape[1]))
