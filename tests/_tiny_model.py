"""A tiny real model and dataset with the engine's model interface, for training-loop tests.

Each image holds one coloured square on a dark background; :class:`TinyNet` regresses the square's box
(``det_weight`` scales that term) and its colour (``seg_weight`` scales that one), both with MSE. It learns in a
few epochs on the CPU. The dataset flips images with torch's global RNG and the model has dropout, so seeding and
resume are exercised for real.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

SIZE = 16
CLASS_NAMES = ["square"]


class TinyNet(nn.Module):
    """Two strided convolutions with BatchNorm, dropout and a linear head: ``box`` ``[B, 4]``, ``color`` ``[B, 3]``."""

    def __init__(self, num_classes: int = 1, width: int = 8, input_size: int = SIZE) -> None:
        super().__init__()
        self.num_classes, self.width, self.input_size = num_classes, width, input_size
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(width * (input_size // 4) ** 2, 7)

    @property
    def config(self) -> dict[str, Any]:
        return {"name": "tiny_net", "num_classes": self.num_classes, "width": self.width,
                "input_size": self.input_size}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.features((images - self.mean) / self.std)  # [B, W, S/4, S/4]
        out = self.head(self.dropout(x.flatten(1)))  # [B, 7]
        return {"box": out[:, :4], "color": out[:, 4:]}

    def loss(self, outputs: dict[str, torch.Tensor], targets: Sequence[dict[str, Any]], *, det_weight: float = 1.0,
             seg_weight: float = 1.0) -> dict[str, torch.Tensor]:
        boxes = torch.stack([t["boxes"][0] for t in targets]).to(outputs["box"]) / self.input_size  # [B, 4]
        colors = torch.stack([t["color"] for t in targets]).to(outputs["color"])  # [B, 3]
        box = F.mse_loss(outputs["box"], boxes)
        color = F.mse_loss(outputs["color"], colors)
        return {"loss": det_weight * box + seg_weight * color, "box": box, "color": color}


def build_tiny(config: dict[str, Any]) -> TinyNet:
    """``build_fn`` for the engine: rebuild from ``model.config``."""
    kwargs = {k: v for k, v in config.items() if k != "name"}
    return TinyNet(**kwargs)


class SquaresDataset(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """``n`` images of one coloured square; item ``i`` is fixed by ``(seed, i)``, the flip by torch's global RNG.

    Args:
        n: Number of items.
        seed: Content seed.
        flip: Random horizontal flip (p = 0.5, from ``torch.rand``).
        delay: Seconds to sleep per item (to make a subprocess slow enough to kill mid-run).
    """

    def __init__(self, n: int, seed: int = 0, *, flip: bool = True, delay: float = 0.0) -> None:
        self.n, self.seed, self.flip, self.delay = n, seed, flip, delay
        self.seen: list[int] = []  # indices read in this process (num_workers=0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        self.seen.append(index)
        if self.delay:
            time.sleep(self.delay)
        rng = np.random.default_rng([self.seed, index])
        side = int(rng.integers(4, 9))
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
        color = torch.tensor(rng.uniform(0.3, 1.0, size=3), dtype=torch.float32)
        image = torch.full((3, SIZE, SIZE), 0.1)
        image[:, y0 : y0 + side, x0 : x0 + side] = color[:, None, None]
        box = torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32)  # [1, 4] xyxy pixels
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            box = torch.stack([SIZE - box[:, 2], box[:, 1], SIZE - box[:, 0], box[:, 3]], dim=1)
        return image, {"boxes": box, "labels": torch.zeros(1, dtype=torch.int64), "color": color, "image_id": index}
