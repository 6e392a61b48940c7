"""Semantic segmentation metrics from an accumulated confusion matrix.

Classes follow :mod:`dataengine.data.coco`: ``0 = background``, ``1..K`` = categories, ``255`` = ignore. Background
**is** a class of the mean IoU (the standard for PASCAL VOC / ADE-style mIoU, and a student that paints objects over
background must pay for it); pass ``["background", *category_names]`` as ``class_names``.

The confusion matrix is summed over every pixel seen (not averaged per image), so large and small images weigh by
their pixels, as in torchvision's segmentation reference (``references/segmentation/utils.py`` ``ConfusionMatrix``).
For DDP, all-reduce :attr:`SegmentationMeter.confusion` (a plain ``int64`` tensor) before :meth:`compute`.

Example:
    >>> import torch
    >>> meter = SegmentationMeter(2, ["background", "cat"])
    >>> meter.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
    >>> meter.compute()
    {'mIoU': 0.5, 'pixel_accuracy': 0.6666666666666666, 'per_class_IoU': {'background': 0.5, 'cat': 0.5}}
"""

from __future__ import annotations

from typing import Any

import torch

from dataengine.data.coco import IGNORE_INDEX

__all__ = ["SegmentationMeter"]


class SegmentationMeter:
    """Accumulates a ``[C, C]`` confusion matrix (rows = target class, columns = predicted class) and derives IoUs.

    Args:
        num_classes: Number of classes ``C`` including background.
        class_names: One name per class (default ``class_0 ... class_{C-1}``).
        ignore_index: Target value of pixels that are never scored.
        device: Where the confusion matrix lives (the inputs' device for DDP all-reduce over NCCL).

    Example:
        >>> import torch
        >>> meter = SegmentationMeter(3)
        >>> meter.update(torch.zeros(2, 4, 4, dtype=torch.int64), torch.zeros(2, 4, 4, dtype=torch.uint8))
        >>> meter.compute()["per_class_IoU"]
        {'class_0': 1.0, 'class_1': None, 'class_2': None}
    """

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        names = [f"class_{i}" for i in range(num_classes)] if class_names is None else list(class_names)
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names for num_classes={num_classes}: {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, got {names}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} collides with a class id (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.class_names = names
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # [C, C]

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.confusion.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted class maps and their targets.

        Args:
            pred: Predicted class ids (argmax of the logits), ``[H, W]`` or ``[B, H, W]``, integer dtype.
            target: Target class ids with ``ignore_index`` for unscored pixels, same shape, integer dtype (uint8 ok).

        Raises:
            ValueError: Shapes differ, a float ``pred`` (logits, not class ids), or ids outside ``0..C-1`` (pred) /
                outside ``0..C-1`` and not ``ignore_index`` (target).

        Example:
            >>> import torch
            >>> m = SegmentationMeter(2)
            >>> m.update(torch.tensor([[1, 1]]), torch.tensor([[1, 255]]))
            >>> m.confusion.tolist()
            [[0, 0], [0, 1]]
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        if pred.dim() not in (2, 3):
            raise ValueError(f"expected [H, W] or [B, H, W] class maps, got shape {tuple(pred.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(f"expected integer class ids (argmax the logits first), got pred {pred.dtype} / "
                             f"target {target.dtype}")
        c = self.num_classes
        # int64 before arithmetic: a uint8 target would overflow in target * C.
        pred = pred.reshape(-1).to(torch.int64)  # [N]
        target = target.reshape(-1).to(torch.int64)  # [N]
        keep = target != self.ignore_index  # [N]
        pred, target = pred[keep], target[keep]  # [M]
        if target.numel():
            bad_target = (target < 0) | (target >= c)
            if bad_target.any():
                raise ValueError(f"target holds ids {sorted(set(target[bad_target].tolist()))} outside 0..{c - 1} "
                                 f"that are not ignore_index={self.ignore_index}")
            bad_pred = (pred < 0) | (pred >= c)
            if bad_pred.any():
                raise ValueError(f"pred holds ids {sorted(set(pred[bad_pred].tolist()))} outside 0..{c - 1}")
        counts = torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)  # [C, C]
        self.confusion += counts.to(self.confusion.device)

    def merge(self, other: SegmentationMeter) -> SegmentationMeter:
        """Add another meter's counts into this one (e.g. per-worker meters) and return ``self``.

        Example:
            >>> import torch
            >>> a, b = SegmentationMeter(2), SegmentationMeter(2)
            >>> b.update(torch.tensor([[1]]), torch.tensor([[1]]))
            >>> a.merge(b).confusion.tolist()
            [[0, 0], [0, 1]]
        """
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class meter into a {self.num_classes}-class meter")
        self.confusion += other.confusion.to(self.confusion.device)
        return self

    def compute(self) -> dict[str, Any]:
        """IoU per class, their mean and the pixel accuracy over every non-ignored pixel seen.

        A class absent from both targets and predictions has IoU ``None`` and is left out of ``mIoU``; a class present
        in only one of them has IoU 0. ``mIoU`` and ``pixel_accuracy`` are ``None`` before any scored pixel.

        Returns:
            ``{"mIoU": float | None, "pixel_accuracy": float | None, "per_class_IoU": {name: float | None}}``.

        Example:
            >>> SegmentationMeter(2).compute()
            {'mIoU': None, 'pixel_accuracy': None, 'per_class_IoU': {'class_0': None, 'class_1': None}}
        """
        cm = self.confusion.to(device="cpu", dtype=torch.float64)  # [C, C]
        tp = cm.diagonal()  # [C]
        union = cm.sum(dim=0) + cm.sum(dim=1) - tp  # [C]: predicted + target - both
        per_class = {
            name: (float(tp[i] / union[i]) if union[i] > 0 else None) for i, name in enumerate(self.class_names)
        }
        present = [v for v in per_class.values() if v is not None]
        total = float(cm.sum())
        return {
            "mIoU": sum(present) / len(present) if present else None,
            "pixel_accuracy": float(tp.sum()) / total if total > 0 else None,
            "per_class_IoU": per_class,
        }
