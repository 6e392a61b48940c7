"""Model cost: GFLOPs of one forward pass (``torch.utils.flop_counter``) and parameter counts.

``FlopCounterMode`` counts the FLOPs of matmuls and convolutions (and their backward, unused here), counting a
multiply-add as **2 FLOPs**; element-wise ops, BatchNorm, pooling and interpolation are not counted. So
``count_gflops`` is twice the "MACs"/"multiply-adds" that papers such as MobileNet report (a network of 569 M
mult-adds, MobileNet 1.0-224 in seed 003's table, counts as 1.14 GFLOPs here).

Example:
    >>> from dataengine.models import create_model
    >>> model = create_model("mobilenet_v3_small_gfl", num_classes=3)
    >>> 0.0 < count_gflops(model, 128) < 0.5
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_gflops", "count_params_m"]


def count_gflops(model: nn.Module, input_size: int | tuple[int, int]) -> float:
    """GFLOPs (1e9 FLOPs, multiply-add = 2) of one eval-mode forward pass on a ``[1, 3, H, W]`` input.

    The model's train/eval mode is restored afterwards.

    Example:
        >>> count_gflops(nn.Conv2d(3, 8, 1, bias=False), 10)  # 3 * 8 * 100 multiply-adds
        4.8e-06
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, h, w, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def count_params_m(model: nn.Module) -> float:
    """Parameters in millions (trainable or not; buffers excluded).

    Example:
        >>> count_params_m(nn.Linear(1000, 1000))
        1.001
    """
    return sum(p.numel() for p in model.parameters()) / 1e6
