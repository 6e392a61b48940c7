"""Checkpoints that load with ``torch.load(..., weights_only=True)``: tensors, numbers, strings, lists and dicts only.

A checkpoint carries everything needed to rebuild and use the model without guessing (STYLE rule 10): the
registered model name and its arguments (``model_config``, so ``create_model(**model_config)`` rebuilds the
network), class names, input size and normalisation. Training checkpoints (``last.pt``) add the EMA, optimizer and
scheduler states, the epoch and step counters and, in ``extra``, the RNG states; the final ``model.pt`` holds the EMA
weights as ``model_state``.

Content is checked before writing: anything that ``weights_only=True`` would refuse (a NumPy array, a custom object,
a function) is a ``TypeError`` naming its key at save time rather than an unreadable file later. Writes are atomic
(temp file in the same directory, fsync, ``os.replace`` via :func:`dataengine.io.atomic_write`), so a run killed
while saving keeps its previous checkpoint.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.pt"
    >>> save_checkpoint(path, model_state={"w": torch.zeros(2)}, model_config={"name": "tiny"}, class_names=["a"],
    ...                 input_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    >>> ckpt = load_checkpoint(path)
    >>> ckpt["class_names"], ckpt["epoch"]
    (['a'], 0)
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataengine.io import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "REQUIRED_KEYS",
    "CheckpointError",
    "check_compatible",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "dataengine-checkpoint-v1"
"""Value of the ``format`` key; a file with another value is refused rather than misread."""

REQUIRED_KEYS = ("format", "model_state", "model_config", "class_names", "input_size", "mean", "std", "epoch", "step")
"""Keys every checkpoint has. Optional (``None`` when absent): ``ema_state``, ``optimizer_state``,
``scheduler_state``; ``extra`` is a dict (empty when absent)."""

_LEAF_TYPES = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A checkpoint is corrupt, truncated, not a dataengine checkpoint, or made for other classes/another model."""


def save_checkpoint(
    path: str | Path,
    *,
    model_state: Mapping[str, torch.Tensor],
    model_config: Mapping[str, Any],
    class_names: Sequence[str],
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    ema_state: Mapping[str, Any] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    epoch: int = 0,
    step: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically; everything in it must load with ``weights_only=True``.

    Args:
        path: Target file (parent directories are created).
        model_state: The model's ``state_dict()`` (for ``model.pt``: the EMA weights).
        model_config: JSON-able architecture description (``model.config``).
        class_names: Contiguous class names, label ``i`` is ``class_names[i]``.
        input_size: Square input side the model was trained at.
        mean: Normalisation mean (3 floats, RGB in [0, 1]).
        std: Normalisation std (3 floats).
        ema_state: ``AveragedModel.state_dict()`` of the EMA (training checkpoints).
        optimizer_state: ``optimizer.state_dict()``.
        scheduler_state: ``scheduler.state_dict()``.
        epoch: Number of completed epochs.
        step: Number of completed optimizer steps.
        extra: Anything else (RNG states, params, metrics), made of tensors, numbers, strings, lists and dicts.

    Raises:
        TypeError: A value that ``weights_only=True`` cannot load (its key path is named) or a ``model_config``
            that is not JSON-able.
        ValueError: ``class_names``, ``mean`` or ``std`` of the wrong shape.
        OSError: The file cannot be written (``path`` is left as it was).

    Example:
        >>> save_checkpoint("/tmp/m.pt", model_state={}, model_config={"name": "x"}, class_names=["a"],
        ...                 input_size=64, mean=[0.0] * 3, std=[1.0] * 3)  # doctest: +SKIP
    """
    path = Path(path)
    try:
        json.dumps(dict(model_config), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint {path}: model_config must be JSON-able ({err})") from None
    if not all(isinstance(n, str) for n in class_names):
        raise ValueError(f"checkpoint {path}: class_names must be strings, got {list(class_names)!r}")
    content: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_state": dict(model_state),
        "model_config": dict(model_config),
        "class_names": list(class_names),
        "input_size": int(input_size),
        "mean": _three_floats(mean, "mean", path),
        "std": _three_floats(std, "std", path),
        "ema_state": None if ema_state is None else dict(ema_state),
        "optimizer_state": None if optimizer_state is None else dict(optimizer_state),
        "scheduler_state": None if scheduler_state is None else dict(scheduler_state),
        "epoch": int(epoch),
        "step": int(step),
        "extra": {} if extra is None else dict(extra),
    }
    _check_weights_only(content, "", path)
    with atomic_write(path, "wb") as fh:
        torch.save(content, fh)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no pickled code is ever executed), on the CPU.

    Args:
        path: A file written by :func:`save_checkpoint`.

    Returns:
        The checkpoint dict (:data:`REQUIRED_KEYS` plus the optional keys).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: Corrupt/truncated file, content that is not weights-only (a pickled object), not a dict,
            missing keys or another format; the message names the path and what is wrong.

    Example:
        >>> load_checkpoint("models/teacher/model.pt")["input_size"]  # doctest: +SKIP
        128
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only raises UnpicklingError both for a pickled object it will not import (a line naming the
        # GLOBAL, worded differently across torch versions) and for bytes that are no pickle ("Unsupported operand").
        reason = _first_line(err)
        if "global" in reason.lower():
            raise CheckpointError(f"{path}: refused to load, it holds a pickled object that is not weights-only "
                                  f"data ({reason})") from None
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint ({reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError, TypeError,
            AttributeError) as err:
        # torch's zip reader reports truncation as RuntimeError ("failed finding central directory"); a file cut
        # inside a tensor record gives OSError (errno 22), some garbage bytes a bare KeyError from the unpickler.
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(err)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a dataengine checkpoint (the file holds a {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a dataengine checkpoint, missing keys {missing}")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    for key in ("ema_state", "optimizer_state", "scheduler_state"):
        ckpt.setdefault(key, None)
    ckpt.setdefault("extra", {})
    return ckpt


def check_compatible(
    ckpt: Mapping[str, Any],
    *,
    class_names: Sequence[str] | None = None,
    model_name: str | None = None,
    path: str | Path = "<checkpoint>",
) -> None:
    """Refuse a checkpoint made for other classes or another model, naming both sides.

    Args:
        ckpt: A dict from :func:`load_checkpoint`.
        class_names: The classes the caller expects, in label order (``None``: not checked).
        model_name: The registered model name the caller expects (``None``: not checked).
        path: Used in the message.

    Raises:
        CheckpointError: The class names differ (the message says which are missing, extra or reordered) or the
            model name differs.

    Example:
        >>> check_compatible({"class_names": ["a", "b"], "model_config": {"name": "m"}},
        ...                  class_names=["a", "c"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dataengine.engine.checkpoint.CheckpointError: <checkpoint>: made for classes ['a', 'b'], ... extra ['b'])
    """
    if class_names is not None and list(ckpt["class_names"]) != list(class_names):
        have, want = list(ckpt["class_names"]), list(class_names)
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        detail = f"missing {missing}, extra {extra}" if missing or extra else "same names in another order"
        raise CheckpointError(f"{path}: made for classes {have}, expected {want} ({detail})")
    if model_name is not None and ckpt["model_config"].get("name") != model_name:
        raise CheckpointError(f"{path}: holds model {ckpt['model_config'].get('name')!r}, expected {model_name!r}")


def load_model(
    path: str | Path,
    build_fn: Callable[[dict[str, Any]], nn.Module],
    *,
    class_names: Sequence[str] | None = None,
    model_name: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint: ``build_fn(model_config)`` then a strict ``load_state_dict``.

    Args:
        path: A checkpoint (normally ``model.pt``).
        build_fn: Builds the architecture from its config, e.g. ``lambda c: create_model(**c)``.
        class_names: Expected classes (see :func:`check_compatible`).
        model_name: Expected registered name.

    Returns:
        The model in eval mode on the CPU, and the checkpoint dict.

    Raises:
        CheckpointError: Unreadable or incompatible checkpoint, or weights that do not fit the rebuilt model.

    Example:
        >>> model, ckpt = load_model("models/teacher/model.pt", lambda c: create_model(**c))  # doctest: +SKIP
    """
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, class_names=class_names, model_name=model_name, path=path)
    model = build_fn(dict(ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as err:  # load_state_dict reports missing/unexpected keys and shape mismatches this way
        raise CheckpointError(f"{path}: weights do not fit the model rebuilt from its config: {err}") from None
    return model.eval(), ckpt


def _three_floats(values: Sequence[float], name: str, path: Path) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != 3:
        raise ValueError(f"checkpoint {path}: {name} must have 3 values (RGB), got {out}")
    return out


def _check_weights_only(obj: Any, key: str, path: Path) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would refuse, naming the key path."""
    if type(obj) in (dict, OrderedDict):  # exact types: weights_only refuses other mapping classes
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint {path}: key {k!r} under '{key}' must be a str or int")
            _check_weights_only(v, f"{key}.{k}" if key else str(k), path)
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{key}[{i}]", path)
    elif isinstance(obj, torch.Tensor):
        # Tensor subclasses other than Parameter (tv_tensors, ...) are pickled as custom classes.
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"checkpoint {path}: '{key}' is a {type(obj).__name__}; save a plain torch.Tensor")
    elif type(obj) not in _LEAF_TYPES:  # exact: numpy.float64 is a float subclass but pickles as a numpy global
        raise TypeError(f"checkpoint {path}: '{key}' is a {type(obj).__module__}.{type(obj).__name__}; only tensors, "
                        "numbers, strings, None, lists and dicts load with weights_only=True")


def _first_line(err: BaseException) -> str:
    """The informative line of torch's long load errors (the refused global or operand when there is one)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for needle in ("global", "unsupported"):
        for line in lines:
            if needle in line.lower():
                return line
    return lines[0] if lines else type(err).__name__
