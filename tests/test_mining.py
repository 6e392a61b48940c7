"""The mine stage: region and pixel rules, map bits, outputs byte for byte, the teacher run, and the dataset's maps."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors

from dataengine.config import AugmentParams, MineParams
from dataengine.curation import (
    ImageEvidence,
    hard_map,
    hard_maps_for,
    hard_pixel_mask,
    mine_hard_negatives,
    mine_image,
    mining_metrics,
    mining_summary_lines,
    region_image_ids,
    select_regions,
    stored_foreground,
    write_mined,
)
from dataengine.curation.mining import MinedImage, general_evidence, regions_against_hidden
from dataengine.data.dataset import CocoDetectionSegDataset, read_hard_map
from dataengine.data.transforms import IMAGE_FILL, HardNegativeMask, SanitizeBoxesKeepSemantic, build_transforms
from dataengine.review.decisions import empty_decisions, image_decision, label_decision

NAMES = ["circle", "square"]
CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


def box(xyxy: list[float], score: float, cls: str = "circle") -> dict[str, Any]:
    return {"bbox": xyxy, "class_name": cls, "score": score}


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------------------------------------------------------
# Image level
# ---------------------------------------------------------------------------------------------------------------


def test_confident_unmatched_box_is_a_region_matched_ones_are_not() -> None:
    teacher = [box([0, 0, 10, 10], 0.9), box([0, 0, 10, 10], 0.8, "square"), box([20, 20, 30, 30], 0.7),
               box([40, 40, 50, 50], 0.3)]
    labels = [[1, 1, 10, 10]]  # matches the first two boxes (IoU 0.81), whatever their class
    regions, fired, dropped = select_regions(teacher, labels, score_threshold=0.5, match_iou=0.3, max_regions=10)
    assert regions == [{"bbox": [20.0, 20.0, 30.0, 30.0], "class_name": "circle", "score": 0.7}]
    assert fired is True and dropped == 0
    # no label box at all: every confident box is a region; nothing confident: no reason
    regions, fired, _ = select_regions(teacher, [], score_threshold=0.5, match_iou=0.3, max_regions=10)
    assert [r["score"] for r in regions] == [0.9, 0.8, 0.7] and fired
    assert select_regions(teacher[3:], [], score_threshold=0.5, match_iou=0.3, max_regions=10) == ([], False, 0)


def test_threshold_edges_are_inclusive() -> None:
    labels = [[0, 0, 10, 10]]
    at_iou = [box([0, 0, 10, 3], 0.9)]  # IoU exactly 0.3 with the label: matched
    assert select_regions(at_iou, labels, score_threshold=0.5, match_iou=0.3, max_regions=5)[0] == []
    below_iou = [box([0, 0, 10, 2.99], 0.9)]  # IoU 0.299: a region
    assert len(select_regions(below_iou, labels, score_threshold=0.5, match_iou=0.3, max_regions=5)[0]) == 1
    far = [[100, 100, 110, 110]]
    assert len(select_regions([box([0, 0, 5, 5], 0.5)], far, score_threshold=0.5, match_iou=0.3,
                              max_regions=5)[0]) == 1  # score == threshold: confident
    assert select_regions([box([0, 0, 5, 5], 0.49999)], far, score_threshold=0.5, match_iou=0.3,
                          max_regions=5)[0] == []
    # scores are compared as stored (5 decimals): 0.499996 is 0.5
    assert len(select_regions([box([0, 0, 5, 5], 0.499996)], far, score_threshold=0.5, match_iou=0.3,
                              max_regions=5)[0]) == 1


def test_reviewer_negative_keeps_every_teacher_box_and_its_reason() -> None:
    ev = ImageEvidence("scenario", "n.png", 4, 20, 20, [box([0, 0, 4, 4], 0.2), box([5, 5, 9, 9], 0.1, "square")],
                       np.zeros((0, 4)), negative=True)
    mined = mine_image(ev, MineParams(), NAMES)
    assert mined.reasons == ["reviewer_negative"] and [r["score"] for r in mined.regions] == [0.2, 0.1]
    ev.teacher_boxes = []  # a negative without any teacher box is still listed, without a map
    mined = mine_image(ev, MineParams(), NAMES)
    assert mined.reasons == ["reviewer_negative"] and mined.regions == [] and mined.png is None
    assert mined.entry()["map"] is None and mined.listed
    ev.teacher_boxes = [box([0, 0, 4, 4], 0.9)]  # confident too: both reasons, in REASONS order
    assert mine_image(ev, MineParams(), NAMES).reasons == ["teacher_fp", "reviewer_negative"]


def test_max_regions_cap_keeps_highest_scores_with_deterministic_ties() -> None:
    teacher = [box([i * 10, 0, i * 10 + 5, 5], s) for i, s in enumerate([0.6, 0.9, 0.7, 0.9, 0.8])]
    regions, fired, dropped = select_regions(teacher, [], score_threshold=0.5, match_iou=0.3, max_regions=3)
    assert [(r["score"], r["bbox"][0]) for r in regions] == [(0.9, 10.0), (0.9, 30.0), (0.8, 40.0)]
    assert fired and dropped == 2
    assert select_regions(teacher[::-1], [], score_threshold=0.5, match_iou=0.3, max_regions=3)[0] == regions


# ---------------------------------------------------------------------------------------------------------------
# Pixel level and maps
# ---------------------------------------------------------------------------------------------------------------


def test_pixel_rule_counts_only_labelled_background() -> None:
    fg = np.array([[0.9, 0.8, 0.79, 0.95], [0.99, 0.99, 0.0, 0.85]], dtype=np.float32)
    label = np.array([[0, 0, 0, 255], [1, 2, 0, 0]], dtype=np.uint8)
    assert hard_pixel_mask(fg, label, 0.8, edge_band=0).tolist() == [[True, True, False, False],
                                                                       [False, False, False, True]]
    with pytest.raises(ValueError, match="differ in size"):
        hard_pixel_mask(fg, label[:, :2], 0.8)


def test_pixels_near_a_labelled_object_are_never_hard() -> None:
    label = np.zeros((7, 7), np.uint8)
    label[3, 3] = 2  # one object pixel in the middle
    hard = hard_pixel_mask(np.ones((7, 7), np.float32), label, 0.8)  # default band: 2 px (8-connected)
    expected = np.ones((7, 7), bool)
    expected[1:6, 1:6] = False
    assert hard.tolist() == expected.tolist()
    assert hard_pixel_mask(np.ones((7, 7), np.float32), label, 0.8, edge_band=1).sum() == 49 - 9


def test_stored_foreground_is_exact_on_background_argmax_and_a_bound_elsewhere() -> None:
    label = np.array([[0, 0, 2, 1, 1]], dtype=np.uint8)
    conf = np.array([[25, 255, 230, 153, 25]], dtype=np.uint8)  # top probability 0.098, 1, 0.902, 0.6, 0.098
    fg, exact = stored_foreground(label, conf)
    assert np.allclose(fg, [[230 / 255, 0.0, 230 / 255, 0.6, 230 / 255]])
    assert exact.tolist() == [[True, True, False, False, False]]
    ev = ImageEvidence("scenario", "x.png", 1, 1, 5, [], np.zeros((0, 4)), foreground=fg, exact=exact,
                       pixel_class=label.astype(np.int64), label=np.zeros((1, 5), np.uint8))
    mined = mine_image(ev, MineParams(pixel_confidence=0.8), NAMES)
    # hard: the background-argmax pixel at 0.902 (class unknown), the square and the circle pixels bounded at 0.902;
    # the circle pixel bounded at 0.6 only is undecided
    assert mined.hard_pixels == 3 and mined.undecided_pixels == 1 and mined.background_pixels == 5
    assert mined.pixel_classes == {"circle": 1, "square": 1, "unknown": 1}


def test_map_bits_regions_cover_touched_pixels_and_pixels_get_bit_2() -> None:
    hard = np.zeros((4, 6), dtype=bool)
    hard[0, 0] = hard[2, 2] = True
    bits = hard_map([{"bbox": [1.5, 1.0, 3.0, 2.2]}, {"bbox": [-2, -2, 0.5, 0.5]}], hard)
    assert bits.tolist() == [[3, 0, 0, 0, 0, 0],
                             [0, 1, 1, 0, 0, 0],
                             [0, 1, 3, 0, 0, 0],
                             [0, 0, 0, 0, 0, 0]]
    assert hard_map([{"bbox": [10, 10, 20, 20]}], hard).tolist() == np.where(hard, 2, 0).tolist()  # outside: nothing


# ---------------------------------------------------------------------------------------------------------------
# The stage on a hand-built scenario tree: exact document, metrics, byte-identical re-runs
# ---------------------------------------------------------------------------------------------------------------

H, W = 8, 10


@pytest.fixture
def scenario_tree(tmp_path: Path) -> dict[str, Path]:
    curated_dir, pred_dir = tmp_path / "curated", tmp_path / "pseudo" / "pool"
    images = [("a.png", 1), ("b/c.png", 2), ("d.png", 3)]
    curated = {
        "images": [{"id": i, "file_name": f, "width": W, "height": H, "semantic_file": f"{f}.png"} for f, i in images],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0},
                        {"id": 2, "image_id": 3, "category_id": 2, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}],
        "categories": CATS,
        "semantic_root": "semantic",
    }
    curated["images"][1]["negative"] = True
    for f, _ in images:
        sem = np.zeros((H, W), np.uint8)
        sem[0:4, 0:4] = 1 if f != "b/c.png" else 0
        sem[7, 9] = 255
        save_png(curated_dir / "semantic" / f"{f}.png", sem)
        label, conf = np.zeros((H, W), np.uint8), np.full((H, W), 255, np.uint8)
        if f == "a.png":
            label[6, 1], conf[6, 1] = 2, 230  # square at 0.9 on background: hard
            label[6, 2], conf[6, 2] = 1, 153  # circle argmax at 0.6: foreground >= 0.6 only: undecided
            conf[6, 3] = 25  # background argmax at 0.098: foreground 0.902: hard, class unknown
            label[7, 9], conf[7, 9] = 2, 255  # ignored pixel: never counted
            label[1, 1], conf[1, 1] = 2, 255  # a labelled circle pixel: not background
        save_png(pred_dir / "seg" / f"{f}.label.png", label)
        save_png(pred_dir / "seg" / f"{f}.confidence.png", conf)
    (curated_dir / "scenario.json").write_text(json.dumps(curated))
    preds = {
        "images": [{"file_name": f, "width": W, "height": H,
                    "seg": {"label": f"seg/{f}.label.png", "confidence": f"seg/{f}.confidence.png"}}
                   for f, _ in images],
        "boxes": [
            {"file_name": "a.png", "bbox": [0, 0, 4, 4], "label": 0, "score": 0.9},  # matched
            {"file_name": "a.png", "bbox": [5.004, 5, 9, 8], "label": 1, "score": 0.6},  # rejected by a person: region
            {"file_name": "a.png", "bbox": [6, 0, 9, 3], "label": 0, "score": 0.3},  # not confident
            {"file_name": "b/c.png", "bbox": [1, 1, 3, 3], "label": 1, "score": 0.2},  # negative: regions
            {"file_name": "b/c.png", "bbox": [5, 1, 7, 3], "label": 0, "score": 0.1},
            {"file_name": "d.png", "bbox": [0, 0, 5, 5], "label": 0, "score": 0.95},  # matched (another class)
        ],
        "class_names": NAMES,
        "category_ids": [1, 2],
    }
    pred_dir.mkdir(parents=True, exist_ok=True)
    (pred_dir / "predictions.json").write_text(json.dumps(preds))
    decisions = empty_decisions()
    decisions["images"]["b/c.png"] = image_decision(source="fiftyone", flags=["negative"])
    decisions["labels"]["a.png#1"] = label_decision("a.png", "reject", source="fiftyone")
    decisions["images"]["gone.png"] = image_decision(source="fiftyone", flags=["negative", "relabel"])
    return {"curated": curated_dir / "scenario.json", "pseudo": tmp_path / "pseudo", "decisions": decisions,
            "root": tmp_path}


def _mine(tree: dict[str, Any], out: Path) -> dict[str, Any]:
    result = mine_hard_negatives(MineParams(sources=("scenario",)), data_root=tree["root"] / "prepared",
                                 curated=tree["curated"], pseudo=tree["pseudo"], decisions=tree["decisions"])
    write_mined(result, out)
    return mining_metrics(result)


def test_scenario_stage_document_metrics_and_maps(scenario_tree: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "mined"
    metrics = _mine(scenario_tree, out)
    doc = json.loads((out / "hard_negatives.json").read_text())
    assert doc["version"] == 1 and doc["params"]["sources"] == ["scenario"] and doc["params"]["match_iou"] == 0.3
    assert doc["images"] == [
        {"source": "scenario", "file_name": "a.png", "image_id": 1, "reasons": ["teacher_fp"],
         "regions": [{"bbox": [5.0, 5.0, 9.0, 8.0], "class_name": "square", "score": 0.6}], "hard_pixels": 2,
         "map": "maps/scenario/a.png.png"},
        {"source": "scenario", "file_name": "b/c.png", "image_id": 2, "reasons": ["reviewer_negative"],
         "regions": [{"bbox": [1.0, 1.0, 3.0, 3.0], "class_name": "square", "score": 0.2},
                     {"bbox": [5.0, 1.0, 7.0, 3.0], "class_name": "circle", "score": 0.1}], "hard_pixels": 0,
         "map": "maps/scenario/b/c.png.png"},
    ]
    bits = read_hard_map(out / "maps/scenario/a.png.png", H, W)
    expected = np.zeros((H, W), np.uint8)
    expected[5:8, 5:9] = 1
    expected[6, 1] = expected[6, 3] = 2
    assert bits.tolist() == expected.tolist()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "maps/scenario/a.png.png", "maps/scenario/b/c.png.png"]
    s = metrics["sources"]["scenario"]
    assert s["images_scanned"] == 3 and s["hard_negative_images"] == 2
    assert s["by_reason"] == {"teacher_fp": 1, "reviewer_negative": 1}
    assert s["regions"] == 3 and s["regions_by_class"] == {"circle": 1, "square": 2}
    # labelled background: all but the 4x4 circle and the ignored pixel in a.png and d.png, all but that pixel in c
    assert s["background_pixels"] == (H * W - 16 - 1) * 2 + (H * W - 1)
    assert s["hard_pixels"] == 2 and s["hard_pixels_by_class"] == {"square": 1, "unknown": 1}
    assert s["hard_pixel_share"] == round(2 / s["background_pixels"], 6)
    assert s["undecided_pixels"] == 1 and s["maps"] == 2 and metrics["skipped"] == {"negative_not_curated": 1}
    assert metrics["total"]["regions"] == 3 and metrics["listed_images"] == 2
    lines = mining_summary_lines(metrics)
    assert lines[0].startswith("mine scenario: 3 images scanned, 2 hard-negative images (teacher_fp 1, "
                               "reviewer_negative 1), 3 regions") and "skipped 1 x negative_not_curated" in lines[-1]


def _a_regions(tree: dict[str, Any], decisions: dict[str, Any], queue: list[dict[str, Any]] | None = None,
               **params: Any) -> list[Any]:
    """The regions of ``a.png`` (the 0.6 square at [5, 5, 9, 8] is the only confident unmatched box)."""
    result = mine_hard_negatives(MineParams(sources=("scenario",), **params), data_root=tree["root"] / "prepared",
                                 curated=tree["curated"], pseudo=tree["pseudo"], decisions=decisions,
                                 review_queue=queue or [])
    return [r["bbox"] for m in result.images["scenario"] if m.file_name == "a.png" for r in m.regions]


def _without_labels(decisions: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(decisions))
    out["labels"] = {}
    return out


def test_on_the_scenario_only_a_persons_verdict_makes_a_region(scenario_tree: dict[str, Any]) -> None:
    square = [[5.0, 5.0, 9.0, 8.0]]
    undecided = _without_labels(scenario_tree["decisions"])
    assert _a_regions(scenario_tree, undecided) == []  # only the filter rejected it: unknown, not negative
    assert _a_regions(scenario_tree, undecided, unreviewed_rejects=True) == square  # the filter-only rule
    assert _a_regions(scenario_tree, scenario_tree["decisions"]) == square  # a person rejected it
    accepted = _without_labels(scenario_tree["decisions"])
    accepted["labels"]["a.png#1"] = label_decision("a.png", "accept", source="labelstudio")
    assert _a_regions(scenario_tree, accepted) == []  # a person said it is right
    moved = _without_labels(scenario_tree["decisions"])  # corrected far away: the teacher's box was wrong there
    moved["labels"]["a.png#1"] = label_decision("a.png", "correct", source="labelstudio", bbox=[0, 5, 3, 8],
                                                class_name="square")
    assert _a_regions(scenario_tree, moved) == square
    reclassed = _without_labels(scenario_tree["decisions"])  # the verdict is wrong, but the box is another
    reclassed["labels"]["a.png#1"] = label_decision("a.png", "correct", source="labelstudio",  # class's object:
                                                    bbox=[5, 5, 9, 8], class_name="circle")  # only the curated set
    assert _a_regions(scenario_tree, reclassed) == square  # keeps it (the review stage adds it: not run here)


def test_a_stale_reject_follows_its_box_as_the_review_stage_does(scenario_tree: dict[str, Any]) -> None:
    stale = _without_labels(scenario_tree["decisions"])  # decided on another teacher's output, where #2 was the box
    stale["labels"]["a.png#2"] = label_decision("a.png", "reject", source="fiftyone",
                                                original={"bbox": [5, 5, 9, 8], "class_name": "square"})
    assert _a_regions(scenario_tree, stale) == [[5.0, 5.0, 9.0, 8.0]]
    elsewhere = _without_labels(scenario_tree["decisions"])  # its original matches no current box: nothing
    elsewhere["labels"]["a.png#2"] = label_decision("a.png", "reject", source="fiftyone",
                                                    original={"bbox": [0, 5, 2, 8], "class_name": "square"})
    assert _a_regions(scenario_tree, elsewhere) == []


def test_undecided_review_boxes_are_never_negatives(scenario_tree: dict[str, Any]) -> None:
    queue = [{"id": "a.png#7", "file_name": "a.png", "bbox": [5.0, 5.0, 9.0, 8.0]}]  # over a.png's region
    undecided = _without_labels(scenario_tree["decisions"])
    # nobody decided the queue's box yet: unknown, not negative, even under the filter-only rule
    assert _a_regions(scenario_tree, undecided, queue, unreviewed_rejects=True) == []
    decided = json.loads(json.dumps(undecided))
    decided["labels"]["a.png#7"] = {"decision": "reject"}  # a reviewer rejected it: the region is back
    assert _a_regions(scenario_tree, decided, queue, unreviewed_rejects=True) == [[5.0, 5.0, 9.0, 8.0]]


def test_reruns_are_byte_identical_and_remove_stale_maps(scenario_tree: dict[str, Any], tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    stale = two / "maps" / "scenario" / "old.png.png"
    save_png(stale, np.ones((2, 2), np.uint8))
    m1, m2 = _mine(scenario_tree, one), _mine(scenario_tree, two)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file()) and not stale.exists()
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    assert json.dumps(m1) == json.dumps(m2)


def test_bad_inputs_name_the_file(scenario_tree: dict[str, Any], tmp_path: Path) -> None:
    preds_path = scenario_tree["pseudo"] / "pool" / "predictions.json"
    preds = json.loads(preds_path.read_text())
    preds_path.write_text(json.dumps({**preds, "class_names": ["circle", "star"]}))
    with pytest.raises(ValueError, match=r"scenario\.json: classes .* differ .*predictions\.json"):
        _mine(scenario_tree, tmp_path / "out")
    preds_path.write_text(json.dumps({**preds, "images": preds["images"][:2]}))
    with pytest.raises(ValueError, match=r"image 'd\.png' has no teacher output in .*predictions\.json"):
        _mine(scenario_tree, tmp_path / "out")
    preds_path.unlink()
    with pytest.raises(FileNotFoundError, match="predictions.json"):
        _mine(scenario_tree, tmp_path / "out")
    with pytest.raises(ValueError, match="needs the teacher"):
        mine_hard_negatives(MineParams(sources=("general",)), data_root=tmp_path, curated=scenario_tree["curated"],
                            pseudo=scenario_tree["pseudo"], decisions=empty_decisions())


# ---------------------------------------------------------------------------------------------------------------
# The teacher run (general): boxes and probabilities back in original pixels
# ---------------------------------------------------------------------------------------------------------------


class StubTeacher(nn.Module):
    """Fixed outputs in letterboxed input pixels: three boxes and foreground 0.9 (class 1) everywhere."""

    detection, segmentation, input_size = True, True, 32

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        return {"batch": images.shape[0]}

    def postprocess(self, outputs: dict[str, Any], *, score_threshold: float) -> list[dict[str, torch.Tensor]]:
        boxes = torch.tensor([[2.0, 1.0, 6.0, 4.0], [10.0, 2.0, 14.0, 6.0], [20.0, 8.0, 24.0, 12.0]])
        scores, labels = torch.tensor([0.9, 0.8, 0.3]), torch.tensor([1, 0, 0])
        keep = scores > score_threshold
        return [{"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}] * outputs["batch"]

    def semantic_probs(self, outputs: dict[str, Any], size: Any) -> torch.Tensor:
        probs = torch.zeros(outputs["batch"], 3, *size)
        probs[:, 0], probs[:, 2] = 0.1, 0.9
        return probs


def test_general_evidence_maps_teacher_outputs_back_to_original_pixels(tmp_path: Path) -> None:
    h, w = 16, 64  # letterboxed into 32 x 32 at scale 0.5, padding below
    root = tmp_path / "images"
    save_png(root / "g.png", np.zeros((h, w, 3), np.uint8))
    sem = np.zeros((h, w), np.uint8)
    sem[0:4, 0:8] = 1  # a circle where the first teacher box is
    sem[15, :] = 255
    save_png(root / "g_sem.png", sem)
    coco = {"images": [{"id": 5, "file_name": "g.png", "width": w, "height": h, "semantic_file": "g_sem.png"}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [4, 2, 8, 6], "iscrowd": 0}],
            "categories": CATS}
    teacher = StubTeacher().train()
    (ev,) = general_evidence(teacher, coco, root, input_size=32, batch_size=4, score_threshold=0.5)
    assert teacher.training  # mode restored
    assert ev.teacher_boxes == [{"bbox": [4.0, 2.0, 12.0, 8.0], "class_name": "square", "score": pytest.approx(0.9)},
                                {"bbox": [20.0, 4.0, 28.0, 12.0], "class_name": "circle", "score": pytest.approx(0.8)}]
    assert ev.label_boxes.tolist() == [[4.0, 2.0, 12.0, 8.0]] and (ev.image_id, ev.file_name) == (5, "g.png")
    mined = mine_image(ev, MineParams(), NAMES)
    assert mined.reasons == ["teacher_fp"]
    assert mined.regions == [{"bbox": [20.0, 4.0, 28.0, 12.0], "class_name": "circle", "score": 0.8}]
    band = 6 * 10 - 32  # the 2-px band around the 4 x 8 circle (rows 0-5, columns 0-9) is never hard
    assert mined.hard_pixels == h * w - 32 - band - w and mined.pixel_classes == {"square": h * w - 32 - band - w}


# ---------------------------------------------------------------------------------------------------------------
# The dataset's hard_negative target
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def map_dataset(tmp_path: Path) -> tuple[dict[str, Any], Path, Path]:
    h, w = 16, 24
    img = np.zeros((h, w, 3), np.uint8)
    img[4:8, 2:6] = 255  # white block: bits 3
    img[0:2, 10:13] = (255, 0, 0)  # red block: bit 1
    bits = np.zeros((h, w), np.uint8)
    bits[4:8, 2:6], bits[0:2, 10:13] = 3, 1
    root = tmp_path / "images"
    save_png(root / "m.png", img)
    save_png(root / "n.png", img)
    save_png(tmp_path / "maps" / "m.png.png", bits)
    coco = {"images": [{"id": 1, "file_name": "m.png", "width": w, "height": h},
                       {"id": 2, "file_name": "n.png", "width": w, "height": h}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 4, 4, 4], "iscrowd": 0}],
            "categories": CATS}
    return coco, root, tmp_path / "maps" / "m.png.png"


def test_dataset_hflips_the_map_with_the_image(map_dataset: tuple[dict[str, Any], Path, Path]) -> None:
    coco, root, path = map_dataset
    tf = build_transforms(AugmentParams(preset="light", hflip=1.0), 24, train=True)
    ds = CocoDetectionSegDataset(coco, root, tf, hard_maps={1: path})
    image, target = ds[0]
    bits = target["hard_negative"]
    assert bits.dtype == torch.uint8 and bits.shape == (24, 24) and type(bits) is torch.Tensor
    white = (image > 0.99).all(0)
    red = (image[0] > 0.99) & (image[1] < 0.01) & (image[2] < 0.01)
    assert torch.equal(bits == 3, white) and torch.equal(bits == 1, red)
    assert (bits[4:8, 18:22] == 3).all()  # x 2..6 of a 24-wide image flipped to 18..22
    assert (bits[16:] == 0).all()  # letterbox padding below the 16-row image is 0
    _, other = ds[1]
    assert torch.equal(other["hard_negative"], torch.zeros(24, 24, dtype=torch.uint8))  # no map: zeros
    assert "hard_negative" not in CocoDetectionSegDataset(coco, root, tf)[0][1]  # no hard_maps: no key


@pytest.mark.parametrize("preset", ["none", "light", "default", "strong"])
def test_every_preset_moves_the_map_with_the_image(preset: str, tmp_path: Path) -> None:
    h, w = 20, 30
    save_png(tmp_path / "r.png", np.full((h, w, 3), (200, 10, 10), np.uint8))
    save_png(tmp_path / "r_map.png", np.full((h, w), 3, np.uint8))
    # as many boxes as the map has rows: v2's SanitizeBoundingBoxes would pick rows of a plain Mask
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [i, 0, 0 if i == 0 else 4, 4], "iscrowd": 0}
            for i in range(32)]
    coco = {"images": [{"id": 1, "file_name": "r.png", "width": w, "height": h}], "annotations": anns,
            "categories": CATS}
    tf = build_transforms(AugmentParams(preset=preset, photometric=0.0), 32, train=True)
    ds = CocoDetectionSegDataset(coco, tmp_path, tf, hard_maps={1: tmp_path / "r_map.png"})
    fill = torch.tensor(IMAGE_FILL, dtype=torch.float32)[:, None, None] / 255
    red = torch.tensor([200, 10, 10], dtype=torch.float32)[:, None, None] / 255
    torch.manual_seed(0)
    for _ in range(6):
        image, target = ds[0]
        bits = target["hard_negative"]
        assert bits.shape == (32, 32) and set(bits.unique().tolist()) <= {0, 3}
        is_image = (image - red).abs().sum(0) < (image - fill).abs().sum(0)  # closer to the photo than to padding
        assert ((bits == 3) == is_image).float().mean() >= 0.95  # only resampled edges may differ


def test_sanitize_leaves_the_hard_negative_map_alone() -> None:
    boxes = tv_tensors.BoundingBoxes([[0, 0, 0, 0], [0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 1, 1]], format="XYXY",
                                     canvas_size=(4, 5))
    bits = HardNegativeMask(torch.arange(20, dtype=torch.uint8).reshape(4, 5) % 4)
    out = SanitizeBoxesKeepSemantic()({"boxes": boxes, "labels": torch.arange(4), "hard_negative": bits})
    assert out["labels"].tolist() == [1, 2, 3] and torch.equal(out["hard_negative"], bits)


def test_read_hard_map_errors_name_the_file(tmp_path: Path) -> None:
    save_png(tmp_path / "big.png", np.full((2, 2), 4, np.uint8))
    with pytest.raises(ValueError, match=r"big\.png: hard-negative map values must be in 0\.\.3, got 4"):
        read_hard_map(tmp_path / "big.png", 2, 2)
    with pytest.raises(ValueError, match=r"big\.png: hard-negative map is 2x2, its image is 3x2"):
        read_hard_map(tmp_path / "big.png", 3, 2)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_hard_map(tmp_path / "nope.png", 2, 2)


# ---------------------------------------------------------------------------------------------------------------
# hard_maps_for
# ---------------------------------------------------------------------------------------------------------------


def test_hard_maps_for_maps_file_names_to_ids_and_refuses_unknown_images(tmp_path: Path) -> None:
    doc = {"version": 1, "params": {}, "images": [
        {"source": "scenario", "file_name": "a.png", "map": "maps/scenario/a.png.png"},
        {"source": "scenario", "file_name": "b.png", "map": None},  # a negative without a map
        {"source": "general", "file_name": "a.png", "map": "maps/general/a.png.png"},
    ]}
    coco = {"images": [{"id": 3, "file_name": "b.png"}, {"id": 9, "file_name": "a.png"}]}
    assert hard_maps_for(doc, "scenario", coco, tmp_path) == {9: tmp_path / "maps/scenario/a.png.png"}
    assert hard_maps_for(doc, "general", coco, tmp_path) == {9: tmp_path / "maps/general/a.png.png"}
    with pytest.raises(ValueError, match=r"lists scenario image 'a\.png', which is not in the COCO"):
        hard_maps_for(doc, "scenario", {"images": [{"id": 3, "file_name": "b.png"}]}, tmp_path)
    with pytest.raises(ValueError, match="version-1"):
        hard_maps_for({"version": 2, "images": []}, "scenario", coco, tmp_path)
    escape = {"version": 1, "images": [{"source": "general", "file_name": "a.png", "map": "../x.png"}]}
    with pytest.raises(ValueError, match="outside"):
        hard_maps_for(escape, "general", coco, tmp_path)


def test_region_image_ids_lists_the_images_with_a_region_only() -> None:
    doc = {"version": 1, "params": {}, "images": [
        {"source": "scenario", "file_name": "a.png", "regions": [{"bbox": [0, 0, 4, 4]}], "map": "m/a.png"},
        {"source": "scenario", "file_name": "b.png", "regions": [], "hard_pixels": 7, "map": "m/b.png"},
        {"source": "general", "file_name": "b.png", "regions": [{"bbox": [1, 1, 3, 3]}], "map": None},
    ]}
    coco = {"images": [{"id": 3, "file_name": "b.png"}, {"id": 9, "file_name": "a.png"}]}
    assert region_image_ids(doc, "scenario", coco) == {9}
    assert region_image_ids(doc, "general", coco) == {3}
    with pytest.raises(ValueError, match=r"lists scenario image 'b\.png', which is not in the COCO"):
        region_image_ids(doc, "scenario", {"images": [{"id": 9, "file_name": "a.png"}]})


# ---------------------------------------------------------------------------------------------------------------
# FiftyOne: the mined_hard_negatives view (embedded MongoDB: slow)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fiftyone_shows_mined_regions_and_drops_them_when_the_output_is_gone(tmp_path: Path) -> None:
    fo = pytest.importorskip("fiftyone")
    from dataengine.review import fiftyone_app as fa
    from dataengine.review.inputs import load_review_inputs
    from review_fixtures import H as RH, W as RW, make_review_tree

    tree = make_review_tree(tmp_path)
    name = f"dataengine-test-{uuid.uuid4().hex[:12]}"
    mined = tmp_path / "mined"
    save_png(mined / "maps" / "scenario" / "a.png.png", np.ones((RH, RW), np.uint8))
    doc = {"version": 1, "params": {}, "images": [
        {"source": "scenario", "file_name": "a.png", "image_id": 1, "reasons": ["teacher_fp"], "hard_pixels": 0,
         "regions": [{"bbox": [0.0, 0.0, RW / 2, RH / 4], "class_name": "circle", "score": 0.7}],
         "map": "maps/scenario/a.png.png"},
        {"source": "scenario", "file_name": "gone.png", "image_id": 9, "reasons": ["reviewer_negative"],
         "regions": [], "hard_pixels": 0, "map": None},
    ]}
    try:
        inputs = load_review_inputs(tree["filtered"], tree["pseudo"], tree["prepared"])
        dataset, _ = fa.build_dataset(inputs, name)
        fa.save_review_views(dataset, confident_reject_score=0.5, hard_negative_score=0.5)
        kwargs = {"mined_root": mined, "pool_root": inputs.pool_root, "general_root": inputs.general_root}
        assert fa.apply_mined_hard_negatives(dataset, doc, **kwargs) == {"samples": 1, "missing": 1}
        view = dataset.load_saved_view("mined_hard_negatives")
        assert view.values("file_name") == ["a.png"]
        sample = view.first()
        (det,) = sample.hard_negative_regions.detections
        assert det.label == "circle" and det.confidence == 0.7 and det.bounding_box == pytest.approx([0, 0, 0.5, 0.25])
        assert sample.hard_negative_reasons == ["teacher_fp"]
        assert sample.hard_negative_map.mask_path == str((mined / "maps/scenario/a.png.png").resolve())
        assert fa.apply_mined_hard_negatives(dataset, None, **kwargs) == {"samples": 0, "missing": 0}
        assert "mined_hard_negatives" not in dataset.list_saved_views()
        assert dataset.count("hard_negative_regions") == 0
        assert sorted(dataset.list_saved_views()) == ["hard_negatives", "rejected_confident", "review_queue"]
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


def test_regions_against_hidden_counts_each_region_once_in_order() -> None:
    hidden = {"images": [{"id": 1, "file_name": "a.png", "confusers": [[40, 0, 10, 10]]},
                         {"id": 2, "file_name": "b.png"}],
              "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
                              {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 0, 10, 10]},
                              {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10]}],  # same place
              "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]}
    region = lambda box, cls: {"bbox": box, "class_name": cls, "score": 0.9}  # noqa: E731
    mined = [
        MinedImage("scenario", "a.png", 1, ["teacher_fp"], [
            region([0, 0, 10, 10], "square"),  # on a circle and a square: its own class wins
            region([20, 0, 30, 10], "circle"),  # on a square
            region([21, 0, 31, 10], "square"),  # IoU 0.82 with the square
            region([40, 0, 46, 10], "circle"),  # IoU 0.6 with the confuser
            region([60, 60, 70, 70], "circle"),  # nothing there
        ]),
        MinedImage("scenario", "b.png", 2, ["teacher_fp"], [region([0, 0, 10, 10], "circle")]),  # image without objects
        MinedImage("scenario", "c.png", 3, ["teacher_fp"], [region([0, 0, 10, 10], "circle")]),  # not in hidden
        MinedImage("scenario", "d.png", 4, [], []),
    ]
    assert regions_against_hidden(mined, hidden) == {
        "regions": 7, "on_object_of_its_class": 2, "on_object_of_another_class": 1, "on_confuser": 1, "elsewhere": 2,
        "not_in_hidden": 1}

