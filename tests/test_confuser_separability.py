"""benchmarks/confuser_separability.py: the scores it reads per object and confuser, and its crop classifier."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

spec = importlib.util.spec_from_file_location(
    "confuser_separability", Path(__file__).resolve().parents[1] / "benchmarks" / "confuser_separability.py")
sep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sep)


def test_scores_follow_the_confuser_fp_rule():
    gt = {"images": [{"id": 1, "confusers": [[50, 50, 10, 10], [100, 100, 8, 8]]}, {"id": 2, "confusers": []}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [52, 50, 10, 10]},
                          {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10]}]}
    preds = [
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.9},  # wrong class on object 1
        {"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.6},  # object 1
        {"image_id": 1, "category_id": 2, "bbox": [52, 50, 10, 10], "score": 0.7},  # object 2, over confuser 1
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.4},  # on confuser 1
    ]
    objects, confusers = sep.object_and_confuser_scores(gt, preds)
    assert objects.tolist() == pytest.approx([0.6, 0.7, 0.0])  # image 2: nothing fired
    assert confusers.tolist() == pytest.approx([0.4, 0.0])  # the real object's 0.7 is not blamed on confuser 1
    out = sep.separation(objects, confusers)
    assert out["objects"] == 3 and out["confusers"] == 2
    # pairs (object > confuser): 0.6 > 0.4, 0.6 > 0, 0.7 > both, 0 vs 0.4 loses, 0 vs 0 ties: (4 + 0.5) / 6
    assert out["auroc"] == pytest.approx(4.5 / 6, abs=1e-4)
    assert out["confusers_scoring_0.3"] == 0.5


def test_crop_classifier_learns_a_separable_difference(tmp_path):
    """Objects are filled squares, confusers hollow ones of the same colour: only the shape tells them apart."""
    rng = np.random.default_rng(0)

    def make(n_images: int, root: Path) -> dict:
        root.mkdir()
        images, anns = [], []
        for i in range(n_images):
            pixels = np.full((64, 64, 3), 40, np.uint8)
            x, y = (int(v) for v in rng.integers(4, 40, 2))
            pixels[y:y + 16, x:x + 16] = (220, 40, 40)
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, 16, 16]})
            cx, cy = (x + 24) % 44 + 2, (y + 24) % 44 + 2
            pixels[cy:cy + 16, cx:cx + 16] = (220, 40, 40)
            pixels[cy + 4:cy + 12, cx + 4:cx + 12] = 40
            Image.fromarray(pixels).save(root / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "confusers": [[cx, cy, 16, 16]]})
        return {"images": images, "annotations": anns}

    train = sep.crops(make(48, tmp_path / "train"), tmp_path / "train", 16)
    test = sep.crops(make(16, tmp_path / "test"), tmp_path / "test", 16)
    assert train[0].shape == (96, 3, 16, 16) and train[1].sum() == 48
    torch.manual_seed(0)
    out = sep.crop_classifier_bound(train, test, epochs=10)
    assert out["train_confusers"] == 48 and out["test_crops"] == 32
    assert out["test_auroc"] > 0.9, out["curve"]
