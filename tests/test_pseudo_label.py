"""Pseudo-labelling: TTA fusion and geometry (exact), segmentation outputs, bad input, kill-and-resume, torchrun."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from dataengine.config import DemoParams, PseudoLabelParams
from dataengine.data.coco import CategoryMap
from dataengine.data.demo import CLASS_NAMES, generate_demo
from dataengine.engine.checkpoint import CheckpointError, load_model, save_checkpoint
from dataengine.models import create_model
from dataengine.pseudo import (
    TTAView,
    ViewBoxes,
    encode_segmentation,
    fuse_boxes,
    fuse_boxes_batch,
    label_images,
    tta_views,
    view_boxes_to_original,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "pseudo_label.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _view(boxes: list[list[float]], scores: list[float], labels: list[int]) -> ViewBoxes:
    return ViewBoxes(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), torch.tensor(scores, dtype=torch.float64),
                     torch.tensor(labels, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------------------
# Fusion and geometry, hand-built
# ----------------------------------------------------------------------------------------------------------------


def test_fusion_of_two_shifted_views_is_exact() -> None:
    a = _view([[10, 10, 30, 30]], [0.8], [1])
    b = _view([[12, 10, 32, 30]], [0.4], [1])  # the same object, 2 px to the right, half the score
    fused = fuse_boxes([a, b], iou_threshold=0.55)
    assert len(fused) == 1 and fused.labels.tolist() == [1] and fused.views.tolist() == [2]
    # Score-weighted corners: x1 = (0.8 * 10 + 0.4 * 12) / 1.2, x2 = (0.8 * 30 + 0.4 * 32) / 1.2.
    assert fused.boxes[0].tolist() == pytest.approx([32 / 3, 10, 92 / 3, 30], abs=1e-12)
    iou_a = (30 - 32 / 3) * 20 / (800 - (30 - 32 / 3) * 20)  # 0.935484
    iou_b = (92 / 3 - 12) * 20 / (800 - (92 / 3 - 12) * 20)  # 0.875
    assert fused.consistency.item() == pytest.approx((iou_a + iou_b) / 2, abs=1e-12)
    assert fused.scores.item() == pytest.approx(0.6, abs=1e-12)
    assert fused.score_std.item() == pytest.approx(0.2, abs=1e-12)


def test_fusion_missing_view_counts_zero_and_one_box_per_view() -> None:
    views = [
        _view([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], [0.9, 0.3, 0.5], [0, 0, 0]),
        _view([[0, 0, 10, 10], [50, 50, 60, 60]], [0.7, 0.5], [0, 2]),  # the second box has another class
        _view([], [], []),
    ]
    fused = fuse_boxes(views, iou_threshold=0.5)
    rows = sorted(zip(fused.labels.tolist(), fused.boxes.tolist(), fused.scores.tolist(), fused.consistency.tolist(),
                      fused.score_std.tolist(), fused.views.tolist()))
    # View 0's second box overlaps the first cluster (IoU 0.82) but that cluster already holds a view-0 box.
    expected = [
        (0, [0, 0, 10, 10], 1.6 / 3, 2 / 3, np.std([0.9, 0.7, 0.0]), 2),
        (0, [1, 0, 11, 10], 0.1, 1 / 3, np.std([0.3, 0.0, 0.0]), 1),
        (0, [50, 50, 60, 60], 0.5 / 3, 1 / 3, np.std([0.5, 0.0, 0.0]), 1),
        (2, [50, 50, 60, 60], 0.5 / 3, 1 / 3, np.std([0.0, 0.5, 0.0]), 1),
    ]
    assert len(rows) == len(expected)
    for row, exp in zip(rows, expected):
        assert row[0] == exp[0] and row[1] == pytest.approx(exp[1]) and row[5] == exp[5]
        assert row[2:5] == pytest.approx(exp[2:5], abs=1e-12)
    assert fused.scores.tolist() == sorted(fused.scores.tolist(), reverse=True)
    empty = fuse_boxes([_view([], [], [])], 0.5)
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)


def _reference_fusion(views: list[ViewBoxes], thr: float) -> list[tuple[Any, ...]]:
    """The module docstring's algorithm, one box at a time in plain Python: the oracle of the vectorised code."""
    def iou(a: list[float], b: list[float]) -> float:
        inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
        area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)  # noqa: E731
        return inter / max(area(a) + area(b) - inter, 1e-12)

    boxes = [(b, s, lab, v, j) for v, view in enumerate(views)
             for j, (b, s, lab) in enumerate(zip(view.boxes.tolist(), view.scores.tolist(), view.labels.tolist()))]
    boxes.sort(key=lambda r: (-r[1], r[3], r[4]))  # decreasing score; ties: view order, then the view's own order
    rows = []
    for label in sorted({r[2] for r in boxes}):
        clusters: list[dict[str, Any]] = []
        for box, score, _, view, _ in (r for r in boxes if r[2] == label):
            free = [(iou(box, c["fused"]), -i) for i, c in enumerate(clusters) if view not in c["members"]]
            best = max(free, default=(-1.0, 0))
            if best[0] > thr:
                c = clusters[-best[1]]
            else:
                c = {"fused": box, "members": {}, "sum": [0.0] * 4, "weight": 0.0}
                clusters.append(c)
            c["members"][view] = (box, score)
            c["sum"] = [t + score * x for t, x in zip(c["sum"], box)]
            c["weight"] += score
            if c["weight"] > 0:
                c["fused"] = [t / c["weight"] for t in c["sum"]]
        for c in clusters:
            per_view = [c["members"].get(v, (None, 0.0)) for v in range(len(views))]
            view_scores = [s for _, s in per_view]
            ious = [iou(c["fused"], b) if b is not None else 0.0 for b, _ in per_view]
            rows.append((sum(view_scores) / len(views), label, c["fused"], sum(ious) / len(views),
                         float(np.std(view_scores)), len(c["members"])))
    return sorted(rows, key=lambda r: (-r[0], r[1], *r[2]))


def _random_views(rng: np.random.Generator, n_views: int = 4) -> list[ViewBoxes]:
    """Views of a crowded image: every object seen by most views with jitter, plus junk; scores with ties."""
    objects = rng.uniform(0, 200, (int(rng.integers(0, 25)), 2))
    views = []
    for _ in range(n_views):
        seen = objects[rng.random(len(objects)) < 0.8]
        sizes = rng.uniform(4, 30, (len(seen), 2))
        boxes = np.concatenate([seen, seen + sizes], 1) + rng.normal(0, 1.5, (len(seen), 4))
        junk = rng.uniform(0, 200, (int(rng.integers(0, 10)), 2))
        boxes = np.concatenate([boxes, np.concatenate([junk, junk + rng.uniform(1, 20, (len(junk), 2))], 1)])
        scores = np.round(rng.uniform(0, 1, len(boxes)) * 20) / 20  # multiples of 0.05: many equal scores
        views.append(_view(boxes.tolist(), scores.tolist(), rng.integers(0, 4, len(boxes)).tolist()))
    return views


@pytest.mark.parametrize("seed", range(4))
def test_fusion_matches_one_box_at_a_time_and_batches_are_bit_identical(seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = [_random_views(rng) for _ in range(12)]
    batched = fuse_boxes_batch(images, 0.55)
    for views, fused in zip(images, batched):
        expected = _reference_fusion(views, 0.55)
        assert len(fused) == len(expected)
        for row, exp in zip(zip(fused.scores.tolist(), fused.labels.tolist(), fused.boxes.tolist(),
                                fused.consistency.tolist(), fused.score_std.tolist(), fused.views.tolist()),
                            expected):
            assert row[1] == exp[1] and row[5] == exp[5]
            assert [row[0], *row[2], row[3], row[4]] == pytest.approx([exp[0], *exp[2], exp[3], exp[4]], abs=1e-9)
        alone = fuse_boxes(views, 0.55)  # one image at a time: the very same floats
        for field in ("boxes", "scores", "labels", "consistency", "score_std", "views"):
            assert torch.equal(getattr(alone, field), getattr(fused, field)), field


def test_fusion_batch_refuses_mixed_view_counts_and_bad_thresholds() -> None:
    v = _view([[0, 0, 4, 4]], [0.5], [0])
    with pytest.raises(ValueError, match="image 1 has 1 views, image 0 has 2"):
        fuse_boxes_batch([[v, v], [v]], 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\), got 1.5"):
        fuse_boxes([v], 1.5)
    assert fuse_boxes_batch([], 0.5) == []


def test_tta_views_round_to_multiples_of_32_and_refuse_collisions() -> None:
    assert [(v.size, v.flip) for v in tta_views(128, (1.0, 1.25), True)] == [
        (128, False), (128, True), (160, False), (160, True)]
    assert [v.size for v in tta_views(64, (0.6, 1.5), False)] == [32, 96]
    with pytest.raises(ValueError, match=r"give input sizes \[128, 128\]"):
        tta_views(128, (1.0, 1.1), False)
    with pytest.raises(ValueError, match="empty"):
        tta_views(128, (), False)


def test_boxes_map_back_exactly_from_flipped_and_scaled_views() -> None:
    # A 40 x 100 (h x w) image at view size 50: scale 0.5, image region 20 x 50 at the top-left.
    box = torch.tensor([[10.0, 4.0, 30.0, 12.0]])  # on the plain view: x 20..60, y 8..24 in the original
    assert view_boxes_to_original(box, TTAView(50, False), 40, 100).tolist() == [[20.0, 8.0, 60.0, 24.0]]
    # The same object on the mirrored view sits at 50 - 30 .. 50 - 10 in canvas pixels.
    flipped = torch.tensor([[20.0, 4.0, 40.0, 12.0]])
    assert view_boxes_to_original(flipped, TTAView(50, True), 40, 100).tolist() == [[20.0, 8.0, 60.0, 24.0]]
    # A tall image (100 x 40) at 200: scale 2, region 80 wide, padding right; mirrored about the region, not the canvas.
    assert view_boxes_to_original(torch.tensor([[60.0, 0.0, 80.0, 10.0]]), TTAView(200, True), 100, 40).tolist() == [
        [0.0, 0.0, 10.0, 5.0]]


def test_anchor_points_follow_the_view_size() -> None:
    model = create_model("mobilenet_v3_small_gfl", num_classes=2, input_size=64).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 96, 96))
    points, strides = model.anchor_points(96)
    assert out["cls_logits"].shape[1] == points.shape[0] == 12 * 12 + 6 * 6 + 3 * 3
    assert points[-1].tolist() == [80.0, 80.0] and strides[-1].item() == 32.0  # last P5 cell of a 96 px input
    assert model.decode_boxes(out).shape == (1, 189, 4)


def test_encode_segmentation_exact() -> None:
    probs = torch.tensor([[[1.0, 0.5, 1 / 3]], [[0.0, 0.5, 1 / 3]], [[0.0, 0.0, 1 / 3]]])  # [3, 1, 3]
    label, conf, unc = encode_segmentation(probs)
    assert label.tolist() == [[0, 0, 0]] and label.dtype == np.uint8
    assert conf.tolist() == [[255, 128, 85]]
    assert unc.tolist() == [[0, round(255 * math.log(2) / math.log(3)), 255]]


# ----------------------------------------------------------------------------------------------------------------
# label_images with a synthetic detector: exact geometry end to end
# ----------------------------------------------------------------------------------------------------------------


class BrightBoxModel(nn.Module):
    """Finds the bright (> 0.5) pixels of each input: one box around them (label 0, score 0.8), and a 2-class
    "segmentation" whose class-1 probability is the brightness. Any input size works, like a real FCN."""

    input_size, num_classes, detection, segmentation, class_names = 32, 1, True, True, None

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    @property
    def config(self) -> dict[str, Any]:
        return {"name": "bright_box"}

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        bright = images.mean(1)  # [B, S, S]
        return {"bright": bright, "seg_logits": bright[:, None]}  # "logits" at full resolution: [B, 1, S, S]

    def postprocess(self, outputs: dict[str, Any], *, score_threshold: float, nms_iou: float, max_detections: int,
                    image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        results = []
        for bright in outputs["bright"]:
            ys, xs = (bright > 0.5).nonzero(as_tuple=True)
            box = [[xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]] if len(xs) else []
            results.append({"boxes": torch.tensor(box, dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.full((len(box),), 0.8), "labels": torch.zeros(len(box), dtype=torch.int64)})
        return results

    def semantic_probs(self, outputs: dict[str, Any], size: tuple[int, int]) -> torch.Tensor:
        p = outputs["seg_logits"].clamp(0, 1)  # [B, 1, S, S]
        return torch.cat([1 - p, p], dim=1)


def test_label_images_maps_every_view_back_exactly(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    (root / "cam" / "a").mkdir(parents=True)
    tall = np.zeros((64, 32, 3), np.uint8)  # h 64, w 32: views 32 and 64 have padding on the right
    tall[8:24, 4:12] = 255  # object at x 4..12, y 8..24 (even corners: exact under 2x downscaling)
    Image.fromarray(tall).save(root / "cam" / "a" / "tall.png")
    wide = np.zeros((16, 64, 3), np.uint8)  # padding at the bottom
    wide[2:10, 40:56] = 255
    Image.fromarray(wide).save(root / "wide.PNG")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    params = PseudoLabelParams(tta_scales=(1.0, 2.0), tta_hflip=True, batch_size=2, num_workers=0, chunk_size=2)

    stats = label_images(BrightBoxModel(), root, ["wide.PNG", "cam/a/tall.png", "broken.jpg"], params,
                         tmp_path / "out", categories=CategoryMap((7,), ("blob",)), progress=False)

    assert (stats["images"], stats["skipped"], stats["boxes"], stats["chunks"], stats["views"]) == (2, 1, 2, 2, 4)
    [skipped] = stats["skipped_files"]
    assert skipped["file_name"] == "broken.jpg" and "broken.jpg: not a readable image" in skipped["reason"]
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [i["file_name"] for i in pred["images"]] == ["cam/a/tall.png", "wide.PNG"]  # sorted
    assert pred["skipped"] == stats["skipped_files"]
    boxes = {b["file_name"]: b for b in pred["boxes"]}
    # Four views (32 and 64 px, plain and mirrored) all find the object where it is: fused exactly, full agreement.
    for name, bbox in [("cam/a/tall.png", [4.0, 8.0, 12.0, 24.0]), ("wide.PNG", [40.0, 2.0, 56.0, 10.0])]:
        assert boxes[name]["bbox"] == bbox
        assert (boxes[name]["score"], boxes[name]["consistency"], boxes[name]["score_std"], boxes[name]["views"]) == (
            0.8, 1.0, 0.0, 4)
        assert (boxes[name]["label"], boxes[name]["category_id"]) == (0, 7)

    seg = pred["images"][0]["seg"]
    assert seg == {"label": "seg/cam/a/tall.png.label.png", "confidence": "seg/cam/a/tall.png.confidence.png",
                   "uncertainty": "seg/cam/a/tall.png.uncertainty.png"}
    label = np.asarray(Image.open(tmp_path / "out" / seg["label"]))
    conf = np.asarray(Image.open(tmp_path / "out" / seg["confidence"]))
    unc = np.asarray(Image.open(tmp_path / "out" / seg["uncertainty"]))
    assert label.shape == conf.shape == unc.shape == (64, 32) and label.dtype == np.uint8
    assert (label[10:22, 6:10] == 1).all() and label[:, 14:].max() == 0 and label[26:].max() == 0  # not mirrored
    assert conf.min() >= 128 and conf[30:, 20:].min() == 255 and unc[30:, 20:].max() == 0  # 2 classes: max p >= 0.5
    wide_label = np.asarray(Image.open(tmp_path / "out" / pred["images"][1]["seg"]["label"]))
    assert wide_label.shape == (16, 64) and (wide_label[4:8, 42:54] == 1).all() and wide_label[:, :36].max() == 0
    assert sorted(p.name for p in (tmp_path / "out" / "chunks").iterdir()) == ["chunk-00000.json", "chunk-00001.json"]


def test_empty_file_list_gives_valid_empty_output(tmp_path: Path) -> None:
    stats = label_images(BrightBoxModel(), tmp_path, [], PseudoLabelParams(num_workers=0), tmp_path / "out",
                         progress=False)
    assert (stats["images"], stats["boxes"], stats["skipped"], stats["chunks"]) == (0, 0, 0, 0)
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert (pred["images"], pred["boxes"], pred["skipped"], pred["class_names"]) == ([], [], [], ["0"])


# ----------------------------------------------------------------------------------------------------------------
# The stage script: tiny demo data, a tiny untrained teacher
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage")
    data = root / "prepared"
    generate_demo(data, DemoParams(seed=3, image_size=64, n_train=1, n_val=3, n_pool=12, n_test=1), progress=False)
    torch.manual_seed(0)
    model = create_model("resnet18_bifpn_gfl", num_classes=len(CLASS_NAMES), input_size=64, neck_channels=16)
    save_checkpoint(root / "teacher" / "model.pt", model_state=model.state_dict(), model_config=model.config,
                    class_names=list(CLASS_NAMES), input_size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    # An untrained GFL head scores about 0.01 everywhere: a low threshold gives every image some boxes to fuse.
    params = {"pseudo_label": {"batch_size": 2, "num_workers": 1, "tta_hflip": True, "tta_scales": [1.0, 1.5],
                               "score_threshold": 0.005, "max_detections": 10, "chunk_size": 2, "segmentation": True,
                               "adapt_bn": True}}  # kill-and-resume and two ranks cover the adapted statistics
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"root": root, "data": data, "teacher": root / "teacher", "params": root / "params.yaml"}


def _cmd(stage: dict[str, Path], out: Path) -> list[str]:
    return [str(SCRIPT), "--params", str(stage["params"]), "--teacher", str(stage["teacher"]), "--data",
            str(stage["data"]), "--out", str(out), "--no-progress"]


def _tree(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(stage: dict[str, Path]) -> Path:
    out = stage["root"] / "reference"
    proc = subprocess.run([sys.executable, *_cmd(stage, out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_stage_outputs(reference: Path) -> None:
    stats = json.loads((reference / "stats.json").read_text())
    assert (stats["pool"]["images"], stats["pool"]["chunks"], stats["val"]["images"]) == (12, 6, 3)
    assert stats["pool"]["boxes"] > 0 and stats["pool"]["images_per_second"] > 0
    # Each set is labelled with its own BatchNorm statistics (pseudo.adapt), stored for a re-run.
    assert (stats["pool"]["adapt_bn"]["images"], stats["val"]["adapt_bn"]["images"]) == (12, 3)
    assert (reference / "pool" / "batchnorm.pt").is_file() and (reference / "val" / "batchnorm.pt").is_file()
    pool = json.loads((reference / "pool" / "predictions.json").read_text())
    assert pool["class_names"] == list(CLASS_NAMES) and [v["size"] for v in pool["tta"]["views"]] == [64, 64, 96, 96]
    assert "cam3/dusk/00003.JPG" in [i["file_name"] for i in pool["images"]]
    assert (reference / "pool" / "seg" / "cam3" / "dusk" / "00003.JPG.label.png").is_file()
    assert all(b["views"] >= 1 and 0 <= b["consistency"] <= 1 and b["score"] > 0 for b in pool["boxes"])
    val = json.loads((reference / "val" / "predictions.json").read_text())
    assert all(i["seg"] is None for i in val["images"]) and not (reference / "val" / "seg").exists()


def test_a_finished_run_rerun_reuses_everything_and_says_so(stage: dict[str, Path], reference: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(reference, out)
    proc = subprocess.run([sys.executable, *_cmd(stage, out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pool 12 images (0 unreadable, skipped)" in proc.stdout and "all 6 chunks reused" in proc.stdout
    assert "img/s" not in proc.stdout  # nothing was labelled: no speed to report
    assert json.loads((out / "stats.json").read_text())["pool"]["labelled_this_run"] == 0
    assert _tree(out / "pool") == _tree(reference / "pool")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_output(stage: dict[str, Path], reference: Path) -> None:
    out = stage["root"] / "killed"
    first_chunk = out / "pool" / "chunks" / "chunk-00000.json"
    proc = subprocess.Popen([sys.executable, *_cmd(stage, out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not first_chunk.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_chunk.exists(), "the stage died before writing its first chunk"
    assert not (out / "pool" / "predictions.json").exists(), "the run finished before it was killed"

    rerun = subprocess.run([sys.executable, *_cmd(stage, out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out / "stats.json").read_text())["pool"]["reused_chunks"] >= 1
    for sub in ("pool", "val"):
        assert (out / sub / "predictions.json").read_bytes() == (reference / sub / "predictions.json").read_bytes()
        assert _tree(out / sub) == _tree(reference / sub)  # PNGs and chunks too, no leftovers of the kill


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_give_the_same_predictions(stage: dict[str, Path], reference: Path) -> None:
    out = stage["root"] / "two_ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *_cmd(stage, out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pool"]["world_size"] == 2 and stats["pool"]["labelled_this_run"] == 12
    for sub in ("pool", "val"):
        assert (out / sub / "predictions.json").read_bytes() == (reference / sub / "predictions.json").read_bytes()
        assert _tree(out / sub) == _tree(reference / sub)


def _run_main(argv: list[str]) -> None:
    old = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = old


def test_stage_refuses_an_empty_pool_and_a_teacher_of_other_classes(stage: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "prepared"
    (data / "scenario" / "pool" / "cam0").mkdir(parents=True)
    (data / "general").mkdir()
    (data / "general" / "val.json").write_bytes((stage["data"] / "general" / "val.json").read_bytes())
    with pytest.raises(SystemExit, match=r"scenario pool .*pool holds no images"):
        _run_main(_cmd({**stage, "data": data}, tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    other = tmp_path / "other"
    model = create_model("mobilenet_v3_small_gfl", num_classes=5, input_size=64)
    names = ["circle", "square", "triangle", "star", "hexagon"]
    save_checkpoint(other / "model.pt", model_state=model.state_dict(), model_config=model.config, class_names=names,
                    input_size=64, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(SystemExit) as exit_info:  # reported in one line by run_stage, exit status 1
        _run_main(_cmd({**stage, "teacher": other}, tmp_path / "out"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"pseudo_label: error: .*model\.pt: made for classes \[.*'hexagon'\], expected \[.*'cross'\].*",
                        err[-1])
    with pytest.raises(CheckpointError, match="made for classes"):  # the library itself raises
        load_model(other / "model.pt", lambda c: create_model(**c), class_names=list(CLASS_NAMES))


def test_rerun_reuses_matching_chunks_and_redoes_or_removes_stale_ones(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    root.mkdir()
    for i in range(3):
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[4 * i : 4 * i + 8, 8:16] = 255
        Image.fromarray(pixels).save(root / f"{i}.png")
    out, model = tmp_path / "out", BrightBoxModel()
    params = PseudoLabelParams(tta_scales=(1.0,), tta_hflip=True, num_workers=0, chunk_size=2)
    files = ["0.png", "1.png", "2.png"]
    first = label_images(model, root, files, params, out, progress=False)
    assert (first["reused_chunks"], first["labelled_this_run"]) == (0, 3)
    again = label_images(model, root, files, params, out, progress=False)
    assert (again["reused_chunks"], again["labelled_this_run"]) == (2, 0)
    # A lost PNG (power cut after the unsynced write) makes its chunk be redone.
    (out / "seg" / "2.png.confidence.png").unlink()
    assert label_images(model, root, files, params, out, progress=False)["labelled_this_run"] == 1
    # Another fusion setting changes the fingerprint: everything is redone.
    changed = label_images(model, root, files, replace(params, fusion_iou=0.7), out, progress=False)
    assert (changed["reused_chunks"], changed["labelled_this_run"]) == (0, 3)
    # A shorter file list: chunk 1 and the PNGs of the dropped image go.
    label_images(model, root, ["0.png"], params, out, progress=False)
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["chunk-00000.json"]
    assert sorted(p.name for p in (out / "seg").iterdir()) == [f"0.png{s}" for s in (
        ".confidence.png", ".label.png", ".uncertainty.png")]
    assert [i["file_name"] for i in json.loads((out / "predictions.json").read_text())["images"]] == ["0.png"]


# ----------------------------------------------------------------------------------------------------------------
# Faults: a full disk, a read-only output folder, a corrupt teacher (real faults, in a subprocess)
# ----------------------------------------------------------------------------------------------------------------

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _drop_file_permission_override() -> None:
    """In the child before exec: root loses the capabilities that let it write into a folder without write
    permission, so a ``chmod 0o555`` folder is read-only for it as for any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _serial_params(stage: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """The stage's params with ``num_workers: 0``: a file size limit would also cap the DataLoader's shared-memory
    files, which a full disk does not (the predictions do not depend on the number of workers)."""
    params = yaml.safe_load(stage["params"].read_text())
    params["pseudo_label"]["num_workers"] = 0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return {**stage, "params": path}


def _assert_no_partial_file(out: Path, reference: Path) -> None:
    """Every file under ``out`` is a finished one: no temp file, and byte-identical to the uninterrupted run's."""
    ref = _tree(reference)
    for name, digest in _tree(out).items():
        assert not Path(name).name.startswith(".") and not name.endswith(".tmp"), f"temp file left: {name}"
        assert ref.get(name) == digest, f"{name} differs from the uninterrupted run's: half-written?"


@pytest.mark.slow
def test_full_disk_stops_with_one_line_and_leaves_no_partial_file(stage: dict[str, Path], reference: Path,
                                                                  tmp_path: Path) -> None:
    stage = _serial_params(stage, tmp_path)
    out = tmp_path / "out"
    # A real write failure: files may not grow past one byte less than the merged predictions (RLIMIT_FSIZE; the
    # write gets EFBIG, as Python ignores SIGXFSZ). Smaller files (PNGs, chunks) fit; the merge does not. The
    # BatchNorm statistics, larger still, are there from an earlier run (a re-run reads them, never rewrites them).
    for sub in ("pool", "val"):
        (out / sub).mkdir(parents=True)
        shutil.copy(reference / sub / "batchnorm.pt", out / sub / "batchnorm.pt")
    limit = (reference / "pool" / "predictions.json").stat().st_size - 1
    proc = subprocess.run([sys.executable, *_cmd(stage, out)], env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    failed = re.fullmatch(r"pseudo_label: error: cannot write (\S+): File too large", last)
    assert failed, proc.stderr[-3000:]
    assert Path(failed.group(1)) == out / "pool" / "predictions.json" and not Path(failed.group(1)).exists()
    assert (out / "pool" / "chunks" / "chunk-00000.json").exists()  # what fitted was kept ...
    _assert_no_partial_file(out, reference)  # ... and nothing half-written under a final name

    rerun = subprocess.run([sys.executable, *_cmd(stage, out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out / "stats.json").read_text())["pool"]["reused_chunks"] == 6  # space freed: resumed
    for sub in ("pool", "val"):  # (stats.json holds timings)
        assert _tree(out / sub) == _tree(reference / sub)


@pytest.mark.slow
def test_read_only_output_folder_stops_with_one_line_and_writes_nothing(stage: dict[str, Path], reference: Path,
                                                                        tmp_path: Path) -> None:
    stage = _serial_params(stage, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = subprocess.run([sys.executable, *_cmd(stage, out)], env=ENV, capture_output=True, text=True,
                              timeout=120, preexec_fn=_drop_file_permission_override if os.geteuid() == 0 else None)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"pseudo_label: error: cannot write {re.escape(str(out))}/pool/\S+: Permission denied",
                        last), last
    assert list(out.iterdir()) == []
    rerun = subprocess.run([sys.executable, *_cmd(stage, out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for sub in ("pool", "val"):
        assert _tree(out / sub) == _tree(reference / sub)


def test_corrupt_teacher_checkpoint_is_one_line_naming_the_file(stage: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    good = (stage["teacher"] / "model.pt").read_bytes()
    for cut in (len(good) // 2, 100):  # inside a tensor record; inside the zip header
        (teacher / "model.pt").write_bytes(good[:cut])
        with pytest.raises(SystemExit) as exit_info:
            _run_main(_cmd({**stage, "teacher": teacher}, tmp_path / "out"))
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert re.fullmatch(rf"pseudo_label: error: {re.escape(str(teacher / 'model.pt'))}: corrupt .*", err[-1]), err
        assert not (tmp_path / "out").exists()


def test_streamed_predictions_file_is_exactly_the_json_of_the_merged_chunks(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    root.mkdir()
    for i in range(5):
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[2 * i : 2 * i + 8, 8:16] = 255 if i != 3 else 0  # image 3: no box
        Image.fromarray(pixels).save(root / f"{i}.png")
    (root / "bad.png").write_bytes(b"no png")
    params = PseudoLabelParams(tta_scales=(1.0,), tta_hflip=True, num_workers=0, chunk_size=2)
    for files, out in ((sorted(p.name for p in root.iterdir()), tmp_path / "out"), ([], tmp_path / "empty")):
        stats = label_images(BrightBoxModel(), root, files, params, out, progress=False)
        chunks = [json.loads(p.read_text()) for p in sorted((out / "chunks").glob("*.json"))] if files else []
        for chunk in chunks:
            chunk["boxes"] = json.loads(chunk["boxes_json"])
            assert chunk["box_count"] == len(chunk["boxes"])
        merged = {key: [r for c in chunks for r in c[key]] for key in ("images", "boxes", "skipped")}
        written = json.loads((out / "predictions.json").read_text())
        if files:
            assert [len(merged[k]) for k in ("images", "boxes", "skipped")] == [5, 4, 1]  # 3 chunks, 1 skipped
        header = {k: v for k, v in written.items() if k not in merged}
        assert list(header) == ["class_names", "category_ids", "model", "tta", "adapt_bn", "fingerprint"]
        expected = json.dumps({**merged, **header}, indent=None, allow_nan=False) + "\n"
        assert (out / "predictions.json").read_text() == expected  # byte for byte, key order included
        assert (stats["images"], stats["boxes"], stats["skipped_files"]) == (
            len(merged["images"]), len(merged["boxes"]), merged["skipped"])
    assert (stats["images"], stats["boxes"]) == (0, 0)
    assert len(written["images"]) == 0 and written["skipped"] == []


def test_merge_memory_does_not_grow_with_the_number_of_chunks(tmp_path: Path) -> None:
    import tracemalloc

    from dataengine.io import atomic_write_json
    from dataengine.pseudo.label import CHUNK_FORMAT, _merge

    def fake_chunks(out: Path, n_chunks: int) -> list[list[str]]:
        chunks = []
        for c in range(n_chunks):
            files = [f"cam/{c:05d}_{i:02d}.png" for i in range(64)]
            box = {"bbox": [1.25, 2.5, 30.75, 31.0], "label": 1, "category_id": 2, "score": 0.01234,
                   "consistency": 0.5, "score_std": 0.001, "views": 2}
            atomic_write_json(out / "chunks" / f"chunk-{c:05d}.json", {
                "format": CHUNK_FORMAT, "fingerprint": "f", "chunk": c, "files": files,
                "images": [{"file_name": f, "width": 32, "height": 32, "seg": None} for f in files],
                "box_count": 64 * 20, "skipped": [],
                "boxes_json": json.dumps([{"file_name": f, **box} for f in files for _ in range(20)])}, indent=None)
            chunks.append(files)
        return chunks

    peaks = {}
    for n in (4, 32):
        out = tmp_path / str(n)
        chunks = fake_chunks(out, n)
        tracemalloc.start()
        try:
            counts = _merge(out, chunks, "f", {"class_names": ["a", "b"]})
            peaks[n] = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
        assert (counts["images"], counts["boxes"]) == (64 * n, 64 * n * 20)
    # Building the merged dict first held every record: 7.0 -> 37.6 MB here (streamed: 1.7 -> 1.8 MB), and 232 MB
    # for 100 chunks of 40 boxes per image.
    assert peaks[32] < 1.5 * peaks[4] + 1.0 and peaks[32] < 8.0, peaks
