"""torchvision classification backbones cut into four stages ending at strides 4, 8, 16 and 32.

The stage outputs are ``C2`` (stride 4, the low-level feature of the segmentation decoder) and ``C3``-``C5``
(strides 8/16/32, the neck's inputs). Stages are slices of the torchvision model, so torchvision's weights load
into them unchanged. Cut points (inclusive index of the last block of each stage in ``model.features``; checked
in the tests against the strides measured on a real forward):

=====================  ========  ========  =========  =========  ===============================================
backbone               stride 4  stride 8  stride 16  stride 32  note
=====================  ========  ========  =========  =========  ===============================================
resnet18 / resnet50    layer1    layer2    layer3     layer4     stem (conv1, bn1, relu, maxpool) joins layer1
mobilenet_v3_small     1         3         8          12         12 = final 1x1 conv (576 ch at width 1.0)
mobilenet_v3_large     3         6         12         16         16 = final 1x1 conv (960 ch)
mobilenet_v2           3         6         13         18         18 = final 1x1 conv (1280 ch)
=====================  ========  ========  =========  =========  ===============================================

The final 1x1 expansion conv is kept, as torchvision's LR-ASPP keeps it: it works on the smallest map, so it
adds depth and channels to the deepest feature (seed 004: "go deeper with lower resolution") for little compute.
Slicing is used rather than ``create_feature_extractor`` because it keeps plain modules (no FX graph), which
export to ONNX and load state dicts as-is.

Pretrained ImageNet weights are read only from the local torch hub cache (``torch.hub.get_dir()/checkpoints``),
never downloaded: this project runs offline and pretrained weights must never be required.

Example:
    >>> import torch
    >>> net = build_backbone("mobilenet_v3_small", width_mult=0.5)
    >>> [f.shape[-1] for f in net(torch.zeros(1, 3, 64, 64))]
    [16, 8, 4, 2]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

__all__ = ["STAGE_ENDS", "Backbone", "PretrainedWeightsMissing", "build_backbone", "pretrained_path"]

STRIDES = (4, 8, 16, 32)

# Inclusive index of the last block of each stage in ``model.features`` (see the module docstring).
STAGE_ENDS: dict[str, tuple[int, int, int, int]] = {
    "mobilenet_v3_small": (1, 3, 8, 12),
    "mobilenet_v3_large": (3, 6, 12, 16),
    "mobilenet_v2": (3, 6, 13, 18),
}
RESNETS = ("resnet18", "resnet50")


class PretrainedWeightsMissing(FileNotFoundError):
    """``pretrained=True`` but the torchvision checkpoint is not in the local torch hub cache."""


class Backbone(nn.Module):
    """A sequence of four stages; ``forward`` returns ``[C2, C3, C4, C5]`` at strides 4, 8, 16, 32.

    Attributes:
        arch: torchvision architecture name.
        channels: Output channels of the four stages.
    """

    def __init__(self, arch: str, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(stages) != len(STRIDES):
            raise ValueError(f"{arch}: expected {len(STRIDES)} stages, got {len(stages)}")
        self.arch = arch
        self.stages = nn.ModuleList(stages)
        self.channels: tuple[int, ...] = tuple(_out_channels(stage, arch) for stage in self.stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats  # [B, C_i, H/s_i, W/s_i] for s_i in 4, 8, 16, 32


def _out_channels(stage: nn.Module, arch: str) -> int:
    # The last BatchNorm of a stage normalises its output (projection BN of an inverted residual, bn2/bn3 or the
    # downsample BN of a ResNet block, which has the same width), whatever the width multiplier.
    norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms, f"{arch}: a backbone stage without BatchNorm"
    return norms[-1].num_features


def pretrained_path(arch: str) -> tuple[Path, str]:
    """Where ``arch``'s default torchvision ImageNet checkpoint must lie in the hub cache, and its download URL.

    Example:
        >>> pretrained_path("resnet18")[0].name
        'resnet18-f37072fd.pth'
    """
    url = tvm.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name, url


def _load_pretrained(model: nn.Module, arch: str) -> None:
    path, url = pretrained_path(arch)
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"pretrained=True for {arch}, but its ImageNet weights are not in the local torch hub cache: expected "
            f"{path}. This project never downloads weights: download {url} on a machine with internet and copy it "
            f"to {path} (or set TORCH_HOME), or use pretrained=False.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)


def build_backbone(arch: str, *, width_mult: float = 1.0, pretrained: bool = False) -> Backbone:
    """Build a torchvision backbone (``weights=None``) cut at strides 4/8/16/32.

    Args:
        arch: One of ``resnet18``, ``resnet50``, ``mobilenet_v3_small``, ``mobilenet_v3_large``, ``mobilenet_v2``.
        width_mult: MobileNet channel multiplier (ResNets accept only 1.0).
        pretrained: Load torchvision's default ImageNet weights from the local hub cache (only at width 1.0).

    Raises:
        ValueError: Unknown ``arch``, a width multiplier on a ResNet, or pretrained weights at width != 1.
        PretrainedWeightsMissing: ``pretrained=True`` and the checkpoint is not in the cache (the message names
            the expected file and its URL).

    Example:
        >>> build_backbone("resnet18").channels
        (64, 128, 256, 512)
    """
    if arch not in RESNETS and arch not in STAGE_ENDS:
        raise ValueError(f"unknown backbone {arch!r}; expected one of {sorted((*RESNETS, *STAGE_ENDS))}")
    if width_mult <= 0:
        raise ValueError(f"{arch}: width_mult must be > 0, got {width_mult}")
    if arch in RESNETS:
        if width_mult != 1.0:
            raise ValueError(f"{arch}: ResNet backbones have no width multiplier, got width_mult={width_mult}")
        net = getattr(tvm, arch)(weights=None)
        if pretrained:
            _load_pretrained(net, arch)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        return Backbone(arch, [stem, net.layer2, net.layer3, net.layer4])
    if pretrained and width_mult != 1.0:
        raise ValueError(f"{arch}: torchvision has ImageNet weights only for width_mult=1.0, got {width_mult}; "
                         "use pretrained=False")
    net = getattr(tvm, arch)(weights=None, width_mult=width_mult)
    if pretrained:
        _load_pretrained(net, arch)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            # torchvision's MobileNetV3 uses BN momentum 0.01 (TensorFlow's 0.99 decay, made for 600-epoch ImageNet
            # runs): after a few hundred from-scratch steps its running stats are still mostly the initial 0/1 and
            # the eval-mode model predicts nothing. PyTorch's default 0.1 (MobileNetV2's) tracks them in ~50 steps.
            module.momentum = 0.1
    bounds = (-1, *STAGE_ENDS[arch])
    stages = [net.features[start + 1:end + 1] for start, end in itertools.pairwise(bounds)]
    return Backbone(arch, stages)
