"""The prepared-data layout every source (demo, BCCD, a user's COCO) is converted to by the ``prepare`` stage.

Downstream stages only ever read this layout, so they do not care where the data came from::

    <root>/
      general/images/...            general ground truth images (train and val)
      general/train.json            COCO; file_name relative to general/images
      general/val.json
      scenario/pool/...             unlabelled scenario images (nested folders allowed)
      scenario/pool_hidden.json     the pool's true labels, if known: ONLY diagnostics and evaluation read it
      scenario/test/...             labelled scenario test images
      scenario/test.json            COCO; file_name relative to scenario/test; may carry "confusers" metadata

Example:
    >>> PreparedLayout("data/prepared").general_train.as_posix()
    'data/prepared/general/train.json'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["PreparedLayout"]


@dataclass(frozen=True)
class PreparedLayout:
    """Paths inside a prepared-data root."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def general_images(self) -> Path:
        return self.root / "general" / "images"

    @property
    def general_train(self) -> Path:
        return self.root / "general" / "train.json"

    @property
    def general_val(self) -> Path:
        return self.root / "general" / "val.json"

    @property
    def pool_images(self) -> Path:
        return self.root / "scenario" / "pool"

    @property
    def pool_hidden(self) -> Path:
        return self.root / "scenario" / "pool_hidden.json"

    @property
    def test_images(self) -> Path:
        return self.root / "scenario" / "test"

    @property
    def test_json(self) -> Path:
        return self.root / "scenario" / "test.json"
