"""Models chosen by name (timm's ``register_model`` / ``create_model`` pattern).

Example:
    >>> import dataengine.models  # registers the built-in models
    >>> "resnet18_bifpn_gfl" in list_models()
    True
    >>> create_model("no_such_model", num_classes=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'no_such_model'; registered models: ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "is_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Register a model factory under its function name; the factory takes ``num_classes`` and keyword arguments.

    Example:
        >>> @register_model
        ... def my_tiny_model(num_classes: int, **kwargs):  # doctest: +SKIP
        ...     ...
    """
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, sorted.

    Example:
        >>> import dataengine.models
        >>> [n for n in list_models() if n.startswith("mobilenet_v3")]
        ['mobilenet_v3_large_gfl', 'mobilenet_v3_small_gfl']
    """
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    """Whether ``name`` is registered."""
    return name in _MODELS


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``create_model(**model.config)`` rebuilds a model's architecture.

    Args:
        name: A name from :func:`list_models`.
        num_classes: Number of object classes ``K`` (segmentation predicts ``K + 1`` with 0 = background).
        **kwargs: The factory's keyword arguments (``input_size``, ``width_mult``, ``neck_channels``, ...).

    Raises:
        ValueError: Unknown name (the message lists the registered ones).

    Example:
        >>> import dataengine.models
        >>> create_model("mobilenet_v3_small_gfl", num_classes=3, input_size=64).config["num_classes"]
        3
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name](num_classes=num_classes, **kwargs)
