"""Typed params: unknown keys, wrong types and out-of-range values are refused with the key and the file, in every
section; each stage script reports a wrong type in one line and writes nothing."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from dataengine.config import DataParams, DemoParams, ParamsError, TrainParams, from_dict, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repo_params_load() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.data is not None and params.data.source == "demo"
    assert params.teacher is not None and params.teacher.train.epochs >= 1


def test_defaults_when_section_missing(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, "data: {}\n"), ["data", "teacher"])
    assert params.data == DataParams()
    assert params.teacher is not None and params.teacher.model.input_size == 128


def test_only_requested_sections(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, "data: {on_bad: skip}\n"), ["data"])
    assert params.data.on_bad == "skip" and params.teacher is None


@pytest.mark.parametrize(
    "text, key, allowed",
    [
        ("data: {sorce: demo}\n", "data.sorce", "allowed keys: source, on_bad"),
        ("data: {demo: {n_trian: 3}}\n", "data.demo.n_trian", "allowed keys: seed, image_size"),
        ("datta: {}\n", "datta", "allowed sections: data"),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, key: str, allowed: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{key}'" in msg and allowed in msg


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("teacher: {train: {epochs: ten}}\n", "teacher.train.epochs", "expected int"),
        ("teacher: {train: {epochs: 2.5}}\n", "teacher.train.epochs", "expected int"),
        ("teacher: {train: {lr: '1e-3x'}}\n", "teacher.train.lr", "expected float"),
        ("teacher: {model: {detection: 'yes'}}\n", "teacher.model.detection", "expected bool"),
        ("teacher: {train: {epochs: true}}\n", "teacher.train.epochs", "expected int"),
        ("data: {on_bad: ignore}\n", "data.on_bad", "one of 'stop', 'skip'"),
        ("data: {demo: 3}\n", "data.demo", "expected a mapping with keys seed"),
        ("data: {coco: {train_json: [a.json]}}\n", "data.coco.train_json", "expected str, got ['a.json'] (list)"),
        ("teacher: {checkpoint: 5}\n", "teacher.checkpoint", "expected str, got 5 (int)"),
        ("teacher: {model: {input_size: null}}\n", "teacher.model.input_size", "expected int, got None"),
        ("teacher: {augment: []}\n", "teacher.augment", "expected a mapping with keys preset"),
        ("pseudo_label: {tta_scales: 1.5}\n", "pseudo_label.tta_scales", "expected a list of float, got 1.5"),
        ("pseudo_label: {tta_scales: [1.0, big]}\n", "pseudo_label.tta_scales[1]", "expected float, got 'big'"),
        ("pseudo_label: {batch_size: '16'}\n", "pseudo_label.batch_size", "expected int, got '16' (str)"),
        ("pseudo_label: {segmentation: 1}\n", "pseudo_label.segmentation", "expected bool, got 1 (int)"),
        ("filter: {target_precision: high}\n", "filter.target_precision", "expected float, got 'high'"),
        ("review: {app_port: '5151'}\n", "review.app_port", "expected int, got '5151' (str)"),
        ("review: {labelstudio: {max_tasks: 1.5}}\n", "review.labelstudio.max_tasks", "expected int, got 1.5"),
        ("rebalance: {target: 3}\n", "rebalance.target", "one of 'uniform', 'tempered', 'explicit', got 3"),
        ("rebalance: {shares: [0.5, 0.5]}\n", "rebalance.shares", "expected a mapping of str to float"),
        ("rebalance: {shares: {a: half}}\n", "rebalance.shares.a", "expected float, got 'half'"),
        ("rebalance: {sources: [general, web]}\n", "rebalance.sources[1]", "one of 'general', 'scenario', got 'web'"),
        ("mine: {sources: general}\n", "mine.sources", "expected a list of one of 'general', 'scenario'"),
        ("mine: {max_regions_per_image: 2.0}\n", "mine.max_regions_per_image", "expected int, got 2.0 (float)"),
        ("distill: 5\n", "distill", "expected a mapping, got 5 (int)"),
        ("distill: {students: [mobilenet_v3_small]}\n", "distill.students",
         "expected a mapping of str to a mapping with keys model, width_mult"),
        ("distill: {students: {s: mobilenet}}\n", "distill.students.s", "expected a mapping with keys model"),
        ("distill: {students: {s: {model: 3}}}\n", "distill.students.s.model", "expected str, got 3 (int)"),
        ("distill: {students: {s: {width_mult: wide}}}\n", "distill.students.s.width_mult",
         "expected float, got 'wide' (str) (or null)"),
        ("distill: {train: {batch_size: 4.0}}\n", "distill.train.batch_size", "expected int, got 4.0 (float)"),
        ("distill: {loss: {cls_kd: 'on'}}\n", "distill.loss.cls_kd", "expected float, got 'on' (str)"),
        ("distill: {detection_loss: {negatives: hard}}\n", "distill.detection_loss.negatives",
         "one of 'focal', 'ssd', got 'hard'"),
        ("distill: {pseudo_labels: 'no'}\n", "distill.pseudo_labels", "expected bool, got 'no' (str)"),
        ("export: {opset: '17'}\n", "export.opset", "expected int, got '17' (str)"),
        ("export: {calibration_method: kl}\n", "export.calibration_method",
         "one of 'minmax', 'entropy', 'percentile', got 'kl'"),
        ("export: {per_channel: null}\n", "export.per_channel", "expected bool, got None (NoneType)"),
    ],
)
def test_wrong_type(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{key}'" in msg and expected in msg


@pytest.mark.parametrize(
    "text, key, bounds",
    [
        ("teacher: {train: {epochs: 0}}\n", "teacher.train.epochs", "in [1, 10000]"),
        ("data: {bccd: {labelled_fraction: 1.5}}\n", "data.bccd.labelled_fraction", "in [0.01, 1.0]"),
        ("teacher: {train: {grad_clip: -1}}\n", "teacher.train.grad_clip", "in [0.0, inf]"),
        ("teacher: {train: {lr: .nan}}\n", "teacher.train.lr", "expected float"),
    ],
)
def test_out_of_range(tmp_path: Path, text: str, key: str, bounds: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert f"'{key}'" in str(err.value) and bounds in str(err.value)


def test_int_accepted_for_float_and_frozen() -> None:
    train = from_dict(TrainParams, {"lr": 1})
    assert isinstance(train.lr, float) and train.lr == 1.0
    with pytest.raises(AttributeError):
        train.lr = 2.0  # type: ignore[misc]


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ParamsError, match="expected a mapping of sections"):
        load_params(write(tmp_path, "- a\n- b\n"))


def test_nested_defaults_are_independent() -> None:
    assert from_dict(DataParams, {"demo": {"seed": 5}}).demo == DemoParams(seed=5)


# What each stage script reads: (script, params section with a wrong type, required arguments besides --params).
STAGES = [
    ("prepare", "data: {on_bad: 1}\n", []),
    ("train_teacher", "teacher: {train: {epochs: '3'}}\n", []),
    ("pseudo_label", "pseudo_label: {tta_scales: 1.5}\n", []),
    ("filter", "filter: {nms_iou: high}\n", []),
    ("rebalance", "rebalance: {shares: [0.5]}\n", []),
    ("mine", "mine: {sources: general}\n", []),
    ("distill", "distill: {students: {s: {width_mult: wide}}}\n",
     ["--student", "s", "--out", "o", "--log-dir", "l", "--metrics", "m.json"]),
    ("export", "export: {opset: '17'}\n", ["--student-dir", "s"]),
]


@pytest.mark.parametrize("stage, text, args", STAGES, ids=[s[0] for s in STAGES])
def test_stage_scripts_refuse_wrong_types_in_one_line_before_any_work(
        stage: str, text: str, args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{stage}.py", "--params", str(path), *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "pipelines" / f"{stage}.py"), run_name="__main__")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{stage}: error: {path}: key '") and "expected" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # nothing written
