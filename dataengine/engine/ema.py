"""Exponential moving average of the weights (and BatchNorm buffers) for evaluation and the final model.

Built on :class:`torch.optim.swa_utils.AveragedModel` (``use_buffers=True``, so running statistics are averaged
too). The update is ``get_ema_multi_avg_fn``'s ``lerp`` with one change: the decay warms up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, the ``num_updates`` rule of TensorFlow's
``tf.train.ExponentialMovingAverage``. Without it a short run (a CPU demo of ~1000 iterations at ``decay=0.999``)
would still carry ``0.999 ** 1000 = 37 %`` of the random initialisation in its EMA.

Example:
    >>> from torch import nn
    >>> model = nn.Linear(2, 1)
    >>> ema = create_ema(model, decay=0.999)
    >>> ema.update_parameters(model)  # the first update copies the weights
    >>> torch.equal(ema.module.weight, model.weight)
    True
    >>> ema_decay_at(0.999, 0), round(ema_decay_at(0.999, 90), 2)
    (0.1, 0.91)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["create_ema", "ema_decay_at", "ema_multi_avg_fn"]


def ema_decay_at(decay: float, num_updates: int) -> float:
    """The decay used for the update after ``num_updates`` averaged models: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def ema_multi_avg_fn(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor | int], None]:
    """``AveragedModel``'s ``multi_avg_fn``: ``ema = lerp(ema, current, 1 - ema_decay_at(decay, n))``.

    Raises:
        ValueError: ``decay`` outside [0, 1].
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        weight = 1.0 - ema_decay_at(decay, int(num_averaged))
        # AveragedModel groups tensors by dtype; foreach lerp handles floating point only (as in get_ema_multi_avg_fn).
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, current, weight)
        else:  # integer buffers such as BatchNorm's num_batches_tracked: keep the model's count
            for e, c in zip(ema_params, current, strict=True):
                e.copy_(c)

    return update


def create_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (deep-copied by ``AveragedModel``), weights and buffers averaged.

    Example:
        >>> create_ema(nn.BatchNorm1d(3), 0.9).n_averaged.item()
        0
    """
    return AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(decay), use_buffers=True)
