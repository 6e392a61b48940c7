"""Fold BatchNorm into the convolution before it, for inference: the same network, fewer passes over memory.

In eval mode ``BN(conv(x)) = conv'(x)`` with ``conv'`` the convolution whose weights are scaled by
``gamma / sqrt(var + eps)`` and whose bias absorbs the shift; the arithmetic is PyTorch's own
(:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`). Outputs differ from the unfolded network only by float rounding
(~1e-5 on the demo teacher's logits). What is hand-written here is finding the pairs, because the generic finder,
``torch.fx.experimental.optimization.fuse``, needs a symbolically traceable model and the multi-task model's heads
read tensor shapes in Python. Two patterns cover the models of :mod:`dataengine.models`:

- a ``Conv2d`` directly followed by a ``BatchNorm2d`` in an ``nn.Sequential`` (``Conv2dNormActivation``, the
  ResNet stem and downsample branches, MobileNet blocks);
- ``conv{i}`` / ``bn{i}`` attribute pairs of torchvision's ``BasicBlock`` and ``Bottleneck``.

A BatchNorm that follows a convolution shared by several norms (the detection head's per-level norms,
:class:`~dataengine.models.heads.GFLHead`) is left as it is.

Example:
    >>> from dataengine.models import create_model
    >>> folded, count = fold_batchnorm(create_model("resnet18_bifpn_gfl", num_classes=3))
    >>> count > 0 and not folded.training
    True
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm"]


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every foldable BatchNorm folded into its convolution.

    Args:
        model: Any module; it is left as it was (weights, mode, memory format).

    Returns:
        The folded copy (in eval mode: its BatchNorms would no longer exist to train) and the number of folds.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> folded, count = fold_batchnorm(net)
        >>> count, type(folded[1]).__name__
        (1, 'Identity')
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in list(folded.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            pairs = [(a, b) for a, b in zip(names, names[1:])
                     if isinstance(module._modules[a], nn.Conv2d) and isinstance(module._modules[b], nn.BatchNorm2d)]
        else:
            pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)
                     if isinstance(getattr(module, f"conv{i}", None), nn.Conv2d)
                     and isinstance(getattr(module, f"bn{i}", None), nn.BatchNorm2d)]
        for conv, norm in pairs:
            setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, norm)))
            setattr(module, norm, nn.Identity())
            count += 1
    return folded, count
