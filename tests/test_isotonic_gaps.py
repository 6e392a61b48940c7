"""benchmarks/isotonic_gaps.py: the two readings of the isotonic steps on a hand-built teacher, and their switch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dataengine.config import FilterParams
from dataengine.data.layout import PreparedLayout
from dataengine.pseudo.calibrate import Calibrator, fit_calibrator

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("isotonic_gaps", ROOT / "benchmarks" / "isotonic_gaps.py")
ig = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ig)

OBJECT, ELSEWHERE = [10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0]


def _split(name: str, boxes: list[tuple[bool, float]]) -> tuple[dict, dict]:
    """One 64x64 image per box, each holding one object; a box is right (on it) or wrong (elsewhere)."""
    files = [f"{name}{i:03d}.png" for i in range(len(boxes))]
    gt = {"images": [{"id": i + 1, "file_name": f, "width": 64, "height": 64} for i, f in enumerate(files)],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0} for i in range(len(files))]}
    predictions = {"class_names": ["a"], "images": [{"file_name": f, "width": 64, "height": 64} for f in files],
                   "boxes": [{"file_name": f, "bbox": OBJECT if right else ELSEWHERE, "label": 0, "score": s,
                              "consistency": 1.0} for f, (right, s) in zip(files, boxes)]}
    return gt, predictions


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_interpolation_lets_in_pool_boxes_between_val_blocks_and_the_step_reading_does_not(tmp_path: Path):
    # Val: 20 right boxes at 0.80-0.95 (p = 1), a block of one right and one wrong at 0.40 / 0.45 (p = 0.5: the val
    # threshold, since the 22 boxes from there up average 0.95), 10 wrong at 0.10-0.19 (p = 0). Nothing in 0.45-0.80.
    val = [(True, s) for s in np.linspace(0.8, 0.95, 20)] + [(True, 0.40), (False, 0.45)]
    val += [(False, s) for s in np.linspace(0.1, 0.19, 10)]
    # Pool: 20 right at 0.85-0.95, and 10 in the gap at 0.50-0.75, every other one right.
    pool = [(True, s) for s in np.linspace(0.85, 0.95, 20)] + [(i % 2 == 0, s) for i, s in
                                                               enumerate(np.linspace(0.5, 0.75, 10))]
    val_gt, val_pred = _split("v", val)
    pool_gt, pool_pred = _split("p", pool)
    _write(tmp_path / "prepared/general/val.json", val_gt)
    _write(tmp_path / "prepared/scenario/pool_hidden.json", pool_gt)
    _write(tmp_path / "pseudo/val/predictions.json", val_pred)
    _write(tmp_path / "pseudo/pool/predictions.json", pool_pred)

    run = ig.run_pseudo(tmp_path / "pseudo", PreparedLayout(tmp_path / "prepared"),
                        FilterParams(min_calibration_boxes=10), 0.85)

    # Interpolated, the gap boxes are priced 0.5-1 and the 30 boxes average above 0.9: all accepted, 25 right.
    assert run["interpolate"]["accepted"] == 30
    assert run["interpolate"]["accepted_in_gap"] == {"a": {"accepted": 10, "right": 5}}
    assert run["interpolate"]["true_precision"] == pytest.approx(25 / 30)
    assert not run["interpolate"]["meets_bar"]
    # Read from the left they are priced 0.5, the 30 average 0.83, and the pool raise keeps the 20 priced 1.
    assert run["step"]["accepted"] == 20
    assert run["step"]["accepted_in_gap"] == {"a": {"accepted": 0, "right": 0}}
    assert run["step"]["true_precision"] == 1.0 and run["step"]["meets_bar"]


def test_reading_switches_predict_and_always_restores_it():
    cal = fit_calibrator(np.array([0.1, 0.3, 0.8, 0.9]), np.ones(4), np.array([0, 0, 1, 1]) > 0)
    step = Calibrator.predict
    with ig.reading("interpolate"):
        assert 0.0 < cal.predict(np.array([0.5]), np.ones(1))[0] < 1.0
    assert Calibrator.predict is step and cal.predict(np.array([0.5]), np.ones(1))[0] == 0.0
    with pytest.raises(RuntimeError), ig.reading("interpolate"):
        raise RuntimeError("boom")
    assert Calibrator.predict is step
    with pytest.raises(ValueError, match="unknown reading 'linear'"), ig.reading("linear"):
        pass
