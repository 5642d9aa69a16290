"""
Modulated deformable convolution (DCNv2, Zhu et al., CVPR 2019) on ``torchvision.ops.deform_conv2d``.

detectron2 0.6's ``ModulatedDeformConv`` calls its compiled extension and refuses CPUs; this module
has the same parameters and call signature, ``conv(x, offset, mask)``, and runs on CPU and GPU.
:func:`use_torchvision_deform` swaps it into the deformable blocks that detectron2's ResNet builds
when ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` is on, keeping their weights.
"""
import torch
from detectron2.layers import ModulatedDeformConv
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock
from torch import nn
from torchvision.ops import deform_conv2d


class TVModulatedDeformConv(nn.Module):
    """
    y = norm(DCNv2(x; offset, mask)), then activation.

    Args of :meth:`forward`: x (N, C_in, H, W); offset (N, 2 * G * kh * kw, H', W'), the (dy, dx) of
    each kernel point per deformable group G; mask (N, G * kh * kw, H', W') in [0, 1].
    Returns (N, C_out, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, deformable_groups: int = 1, bias: bool = True,
                 norm: nn.Module = None, activation=None):
        super().__init__()
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.deformable_groups = groups, deformable_groups
        self.norm, self.activation = norm, activation
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    @classmethod
    def from_detectron2(cls, conv: ModulatedDeformConv) -> "TVModulatedDeformConv":
        """The same layer (weights, norm, activation) as a detectron2 ``ModulatedDeformConv``."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.deformable_groups, bias=conv.bias is not None, norm=conv.norm,
                  activation=conv.activation)
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def forward(self, x, offset, mask):
        # torchvision infers the weight groups (ResNeXt) from weight.shape[1] = C_in / groups.
        x = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                          dilation=self.dilation, mask=mask)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def use_torchvision_deform(module: nn.Module) -> nn.Module:
    """Replace the compiled-extension DCNv2 of every ``DeformBottleneckBlock`` in ``module``."""
    for block in module.modules():
        if isinstance(block, DeformBottleneckBlock) and isinstance(block.conv2, ModulatedDeformConv):
            block.conv2 = TVModulatedDeformConv.from_detectron2(block.conv2)
        elif isinstance(block, DeformBottleneckBlock):
            raise ValueError("MODEL.RESNETS.DEFORM_MODULATED must be True: only DCNv2 (modulated) has a "
                             "torchvision implementation here")
    return module
