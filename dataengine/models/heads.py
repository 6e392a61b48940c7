"""Dense GFL detection head (shared across P3-P5) and the SPP/LR-ASPP-style semantic segmentation head.

Detection head: a class tower and a box tower of ``num_convs`` 3x3 convs each, whose weights are shared by all
levels (GFL/NanoDet/EfficientDet) while each level keeps its own BatchNorm statistics (EfficientDet's class/box nets
do this: feature statistics differ between strides, a shared BN would mix them). Teachers use plain 3x3 convs and
a 3x3 output conv (GFL); students use depthwise-separable convs and a 1x1 output conv (NanoDet), seed 003.
Outputs are flattened level-major, row-major inside a level, i.e. the order of
:meth:`MultiTaskDetSeg.anchor_points`.

Segmentation head (seeds 004 and LR-ASPP, Howard et al. 2019), on the neck's P5 and P3 and the backbone's C2::

    P5 -> SPP (avg pools 1x1, 2x2, 4x4 + 1x1 convs, concat, 1x1) -> SE gate with skip: x * (1 + sigmoid(fc(gap x)))
       -> bilinear up to P3, + 1x1(P3) -> dw-sep 3x3                      (context refined on the stride-8 map)
       -> bilinear up to C2, concat 1x1(C2) -> dw-sep 3x3 -> 1x1 -> K+1 logits at stride 4

SPP rather than ASPP (seed 004: "SPP is faster than ASPP"; it only needs pooled maps of the deepest feature), the
SE gate with a skip ("skip + sigmoid works better than sigmoid only"), low-level features at 1/4 ("1/4 is enough
for most realtime cases"), depthwise + pointwise convs in the decoder, bilinear upsampling only.

Example:
    >>> import torch
    >>> head = GFLHead(16, num_classes=3, reg_max=7, num_convs=1, depthwise=True)
    >>> cls, dist = head([torch.zeros(2, 16, s, s) for s in (4, 2, 1)])
    >>> tuple(cls.shape), tuple(dist.shape)
    ((2, 21, 3), (2, 21, 32))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dataengine.models.layers import conv_block, conv_bn_act, resize_to

__all__ = ["GFLHead", "SegmentationHead"]


class _SharedConv(nn.Module):
    """3x3 conv (plain or depthwise-separable) with weights shared across levels and one BN per level, + ReLU."""

    def __init__(self, channels: int, num_levels: int, *, depthwise: bool) -> None:
        super().__init__()
        if depthwise:
            convs = [nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                     nn.Conv2d(channels, channels, 1, bias=False)]
        else:
            convs = [nn.Conv2d(channels, channels, 3, padding=1, bias=False)]
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_levels)) for _ in convs)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        for conv, norms in zip(self.convs, self.norms):
            x = F.relu(norms[level](conv(x)))
        return x


class GFLHead(nn.Module):
    """Per-location class logits ``[B, N, K]`` and side distributions ``[B, N, 4 * (reg_max + 1)]`` over levels.

    Args:
        channels: Input (neck) channels, kept through the towers.
        num_classes: ``K``.
        reg_max: Last distribution bin; each side covers ``[0, reg_max]`` strides.
        num_convs: Convs per tower.
        depthwise: Depthwise-separable towers and 1x1 outputs (students) or plain 3x3 (teachers).
        num_levels: Number of feature levels (3: P3-P5).
        prior_prob: Initial foreground probability of the class logits (RetinaNet/GFL: 0.01).
    """

    def __init__(self, channels: int, num_classes: int, reg_max: int, num_convs: int, *, depthwise: bool,
                 num_levels: int = 3, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.cls_tower = nn.ModuleList(_SharedConv(channels, num_levels, depthwise=depthwise) for _ in range(num_convs))
        self.reg_tower = nn.ModuleList(_SharedConv(channels, num_levels, depthwise=depthwise) for _ in range(num_convs))
        kernel = 1 if depthwise else 3
        self.cls_out = nn.Conv2d(channels, num_classes, kernel, padding=kernel // 2)
        self.reg_out = nn.Conv2d(channels, 4 * (reg_max + 1), kernel, padding=kernel // 2)
        # Learnt per-level scale of the distribution logits (GFL's Scale modules).
        self.scales = nn.Parameter(torch.ones(num_levels))
        for conv in (self.cls_out, self.reg_out):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cls_all, reg_all = [], []
        for level, feat in enumerate(feats):
            cls_feat, reg_feat = feat, feat
            for cls_conv, reg_conv in zip(self.cls_tower, self.reg_tower):
                cls_feat, reg_feat = cls_conv(cls_feat, level), reg_conv(reg_feat, level)
            cls = self.cls_out(cls_feat)  # [B, K, H, W]
            reg = self.reg_out(reg_feat) * self.scales[level]  # [B, 4(R+1), H, W]
            cls_all.append(cls.flatten(2).transpose(1, 2))  # [B, HW, K]
            reg_all.append(reg.flatten(2).transpose(1, 2))  # [B, HW, 4(R+1)]
        return torch.cat(cls_all, 1), torch.cat(reg_all, 1)  # [B, N, K], [B, N, 4(R+1)]


def _grid_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Average-pool ``x`` to about ``bins x bins`` cells with a fixed window (SPP's pyramid pooling).

    Equal to ``adaptive_avg_pool2d(x, bins)`` when the map size is a multiple of ``bins`` (inputs that are multiples
    of ``32 * bins``), and exportable to ONNX, which ``adaptive_avg_pool2d`` with an output size > 1 is not; a map
    smaller than ``bins`` is left as is.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    kernel = (math.ceil(h / bins), math.ceil(w / bins))
    return F.avg_pool2d(x, kernel, stride=kernel, ceil_mode=True)


class SegmentationHead(nn.Module):
    """Semantic logits ``[B, num_outputs, H/4, W/4]`` from ``C2`` (stride 4), ``P3`` (stride 8) and ``P5`` (stride 32).

    Args:
        low_channels: Channels of the backbone's stride-4 feature ``C2``.
        channels: Neck channels (of ``P3`` and ``P5``), also the decoder width.
        num_outputs: ``K + 1`` (0 = background).
        pool_sizes: SPP output grids on ``P5``.
    """

    def __init__(self, low_channels: int, channels: int, num_outputs: int,
                 pool_sizes: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        branch = max(8, channels // 4)
        self.pool_sizes = tuple(pool_sizes)
        # Pooled branches have no BN: a 1x1 pooled map of batch 1 has a single value per channel (LR-ASPP's pooled
        # branch has none either).
        self.spp = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, branch, 1), nn.ReLU()) for _ in self.pool_sizes)
        self.spp_fuse = conv_bn_act(channels + branch * len(self.pool_sizes), channels, 1)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1), nn.Sigmoid())
        self.p3_proj = conv_bn_act(channels, channels, 1)
        self.refine = conv_block(channels, channels, depthwise=True)
        low = max(16, channels // 2)
        self.low_proj = conv_bn_act(low_channels, low, 1)
        self.fuse = conv_block(channels + low, channels, depthwise=True)
        self.classifier = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, c2: torch.Tensor, p3: torch.Tensor, p5: torch.Tensor) -> torch.Tensor:
        pooled = [resize_to(conv(_grid_pool(p5, bins)), p5) for conv, bins in zip(self.spp, self.pool_sizes)]
        context = self.spp_fuse(torch.cat([p5, *pooled], 1))  # [B, C, H/32, W/32]
        context = context * (1 + self.gate(context))  # SE gate with skip (seed 004)
        x = self.refine(self.p3_proj(p3) + resize_to(context, p3))  # [B, C, H/8, W/8]
        x = self.fuse(torch.cat([resize_to(x, c2), self.low_proj(c2)], 1))  # [B, C, H/4, W/4]
        return self.classifier(x)  # [B, K+1, H/4, W/4]
