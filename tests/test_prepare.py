"""The prepare stage on a user's COCO data with bad entries: `stop` refuses with every entry named, `skip`
quarantines them into a report and counts them -- never a silent drop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine.config import CocoSourceParams, DataParams
from dataengine.data.coco import load_coco
from dataengine.data.prepare import DataValidationError, prepare_data


def _png(path: Path, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(path)


@pytest.fixture
def user_data(tmp_path: Path) -> CocoSourceParams:
    images = tmp_path / "src" / "images"
    for name in ("a.png", "b.png", "v.png"):
        _png(images / name)
    (images / "empty.png").write_bytes(b"")  # zero-size image
    cats = [{"id": 1, "name": "thing"}]
    train = {"images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16},
                        {"id": 2, "file_name": "b.png", "width": 16, "height": 16},
                        {"id": 3, "file_name": "empty.png", "width": 16, "height": 16}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5], "area": 25, "iscrowd": 0},
                             {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
                              "iscrowd": 0},  # outside the image
                             {"id": 3, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2], "area": 4,
                              "iscrowd": 0}],  # unknown category
             "categories": cats}
    val = {"images": [{"id": 1, "file_name": "v.png", "width": 16, "height": 16}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
           "categories": cats}
    (tmp_path / "src" / "train.json").write_text(json.dumps(train))
    (tmp_path / "src" / "val.json").write_text(json.dumps(val))
    _png(tmp_path / "src" / "scenario" / "cam" / "x.PNG")
    (tmp_path / "src" / "scenario" / "broken.jpg").write_bytes(b"not an image")
    return CocoSourceParams(train_json=str(tmp_path / "src/train.json"), val_json=str(tmp_path / "src/val.json"),
                            images=str(images), scenario_dir=str(tmp_path / "src/scenario"))


def test_stop_lists_every_bad_entry_and_writes_nothing(user_data: CocoSourceParams, tmp_path: Path) -> None:
    before = (tmp_path / "src" / "train.json").read_bytes()
    out = tmp_path / "prepared"
    with pytest.raises(DataValidationError) as err:
        prepare_data(DataParams(source="coco", coco=user_data), out, progress=False)
    msg = str(err.value)
    for needle in ("empty.png", "broken.jpg", "data.on_bad: skip"):
        assert needle in msg, msg
    assert "zero" in msg.lower() and "category" in msg.lower()
    assert not out.exists() and not out.with_name("prepared.partial").exists()
    assert (tmp_path / "src" / "train.json").read_bytes() == before, "the source is never modified"


def test_skip_quarantines_and_counts(user_data: CocoSourceParams, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    metrics = prepare_data(DataParams(source="coco", on_bad="skip", coco=user_data), out, progress=False)
    quarantine = json.loads((out / "quarantine.json").read_text())
    codes = sorted(q["code"] for q in quarantine)
    assert "zero_size_image" in codes and "box_outside_image" in codes and "unknown_category" in codes
    assert any(q["split"] == "scenario_pool" and q["file"].endswith("broken.jpg") for q in quarantine)
    assert metrics["quarantined"] == len(quarantine) and metrics["bad_entries"] >= 4
    train = load_coco(out / "general" / "train.json")
    assert sorted(img["file_name"] for img in train["images"]) == ["a.png", "b.png"]
    assert [a["id"] for a in train["annotations"]] == [1]
    assert metrics["general_train"]["per_class"] == {"thing": 1}
    assert metrics["scenario_pool"]["images"] == 1
    assert not (out / "scenario" / "pool" / "broken.jpg").exists(), "quarantined pool images leave the pool"
    assert (out / "quarantine" / "pool" / "broken.jpg").exists()
