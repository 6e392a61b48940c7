"""The COCO dataset returns the right labels, boxes and semantic values; the image-folder dataset letterboxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from dataengine.config import AugmentParams
from dataengine.data.coco import CategoryMap, save_coco
from dataengine.data.dataset import CocoDetectionSegDataset, ImageFolderDataset, collate, stack_semantic
from dataengine.data.transforms import build_transforms, letterbox_params
from dataengine.io import PathEscapeError

H, W = 32, 40
CATS = [{"id": 7, "name": "blob"}, {"id": 3, "name": "cell"}]  # sorted by id: cell -> label 0, blob -> label 1


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def rle(y1: int, y2: int, x1: int, x2: int) -> dict[str, Any]:
    m = np.zeros((H, W), dtype=np.uint8, order="F")
    m[y1:y2, x1:x2] = 1
    out = mask_utils.encode(m)
    return {"size": out["size"], "counts": out["counts"].decode("ascii")}


def ann(ann_id: int, image_id: int, category_id: int, bbox: list[int], seg: Any = None, iscrowd: int = 0) -> dict:
    out = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}
    out["area"] = bbox[2] * bbox[3]
    if seg is not None:
        out["segmentation"] = seg
    return out


@pytest.fixture
def tiny_coco(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("a/one.png", "b/two.png", "three.png"):
        save_png(root / name, rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    sem = np.zeros((H, W), dtype=np.uint8)
    sem[0:4, 0:4] = 3  # cell -> 1
    sem[4:8, 0:4] = 7  # blob -> 2
    sem[8:12, 0:4] = 99  # unknown category id -> ignore
    sem[12:16, 0:4] = 255  # ignore
    save_png(root / "b/two_sem.png", sem)
    coco = {
        "images": [
            {"id": 1, "file_name": "a/one.png", "height": H, "width": W},
            {"id": 2, "file_name": "b/two.png", "height": H, "width": W, "semantic_file": "b/two_sem.png"},
            {"id": 3, "file_name": "three.png", "height": H, "width": W},
        ],
        "annotations": [
            ann(10, 1, 7, [2, 4, 8, 8], seg=[[2, 4, 10, 4, 10, 12, 2, 12]]),  # polygon x 2..10, y 4..12, blob
            ann(11, 1, 3, [20, 10, 10, 10], seg=rle(10, 20, 20, 30)),  # RLE x 20..30, y 10..20, cell
            ann(12, 1, 3, [30, 24, 8, 6], seg=rle(24, 30, 30, 38), iscrowd=1),  # crowd: ignore, not a target
            ann(13, 2, 3, [10, 10, 5, 6]),  # box-only, on the image with a semantic_file
        ],
        "categories": CATS,
    }
    return coco, root


def test_raw_targets_labels_boxes_semantic_and_crowd(tiny_coco: tuple[dict[str, Any], Path]) -> None:
    coco, root = tiny_coco
    ds = CocoDetectionSegDataset(coco, root, with_instance_masks=True)
    assert len(ds) == 3 and ds.has_masks
    image, t = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert t["labels"].tolist() == [1, 0]  # crowd annotation 12 is not a detection target
    assert t["boxes"].tolist() == [[2, 4, 10, 12], [20, 10, 30, 20]]
    assert t["masks"].shape == (2, H, W) and t["masks"].dtype == torch.uint8
    assert t["masks"][1].sum() == 100 and t["masks"][1, 10:20, 20:30].all()
    sem = t["semantic"]
    assert sem.dtype == torch.int64 and sem.shape == (H, W) and t["has_semantic"] is True
    assert (sem[5:11, 3:9] == 2).all()  # blob -> label 1 -> class 2
    assert (sem[10:20, 20:30] == 1).all()  # cell -> class 1
    assert (sem[24:30, 30:38] == 255).all()  # crowd -> ignore
    assert (sem == 0).sum() == H * W - 64 - 100 - 48
    assert t["image_id"] == 1 and t["orig_size"].tolist() == [H, W] and t["weight"].item() == 1.0


def test_semantic_file_wins_and_box_only_annotations(tiny_coco: tuple[dict[str, Any], Path]) -> None:
    coco, root = tiny_coco
    _, t = CocoDetectionSegDataset(coco, root, with_instance_masks=True)[1]
    sem = t["semantic"]
    assert (sem[0:4, 0:4] == 1).all() and (sem[4:8, 0:4] == 2).all()
    assert (sem[8:16, 0:4] == 255).all()  # unknown id 99 and 255 are ignore
    assert (sem[16:, :] == 0).all() and (sem[:, 4:] == 0).all()  # the file is authoritative: box region stays 0
    assert t["labels"].tolist() == [0] and t["boxes"].tolist() == [[10, 10, 15, 16]]
    assert t["masks"][0].sum() == 30 and t["masks"][0, 10:16, 10:15].all()  # box-only -> box-filled mask


def test_zero_annotation_image_is_background_and_box_only_is_ignore(tiny_coco: tuple[dict[str, Any], Path]) -> None:
    coco, root = tiny_coco
    _, t = CocoDetectionSegDataset(coco, root, with_instance_masks=True)[2]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, H, W)
    assert (t["semantic"] == 0).all() and t["has_semantic"] is True
    # Without the semantic_file, the box-only annotation's pixels are unknown: ignore, not background.
    del coco["images"][1]["semantic_file"]
    _, t = CocoDetectionSegDataset(coco, root)[1]
    assert (t["semantic"][10:16, 10:15] == 255).all() and (t["semantic"] == 255).sum() == 30


def test_dataset_without_masks_has_no_semantic(tiny_coco: tuple[dict[str, Any], Path]) -> None:
    coco, root = tiny_coco
    del coco["images"][1]["semantic_file"]
    for ann in coco["annotations"]:
        ann.pop("segmentation", None)
    ds = CocoDetectionSegDataset(coco, root)
    assert not ds.has_masks
    _, t = ds[0]
    assert (t["semantic"] == 255).all() and t["has_semantic"] is False
    assert t["labels"].tolist() == [1, 0]
    _, t = CocoDetectionSegDataset(tiny_coco[0], root, with_semantic=False)[0]
    assert t["has_semantic"] is False


def test_transformed_batch_through_dataloader(tiny_coco: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    coco, root = tiny_coco
    save_coco(tmp_path / "train.json", coco)
    ds = CocoDetectionSegDataset(
        tmp_path / "train.json", root, build_transforms(None, 64, train=False), image_weights={3: 2.5}
    )
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    sem = stack_semantic(targets)
    assert sem.shape == (3, 64, 64) and sem.dtype == torch.int64
    scale, _, _ = letterbox_params(H, W, 64)  # 1.6: 40x32 -> 64x51, padding rows 51..63 are ignore
    assert (sem[:, 52:] == 255).all() and (sem[2, :51] == 0).all()
    assert targets[0]["boxes"].tolist() == pytest.approx(np.array([[2, 4, 10, 12], [20, 10, 30, 20]]) * scale)
    assert [t["weight"].item() for t in targets] == [1.0, 1.0, 2.5]
    assert (sem[0, 17:31, 33:47] == 1).all()  # the RLE cell, scaled by 1.6


def test_train_transforms_on_dataset(tiny_coco: tuple[dict[str, Any], Path]) -> None:
    coco, root = tiny_coco
    torch.manual_seed(0)
    transform = build_transforms(AugmentParams(preset="strong"), 48, True)
    ds = CocoDetectionSegDataset(coco, root, transform, with_instance_masks=True)
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 48, 48)
        assert t["boxes"].shape[0] == t["labels"].shape[0] == t["masks"].shape[0]
        assert set(t["semantic"].unique().tolist()) <= {0, 1, 2, 255}


def test_bad_inputs_name_the_culprit(tiny_coco: tuple[dict[str, Any], Path]) -> None:
    coco, root = tiny_coco
    with pytest.raises(KeyError, match="annotation 10 of image 1: unknown category id 7"):
        CocoDetectionSegDataset(coco, root, categories=CategoryMap.from_names(["a", "b", "c"]))[0]
    coco["images"][2]["width"] = 41
    with pytest.raises(ValueError, match="image 3 .*three.png.*32x41"):
        CocoDetectionSegDataset(coco, root)[2]
    coco["images"][2]["file_name"] = "../outside.png"
    with pytest.raises(PathEscapeError):
        CocoDetectionSegDataset(coco, root)[2]


def test_image_folder_dataset_nested_mixed_case(tmp_path: Path) -> None:
    save_png(tmp_path / "x" / "A.JPG", np.full((20, 40, 3), 200, dtype=np.uint8))
    save_png(tmp_path / "y" / "z" / "b.Png", np.full((30, 15, 3), 10, dtype=np.uint8))
    save_png(tmp_path / ".hidden" / "c.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, input_size=32)
    assert ds.files == ["x/A.JPG", "y/z/b.Png"]
    image, info = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert info["file_name"] == "x/A.JPG" and info["index"] == 0 and info["orig_size"].tolist() == [20, 40]
    assert info["scale"] == 0.8 and info["pad"] == (0, 0)
    assert torch.allclose(image[:, :16], torch.tensor(200 / 255))  # 20x40 -> 16x32 at the top
    assert not torch.allclose(image[:, 16:], torch.tensor(200 / 255))
    image, info = ds[1]
    assert info["scale"] == pytest.approx(32 / 30) and torch.allclose(image[:, :, :16], torch.tensor(10 / 255))
    assert len(ImageFolderDataset(tmp_path, ["y/z/b.Png"], input_size=32)) == 1
