"""
Classification losses of the RoI box head, selected by ``MODEL.ROI_BOX_HEAD.CLS_LOSS``.

Each loss takes the box head's logits of shape (R, C + 1) — C categories, background last, as
detectron2's ``FastRCNNOutputLayers`` produces them — and the RoIs' labels (R,) in [0, C] (C is
background). It returns a scalar loss and says how logits become the (R, C + 1) probabilities that
detectron2's ``fast_rcnn_inference`` expects (it drops the last, background column).
"""
import torch
import torch.nn.functional as F
from detectron2.utils.registry import Registry

CLS_LOSS_REGISTRY = Registry("CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = "Classification losses of the RoI box head; built with (cfg)."


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


@_register("softmax")
class SoftmaxCE:
    """
    detectron2's default: softmax cross-entropy over C + 1 classes, averaged over the R RoIs.
    """

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
