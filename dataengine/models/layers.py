"""Small building blocks shared by necks and heads: conv + BN + ReLU, its depthwise-separable variant, resizing.

Every conv is followed by BatchNorm: the seeds' recipe trains from scratch with BN and a large learning rate
(ScratchDet). Upsampling is bilinear interpolation only, never transposed convs (seed 000: "avoid transposed and
deformable convolutions"; seed 004: bilinear runs faster than deconvolution for similar accuracy).

Example:
    >>> import torch
    >>> block = conv_block(8, 16, depthwise=True)
    >>> block(torch.zeros(1, 8, 4, 4)).shape
    torch.Size([1, 16, 4, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

__all__ = ["conv_block", "conv_bn_act", "resize_to"]


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 1, *, groups: int = 1,
                act: bool = True) -> nn.Module:
    """``Conv2d`` (no bias: BN follows) + ``BatchNorm2d`` + optional ReLU, 'same' padding, stride 1.

    Example:
        >>> conv_bn_act(4, 8)(torch.zeros(2, 4, 3, 3)).shape
        torch.Size([2, 8, 3, 3])
    """
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, groups=groups,
                                activation_layer=nn.ReLU if act else None)


def conv_block(in_channels: int, out_channels: int, *, depthwise: bool) -> nn.Module:
    """A 3x3 feature conv: depthwise-separable (MobileNet: 3x3 depthwise + 1x1 pointwise, each BN + ReLU) or plain.

    Depthwise-separable costs ``9*C + C*C'`` multiply-adds per pixel instead of ``9*C*C'`` (seed 003), which is what
    makes the student's neck and heads cheap; teachers use plain 3x3 convs in their detection head.

    Example:
        >>> len(conv_block(8, 8, depthwise=True)), len(conv_block(8, 8, depthwise=False))
        (2, 3)
    """
    if depthwise:
        return nn.Sequential(conv_bn_act(in_channels, in_channels, 3, groups=in_channels),
                             conv_bn_act(in_channels, out_channels, 1))
    return conv_bn_act(in_channels, out_channels, 3)


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``x`` ``[B, C, h, w]`` to the spatial size of ``like`` (works for odd sizes too).

    Example:
        >>> resize_to(torch.zeros(1, 2, 3, 3), torch.zeros(1, 5, 6, 6)).shape
        torch.Size([1, 2, 6, 6])
    """
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
