"""Torch datasets: labelled COCO (detection + semantic segmentation) and unlabelled image folders.

A labelled sample is ``(image, target)`` with ``image`` a float32 ``tv_tensors.Image`` ``[3, S, S]`` in [0, 1]
(after :func:`dataengine.data.transforms.build_transforms`) and ``target`` holding

- ``boxes``: ``tv_tensors.BoundingBoxes`` XYXY float32 ``[N, 4]`` (``[0, 4]`` for an image without objects);
- ``labels``: int64 ``[N]``, contiguous labels (:class:`~dataengine.data.coco.CategoryMap`);
- ``masks``: ``tv_tensors.Mask`` uint8 ``[N, S, S]``, only with ``with_instance_masks=True``;
- ``semantic``: int64 ``[S, S]``, 0 background, label + 1, 255 ignore; ``has_semantic`` says whether it carries
  any supervision (it is all 255 for datasets without masks, and with ``with_semantic=False``);
- ``image_id`` (int), ``orig_size`` (int64 ``[2]``, ``h, w``) and ``weight`` (float32 scalar, 1 unless given);
- ``hard_negative``: uint8 ``[S, S]``, only with ``hard_maps=``: the mine stage's map of the image (bit 1 inside a
  hard-negative region, bit 2 on a hard negative pixel; :mod:`dataengine.curation.mining`) transformed jointly with
  the image (nearest resampling, padding 0), all zeros for an image without a map.

Crowd annotations (``iscrowd=1``) are never detection targets; they are ignore regions in the semantic mask.

Example:
    >>> from dataengine.data.transforms import build_transforms
    >>> ds = CocoDetectionSegDataset("train.json", "images", build_transforms(None, 128, False))  # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dataengine.boxes import coco_to_xyxy
from dataengine.data.coco import (
    IGNORE_INDEX,
    CategoryMap,
    annotation_to_mask,
    annotations_by_image,
    load_coco,
    semantic_from_instances,
)
from dataengine.data.images import list_images, read_image
from dataengine.data.transforms import HardNegativeMask, Letterbox, SemanticMask, letterbox_params
from dataengine.io import safe_join

__all__ = [
    "CocoDetectionSegDataset",
    "ImageFolderDataset",
    "collate",
    "read_hard_map",
    "read_semantic_file",
    "stack_semantic",
]

HARD_MAP_MAX = 3
"""Largest value of a hard-negative map: bits 1 (region) and 2 (pixel)."""

Sample = tuple[torch.Tensor, dict[str, Any]]


def read_semantic_file(path: str | Path, height: int, width: int, lut: np.ndarray) -> np.ndarray:
    """Read a ``semantic_file`` PNG of category ids and map it to semantic classes through ``lut``.

    Args:
        path: Single-channel PNG (mode ``L``, ``P`` or 16-bit) whose pixels are COCO category ids, 0 = background.
        height: Expected height (the image's).
        width: Expected width.
        lut: 256-entry table from :meth:`CategoryMap.semantic_lut`; ids above 255 become ignore.

    Returns:
        ``[H, W]`` uint8: 0 background, label + 1, 255 ignore.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Unreadable, not single-channel, or not ``height x width``; the message names the file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.png"
        >>> Image.fromarray(np.array([[0, 7]], np.uint8)).save(p)
        >>> read_semantic_file(p, 1, 2, CategoryMap((7,), ("cat",)).semantic_lut()).tolist()
        [[0, 1]]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"semantic_file not found: {path}")
    try:
        with Image.open(path) as img:
            mode = img.mode
            ids = np.asarray(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: unreadable semantic_file ({err})") from None
    if ids.ndim != 2:
        raise ValueError(f"{path}: semantic_file must be a single-channel PNG of category ids, got mode {mode}")
    if ids.shape != (height, width):
        raise ValueError(f"{path}: semantic_file is {ids.shape[0]}x{ids.shape[1]}, its image is {height}x{width}")
    ids = ids.astype(np.int64)
    return np.where(ids > 255, IGNORE_INDEX, lut[np.clip(ids, 0, 255)]).astype(np.uint8)


def read_hard_map(path: str | Path, height: int, width: int) -> np.ndarray:
    """Read a hard-negative map PNG of the mine stage (uint8, values 0..3, the image's size).

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Unreadable, not single-channel 8-bit, not ``height x width``, or a value above 3; the message
            names the file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.png"
        >>> Image.fromarray(np.array([[0, 3]], np.uint8)).save(p)
        >>> read_hard_map(p, 1, 2).tolist()
        [[0, 3]]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hard-negative map not found: {path}")
    try:
        with Image.open(path) as img:
            mode = img.mode
            bits = np.asarray(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: unreadable hard-negative map ({err})") from None
    if mode != "L" or bits.ndim != 2:
        raise ValueError(f"{path}: a hard-negative map must be a single-channel 8-bit PNG (mode L), got mode {mode}")
    if bits.shape != (height, width):
        raise ValueError(f"{path}: hard-negative map is {bits.shape[0]}x{bits.shape[1]}, its image is {height}x{width}")
    if bits.size and int(bits.max()) > HARD_MAP_MAX:
        raise ValueError(f"{path}: hard-negative map values must be in 0..{HARD_MAP_MAX}, got {int(bits.max())}")
    return bits.astype(np.uint8)


class CocoDetectionSegDataset(Dataset[Sample]):
    """A COCO file as a detection + semantic segmentation dataset.

    Args:
        coco: A COCO dict (not modified) or the path of a COCO JSON file.
        image_root: Folder the ``file_name`` (and ``semantic_file``) entries are relative to.
        transforms: Joint transform from :func:`~dataengine.data.transforms.build_transforms`; ``None`` returns the
            image at its own size (float32 in [0, 1]) with boxes untouched.
        categories: Label mapping; defaults to the file's own categories. Pass the model's map when the file's
            categories may differ (e.g. a pseudo-label file).
        with_instance_masks: Add ``target["masks"]`` (an annotation without ``segmentation`` gets its box filled).
        with_semantic: Build the semantic target; if ``False`` it is all 255 and ``has_semantic`` is False.
        image_weights: Optional per-image weight by image id (e.g. for hard negatives), put in ``target["weight"]``.
        semantic_root: Folder the ``semantic_file`` entries are relative to. Default: the file's top-level
            ``"semantic_root"`` (relative to the COCO file's folder; the filter and review stages write masks
            beside their COCO file, as the pool images are another stage's output) or else ``image_root``.
        hard_maps: Image id -> hard-negative map PNG (:func:`dataengine.curation.mining.hard_maps_for`). When
            given (even empty), every sample gets ``target["hard_negative"]``, zeros for images not in it, so a
            batch is uniform.

    Semantic target, in order of preference: the image's ``semantic_file``; otherwise, if the dataset has any mask
    (a ``segmentation`` or a ``semantic_file`` anywhere), the instance masks rasterised with crowd regions as
    ignore, and the background pixels inside a box-only annotation as ignore too (its pixels are unknown, not
    background); otherwise all 255 with ``has_semantic=False``. An image without annotations in a dataset with
    masks is all background: a useful negative.

    Example:
        >>> coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
        >>> len(CocoDetectionSegDataset(coco, "."))
        0
    """

    def __init__(
        self,
        coco: dict[str, Any] | str | Path,
        image_root: str | Path,
        transforms: Callable[..., Any] | None = None,
        *,
        categories: CategoryMap | None = None,
        with_instance_masks: bool = False,
        with_semantic: bool = True,
        image_weights: dict[int, float] | None = None,
        semantic_root: str | Path | None = None,
        hard_maps: Mapping[int, str | Path] | None = None,
    ) -> None:
        self.coco = load_coco(coco) if isinstance(coco, (str, Path)) else coco
        self.image_root = Path(image_root)
        if semantic_root is None and self.coco.get("semantic_root"):
            if not isinstance(coco, (str, Path)):
                raise ValueError("this COCO dict has a 'semantic_root' relative to its file: pass the file's path, "
                                 "or semantic_root=")
            semantic_root = safe_join(Path(coco).parent, self.coco["semantic_root"])
        self.semantic_root = Path(semantic_root) if semantic_root is not None else self.image_root
        self.transforms = transforms
        self.categories = categories if categories is not None else CategoryMap.from_coco(self.coco)
        self.with_instance_masks = with_instance_masks
        self.with_semantic = with_semantic
        self.image_weights = dict(image_weights or {})
        self.hard_maps = {int(k): Path(v) for k, v in hard_maps.items()} if hard_maps is not None else None
        self.images: list[dict[str, Any]] = list(self.coco["images"])
        self._anns = annotations_by_image(self.coco)
        self._lut = self.categories.semantic_lut()
        self.has_masks = any(img.get("semantic_file") for img in self.images) or any(
            ann.get("segmentation") for ann in self.coco["annotations"]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        info = self.images[index]
        image_id = int(info["id"])
        path = safe_join(self.image_root, info["file_name"])
        pixels = read_image(path)  # [H, W, 3] uint8
        h, w = pixels.shape[:2]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(
                f"image {image_id} ({path}): COCO says {info.get('height')}x{info.get('width')} (h x w), the file "
                f"is {h}x{w} after EXIF orientation"
            )
        anns = self._anns[image_id]
        objects = [a for a in anns if not a.get("iscrowd", 0)]

        xywh = np.asarray([a["bbox"] for a in objects], dtype=np.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.as_tensor(coco_to_xyxy(xywh), dtype=torch.float32), format="XYXY", canvas_size=(h, w)
            ),  # [N, 4]
            "labels": torch.tensor([self._label(a, image_id) for a in objects], dtype=torch.int64),  # [N]
        }
        if self.with_instance_masks:
            masks = [self._instance_mask(a, h, w) for a in objects]
            stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))  # [N, H, W]
        semantic, has_semantic = self._semantic(info, anns, h, w)
        target["semantic"] = SemanticMask(torch.from_numpy(semantic))  # [H, W]
        if self.hard_maps is not None:
            path = self.hard_maps.get(image_id)
            bits = read_hard_map(path, h, w) if path is not None else np.zeros((h, w), dtype=np.uint8)
            target["hard_negative"] = HardNegativeMask(torch.from_numpy(bits))  # [H, W]

        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))  # [3, H, W]
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        else:
            image = v2.functional.to_dtype(image, torch.float32, scale=True)
        target["semantic"] = target["semantic"].as_subclass(torch.Tensor).to(torch.int64)  # [S, S]
        if "hard_negative" in target:
            target["hard_negative"] = target["hard_negative"].as_subclass(torch.Tensor).to(torch.uint8)  # [S, S]
        target["has_semantic"] = has_semantic
        target["image_id"] = image_id
        target["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
        target["weight"] = torch.tensor(float(self.image_weights.get(image_id, 1.0)), dtype=torch.float32)
        return image, target

    def _label(self, ann: dict[str, Any], image_id: int) -> int:
        try:
            return self.categories.label(int(ann["category_id"]))
        except KeyError as err:
            raise KeyError(f"annotation {ann.get('id')} of image {image_id}: {err.args[0]}") from None

    @staticmethod
    def _box_region(ann: dict[str, Any], h: int, w: int) -> tuple[slice, slice]:
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        x1, y1 = max(0, math.floor(x)), max(0, math.floor(y))
        x2, y2 = min(w, math.ceil(x + bw)), min(h, math.ceil(y + bh))
        return slice(y1, max(y1, y2)), slice(x1, max(x1, x2))

    def _instance_mask(self, ann: dict[str, Any], h: int, w: int) -> np.ndarray:
        mask = annotation_to_mask(ann, h, w)
        if mask is None:
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[self._box_region(ann, h, w)] = 1
        return mask

    def _semantic(self, info: dict[str, Any], anns: list[dict[str, Any]], h: int, w: int) -> tuple[np.ndarray, bool]:
        if not self.with_semantic or not self.has_masks:
            return np.full((h, w), IGNORE_INDEX, dtype=np.uint8), False
        if info.get("semantic_file"):
            return read_semantic_file(safe_join(self.semantic_root, info["semantic_file"]), h, w, self._lut), True
        sem = semantic_from_instances([a for a in anns if a.get("segmentation")], h, w, self.categories)
        unknown = np.zeros((h, w), dtype=bool)
        for ann in anns:
            if not ann.get("segmentation"):
                unknown[self._box_region(ann, h, w)] = True
        sem[unknown & (sem == 0)] = IGNORE_INDEX
        return sem, True


class ImageFolderDataset(Dataset[Sample]):
    """Unlabelled images (the scenario pool), letterboxed for inference.

    Yields ``(image, info)``: ``image`` float32 ``[3, S, S]`` in [0, 1] (top-left letterbox), ``info`` =
    ``{"file_name", "index", "orig_size" (int64 [h, w]), "scale", "pad" ((pad_x, pad_y))}``; map predictions back
    with :func:`~dataengine.data.transforms.unletterbox_boxes` / ``unletterbox_mask``.

    Args:
        root: Image folder.
        files: File names relative to ``root``; default: every image under it (:func:`list_images`).
        input_size: Side ``S`` of the square model input.

    Raises:
        FileNotFoundError: ``root`` is not a directory (when ``files`` is not given).

    Example:
        >>> import tempfile
        >>> len(ImageFolderDataset(tempfile.mkdtemp(), input_size=64))
        0
    """

    def __init__(self, root: str | Path, files: Sequence[str] | None = None, *, input_size: int) -> None:
        self.root = Path(root)
        self.files = list(files) if files is not None else list_images(self.root)
        self.input_size = input_size
        self.transform = v2.Compose(
            [Letterbox(input_size), v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        name = self.files[index]
        pixels = read_image(safe_join(self.root, name))  # [H, W, 3] uint8
        h, w = pixels.shape[:2]
        scale, pad_x, pad_y = letterbox_params(h, w, self.input_size)
        image = self.transform(tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1)))  # [3, S, S]
        info = {
            "file_name": name,
            "index": index,
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "scale": scale,
            "pad": (pad_x, pad_y),
        }
        return image, info


def collate(batch: Sequence[Sample]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """DataLoader ``collate_fn``: stack the (equal-size) images, keep the targets as a list.

    Raises:
        ValueError: Empty batch, or images of different sizes (a transform without letterbox).

    Example:
        >>> images, targets = collate([(torch.zeros(3, 4, 4), {"a": 1}), (torch.ones(3, 4, 4), {"a": 2})])
        >>> images.shape, [t["a"] for t in targets]
        (torch.Size([2, 3, 4, 4]), [1, 2])
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    sizes = {tuple(image.shape) for image, _ in batch}
    if len(sizes) > 1:
        raise ValueError(f"images in a batch must share one size (use a letterbox transform), got {sorted(sizes)}")
    images = torch.stack([image.as_subclass(torch.Tensor) for image, _ in batch])  # [B, 3, S, S]
    return images, [target for _, target in batch]


def stack_semantic(targets: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Stack ``target["semantic"]`` of a batch into int64 ``[B, S, S]`` (255 = ignore).

    Example:
        >>> stack_semantic([{"semantic": torch.zeros(2, 2)}, {"semantic": torch.ones(2, 2)}]).shape
        torch.Size([2, 2, 2])
    """
    if not targets:
        raise ValueError("cannot stack the semantic masks of an empty batch")
    return torch.stack([torch.as_tensor(t["semantic"]).to(torch.int64) for t in targets])  # [B, S, S]
