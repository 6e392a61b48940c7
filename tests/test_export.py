"""ONNX export, post-processing parity, INT8 quantisation, latency and the export stage (tiny models, 64 px)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from dataengine.config import DemoParams
from dataengine.data.demo import generate_demo
from dataengine.engine.checkpoint import CheckpointError, save_checkpoint
from dataengine.export import (
    ONNX_FORMAT,
    dense_outputs,
    dvc_lock_versions,
    export_onnx,
    onnx_latency_ms,
    postprocess_dense,
    quantize_int8,
    read_onnx_metadata,
)
from dataengine.models import create_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
CLASSES = ["cat", "dog"]


def make_student(num_classes: int = 2, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    """A random mobilenet_v3_small_gfl that behaves like a trained one at the outputs.

    A freshly initialised MobileNetV3 in eval mode has vanishing activations (BatchNorm's running variance is 1, the
    real one ~1e-6 deep down), so every location would score the prior 0.01. BatchNorm statistics are re-estimated on
    random images and the class logits spread over a few units: scores well apart (many above 0.3), so NMS parity
    compares real, untied detections.
    """
    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small_gfl", num_classes=num_classes, input_size=SIZE, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, SIZE, SIZE))
    if model.det_head is not None:
        torch.nn.init.normal_(model.det_head.cls_out.weight, std=0.5)
        torch.nn.init.zeros_(model.det_head.cls_out.bias)
    return model.eval()


def save_student(model: torch.nn.Module, path: Path, class_names: list[str]) -> Path:
    save_checkpoint(path, model_state=model.state_dict(), model_config=model.config, class_names=class_names,
                    input_size=SIZE, mean=model.mean.flatten().tolist(), std=model.std.flatten().tolist())
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("export")
    model = make_student()
    model.class_names = list(CLASSES)
    export_onnx(model, root / "model.onnx", input_size=SIZE)
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (50, 90), (90, 40), (32, 32))]
    quantize_int8(root / "model.onnx", root / "model.int8.onnx", calib, input_size=SIZE, method="minmax",
                  per_channel=True)
    return {"model": model, "root": root}


def _run(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images})))


def test_onnx_outputs_match_pytorch_with_dynamic_batch(exported: dict[str, object]) -> None:
    model, root = exported["model"], exported["root"]
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))  # traced with batch 1
    got = _run(root / "model.onnx", images.numpy())
    with torch.no_grad():
        want = dense_outputs(model, images)
    assert list(got) == ["boxes", "scores", "seg_probs"]
    assert got["boxes"].shape == (3, 84, 4) and got["scores"].shape == (3, 84, 2)
    assert got["seg_probs"].shape == (3, 3, SIZE // 4, SIZE // 4)
    np.testing.assert_allclose(got["boxes"], want["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(got["scores"], want["scores"].numpy(), atol=1e-4)
    np.testing.assert_allclose(got["seg_probs"], want["seg_probs"].numpy(), atol=1e-4)
    np.testing.assert_allclose(got["seg_probs"].sum(1), 1.0, atol=1e-5)
    # decoding in the graph is the model's own
    with torch.no_grad():
        np.testing.assert_allclose(got["boxes"], model.decode_boxes(model(images)).numpy(), atol=1e-3)


def test_onnx_metadata(exported: dict[str, object]) -> None:
    model, root = exported["model"], exported["root"]
    proto = onnx.load(str(root / "model.onnx"))
    assert proto.opset_import[0].version == 17
    assert [i.name for i in proto.graph.input] == ["images"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = read_onnx_metadata(root / "model.onnx")
    assert meta["format"] == ONNX_FORMAT and meta["precision"] == "fp32"
    assert meta["class_names"] == CLASSES and meta["input_size"] == SIZE
    assert meta["model_config"] == model.config
    np.testing.assert_allclose(meta["mean"], [0.485, 0.456, 0.406], atol=1e-6)
    assert not list(root.glob(".*.tmp"))  # atomic write left no temporary file


def test_export_refuses_missing_class_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class names"):
        export_onnx(make_student(), tmp_path / "m.onnx", input_size=SIZE)
    assert not (tmp_path / "m.onnx").exists()


def test_disabled_head_has_no_output(tmp_path: Path) -> None:
    model = make_student(segmentation=False)
    export_onnx(model, tmp_path / "det.onnx", input_size=SIZE, class_names=CLASSES)
    got = _run(tmp_path / "det.onnx", np.zeros((1, 3, SIZE, SIZE), np.float32))
    assert list(got) == ["boxes", "scores"]
    assert read_onnx_metadata(tmp_path / "det.onnx")["outputs"] == ["boxes", "scores"]


def test_postprocess_dense_equals_model_postprocess(exported: dict[str, object]) -> None:
    model, root = exported["model"], exported["root"]
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outputs = model(images)
        dense = dense_outputs(model, images)
    kwargs = {"score_threshold": 0.3, "nms_iou": 0.6, "max_detections": 20, "pre_nms_topk": 100}
    want = model.postprocess(outputs, **kwargs)
    assert all(len(w["scores"]) > 0 for w in want)  # the test compares real detections
    # same tensors in: identical detections
    for got, ref in zip(postprocess_dense(dense["boxes"], dense["scores"], image_size=(SIZE, SIZE), **kwargs), want):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(got[key], ref[key]), key
    # ONNX outputs (NumPy in, NumPy out): the same detections up to float noise
    onnx_out = _run(root / "model.onnx", images.numpy())
    for got, ref in zip(postprocess_dense(onnx_out["boxes"], onnx_out["scores"], image_size=(SIZE, SIZE), **kwargs),
                        want):
        assert isinstance(got["boxes"], np.ndarray) and got["boxes"].dtype == np.float32
        np.testing.assert_array_equal(got["labels"], ref["labels"].numpy())
        np.testing.assert_allclose(got["scores"], ref["scores"].numpy(), atol=1e-4)
        np.testing.assert_allclose(got["boxes"], ref["boxes"].numpy(), atol=1e-3)


def test_postprocess_dense_hand_built_cases() -> None:
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 80, 70]]], np.float32)
    scores = np.zeros((1, 4, 2), np.float32)
    scores[0, 0, 0], scores[0, 1, 0], scores[0, 2, 1], scores[0, 3, 0] = 0.9, 0.8, 0.7, 0.6
    det = postprocess_dense(boxes, scores, score_threshold=0.5, image_size=(64, 64))[0]
    # box 1 is suppressed by box 0 (same class); box 2 overlaps box 0 but is another class: class-wise NMS keeps it
    np.testing.assert_allclose(det["scores"], [0.9, 0.7, 0.6])
    assert det["labels"].tolist() == [0, 1, 0]
    assert det["boxes"][2].tolist() == [50, 50, 64, 64]  # clipped to the input
    assert postprocess_dense(boxes, scores, score_threshold=0.5, max_detections=1)[0]["labels"].tolist() == [0]
    empty = postprocess_dense(boxes, scores, score_threshold=0.95)[0]  # zero detections is a real case
    assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,) and empty["labels"].dtype == np.int64
    assert postprocess_dense(np.zeros((0, 4, 4), np.float32), np.zeros((0, 4, 2), np.float32)) == []
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        postprocess_dense(boxes[0], scores[0])


def test_int8_graph_runs_and_keeps_metadata(exported: dict[str, object]) -> None:
    root = exported["root"]
    meta = read_onnx_metadata(root / "model.int8.onnx")
    assert meta["precision"] == "int8" and meta["class_names"] == CLASSES and meta["calibration_images"] == "4"
    ops = {node.op_type for node in onnx.load(str(root / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    images = np.random.default_rng(3).random((2, 3, SIZE, SIZE), dtype=np.float32)
    got, fp32 = _run(root / "model.int8.onnx", images), _run(root / "model.onnx", images)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in fp32.items()}
    np.testing.assert_allclose(got["seg_probs"].sum(1), 1.0, atol=1e-4)  # the softmax stays FP32
    assert np.isfinite(got["boxes"]).all()


def test_quantize_refuses_bad_input(exported: dict[str, object], tmp_path: Path) -> None:
    root = exported["root"]
    with pytest.raises(ValueError, match="no calibration images"):
        quantize_int8(root / "model.onnx", tmp_path / "q.onnx", [], input_size=SIZE)
    with pytest.raises(ValueError, match="minmax, entropy, percentile"):
        quantize_int8(root / "model.onnx", tmp_path / "q.onnx", [np.zeros((8, 8, 3), np.uint8)], input_size=SIZE,
                      method="kl")  # type: ignore[arg-type]
    (tmp_path / "plain.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="plain.onnx"):
        quantize_int8(tmp_path / "plain.onnx", tmp_path / "q.onnx", [np.zeros((8, 8, 3), np.uint8)], input_size=SIZE)


def test_latency_is_a_positive_float(exported: dict[str, object]) -> None:
    for name in ("model.onnx", "model.int8.onnx"):
        ms = onnx_latency_ms(exported["root"] / name, input_size=SIZE, runs=3, warmup=1)
        assert isinstance(ms, float) and 0.0 < ms < 10_000.0


def test_dvc_lock_versions(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"distill@s": {
        "cmd": "python pipelines/distill.py",
        "deps": [{"path": "data/prepared", "hash": "md5", "md5": "abc.dir"}, {"path": "data/mined", "md5": "def.dir"}],
        "params": {"params.yaml": {"distill.input_size": 128}},
        "outs": [{"path": "models/students/s/model.pt", "md5": "123"}]}}}))
    versions = dvc_lock_versions(lock, "distill@s")
    assert versions["deps"] == {"data/prepared": "abc.dir", "data/mined": "def.dir"}
    assert versions["params"] == {"params.yaml": {"distill.input_size": 128}}
    assert versions["outs"] == {"models/students/s/model.pt": "123"}
    missing = dvc_lock_versions(lock, "distill@other")
    assert missing["deps"] is None and "distill@other" in missing["note"]


@pytest.mark.slow
def test_export_stage_writes_onnx_int8_and_card(tmp_path: Path) -> None:
    data = tmp_path / "prepared"
    generate_demo(data, DemoParams(seed=3, image_size=SIZE, n_train=1, n_val=1, n_pool=4, n_test=3), progress=False)
    names = [c["name"] for c in json.loads((data / "scenario" / "test.json").read_text())["categories"]]
    student = tmp_path / "students" / "tiny"
    save_student(make_student(len(names)), student / "model.pt", names)
    teacher = save_student(make_student(len(names), seed=1), tmp_path / "teacher.pt", names)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"export": {"calibration_images": 2, "latency_runs": 50,
                                                                     "latency_warmup": 1}}))
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "export.py"), "--student-dir", str(student),
                           "--teacher", str(teacher), "--data", str(data), "--params", str(tmp_path / "params.yaml"),
                           "--lock", str(tmp_path / "dvc.lock")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "export: tiny: INT8" in proc.stderr and proc.stdout == ""
    card = json.loads((student / "card.json").read_text())
    assert card["name"] == "tiny" and card["classes"] == names and card["input_size"] == SIZE
    assert card["export"]["calibration_images"] == 2
    assert set(card["metrics"]) >= {"pytorch", "onnx_fp32", "onnx_int8"}
    # FP32 ONNX is scored by the same protocol as PyTorch: the same numbers
    assert card["metrics"]["onnx_fp32"]["mAP"] == pytest.approx(card["metrics"]["pytorch"]["mAP"], abs=1e-3)
    assert card["parity"]["passed"] is True and card["parity"]["map_drop_fp32_points"] == pytest.approx(0, abs=0.1)
    assert card["latency_ms"] > 0 and card["latency_ms_int8"] > 0 and card["params_m"] > 0 and card["gflops"] > 0
    assert len(card["teacher"]["sha256"]) == 64
    assert card["versions"]["deps"] is None and "no " in card["versions"]["note"]
    assert read_onnx_metadata(student / "model.int8.onnx")["precision"] == "int8"
