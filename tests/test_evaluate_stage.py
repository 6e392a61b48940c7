"""The evaluate stage on a tiny demo test set with real (briefly trained) checkpoints: summary keys and arithmetic,
PR curves (CSV and their link to AP50), report and figures, missing cards/folders/baselines, bad checkpoints.

The models are one small GFL network trained for a few dozen steps on the 8 test images and saved at three points,
so teacher, student and baseline have different APs; student ``beta`` (no card, no baseline) is saved at input size
128 (the others at 64), so its GFLOPs differ from the teacher's.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dataengine.config import DemoParams
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.dataset import CocoDetectionSegDataset, collate
from dataengine.data.demo import generate_demo
from dataengine.data.transforms import build_transforms
from dataengine.engine.checkpoint import CheckpointError, save_checkpoint
from dataengine.evaluation import flatten_metrics
from dataengine.evaluation.report import (
    ModelResult,
    ModelSpec,
    choose_samples,
    read_latency,
    run_evaluation,
    summarize,
)
from dataengine.inference import evaluate_model
from dataengine.models import create_model

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_stage", ROOT / "pipelines" / "evaluate.py")
evaluate_stage = importlib.util.module_from_spec(_spec)  # the stage script, run in-process through its main()
_spec.loader.exec_module(evaluate_stage)

SIZE = 64
CARD = {"latency_ms": 3.5, "latency_ms_int8": 1.25, "opset": 17}
STUDENT_KEYS = {"mAP", "AP50", "mIoU", "per_class_AP", "confuser_fp_per_image", "params_m", "gflops", "latency_ms",
                "latency_ms_int8", "lift_AP50_vs_baseline", "AP50_ratio_to_teacher", "gflops_ratio_to_teacher"}
MODEL_KEYS = {"mAP", "AP50", "AP75", "mIoU", "per_class_AP", "confuser_fp_per_image", "params_m", "gflops"}


def _save(path: Path, model: torch.nn.Module, class_names: list[str], input_size: int) -> None:
    config = {**model.config, "input_size": input_size}
    save_checkpoint(path, model_state=model.state_dict(), model_config=config, class_names=class_names,
                    input_size=input_size, mean=model.mean.flatten().tolist(), std=model.std.flatten().tolist())


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # Small tensors gain nothing from a second thread, and on a shared CPU the OpenMP threads of parallel test runs
    # oversubscribe the cores (an order of magnitude slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Demo data, checkpoints at steps 20/40/60 of one training run, and one full evaluation."""
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "prepared"
    generate_demo(data, DemoParams(seed=3, image_size=SIZE, n_train=1, n_val=1, n_pool=1, n_test=8), progress=False)
    gt = load_coco(data / "scenario" / "test.json")
    names = list(CategoryMap.from_coco(gt).names)
    dataset = CocoDetectionSegDataset(gt, data / "scenario" / "test", build_transforms(None, SIZE, train=False))
    images, targets = collate([dataset[i] for i in range(len(dataset))])

    torch.manual_seed(0)
    model = create_model("resnet18_bifpn_gfl", num_classes=len(names), input_size=SIZE, neck_channels=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    saves = {20: [root / "baselines" / "alpha" / "model.pt"], 40: [root / "students" / "alpha" / "model.pt"],
             60: [root / "teacher" / "model.pt", root / "students" / "beta" / "model.pt"]}
    for step in range(1, 61):
        model.train()
        loss = model.loss(model(images), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for path in saves.get(step, []):
            _save(path, model.eval(), names, 2 * SIZE if "beta" in path.parts else SIZE)
    (root / "students" / "alpha" / "card.json").write_text(json.dumps(CARD))
    (root / "students" / "no_checkpoint").mkdir()  # a folder without model.pt is skipped with a note

    out = root / "out"
    run = run_evaluation(root / "teacher" / "model.pt", root / "students", root / "baselines", data,
                         metrics=out / "metrics" / "summary.json", report_dir=out / "reports",
                         plots_dir=out / "plots" / "evaluate", progress=False)
    return {"root": root, "data": data, "gt": gt, "names": names, "run": run, "out": out}


# --------------------------------------------------------------------------------------------------------------
# summary.json
# --------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_summary_has_every_key_with_numbers_and_card_latency(world: dict[str, Any]) -> None:
    summary = json.loads((world["out"] / "metrics" / "summary.json").read_text())
    assert summary == world["run"].summary
    assert set(summary) == {"teacher", "baseline", "students"}
    assert set(summary["students"]) == {"alpha", "beta"} and set(summary["baseline"]) == {"alpha"}
    for m in (summary["teacher"], summary["baseline"]["alpha"], summary["students"]["alpha"]):
        assert MODEL_KEYS <= set(m)
        assert all(_is_number(m[k]) for k in MODEL_KEYS - {"per_class_AP"}), m
        assert set(m["per_class_AP"]) == set(world["names"])
        assert 0 <= m["AP50"] <= 1 and 0 <= m["mIoU"] <= 1 and m["params_m"] > 0.1
    alpha = summary["students"]["alpha"]
    assert STUDENT_KEYS <= set(alpha) and all(_is_number(alpha[k]) for k in STUDENT_KEYS - {"per_class_AP"})
    assert (alpha["latency_ms"], alpha["latency_ms_int8"]) == (3.5, 1.25)
    assert summary["teacher"]["AP50"] > 0.05, "the tiny teacher should have learnt something on its own images"
    # dvc metrics reads it: only numbers, dicts and nulls
    flat = flatten_metrics(summary)
    assert flat["students/alpha/latency_ms"] == 3.5 and "students/beta/latency_ms" not in flat


def test_lift_and_ratios_follow_from_the_per_model_numbers(world: dict[str, Any]) -> None:
    summary = world["run"].summary
    t, s, b = summary["teacher"], summary["students"]["alpha"], summary["baseline"]["alpha"]
    # The summary rounds each value to 4 decimals; the derived ones are computed before rounding.
    assert s["lift_AP50_vs_baseline"] == pytest.approx(100 * (s["AP50"] - b["AP50"]), abs=0.02)
    assert s["AP50_ratio_to_teacher"] == pytest.approx(s["AP50"] / t["AP50"], abs=1e-3)
    assert s["gflops_ratio_to_teacher"] == pytest.approx(s["gflops"] / t["gflops"], abs=1e-3) == 1.0
    # beta is the same network run at 128 px instead of 64: convolution FLOPs scale with the pixel count
    beta = summary["students"]["beta"]
    assert beta["gflops_ratio_to_teacher"] == pytest.approx(beta["gflops"] / t["gflops"], abs=1e-3)
    assert beta["gflops_ratio_to_teacher"] == pytest.approx(4.0, rel=0.05)
    assert beta["params_m"] == t["params_m"]
    assert s["AP50"] != b["AP50"], "student and baseline are checkpoints of different training steps"


def test_one_pass_numbers_match_the_shared_evaluation_path(world: dict[str, Any]) -> None:
    from dataengine.engine.checkpoint import load_model

    model, _ = load_model(world["root"] / "students" / "alpha" / "model.pt", lambda c: create_model(**c))
    reference = evaluate_model(model, world["gt"], world["data"] / "scenario" / "test", input_size=SIZE)
    alpha = world["run"].summary["students"]["alpha"]
    for key in ("mAP", "AP50", "AP75", "mIoU"):
        assert alpha[key] == pytest.approx(reference[key], abs=5e-5), key


# --------------------------------------------------------------------------------------------------------------
# PR curves, report, figures
# --------------------------------------------------------------------------------------------------------------


def test_pr_csv_one_monotone_curve_per_model_whose_mean_is_ap50(world: dict[str, Any]) -> None:
    with (world["out"] / "plots" / "evaluate" / "pr_curves.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    labels = ["teacher", "student/alpha", "student/beta", "baseline/alpha"]
    assert list(rows[0]) == ["recall", *labels]
    recall = np.array([float(r["recall"]) for r in rows])
    assert len(recall) == 101 and recall[0] == 0 and recall[-1] == 1 and (np.diff(recall) > 0).all()
    summary = world["run"].summary
    ap50 = {"teacher": summary["teacher"]["AP50"], "student/alpha": summary["students"]["alpha"]["AP50"],
            "student/beta": summary["students"]["beta"]["AP50"], "baseline/alpha": summary["baseline"]["alpha"]["AP50"]}
    for label in labels:
        precision = np.array([float(r[label]) for r in rows])
        assert ((precision >= 0) & (precision <= 1)).all()
        assert (np.diff(precision) <= 1e-4).all(), f"{label}: interpolated precision must not rise with recall"
        assert precision.mean() == pytest.approx(ap50[label], abs=2e-4), label  # COCO AP50 = mean of this curve


def test_report_tables_acceptance_lines_and_links(world: dict[str, Any]) -> None:
    text = (world["out"] / "reports" / "summary.md").read_text()
    summary = world["run"].summary
    assert "| model | role | mAP | AP50 | mIoU | confuser FP/img | params M | GFLOPs | latency FP32 ms |" in text
    for row in ("| teacher | teacher |", "| alpha | student |", "| alpha | baseline |", "| beta | student |"):
        assert row in text
    lift = summary["students"]["alpha"]["lift_AP50_vs_baseline"]
    assert f"lift {lift:+.2f} AP50 points" in text
    assert f"{summary['students']['alpha']['AP50_ratio_to_teacher']:.3f} x teacher" in text
    assert "| 3.50 | 1.25 |" in text  # alpha's card latencies in the table
    assert "](pr_curves.png)" in text and "](samples.png)" in text


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"), dtype=np.float32)


def test_figures_are_real_images(world: dict[str, Any]) -> None:
    pr = _png(world["out"] / "reports" / "pr_curves.png")
    samples = _png(world["out"] / "reports" / "samples.png")
    assert pr.shape[0] > 300 and pr.shape[1] > 500
    n_rows, n_cols = len(world["run"].sample_ids), 4 + 1  # 4 models + ground truth
    assert samples.shape[1] > 150 * n_cols and samples.shape[0] > 150 * n_rows
    for pixels in (pr, samples):
        assert pixels.std() > 20, "a blank or single-colour figure"
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_samples_are_deterministic_and_include_confusers(world: dict[str, Any]) -> None:
    gt = world["gt"]
    ids = world["run"].sample_ids
    assert ids == choose_samples(gt) and len(ids) == min(6, len(gt["images"]))
    confused = {img["id"] for img in gt["images"] if img.get("confusers")}
    assert confused, "the demo test split should have confusers"
    assert set(ids) & confused
    # predicted segmentation kept for exactly the sample images, at original resolution
    result = world["run"].results[0]
    assert set(result.sample_semantic) == set(ids)
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    assert all(result.sample_semantic[i].shape == sizes[i] for i in ids)


def test_choose_samples_spreads_over_groups_without_rng() -> None:
    gt = {"images": [{"id": i, "confusers": [[0, 0, 4, 4]] if i in (2, 5, 9) else []} for i in range(1, 11)],
          "annotations": [{"image_id": i, "bbox": [0, 0, 2, 2]} for i in (1, 3, 4, 6)]}
    assert choose_samples(gt, 4) == [2, 3, 6, 9]  # 2 of the 3 confuser images (spread out), 2 with objects
    assert choose_samples(gt, 5) == [2, 3, 5, 6, 9]  # ceil(5 / 2) = 3 confuser images
    assert choose_samples(gt, 30) == list(range(1, 11))  # everything, each once
    assert choose_samples(gt, 0) == []


# --------------------------------------------------------------------------------------------------------------
# Missing cards, baselines, folders; bad checkpoints
# --------------------------------------------------------------------------------------------------------------


def test_missing_card_gives_null_latency_and_a_note(world: dict[str, Any]) -> None:
    beta = world["run"].summary["students"]["beta"]
    assert beta["latency_ms"] is None and beta["latency_ms_int8"] is None
    assert beta["lift_AP50_vs_baseline"] is None and _is_number(beta["AP50_ratio_to_teacher"])
    notes = "\n".join(world["run"].notes)
    assert f"{world['root'] / 'students' / 'beta' / 'card.json'} not found" in notes
    assert "student beta has no baseline" in notes and "no_checkpoint has no model.pt" in notes
    assert "student beta has no baseline" in (world["out"] / "reports" / "summary.md").read_text()


def test_read_latency_partial_and_bad_cards(tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"latency_ms": 2}))
    latency, notes = read_latency(card)
    assert latency == {"latency_ms": 2.0, "latency_ms_int8": None} and "no 'latency_ms_int8'" in notes[0]
    card.write_text(json.dumps({"latency_ms": "fast"}))
    with pytest.raises(ValueError, match=r"card\.json.*'latency_ms' must be a number"):
        read_latency(card)
    card.write_text("{")
    with pytest.raises(ValueError, match="card.json: not valid JSON"):
        read_latency(card)


def test_summarize_arithmetic_and_undefined_values() -> None:
    def result(role: str, name: str, **metrics: Any) -> ModelResult:
        return ModelResult(ModelSpec(role, name, Path(f"{role}/{name}.pt")), metrics, [], None, [])

    summary = summarize([
        result("teacher", "teacher", AP50=0.6, gflops=3.0),
        result("student", "s", AP50=0.45, gflops=0.3), result("baseline", "s", AP50=0.4012345, gflops=0.3),
        result("student", "lonely", AP50=0.2, gflops=None),
    ])
    s, lonely = summary["students"]["s"], summary["students"]["lonely"]
    assert s["lift_AP50_vs_baseline"] == 4.88 and s["AP50_ratio_to_teacher"] == 0.75
    assert s["gflops_ratio_to_teacher"] == 0.1 and summary["baseline"]["s"]["AP50"] == 0.4012
    assert lonely["lift_AP50_vs_baseline"] is None and lonely["gflops_ratio_to_teacher"] is None
    zero = summarize([result("teacher", "teacher", AP50=0.0, gflops=1.0), result("student", "s", AP50=0.1, gflops=1.0)])
    assert zero["students"]["s"]["AP50_ratio_to_teacher"] is None  # no ratio to a teacher that finds nothing
    with pytest.raises(ValueError, match="exactly one teacher"):
        summarize([result("student", "s", AP50=0.1)])


def test_missing_student_and_baseline_folders_still_evaluate_the_teacher(world: dict[str, Any], tmp_path: Path) -> None:
    run = run_evaluation(world["root"] / "teacher" / "model.pt", tmp_path / "nope_students", None, world["data"],
                         metrics=tmp_path / "summary.json", report_dir=tmp_path / "reports",
                         plots_dir=tmp_path / "plots", num_samples=2, progress=False)
    assert run.summary["students"] == {} and run.summary["baseline"] == {}
    assert run.summary["teacher"] == world["run"].summary["teacher"]  # deterministic
    assert any("no students evaluated" in n for n in run.notes) and any("no baselines" in n for n in run.notes)
    assert "No student was evaluated." in (tmp_path / "reports" / "summary.md").read_text()
    assert (tmp_path / "plots" / "pr_curves.csv").read_text().splitlines()[0] == "recall,teacher"


@pytest.mark.parametrize("kind", ["truncated", "garbage", "other_classes"])
def test_bad_checkpoint_is_an_error_naming_the_file(world: dict[str, Any], tmp_path: Path, kind: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    students = tmp_path / "students"
    bad = students / "bad" / "model.pt"
    if kind == "truncated":  # torch's zip reader fails with a bare OSError for some cuts
        bad.parent.mkdir(parents=True)
        bad.write_bytes((world["root"] / "teacher" / "model.pt").read_bytes()[:20000])
    elif kind == "garbage":  # the weights-only unpickler fails with a bare KeyError on these bytes
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"hello world" * 10)
    else:
        model = create_model("resnet18_bifpn_gfl", num_classes=len(world["names"]), input_size=SIZE, neck_channels=16)
        _save(bad, model, list(reversed(world["names"])), SIZE)
    kwargs = {"metrics": tmp_path / "summary.json", "report_dir": tmp_path / "reports", "plots_dir": tmp_path / "p"}
    with pytest.raises(CheckpointError, match=str(bad)):
        run_evaluation(world["root"] / "teacher" / "model.pt", students, None, world["data"], progress=False,
                       **kwargs)
    assert not any(tmp_path.glob("summary.json")) and not (tmp_path / "reports").exists(), "nothing half-written"

    code = evaluate_stage.main(["--teacher", str(world["root"] / "teacher" / "model.pt"), "--students", str(students),
                                "--baselines", str(tmp_path / "none"), "--data", str(world["data"]),
                                "--metrics", str(tmp_path / "summary.json"), "--report", str(tmp_path / "reports"),
                                "--plots", str(tmp_path / "p")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("evaluate: error: ") and str(bad) in err
