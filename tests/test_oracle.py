"""The simulated reviewer (benchmarks only): exact decisions on a hand-built pool."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine.config import load_params
from dataengine.review.decisions import validate_decisions
from dataengine.review.oracle import review_plan, simulate_review

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("distill_ablation", ROOT / "benchmarks" / "distill_ablation.py")
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)

CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "star"}]


def _rec(file_name: str, i: int, bbox: list[float], cls: str, score: float, reason: str | None = None) -> dict:
    return {"id": f"{file_name}#{i}", "file_name": file_name, "bbox": bbox, "class_name": cls, "score": score,
            "reason": reason}


def _pool() -> tuple[list, dict, list, dict]:
    accepted = {
        "categories": CATS,
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "c.png"}],
        "annotations": [
            # a.png: right (circle on a circle), a confuser box, a duplicate of the circle
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9, "pseudo_id": "a.png#0"},
            {"image_id": 1, "category_id": 2, "bbox": [60, 60, 10, 10], "score": 0.8, "pseudo_id": "a.png#1"},
            {"image_id": 1, "category_id": 1, "bbox": [11, 11, 20, 20], "score": 0.7, "pseudo_id": "a.png#2"},
            # b.png: nothing there at all (a negative image)
            {"image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10], "score": 0.85, "pseudo_id": "b.png#0"},
            # c.png: never reached (n_images=2)
            {"image_id": 3, "category_id": 2, "bbox": [5, 5, 10, 10], "score": 0.85, "pseudo_id": "c.png#0"},
        ],
    }
    queue = [_rec("a.png", 3, [40, 0, 50, 10], "circle", 0.4),      # review band: a star called circle -> correct
             _rec("b.png", 1, [30, 30, 40, 40], "star", 0.3),
             _rec("a.png", 4, [0, 90, 5, 95], "star", 0.2),         # review band: nothing there -> reject
             _rec("c.png", 1, [0, 0, 4, 4], "star", 0.3)]
    rejected = [_rec("a.png", 5, [90, 90, 99, 99], "circle", 0.6, reason="low_probability"),  # confident: looked at
                _rec("a.png", 6, [80, 0, 90, 10], "circle", 0.1, reason="low_probability")]   # not shown: skipped
    hidden = {"categories": CATS,
              "images": [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "b.png"},
                         {"id": 9, "file_name": "c.png"}],
              "annotations": [{"image_id": 7, "category_id": 1, "bbox": [10, 10, 20, 20]},
                              {"image_id": 7, "category_id": 2, "bbox": [40, 0, 10, 10]},
                              {"image_id": 7, "category_id": 2, "bbox": [100, 100, 8, 8]},   # missed: added
                              {"image_id": 9, "category_id": 2, "bbox": [5, 5, 10, 10]}]}
    return queue, accepted, rejected, hidden


def test_simulated_review_decides_like_a_careful_person() -> None:
    decisions, stats = simulate_review(*_pool(), n_images=2)
    labels = {k: v["decision"] for k, v in decisions["labels"].items()}
    assert labels == {"a.png#0": "accept", "a.png#1": "reject", "a.png#2": "reject", "a.png#3": "correct",
                      "a.png#4": "reject", "a.png#5": "reject", "b.png#0": "reject", "b.png#1": "reject"}
    corrected = decisions["labels"]["a.png#3"]
    assert corrected["class_name"] == "star" and corrected["bbox"] == [40.0, 0.0, 50.0, 10.0]
    assert decisions["images"]["a.png"]["added"] == [{"bbox": [100.0, 100.0, 108.0, 108.0], "class_name": "star"}]
    assert decisions["images"]["b.png"]["flags"] == ["negative"] and "c.png" not in decisions["images"]
    assert all(e["source"] == "simulated" for e in [*decisions["labels"].values(), *decisions["images"].values()])
    assert stats == {"images": 2, "accepted": 1, "rejected": 6, "corrected": 1, "added": 1, "negative": 1}
    validate_decisions(decisions)


def test_simulated_review_of_zero_images_and_unknown_image() -> None:
    queue, accepted, rejected, hidden = _pool()
    decisions, stats = simulate_review(queue, accepted, rejected, hidden, n_images=0)
    assert decisions["labels"] == {} and decisions["images"] == {} and stats["images"] == 0
    hidden["images"] = hidden["images"][1:]
    with pytest.raises(KeyError, match="a.png"):
        simulate_review(queue, accepted, rejected, hidden, n_images=1)


def test_review_plan_puts_the_audit_first_and_counts_each_image_once() -> None:
    queue = [{"file_name": f, "id": f"{f}#{i}"} for i, f in enumerate(["q1", "q1", "a2", "q3", "q4"])]
    audit = [{"file_name": "a1", "id": "a1#0"}, {"file_name": "a2", "id": "a2#5"}, {"file_name": "a1", "id": "a1#1"}]
    records, n = review_plan(queue, audit, queue_images=3)
    # Audit images a1, a2, then the queue's first three images q1, a2 (already counted), q3.
    assert n == 4 and list(dict.fromkeys(r["file_name"] for r in records)) == ["a1", "a2", "q1", "q3"]
    assert [r["id"] for r in records[:3]] == ["a1#0", "a2#5", "a1#1"]
    assert review_plan(queue, [], queue_images=0) == ([], 0)
    assert review_plan(queue, audit, queue_images=0)[1] == 2


def test_oracle_mined_adds_every_curated_confuser_as_a_region(tmp_path):
    """``benchmarks/distill_ablation.py --oracle-mining``: confusers become regions, existing bits are kept."""
    mined = tmp_path / "mined"
    (mined / "maps/scenario").mkdir(parents=True)
    old = np.zeros((8, 10), np.uint8)
    old[0, 0] = 2  # a hard pixel
    Image.fromarray(old).save(mined / "maps/scenario/a.png.png")
    entry = {"source": "scenario", "file_name": "a.png", "image_id": 1, "reasons": [], "hard_pixels": 1,
             "regions": [], "map": "maps/scenario/a.png.png"}
    (mined / "hard_negatives.json").write_text(json.dumps({"version": 1, "params": {}, "images": [entry]}))
    curated = tmp_path / "curated.json"
    curated.write_text(json.dumps({"categories": CATS, "annotations": [], "images": [
        {"id": 1, "file_name": "a.png", "width": 10, "height": 8}, {"id": 2, "file_name": "b.png", "width": 10,
                                                                    "height": 8}]}))
    hidden = tmp_path / "hidden.json"
    hidden.write_text(json.dumps({"categories": CATS, "annotations": [], "images": [
        {"id": 7, "file_name": "a.png", "width": 10, "height": 8, "confusers": [[1.5, 2, 2, 3]]},
        {"id": 8, "file_name": "b.png", "width": 10, "height": 8, "confusers": [[0, 0, 1, 1], [8, 6, 2, 2]]},
        {"id": 9, "file_name": "c.png", "width": 10, "height": 8, "confusers": [[0, 0, 1, 1]]}]}))  # not curated

    stats = ablation.oracle_mined(mined, tmp_path / "oracle", curated, hidden)

    assert stats == {"confuser_regions_added": 3, "images": 2}
    doc = json.loads((tmp_path / "oracle/hard_negatives.json").read_text())
    by_name = {e["file_name"]: e for e in doc["images"]}
    assert sorted(by_name) == ["a.png", "b.png"]
    assert by_name["a.png"]["regions"] == [{"bbox": [1.5, 2, 3.5, 5], "class_name": "confuser", "score": 1.0}]
    assert by_name["b.png"]["image_id"] == 2 and by_name["b.png"]["map"] == "maps/scenario/b.png.png"
    a = np.array(Image.open(tmp_path / "oracle/maps/scenario/a.png.png"))
    assert a[0, 0] == 2 and (a[2:5, 1:4] == 1).all() and a.sum() == 2 + 9  # floor/ceil: columns 1-3, rows 2-4
    b = np.array(Image.open(tmp_path / "oracle/maps/scenario/b.png.png"))
    assert b[0, 0] == 1 and (b[6:8, 8:10] == 1).all() and b.sum() == 5
    assert not (mined / "maps/scenario/b.png.png").exists()  # the mine stage's output is left as it was


def test_with_epochs_changes_the_budget_and_nothing_else():
    """``benchmarks/distill_ablation.py --epochs E``: E x epoch_size images, every other param as in params.yaml."""
    base = load_params(ROOT / "params.yaml", ["distill"]).distill

    longer = ablation.with_epochs(base, 18)
    assert longer.train.epochs == 18 and longer.train.eval_every == 18  # one evaluation, after the last epoch
    assert dataclasses.replace(longer.train, epochs=base.train.epochs, eval_every=base.train.eval_every) == base.train
    assert dataclasses.replace(longer, train=base.train) == base


@pytest.mark.parametrize("swap", [["--pseudo", "x/pseudo"], ["--filtered", "x/none/filtered"]])
def test_other_labels_need_a_simulated_review_run(swap: list[str]):
    """``--pseudo``/``--filtered`` only act through ``--oracle-review``; alone they would be silently ignored."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_ablation.py"), *swap],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--pseudo and --filtered need --oracle-review" in result.stderr
