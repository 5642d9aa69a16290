"""The box predictor of every cascade stage, with a pluggable classification loss."""
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, _log_classification_stats
from detectron2.structures import Instances

from .losses import build_cls_loss


class CN2FastRCNNOutputLayers(FastRCNNOutputLayers):
    """
    detectron2's ``FastRCNNOutputLayers`` (a linear layer to C + 1 class logits and one to the box
    deltas), whose classification loss and score function come from ``model/losses.py``.
    """

    @configurable
    def __init__(self, input_shape, *, cls_loss, **kwargs):
        super().__init__(input_shape, **kwargs)
        self.cls_loss = cls_loss
        self.cls_loss.init_bias(self.cls_score)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["cls_loss"] = build_cls_loss(cfg)
        return ret

    def losses(self, predictions, proposals: List[Instances]):
        """
        Args:
            predictions: (class logits (R, C + 1), box deltas (R, 4)) from :meth:`forward`.
            proposals: the R RoIs with ``proposal_boxes``, ``gt_classes`` and (when any is
                foreground) ``gt_boxes``.
        """
        scores, deltas = predictions
        gt_classes = cat([p.gt_classes for p in proposals], dim=0) if proposals else torch.empty(0)
        _log_classification_stats(scores, gt_classes)
        if proposals:
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                            for p in proposals], dim=0)
        else:
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=deltas.device)
        losses = {
            "loss_cls": self.cls_loss(scores, gt_classes),
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, deltas, gt_classes),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def predict_probs(self, predictions, proposals: List[Instances]):
        """Per image, (Ri, C + 1) class probabilities under this head's loss (softmax or sigmoid)."""
        scores, _ = predictions
        return self.cls_loss.probs(scores).split([len(p) for p in proposals], dim=0)
