"""ResNet/ResNeXt + FPN with levels P3-P7 (P6 and P7 computed from P5), as CenterNet2 uses."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7

from .deform import use_torchvision_deform


@BACKBONE_REGISTRY.register()
def build_p67_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    FPN on ``MODEL.FPN.IN_FEATURES`` (res3-res5 -> P3-P5) plus P6, P7 by stride-2 convolutions on
    P5. Depth, groups and width per group come from ``MODEL.RESNETS`` (R18/R50/X101-32x8d ...);
    deformable stages (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) use torchvision's DCNv2.
    """
    bottom_up = use_torchvision_deform(build_resnet_backbone(cfg, input_shape))
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_p2p6_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    detectron2's standard FPN: res2-res5 -> P2-P5, P6 by max-pooling P5 (Table 3 "+ FPN P2-P6"),
    with the same ResNet options and torchvision DCNv2 as the P3-P7 builder.
    """
    bottom_up = use_torchvision_deform(build_resnet_backbone(cfg, input_shape))
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
