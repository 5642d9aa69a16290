"""Cascade RoI heads for CenterNet2 (report sections 2 and 4) and the CascadeRCNN baseline."""
from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Instances

from .fast_rcnn import CN2FastRCNNOutputLayers
from .point_rend import CN2PointRendMaskHead


def combine_scores(cls_probs: torch.Tensor, proposal_scores: torch.Tensor) -> torch.Tensor:
    """
    The CenterNet2 test-time score (report section 4; official CustomCascadeROIHeads): the
    geometric mean of the proposal score and the cascade's classification score s. The agnostic
    CenterNet's proposal score is already sqrt(heatmap probability p) (official
    predict_single_level), so the final score is (s * sqrt(p))^0.5.

    Args:
        cls_probs: (R, C + 1) classification probabilities; proposal_scores: (R,) in [0, 1].
    Returns:
        (R, C + 1).
    """
    return (cls_probs * proposal_scores[:, None]).sqrt()


@ROI_HEADS_REGISTRY.register()
class CenterNet2CascadeROIHeads(CascadeROIHeads):
    """
    detectron2's ``CascadeROIHeads`` with (a) the pluggable classification loss of
    ``CN2FastRCNNOutputLayers`` in every stage and (b) optionally, at test, the sqrt(p * s) score
    rule (``MODEL.ROI_HEADS.MULT_PROPOSAL_SCORE``). Training is detectron2's unchanged.
    """

    @configurable
    def __init__(self, *, mult_proposal_score: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.mult_proposal_score = mult_proposal_score

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["mult_proposal_score"] = cfg.MODEL.ROI_HEADS.MULT_PROPOSAL_SCORE
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            CN2FastRCNNOutputLayers(cfg, head.output_shape, box2box_transform=Box2BoxTransform(weights=w))
            for head, w in zip(ret["box_heads"], cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS)
        ]
        return ret

    def _forward_mask(self, features, instances: List[Instances]):
        """detectron2's mask branch; PointRend also gets the FPN maps, for its fine-grained features."""
        if not self.mask_on or not isinstance(self.mask_head, CN2PointRendMaskHead):
            return super()._forward_mask(features, instances)
        if self.training:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
        boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
        pooled = self.mask_pooler([features[f] for f in self.mask_in_features], boxes)
        return self.mask_head(pooled, instances, features)

    def _forward_box(self, features, proposals: List[Instances], targets=None):
        if self.training:
            return super()._forward_box(features, proposals, targets)
        # Inference: run the stages, average their class probabilities, boxes from the last stage.
        proposal_scores = [p.objectness_logits.sigmoid() for p in proposals]
        features = [features[f] for f in self.box_in_features]
        image_sizes = [p.image_size for p in proposals]
        probs_per_stage, boxes = [], None
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            predictions = self._run_stage(features, proposals, k)
            boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
            probs_per_stage.append(self.box_predictor[k].predict_probs(predictions, proposals))
        scores = [torch.stack(per_image).mean(dim=0) for per_image in zip(*probs_per_stage)]
        if self.mult_proposal_score:
            scores = [combine_scores(s, p) for s, p in zip(scores, proposal_scores)]
        predictor = self.box_predictor[-1]
        instances, _ = fast_rcnn_inference(boxes, scores, image_sizes, predictor.test_score_thresh,
                                           predictor.test_nms_thresh, predictor.test_topk_per_image)
        return instances
