"""Optimizer and per-iteration learning-rate schedule from :class:`~dataengine.config.TrainParams`.

- Weight decay applies to weights of rank >= 2 (convolutions, linear layers) only; biases and normalisation
  parameters (rank <= 1) get none, as in timm's ``param_groups_weight_decay`` (decaying a BatchNorm scale towards 0
  only fights the normalisation).
- Both schedules start with ``warmup_epochs`` of warm-up, counted in iterations, and are stepped once per iteration
  through :class:`torch.optim.lr_scheduler.LambdaLR`:

  ``cosine``: linear warm-up from ``WARMUP_START_FACTOR * lr`` (torchvision's detection references warm up from
  ``lr / 1000``), then cosine annealing (Loshchilov & Hutter, SGDR) to ``COSINE_FINAL_FACTOR * lr`` at the last
  iteration.

  ``onecycle``: the 1cycle policy of Smith & Topin (2018) with ``OneCycleLR``'s defaults (``anneal_strategy="cos"``,
  ``div_factor=25``, ``final_div_factor=1e4``): cosine rise from ``lr / 25`` to ``lr`` during warm-up, cosine fall
  to ``lr / 25 / 1e4``. Written as a ``LambdaLR`` because ``OneCycleLR`` divides by zero when the warm-up is one
  iteration (``pct_start * total_steps == 1``) and does not warm up at all with ``pct_start=0``.

Example:
    >>> factor = lr_factor_fn("cosine", warmup_steps=10, total_steps=110)
    >>> round(factor(0), 4), factor(10), round(factor(109), 4)
    (0.001, 1.0, 0.01)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from dataengine.config import TrainParams

__all__ = [
    "COSINE_FINAL_FACTOR",
    "ONECYCLE_DIV_FACTOR",
    "ONECYCLE_FINAL_DIV_FACTOR",
    "WARMUP_START_FACTOR",
    "build_optimizer",
    "build_scheduler",
    "lr_factor_fn",
    "param_groups",
]

WARMUP_START_FACTOR = 1e-3
COSINE_FINAL_FACTOR = 0.01
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, object]]:
    """Split the trainable parameters of ``modules`` into a decayed and a non-decayed group.

    Parameters shared between modules are counted once; frozen parameters (``requires_grad=False``) are left out.

    Args:
        modules: The model and any extra trained modules (adapters).
        weight_decay: Decay of the rank >= 2 weights.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]``.

    Example:
        >>> groups = param_groups([nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))], 0.05)
        >>> [len(g["params"]) for g in groups], [g["weight_decay"] for g in groups]
        ([1, 3], [0.05, 0.0])
    """
    seen: set[int] = set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(modules: Iterable[nn.Module], params: TrainParams) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum, over :func:`param_groups` of ``modules``.

    ``params.momentum`` is SGD's momentum (AdamW keeps its default betas).

    Raises:
        ValueError: No trainable parameter.

    Example:
        >>> opt = build_optimizer([nn.Linear(2, 2)], TrainParams(optimizer="sgd", lr=0.1))
        >>> type(opt).__name__, opt.param_groups[0]["nesterov"]
        ('SGD', True)
    """
    groups = param_groups(modules, params.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("nothing to optimise: the model and extra modules have no trainable parameters")
    groups = [g for g in groups if g["params"]]
    if params.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=params.lr)
    # Nesterov needs a non-zero momentum (torch.optim.SGD refuses nesterov with momentum 0).
    return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, nesterov=params.momentum > 0)


def lr_factor_fn(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each iteration (see the module docstring).

    Args:
        schedule: ``"cosine"`` or ``"onecycle"``.
        warmup_steps: Warm-up iterations (capped at ``total_steps``).
        total_steps: Iterations in the whole run.

    Returns:
        ``factor(step)`` for ``step = 0 .. total_steps`` (past the end it stays at the final value).

    Raises:
        ValueError: Unknown schedule or ``total_steps < 1``.

    Example:
        >>> f = lr_factor_fn("onecycle", warmup_steps=5, total_steps=20)
        >>> round(f(0), 6), f(5), f(19) < 1e-5
        (0.04, 1.0, True)
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if schedule not in ("cosine", "onecycle"):
        raise ValueError(f"unknown schedule {schedule!r}; expected 'cosine' or 'onecycle'")
    warmup = min(max(warmup_steps, 0), total_steps)
    if schedule == "cosine":
        start, peak, final = WARMUP_START_FACTOR, 1.0, COSINE_FINAL_FACTOR
    else:
        start, peak, final = 1.0 / ONECYCLE_DIV_FACTOR, 1.0, 1.0 / ONECYCLE_DIV_FACTOR / ONECYCLE_FINAL_DIV_FACTOR
    decay_steps = max(total_steps - 1 - warmup, 1)

    def cos_between(a: float, b: float, t: float) -> float:
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * t))  # a at t=0, b at t=1

    def factor(step: int) -> float:
        if step < warmup:
            t = step / warmup
            return start + (peak - start) * t if schedule == "cosine" else cos_between(start, peak, t)
        return cos_between(peak, final, min((step - warmup) / decay_steps, 1.0))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, params: TrainParams,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-iteration schedule of ``params`` (``warmup_epochs`` converted to iterations, rounded).

    Example:
        >>> opt = build_optimizer([nn.Linear(2, 2)], TrainParams(lr=0.1))
        >>> sched = build_scheduler(opt, TrainParams(lr=0.1, epochs=2, warmup_epochs=1), steps_per_epoch=10)
        >>> round(opt.param_groups[0]["lr"], 6)
        0.0001
    """
    total = params.epochs * steps_per_epoch
    warmup = round(params.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(params.schedule, warmup, total))
