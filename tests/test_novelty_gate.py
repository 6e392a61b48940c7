"""benchmarks/novelty_gate.py: the features it reads at each box and its nearest-neighbour score."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataengine.models import create_model

spec = importlib.util.spec_from_file_location(
    "novelty_gate", Path(__file__).resolve().parents[1] / "benchmarks" / "novelty_gate.py")
gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate)


def test_knn_score_is_the_kth_same_class_cosine_distance():
    ref = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, -1.0]])
    labels = np.array([1, 1, 2, 1])
    query = np.array([[5.0, 0.0], [0.0, 1.0]])
    # class 1 only: [0, 1] is orthogonal to the first two and opposite to the third; scale does not matter
    assert gate.knn_scores(ref, labels, query, np.array([1, 1]), 1) == pytest.approx([0.0, 1.0])
    assert gate.knn_scores(ref, labels, query, np.array([1, 1]), 3) == pytest.approx([1.0, 2.0])
    assert gate.knn_scores(ref, labels, query, np.array([1, 2]), 1) == pytest.approx([0.0, 0.0])
    assert gate.knn_scores(ref, labels, query, np.array([1, 1]), 9) == pytest.approx([1.0, 2.0])  # k > class size


def test_box_features_follow_the_annotations_order(tmp_path):
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small_gfl", num_classes=2, segmentation=False).eval()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]}
    anns = [{"image_id": 2, "bbox": [8, 8, 20, 20]}, {"image_id": 1, "bbox": [0, 0, 30, 30]},
            {"image_id": 2, "bbox": [30, 30, 16, 16]}]
    feats = gate.box_features(model, tmp_path, coco, anns, batch_size=1)
    alone = [gate.box_features(model, tmp_path, coco, [a])[0] for a in anns]
    width = model.neck_channels * sum(cells * cells for _, _, cells in gate.LEVELS)
    assert feats.shape == (3, width)
    np.testing.assert_allclose(feats, np.stack(alone), rtol=1e-5, atol=1e-6)
    assert not np.allclose(feats[0], feats[2])  # two boxes of one image differ
