"""BiFPN neck (EfficientDet, Tan et al. 2020) on three levels, P3-P5 (strides 8, 16, 32).

One BiFPN layer is a top-down pass followed by a bottom-up pass, with an extra edge from each input to the output
of the same level (EfficientDet §3.2, Fig. 2f)::

    P5_in ──────────────────────────────► P5_out
      │ up                                  ▲ down
    P4_in ──► P4_td ──────────────────► P4_out
                │ up                        ▲ down
    P3_in ──────┴──────────────────────► P3_out

Every node fuses its inputs with *fast normalized fusion* (§3.3): ``O = sum_i w_i * I_i / (eps + sum_j w_j)`` with
``w_i = relu(w_i)`` learnt scalars, then applies ReLU and a depthwise-separable conv block (3x3 depthwise + BN +
ReLU, 1x1 pointwise + BN + ReLU). EfficientDet uses swish and no activation inside the separable conv; ReLU is used
everywhere here for mobile/quantisation friendliness. Resampling is bilinear
upsampling and 3x3 stride-2 max pooling (EfficientDet's downsampling), sized to the target map so any input size
works.

Teachers stack several layers with more channels (compound-scaling style: ``repeats`` and ``channels`` are the
depth/width knobs, EfficientDet §4.2); students use one layer with few channels, which is a light PAN.

Example:
    >>> import torch
    >>> neck = BiFPN((24, 48, 96), channels=32, repeats=1)
    >>> feats = [torch.zeros(1, c, s, s) for c, s in ((24, 8), (48, 4), (96, 2))]
    >>> [tuple(p.shape) for p in neck(feats)]
    [(1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dataengine.models.layers import conv_block, conv_bn_act, resize_to

__all__ = ["BiFPN", "BiFPNLayer", "FastNormalizedFusion"]


class FastNormalizedFusion(nn.Module):
    """``sum_i relu(w_i) * x_i / (eps + sum_j relu(w_j))`` (EfficientDet §3.3), then ReLU and a 3x3 conv block.

    Fast normalised fusion instead of softmax fusion: EfficientDet's ablation shows the same accuracy at ~30% less
    GPU time, and it is just multiplies and adds on a phone.
    """

    def __init__(self, num_inputs: int, channels: int, *, eps: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps
        self.conv = conv_block(channels, channels, depthwise=True)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        fused = sum(w[i] * x for i, x in enumerate(inputs))  # [B, C, H, W]
        return self.conv(F.relu(fused))


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up BiFPN pass over ``[P3, P4, P5]`` with ``channels`` channels each."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.p4_td = FastNormalizedFusion(2, channels)
        self.p3_out = FastNormalizedFusion(2, channels)
        self.p4_out = FastNormalizedFusion(3, channels)
        self.p5_out = FastNormalizedFusion(2, channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = feats
        p4_td = self.p4_td([p4, resize_to(p5, p4)])
        p3_out = self.p3_out([p3, resize_to(p4_td, p3)])
        p4_out = self.p4_out([p4, p4_td, _downsample(p3_out, p4)])
        p5_out = self.p5_out([p5, _downsample(p4_out, p5)])
        return [p3_out, p4_out, p5_out]


def _downsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # 3x3 stride-2 max pool, padding 1: ceil(H/2), which is how the backbones shrink maps too.
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    return resize_to(x, like)  # only resamples in the rare case the sizes still differ


class BiFPN(nn.Module):
    """1x1 lateral projections of ``C3``-``C5`` to ``channels``, then ``repeats`` BiFPN layers.

    Args:
        in_channels: Channels of the backbone's stride-8, -16 and -32 features.
        channels: Width of every level (EfficientDet's ``W_bifpn``).
        repeats: Number of BiFPN layers (EfficientDet's ``D_bifpn``).
    """

    def __init__(self, in_channels: Sequence[int], channels: int, repeats: int) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"BiFPN takes 3 levels (strides 8, 16, 32), got in_channels={list(in_channels)}")
        if channels < 1 or repeats < 1:
            raise ValueError(f"BiFPN needs channels >= 1 and repeats >= 1, got channels={channels}, repeats={repeats}")
        self.lateral = nn.ModuleList(conv_bn_act(c, channels, 1, act=False) for c in in_channels)
        self.layers = nn.ModuleList(BiFPNLayer(channels) for _ in range(repeats))
        self.channels = channels

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [lat(f) for lat, f in zip(self.lateral, feats)]  # 3 x [B, C, H/s, W/s]
        for layer in self.layers:
            out = layer(out)
        return out
