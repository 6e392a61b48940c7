"""Seeds and RNG states: the same seed gives the same run, and a resumed run continues the same random streams.

The trainer reseeds Python's ``random``, NumPy's global generator and torch (CPU and CUDA) at the start of every
epoch from ``derive_seed(seed, epoch, rank)``, and the samplers from ``derive_seed(seed, epoch)``. The random
numbers of epoch ``e`` therefore depend only on ``(seed, e, rank)``, not on how the run got there, which is what
makes a resumed run repeat an uninterrupted one. DataLoader workers need no ``worker_init_fn``: torch seeds each
worker's ``random``, NumPy and torch from the loader's generator (``torch/utils/data/_utils/worker.py``,
``_worker_loop``; torch >= 1.9), and that generator is reseeded every epoch too.

RNG states are also saved in checkpoints (:func:`rng_state`, tensors and numbers only, so they load with
``weights_only=True``) and restored on resume, so code that runs after ``fit`` sees the same streams as well.

Example:
    >>> seed_everything(0); a = torch.rand(1)
    >>> seed_everything(0); torch.equal(a, torch.rand(1))
    True
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["derive_seed", "rng_state", "seed_everything", "set_rng_state"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys such as ``(seed, epoch, rank)``.

    ``numpy.random.SeedSequence`` hashes the keys so that nearby tuples give unrelated streams (a plain
    ``seed + epoch`` would make run ``seed=1, epoch=0`` replay run ``seed=0, epoch=1``).

    Example:
        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (all devices).

    Example:
        >>> seed_everything(3); x = random.random()
        >>> seed_everything(3); x == random.random()
        True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seeding takes 32 bits
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and numbers (loadable with ``weights_only=True``).

    Example:
        >>> state = rng_state(); a = torch.rand(2)
        >>> set_rng_state(state); torch.equal(a, torch.rand(2))
        True
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()  # ('MT19937', uint32[624], int, int, float)
    version, internal, gauss_next = random.getstate()  # (3, 625 ints, float | None)
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states from :func:`rng_state`; CUDA states are restored only when the device count matches.

    Raises:
        KeyError: ``state`` lacks one of the keys :func:`rng_state` writes.
    """
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
