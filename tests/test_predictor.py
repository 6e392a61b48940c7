"""load_student / Predictor over the three backends, its errors (corrupt, other classes, pickled code), evaluation
parity with evaluate_model, and the `dataengine predict` command (COCO results with RLE masks)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from dataengine.cli import main as cli_main
from dataengine.config import DemoParams
from dataengine.data.demo import generate_demo
from dataengine.data.transforms import unletterbox_boxes
from dataengine.engine.checkpoint import CheckpointError
from dataengine.export import export_onnx, letterbox_input, quantize_int8
from dataengine.inference import evaluate_model
from dataengine.predictor import ModelNotFoundError, Predictor, evaluate_predictor, load_student, predict_cli

sys.path.insert(0, str(Path(__file__).parent))
from test_export import CLASSES, SIZE, make_student, save_student  # noqa: E402

H, W = 50, 90  # a non-square image: letterbox scale 64/90, padding at the bottom


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A student directory with model.pt, model.onnx, model.int8.onnx, and a 50x90 test image."""
    root = tmp_path_factory.mktemp("student")
    model = make_student()
    save_student(model, root / "s" / "model.pt", CLASSES)
    export_onnx(model, root / "s" / "model.onnx", input_size=SIZE, class_names=CLASSES)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "img.png")
    quantize_int8(root / "s" / "model.onnx", root / "s" / "model.int8.onnx", [image, image[:, ::-1].copy()],
                  input_size=SIZE)
    return {"dir": root / "s", "image": image, "png": root / "img.png", "model": model, "root": root}


def _check_format(pred: dict[str, object], n_classes: int = 2) -> None:
    assert set(pred) == {"boxes", "scores", "labels", "class_names", "mask"}
    boxes, scores, labels = pred["boxes"], pred["scores"], pred["labels"]
    m = len(scores)
    assert boxes.dtype == np.float32 and boxes.shape == (m, 4)
    assert scores.dtype == np.float32 and labels.dtype == np.int64 and labels.shape == (m,)
    assert pred["class_names"] == [CLASSES[i] for i in labels]
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= W).all()  # original pixels, clipped to 90 x 50
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= H).all()
    assert (np.diff(scores) <= 0).all()
    mask = pred["mask"]
    assert mask.dtype == np.uint8 and mask.shape == (H, W) and mask.max() <= n_classes


def test_backends_give_the_same_format_in_original_coordinates(student: dict[str, object]) -> None:
    d = student["dir"]
    preds = {
        "dir": load_student(d).predict([student["png"]])[0],
        "pt": load_student(d / "model.pt").predict([student["png"]])[0],
        "onnx": load_student(d, backend="onnx").predict([student["png"]])[0],
        "onnx_file": load_student(d / "model.onnx").predict([student["png"]])[0],
        "int8": load_student(d, backend="int8").predict([student["png"]])[0],
    }
    for pred in preds.values():
        _check_format(pred)
    ref = preds["pt"]
    assert len(ref["scores"]) > 0
    for key in ("dir", "onnx", "onnx_file"):
        np.testing.assert_array_equal(preds[key]["labels"], ref["labels"])
        np.testing.assert_allclose(preds[key]["boxes"], ref["boxes"], atol=2e-3)
        np.testing.assert_allclose(preds[key]["scores"], ref["scores"], atol=1e-4)
        assert (preds[key]["mask"] != ref["mask"]).mean() < 0.01
    # the boxes are the model's own detections on the letterboxed image, divided by the letterbox scale
    model = student["model"]
    x, info = letterbox_input(student["image"], SIZE)
    with torch.no_grad():
        det = model.postprocess(model(x[None]), score_threshold=0.3)[0]
    want = unletterbox_boxes(det["boxes"], info.scale, 0, 0).clamp(min=0)
    want[:, 0::2], want[:, 1::2] = want[:, 0::2].clamp(max=W), want[:, 1::2].clamp(max=H)
    np.testing.assert_allclose(ref["boxes"], want.numpy(), atol=1e-4)
    assert info.scale == pytest.approx(SIZE / W)


def test_inputs_path_pil_and_array_agree_and_batching(student: dict[str, object]) -> None:
    predictor = load_student(student["dir"], backend="onnx")
    assert isinstance(predictor, Predictor) and predictor.backend == "onnx" and predictor.class_names == CLASSES
    image = student["image"]
    small = image[:20, :30].copy()
    preds = predictor.predict([student["png"], Image.fromarray(image), image, small], batch_size=3)
    assert len(preds) == 4
    for pred in preds[1:3]:
        np.testing.assert_array_equal(pred["boxes"], preds[0]["boxes"])
        np.testing.assert_array_equal(pred["mask"], preds[0]["mask"])
    assert preds[3]["mask"].shape == (20, 30)
    assert predictor.predict([]) == []
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        predictor.predict([image.astype(np.float32)])


def test_no_segmentation_head_gives_mask_none(tmp_path: Path) -> None:
    model = make_student(segmentation=False)
    save_student(model, tmp_path / "model.pt", CLASSES)
    export_onnx(model, tmp_path / "model.onnx", input_size=SIZE, class_names=CLASSES)
    image = np.zeros((H, W, 3), np.uint8)
    for backend in ("pt", "onnx"):
        pred = load_student(tmp_path, backend=backend).predict([image], score_threshold=0.0)[0]
        assert pred["mask"] is None and pred["boxes"].shape[1] == 4


def test_evaluate_predictor_equals_evaluate_model(student: dict[str, object], tmp_path: Path) -> None:
    data = tmp_path / "prepared"
    generate_demo(data, DemoParams(seed=3, image_size=SIZE, n_train=1, n_val=1, n_pool=1, n_test=3), progress=False)
    test = json.loads((data / "scenario" / "test.json").read_text())
    names = [c["name"] for c in test["categories"]]
    model = make_student(len(names))
    save_student(model, tmp_path / "five" / "model.pt", names)
    export_onnx(model, tmp_path / "five" / "model.onnx", input_size=SIZE, class_names=names)
    want = evaluate_model(model, test, data / "scenario" / "test", input_size=SIZE)
    for backend in ("pt", "onnx"):
        got = evaluate_predictor(load_student(tmp_path / "five", backend=backend), test, data / "scenario" / "test")
        assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-6 if backend == "pt" else 1e-3)
        assert got["mIoU"] == pytest.approx(want["mIoU"], abs=1e-6 if backend == "pt" else 1e-3)
    with pytest.raises(CheckpointError, match="expected"):
        evaluate_predictor(load_student(student["dir"]), test, data / "scenario" / "test")


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file (builtins.open in write mode): code execution, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_malicious_pickle_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil" / "model.pt"
    evil.parent.mkdir()
    torch.save({"model_state": _Payload(marker), "format": "dataengine-checkpoint-v1"}, evil)
    assert not marker.exists()
    # the payload is real: an unsafe load runs it
    probe = tmp_path / "probe.pt"
    torch.save(_Payload(tmp_path / "probe_marker"), probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe_marker").exists()
    for path in (evil, evil.parent):
        with pytest.raises(CheckpointError, match=r"refused to load.*not weights-only") as err:
            load_student(path)
        assert str(evil) in str(err.value)
        assert not marker.exists()
    # a raw pickle (not torch's zip format) with the same payload
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        load_student(tmp_path / "raw.pt")
    assert not marker.exists()


def test_corrupt_truncated_and_foreign_files(student: dict[str, object], tmp_path: Path) -> None:
    d = student["dir"]
    for name in ("model.pt", "model.onnx"):
        data = (d / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="corrupt") as err:
            load_student(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 not a protobuf at all \xff" * 10)
    with pytest.raises(CheckpointError, match="junk.onnx"):
        load_student(tmp_path / "junk.onnx")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"suffix '\.bin'"):
        load_student(tmp_path / "model.bin")
    # an ONNX graph that is not a dataengine export (no metadata)
    import onnx

    proto = onnx.load(str(d / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(CheckpointError, match="not a dataengine ONNX export"):
        load_student(tmp_path / "plain.onnx")


def test_missing_files_and_bad_backend(student: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nothing.pt"):
        load_student(tmp_path / "nothing.pt")
    assert issubclass(ModelNotFoundError, FileNotFoundError) and issubclass(ModelNotFoundError, CheckpointError)
    shutil.copy(student["dir"] / "model.pt", tmp_path / "model.pt")
    with pytest.raises(ModelNotFoundError, match=r"model\.int8\.onnx.*export stage"):
        load_student(tmp_path, backend="int8")
    with pytest.raises(ValueError, match="pt, onnx, int8"):
        load_student(tmp_path, backend="tflite")
    with pytest.raises(ValueError, match="does not fit"):
        load_student(tmp_path / "model.pt", backend="onnx")


def test_other_classes_are_refused(student: dict[str, object]) -> None:
    d = student["dir"]
    assert load_student(d, expected_classes=CLASSES).class_names == CLASSES
    for backend in ("pt", "onnx", "int8"):
        with pytest.raises(CheckpointError, match=r"made for classes \['cat', 'dog'\], expected \['cat', 'cow'\]"):
            load_student(d, backend=backend, expected_classes=["cat", "cow"])


# ---------------------------------------------------------------------------------------------------------------
# `dataengine predict`
# ---------------------------------------------------------------------------------------------------------------


def test_predict_cli_writes_coco_results_with_rle(student: dict[str, object], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.copy(student["png"], images / "a.png")
    Image.fromarray(student["image"][:30, :40].copy()).save(images / "sub" / "b.jpg", quality=95)
    out = tmp_path / "preds.json"
    rc = cli_main(["predict", "--model", str(student["dir"]), str(images), "--out", str(out), "--backend", "onnx",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    entries = json.loads(out.read_text())
    files = [(images / "a.png").as_posix(), (images / "sub" / "b.jpg").as_posix()]
    assert {e["file_name"] for e in entries} == set(files)
    preds = load_student(student["dir"], backend="onnx").predict(files)
    boxes = [e for e in entries if "bbox" in e]
    segms = [e for e in entries if "segmentation" in e]
    assert len(boxes) == sum(len(p["scores"]) for p in preds) > 0
    assert {e["category_id"] for e in boxes} <= {1, 2}
    # valid COCO results: pycocotools loads both kinds against a GT with these image ids
    sizes = {1: (H, W), 2: (30, 40)}
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in sizes.items()],
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)], "annotations": []}
    gt.createIndex()
    gt.loadRes(boxes)
    gt.loadRes(segms)
    # the RLE masks rebuild the predictor's semantic mask, and a box entry is xywh of the predictor's xyxy
    for image_id, pred in enumerate(preds, start=1):
        rebuilt = np.zeros(sizes[image_id], np.uint8)
        for entry in (e for e in segms if e["image_id"] == image_id):
            assert isinstance(entry["segmentation"]["counts"], str)
            rebuilt[mask_utils.decode(entry["segmentation"]).astype(bool)] = entry["category_id"]
        np.testing.assert_array_equal(rebuilt, pred["mask"])
    first = next(e for e in boxes if e["image_id"] == 1)
    x1, y1, x2, y2 = preds[0]["boxes"][0].tolist()
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert first["category_id"] == preds[0]["labels"][0] + 1


def test_predict_cli_errors_and_help(student: dict[str, object], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "preds.json"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    cases = [
        (["--model", str(tmp_path / "none"), str(student["png"])], "model not found"),
        (["--model", str(student["dir"]), str(tmp_path / "broken.png")], "broken.png"),
        (["--model", str(student["dir"]), str(tmp_path / "missing.png")], "image not found"),
    ]
    for args, needle in cases:
        assert predict_cli([*args, "--out", str(out), "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        cli_main(["predict", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "COCO" in help_text and "--backend" in help_text and "RLE" in help_text


def test_import_dataengine_stays_light() -> None:
    code = ("import sys, dataengine; assert 'torch' not in sys.modules, 'torch imported'; "
            "f = dataengine.load_student; assert 'torch' in sys.modules; print(f.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "dataengine.predictor"
