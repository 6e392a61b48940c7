"""BatchNorm statistics re-estimated on the images being labelled (AdaBN), so the teacher normalises each domain by
its own statistics.

A teacher trained on the general set normalises every layer by the general set's BatchNorm statistics. The
scenario's images (another camera, colour cast, blur) shift those statistics, and every layer after the first sees
inputs it was not trained on. AdaBN (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain
Adaptation") re-estimates the running mean and variance of every BatchNorm layer on the target images and changes
nothing else: no labels, no gradients, one forward pass. :func:`adapt_batchnorm` does that on a copy of the model
with :func:`torch.optim.swa_utils.update_bn` (reset the statistics, then a cumulative average over the batches),
fed with the TTA views the labelling will run (each view size, mirrored or not), so the statistics match what the
network then sees.

The ``pseudo_label`` stage adapts once per image set: the scenario pool gets the pool's statistics and general val
(the filter's calibration set) gets val's, computed the same way, so the calibration is fitted and applied on the
outputs of one procedure. Measured on the demo (README, "Pseudo-labels"): the teacher's scenario-test mAP rises and
the accepted band's true precision rises for three teacher seeds.

Resume: rank 0 computes the statistics once and writes them to ``<out>/batchnorm.pt`` (atomically, keyed by the
model's weights, the images and the views); a re-run with the same key loads them instead of recomputing, so a
killed and re-run labelling gets bit-identical statistics and reuses its chunks. Under ``torchrun`` the other ranks
receive rank 0's statistics (:func:`~dataengine.engine.distributed.broadcast_module`), so every rank labels with the
same network whatever the number of ranks.

Example:
    >>> views = tta_views(128, (1.0, 1.25), hflip=True)  # doctest: +SKIP
    >>> adapted, info = adapt_batchnorm(model, "data/prepared/scenario/pool", files, views,
    ...                                 out_dir="data/pseudo/pool")  # doctest: +SKIP
    >>> info["images"], info["layers"]  # doctest: +SKIP
    (600, 68)
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataengine.engine.distributed import broadcast_module, is_distributed, is_main_process
from dataengine.io import atomic_write_bytes
from dataengine.pseudo.tta import TTADataset, TTAView, collate_views, flip_image_regions

__all__ = ["BATCHNORM_FILE", "adapt_batchnorm", "evenly_spaced", "hash_state", "with_batchnorm"]

BATCHNORM_FILE = "batchnorm.pt"
_FORMAT = "dataengine-adabn-v1"
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # what AdaBN sets, per BatchNorm layer


def hash_state(digest: Any, module: nn.Module) -> None:
    """Feed every entry of ``module.state_dict()`` (name, then raw bytes) to the hashlib object ``digest``."""
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def evenly_spaced(files: Sequence[str], k: int) -> list[str]:
    """``k`` of ``files`` spread evenly over the list (all of them when there are at most ``k``).

    Example:
        >>> evenly_spaced(["a", "b", "c", "d", "e", "f"], 3)
        ['a', 'c', 'e']
    """
    n = len(files)
    return list(files) if n <= k else [files[i * n // k] for i in range(k)]


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _key(model: nn.Module, files: Sequence[str], views: Sequence[TTAView], batch_size: int) -> str:
    digest = hashlib.sha256(json.dumps({"format": _FORMAT, "files": list(files), "batch_size": batch_size,
                                        "views": [[v.size, v.flip] for v in views]}).encode())
    hash_state(digest, model)
    return digest.hexdigest()


def _load(path: Path) -> tuple[str | None, dict[str, torch.Tensor]]:
    """The key and statistics of a file this module wrote (``weights_only``).

    Raises:
        ValueError: Missing, unreadable or not such a file (the message names it).
    """
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, truncated or foreign: all one message
        raise ValueError(f"{path}: not a BatchNorm statistics file ({err})") from err
    state = cached.get("state") if isinstance(cached, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a BatchNorm statistics file (no 'state')")
    return cached.get("key"), state


def _read_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The statistics stored under ``key`` at ``path``; ``None`` when absent, unreadable or made for another key
    (such a file is recomputed and overwritten, never trusted)."""
    try:
        stored, state = _load(path)
    except ValueError:
        return None
    return state if stored == key else None


def with_batchnorm(model: nn.Module, path: str | Path) -> nn.Module:
    """A copy of ``model`` (eval mode) with the BatchNorm statistics a labelling stored at ``path``.

    The network that labelled an image set is the teacher with that set's statistics: this rebuilds it, e.g. to
    evaluate it on the scenario's test images or to reuse it (``data/pseudo/pool/batchnorm.pt``).

    Raises:
        ValueError: ``path`` is not a statistics file of this module, or holds statistics of other layers or shapes
            than ``model``'s (the message names the file).
    """
    path = Path(path)
    _, state = _load(path)
    expected = {f"{name}.{buf}": getattr(m, buf).shape for name, m in _batchnorms(model) for buf in _BUFFERS}
    got = {k: getattr(v, "shape", None) for k, v in state.items()}
    if got != expected:
        raise ValueError(f"{path}: statistics for {len(got)} buffers that do not match the model's {len(expected)} "
                         f"BatchNorm buffers (another model?)")
    adapted = copy.deepcopy(model).eval()
    adapted.load_state_dict(state, strict=False)  # copies onto the model's device
    return adapted


def _views_of(loader: DataLoader, views: Sequence[TTAView], sizes: list[int], device: torch.device,
              bar: tqdm) -> Iterator[torch.Tensor]:
    """Every TTA view of every batch, as the float [0, 1] tensors the labelling feeds the network."""
    for batch in loader:
        orig_sizes = [item["orig_size"] for item in batch["items"]]
        for size, images in zip(sizes, batch["images"]):
            x = images.to(device).float().div_(255)  # [B, 3, S, S]
            for view in (v for v in views if v.size == size):
                yield flip_image_regions(x, orig_sizes) if view.flip else x
        bar.update(len(orig_sizes))


def adapt_batchnorm(
    model: nn.Module,
    image_root: str | Path,
    files: Sequence[str],
    views: Sequence[TTAView],
    *,
    out_dir: str | Path,
    batch_size: int = 16,
    max_images: int = 1024,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``files`` (AdaBN); ``model`` is untouched.

    Args:
        model: The teacher, on its device. A model without BatchNorm layers is returned as it is (info ``None``).
        image_root: Folder the file names are relative to.
        files: The images to be labelled, sorted; at most ``max_images`` of them, evenly spaced
            (:func:`evenly_spaced`), give the statistics. Unreadable ones are left out (the labelling reports them).
        views: The TTA views the labelling runs; each one is a forward pass per batch.
        out_dir: Where ``batchnorm.pt`` is kept for a re-run (see the module docstring).
        batch_size: Images per forward pass (the statistics are the average of the batches').
        max_images: Cap on the images used.
        num_workers: DataLoader workers.
        progress: Show a progress bar on rank 0.

    Returns:
        The adapted copy (eval mode) and ``{"images", "layers", "seconds", "reused"}`` (``seconds`` of this call).

    Raises:
        ValueError: No readable image among those used.
    """
    norms = _batchnorms(model)
    if not norms:
        return model, None
    start = time.perf_counter()
    used = evenly_spaced(files, max_images)
    path, key = Path(out_dir) / BATCHNORM_FILE, _key(model, used, views, batch_size)
    adapted = copy.deepcopy(model).eval()
    reused = False
    if is_main_process():
        state = _read_cache(path, key)
        reused = state is not None
        if state is None:
            device = next(model.parameters()).device
            sizes = list(dict.fromkeys(v.size for v in views))
            loader = DataLoader(TTADataset(Path(image_root), used, sizes), batch_size=batch_size,
                                num_workers=num_workers, collate_fn=collate_views)
            bar = tqdm(total=len(used), desc=f"adapt BatchNorm {Path(out_dir).name}", unit="img",
                       disable=not progress, dynamic_ncols=True)
            with bar:
                update_bn(_views_of(loader, views, sizes, device, bar), adapted)
            if int(_batchnorms(adapted)[0][1].num_batches_tracked) == 0:  # update_bn saw no batch
                raise ValueError(f"adapting BatchNorm to {image_root}: none of the {len(used)} images could be read")
            state = {f"{name}.{buf}": getattr(m, buf).detach().cpu().clone()
                     for name, m in _batchnorms(adapted) for buf in _BUFFERS}
            buffer = io.BytesIO()
            torch.save({"key": key, "state": state}, buffer)
            atomic_write_bytes(path, buffer.getvalue())
        else:
            adapted.load_state_dict(state, strict=False)
    if is_distributed():  # the other ranks wait here for rank 0's statistics
        broadcast_module(adapted, params=False, buffers=True)
    adapted.eval()
    return adapted, {"images": len(used), "layers": len(norms), "seconds": round(time.perf_counter() - start, 3),
                     "reused": reused}
