"""
Classification losses of the RoI box head, selected by ``MODEL.ROI_BOX_HEAD.CLS_LOSS`` (Table 2).

Each loss takes the box head's logits of shape (R, C + 1) — C categories, background last, as
detectron2's ``FastRCNNOutputLayers`` produces them — and the RoIs' labels (R,) in [0, C] (C is
background). It returns a scalar and says how logits become the (R, C + 1) probabilities that
detectron2's ``fast_rcnn_inference`` expects (it ignores the last, background column).

- ``softmax``: cross-entropy over C + 1 classes (detectron2's default).
- ``sigmoid``: binary cross-entropy on the C category logits; background = all targets 0.
- ``eql``: Equalization Loss (Tan et al., CVPR 2020, eq. 4-6): sigmoid BCE where, for foreground
  RoIs, the negative terms of tail categories are dropped.
- ``fedloss``: the federated loss (report section 3): sigmoid BCE on a per-iteration subset S of
  categories — every category among the iteration's labels plus negatives drawn in proportion to
  (training image count)^0.5 until |S| reaches its size — and no loss outside S.
The sigmoid family normalises as the report's implementation does: the BCE summed over categories
and RoIs, divided by the number of RoIs R.
"""
import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.utils.registry import Registry

CLS_LOSS_REGISTRY = Registry("CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = "Classification losses of the RoI box head; built with (cfg)."

# LVIS v1 reference sizes that the defaults scale from (report sections 3 and 4.1).
LVIS_V1_CLASSES, LVIS_FED_LOSS_CLASSES, LVIS_EQL_KEEP = 1203, 50, 200


def _register(name: str):
    """Register under the name the config uses (fvcore's ``register`` only takes ``__name__``)."""
    def deco(obj):
        CLS_LOSS_REGISTRY._do_register(name, obj)
        return obj
    return deco


def build_cls_loss(cfg):
    name = cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS
    if name not in CLS_LOSS_REGISTRY:
        allowed = ", ".join(sorted(CLS_LOSS_REGISTRY._obj_map))
        raise ValueError(f"MODEL.ROI_BOX_HEAD.CLS_LOSS={name!r}; allowed: {allowed}")
    return CLS_LOSS_REGISTRY.get(name)(cfg)


def load_image_counts(path: str, num_classes: int) -> torch.Tensor:
    """
    Per-category training image counts, (C,) float, from a ``cat_info.json`` (list of {id,
    image_count}; ids 1..C in LVIS order, as the prepare stage writes it).
    """
    if not path:
        raise ValueError("MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH is empty: eql and fedloss need the training "
                         "set's cat_info.json (written by `python -m pipeline.data.prepare`)")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH: {file} not found (run the prepare stage)")
    info = sorted(json.loads(file.read_text()), key=lambda c: c["id"])
    if len(info) != num_classes:
        raise ValueError(f"{file}: {len(info)} categories, but MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}")
    return torch.tensor([float(c["image_count"]) for c in info])


def _scaled(value: int, reference: int, num_classes: int) -> int:
    """``value`` if set (>= 0), else the LVIS v1 reference as the same fraction of C (at least 1)."""
    return value if value >= 0 else max(1, round(num_classes * reference / LVIS_V1_CLASSES))


@_register("softmax")
class SoftmaxCE:
    """Softmax cross-entropy over C + 1 classes, averaged over the R RoIs (detectron2's default)."""

    def __init__(self, cfg=None):
        pass

    def init_bias(self, cls_score: torch.nn.Linear) -> None:
        """Softmax starts unbiased (detectron2's initialisation)."""

    def __call__(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
        if logits.numel() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, gt_classes, reduction="mean")

    @staticmethod
    def probs(logits: torch.Tensor) -> torch.Tensor:
        return F.softmax(logits, dim=-1)


@_register("sigmoid")
class SigmoidCE:
    """
    Binary cross-entropy on the C category logits (the background logit is unused): a foreground
    RoI of class k has target 1 for k and 0 elsewhere, a background RoI all 0. Summed over
    categories and RoIs, divided by R. Subclasses choose which (RoI, category) terms count.
    """

    def __init__(self, cfg):
        self.num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        self.prior_prob = cfg.MODEL.ROI_BOX_HEAD.PRIOR_PROB

    def init_bias(self, cls_score: torch.nn.Linear) -> None:
        """Class logits start at the prior probability (Lin et al., focal loss, section 4.1)."""
        torch.nn.init.constant_(cls_score.bias, -math.log((1 - self.prior_prob) / self.prior_prob))

    def weights(self, gt_classes: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        """(R, C) weights of the BCE terms, or None for all ones."""
        return None

    def __call__(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
        if logits.numel() == 0:
            return logits.sum() * 0.0
        r, c = logits.shape[0], self.num_classes
        targets = F.one_hot(gt_classes, c + 1)[:, :c].to(logits.dtype)  # background -> all zeros
        loss = F.binary_cross_entropy_with_logits(logits[:, :c], targets, reduction="none")
        w = self.weights(gt_classes, targets)
        if w is not None:
            loss = loss * w
        return loss.sum() / r

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid of the C category logits, and 0 for background (unused by the sigmoid family)."""
        c = self.num_classes
        return torch.cat([logits[:, :c].sigmoid(), logits.new_zeros((logits.shape[0], 1))], dim=1)


@_register("eql")
class EqualizationLoss(SigmoidCE):
    """
    EQL (Tan et al. 2020, eq. 5): w_j = 1 - E(r) T(f_j) (1 - y_j), where E(r) = 1 for a foreground
    RoI and T(f_j) = 1 for a tail category. Tail = a training image count below the N-th largest
    (N = ``EQL_KEEP_TOPK``), as the official ``_load_class_freq`` thresholds with
    ``kthvalue(counts, C - EQL_FREQ_CAT + 1)``: categories tied with the N-th stay frequent, so
    more than N can be. So a foreground RoI gets no negative gradient on tail categories;
    background RoIs keep every term.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        counts = load_image_counts(cfg.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH, self.num_classes)
        keep = _scaled(cfg.MODEL.ROI_BOX_HEAD.EQL_KEEP_TOPK, LVIS_EQL_KEEP, self.num_classes)
        # The N-th largest count is the (C - N + 1)-th smallest.
        threshold = counts.kthvalue(self.num_classes - min(keep, self.num_classes) + 1).values
        self.tail = (counts < threshold).float()  # (C,) T(f_j)
        self.keep = keep

    def weights(self, gt_classes, targets):
        foreground = (gt_classes < self.num_classes).to(targets.dtype)[:, None]  # E(r), (R, 1)
        return 1.0 - foreground * self.tail.to(targets.device)[None, :] * (1.0 - targets)


@_register("fedloss")
class FederatedLoss(SigmoidCE):
    """
    The federated loss (report section 3). Each call (every training iteration, in every cascade
    stage, as in the report's implementation) draws a category set S: all categories among the
    RoIs' labels, plus negatives sampled without replacement with probability proportional to
    image_count^power (power 0.5) until |S| = ``FED_LOSS_NUM_CLASSES`` (50 on LVIS v1; the
    background label counts as one when present, as in the official code), or all C categories
    when fewer. Only the BCE terms of categories in S count; the rest get no gradient.
    """

    def __init__(self, cfg, generator: Optional[torch.Generator] = None):
        super().__init__(cfg)
        counts = load_image_counts(cfg.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH, self.num_classes)
        self.sample_weights = counts ** cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER
        self.set_size = _scaled(cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES, LVIS_FED_LOSS_CLASSES,
                                self.num_classes)
        self.generator = generator

    def sample_classes(self, gt_classes: torch.Tensor) -> torch.Tensor:
        """
        S: sorted category indices from the RoIs' labels (R,). As the official
        ``get_fed_loss_inds``, the labels present count towards |S| including the background index
        C, which gets no loss: with background RoIs, S holds ``set_size - 1`` categories.
        """
        appeared = gt_classes.unique().cpu()
        positives = appeared[appeared < self.num_classes]
        weights = self.sample_weights.clone()
        weights[positives] = 0.0
        n_neg = min(max(self.set_size - len(appeared), 0), int((weights > 0).sum()))
        negatives = (torch.multinomial(weights, n_neg, replacement=False, generator=self.generator)
                     if n_neg > 0 else positives.new_zeros(0))
        return torch.cat([positives, negatives]).sort().values

    def weights(self, gt_classes, targets):
        in_set = torch.zeros(self.num_classes, dtype=targets.dtype)
        in_set[self.sample_classes(gt_classes)] = 1.0
        return in_set.to(targets.device)[None, :].expand_as(targets)
