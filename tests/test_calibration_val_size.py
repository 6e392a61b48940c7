"""benchmarks/calibration_val_size.py: the val subsets it calibrates on, and the check that they extend the val."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dataengine.config import DemoParams
from dataengine.data.demo import generate_demo

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("calibration_val_size", ROOT / "benchmarks" / "calibration_val_size.py")
cvs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cvs)


def test_a_larger_demo_val_starts_with_the_smaller_ones_images_and_labels(tmp_path: Path):
    # The premise of the benchmark: growing n_val leaves the first images (and their labels) as they were.
    small = DemoParams(seed=4, image_size=64, n_train=2, n_val=3, n_pool=1, n_test=1, general_confuser_rate=0.5)
    generate_demo(tmp_path / "small", small, progress=False)
    generate_demo(tmp_path / "large", DemoParams(seed=4, image_size=64, n_train=1, n_val=7, n_pool=1, n_test=1,
                                                 general_confuser_rate=0.5), progress=False)
    small_val = json.loads((tmp_path / "small/general/val.json").read_text())
    large_val = json.loads((tmp_path / "large/general/val.json").read_text())
    files = [im["file_name"] for im in small_val["images"]]
    cvs.check_same_prefix(tmp_path / "small/general/images", tmp_path / "large/general/images", files)
    sub = cvs.val_subset(large_val, 3)
    assert [im["file_name"] for im in sub["images"]] == files

    def boxes(coco: dict) -> list:
        name = {im["id"]: im["file_name"] for im in coco["images"]}
        return sorted((name[a["image_id"]], a["category_id"], a["bbox"]) for a in coco["annotations"])

    assert boxes(sub) == boxes(small_val) and boxes(sub)
    # Another seed draws other images: the check names the first that differs.
    generate_demo(tmp_path / "other", DemoParams(seed=5, image_size=64, n_train=1, n_val=3, n_pool=1, n_test=1),
                  progress=False)
    with pytest.raises(SystemExit, match="val/00000.png differs"):
        cvs.check_same_prefix(tmp_path / "small/general/images", tmp_path / "other/general/images", files)


def test_val_subset_refuses_sizes_the_extended_val_lacks():
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}
    with pytest.raises(ValueError, match="holds 1 images"):
        cvs.val_subset(coco, 2)
    with pytest.raises(ValueError, match="val size 0"):
        cvs.val_subset(coco, 0)
