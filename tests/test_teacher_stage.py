"""The train_teacher stage script on tiny demo data: metrics keys, and kill mid-epoch -> re-run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dataengine.config import DemoParams
from dataengine.data.demo import generate_demo
from dataengine.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    generate_demo(root, DemoParams(seed=3, image_size=64, n_train=24, n_val=6, n_pool=4, n_test=6), progress=False)
    return root


def _params(tmp_path: Path, epochs: int) -> Path:
    params = {"teacher": {"model": {"name": "resnet18_bifpn_gfl", "input_size": 64, "neck_channels": 16},
                          "train": {"epochs": epochs, "batch_size": 4, "num_workers": 0, "warmup_epochs": 1},
                          "augment": {"preset": "light"}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _cmd(params: Path, data: Path, tmp_path: Path) -> list[str]:
    return [sys.executable, str(ROOT / "pipelines/train_teacher.py"), "--params", str(params), "--data", str(data),
            "--out", str(tmp_path / "teacher"), "--log-dir", str(tmp_path / "live"),
            "--metrics", str(tmp_path / "teacher.json")]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_train_teacher_kill_and_resume(tiny_data: Path, tmp_path: Path) -> None:
    cmd = _cmd(_params(tmp_path, epochs=4), tiny_data, tmp_path)
    last = tmp_path / "teacher" / "last.pt"
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last.exists(), "no checkpoint written after the first epoch"
    time.sleep(0.5)  # now inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_epoch = int(load_checkpoint(last)["epoch"])
    assert killed_epoch < 4, "the run finished before it could be killed; make the test data larger"
    assert not (tmp_path / "teacher" / "model.pt").exists() and not (tmp_path / "teacher.json").exists(), \
        "a killed run must not leave final outputs"

    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from the checkpoint of epoch {killed_epoch}" in rerun.stderr
    metrics = json.loads((tmp_path / "teacher.json").read_text())
    assert metrics["epochs"] == 4
    for split in ("general_val", "scenario_test"):
        assert {"mAP", "AP50", "mIoU"} <= set(metrics[split]), metrics[split]
        assert 0.0 <= metrics[split]["AP50"] <= 1.0
    assert metrics["params_m"] > 1 and metrics["gflops"] > 0 and metrics["train_seconds"] > 0
    ckpt = load_checkpoint(tmp_path / "teacher" / "model.pt")
    assert ckpt["class_names"] == ["circle", "square", "triangle", "star", "cross"] and ckpt["input_size"] == 64
    rows = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().strip().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2", "3"], "one log row per epoch after resume"


@pytest.mark.slow
def test_changed_params_restart_instead_of_resuming(tiny_data: Path, tmp_path: Path) -> None:
    first = subprocess.run(_cmd(_params(tmp_path, epochs=1), tiny_data, tmp_path), env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    (tmp_path / "teacher" / "model.pt").unlink()  # as if the run had been killed after its last checkpoint
    second = subprocess.run(_cmd(_params(tmp_path, epochs=2), tiny_data, tmp_path), env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "not resuming" in second.stderr and (tmp_path / "teacher" / "last.pt.stale").exists()
    assert json.loads((tmp_path / "teacher.json").read_text())["epochs"] == 2


@pytest.mark.slow
def test_finished_run_is_not_resumed(tiny_data: Path, tmp_path: Path) -> None:
    """A re-run after a finished run (DVC re-runs it because code or data changed) must train again."""
    cmd = _cmd(_params(tmp_path, epochs=1), tiny_data, tmp_path)
    assert subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600).returncode == 0
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "previous run" in again.stderr and "finished; training from scratch" in again.stderr
    assert "resumed from" not in again.stderr
    assert json.loads((tmp_path / "teacher.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_epoch_size_fixes_the_teacher_budget(tiny_data: Path, tmp_path: Path) -> None:
    """``teacher.epoch_size`` draws that many images per epoch whatever the size of general train (24 here)."""
    params = _params(tmp_path, epochs=1)
    doc = yaml.safe_load(params.read_text())
    doc["teacher"]["epoch_size"] = 8
    params.write_text(yaml.safe_dump(doc))
    run = subprocess.run(_cmd(params, tiny_data, tmp_path), env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "teacher.json").read_text())
    assert metrics["images_per_epoch"] == 8 and metrics["steps"] == 2  # batch_size 4
