"""Typed params: unknown keys, wrong types and out-of-range values are refused with the key and the file."""

from __future__ import annotations

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
