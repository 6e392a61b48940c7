"""Single-process or ``torchrun`` training from one entry point.

A stage script calls nothing special: :class:`~dataengine.engine.Trainer` calls :func:`init_distributed`, which joins
the process group described by ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) when ``WORLD_SIZE > 1`` and does nothing otherwise. Backend: NCCL when every rank of a machine has a
GPU of its own, else Gloo: on CPU, and when ranks share GPUs (``LOCAL_RANK`` modulo the GPU count picks the device),
which NCCL refuses. Sharing pays for pseudo-labelling, whose per-image host work leaves one GPU mostly idle (README,
"GPU path"); training ranks should each have their own GPU. Only rank 0 writes files, logs and progress bars
(:func:`is_main_process`); the script calls :func:`cleanup` at the end.

BatchNorm under DDP: on CUDA with NCCL the trainer converts BatchNorm to :class:`torch.nn.SyncBatchNorm` (batch
statistics over all ranks). SyncBatchNorm refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU or
XPU", torch ``nn/modules/batchnorm.py``), so on CPU, and with Gloo, the batch statistics are per rank; DDP's default
buffer sync (``broadcast_buffers``, now ``forward_sync_buffers``) copies rank 0's running statistics to every rank
before each forward, and the trainer broadcasts the buffers once more at the end of each epoch, so every rank ends an
epoch with identical weights and buffers.

Example:
    >>> init_distributed()  # no WORLD_SIZE in the environment: single process
    False
    >>> get_rank(), get_world_size(), is_main_process()
    (0, 1, True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from dataengine.engine.seeding import derive_seed

__all__ = [
    "DistributedWeightedSampler",
    "all_reduce_grads",
    "all_reduce_mean",
    "barrier",
    "broadcast_module",
    "check_sampler_weights",
    "cleanup",
    "default_backend",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "process_device",
    "unwrap_model",
]


def is_distributed() -> bool:
    """Whether a process group is initialised (this process is one of several ranks)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """Rank on this machine, from ``torchrun``'s ``LOCAL_RANK`` (0 when unset); picks the CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Whether this process is rank 0, the only one that writes files, logs and progress bars.

    Example:
        >>> is_main_process()
        True
    """
    return get_rank() == 0


def default_backend() -> str:
    """``"nccl"`` when CUDA is available and this machine's ranks (``LOCAL_WORLD_SIZE``, set by ``torchrun``) do
    not outnumber its GPUs, else ``"gloo"``."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_world <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group described by ``torchrun``'s environment, if there is one.

    Idempotent: a second call (or a group the caller created) is left as it is.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; ``None``: :func:`default_backend`.

    Returns:
        Whether this process is part of a multi-process group.

    Raises:
        ValueError: ``WORLD_SIZE`` is not an integer.

    Example:
        >>> init_distributed()  # under torchrun --nproc_per_node 2  # doctest: +SKIP
        True
    """
    if is_distributed():
        return True
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None
    if world_size <= 1:
        return False
    backend = backend or default_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(process_device())
    dist.init_process_group(backend=backend)  # env:// rendezvous set up by torchrun
    return True


def process_device() -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Example:
        >>> process_device().type in ("cpu", "cuda")
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[process_device().index])
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op in a single process); call it once at the end of a script."""
    if is_distributed():
        dist.destroy_process_group()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the module itself otherwise).

    A ``loss_fn`` receives the wrapped model: call ``model(images)`` for the forward (DDP's gradient hooks need it)
    and ``unwrap_model(model).loss(...)`` for anything else.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> unwrap_model(m) is m
        True
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over all ranks (identity in a single process).

    Every rank must pass the same keys; they are reduced in sorted order.

    Example:
        >>> all_reduce_mean({"loss": 2.0}, torch.device("cpu"))
        {'loss': 2.0}
    """
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)  # [K]
    dist.all_reduce(packed)
    packed /= get_world_size()
    return dict(zip(keys, packed.tolist(), strict=True))


def broadcast_module(module: nn.Module, *, params: bool = True, buffers: bool = True, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and/or buffers (BatchNorm statistics, EMA counters) to every rank, in place.

    No-op in a single process.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*(module.parameters() if params else ()), *(module.buffers() if buffers else ())]:
            dist.broadcast(tensor.data, src=src)


def all_reduce_grads(module: nn.Module) -> None:
    """Average the gradients of ``module``'s trainable parameters over ranks (no-op in a single process).

    For modules trained outside the DDP-wrapped model (distillation adapters called from a ``loss_fn``): DDP only
    synchronises the gradients of the module it wraps. A parameter without a gradient on this rank counts as zero,
    so every rank takes part in every reduction.
    """
    if not is_distributed():
        return
    world = get_world_size()
    for param in module.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad /= world


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement, split over ranks (DDP counterpart of ``WeightedRandomSampler``).

    Each epoch, every rank draws the same ``ceil(N / world) * world`` indices from ``torch.multinomial`` with a
    generator seeded by ``(seed, epoch)`` and keeps every ``world``-th one from its rank, as
    ``DistributedSampler`` splits a permutation. Call :meth:`set_epoch` at the start of each epoch.

    Args:
        weights: One non-negative weight per dataset item (not necessarily normalised).
        num_replicas: Number of ranks (default: the process group's size).
        rank: This rank (default: the process group's rank).
        seed: Base seed, the same on every rank.

    Raises:
        ValueError: Negative, non-finite or all-zero weights; a rank out of range.

    Example:
        >>> s0 = DistributedWeightedSampler([1.0, 0.0, 1.0, 0.0], num_replicas=2, rank=0, seed=0)
        >>> s1 = DistributedWeightedSampler([1.0, 0.0, 1.0, 0.0], num_replicas=2, rank=1, seed=0)
        >>> sorted(set(list(s0) + list(s1))) <= [0, 2], len(s0)
        (True, 2)
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor, *, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, num_samples: int | None = None) -> None:
        self.weights = check_sampler_weights(weights)
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is out of range for {self.num_replicas} replicas")
        self.seed = seed
        self.epoch = 0
        # ``num_samples``: draws per epoch over all ranks (default: one per item), split evenly between the ranks.
        self.num_samples = math.ceil((num_samples or len(self.weights)) / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose draw :meth:`__iter__` returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        drawn = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=gen)
        return iter(drawn[self.rank :: self.num_replicas].tolist())


def check_sampler_weights(weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Validate per-item sampling weights and return them as float64 ``[N]``.

    Raises:
        ValueError: Empty, negative, non-finite or all-zero weights (the message gives the first bad index).

    Example:
        >>> check_sampler_weights([1, 2]).tolist()
        [1.0, 2.0]
    """
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()  # [N]
    if w.numel() == 0:
        raise ValueError("sampler weights are empty; expected one weight per dataset item")
    bad = (~torch.isfinite(w)) | (w < 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"sampler weight {i} is {w[i].item()}; expected a finite number >= 0")
    if w.sum() <= 0:
        raise ValueError("sampler weights are all zero; at least one item must have a positive weight")
    return w
