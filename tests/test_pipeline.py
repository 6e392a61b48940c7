"""`dvc repro` end to end on a copy of the project with tiny params: stages run, write their outputs, and a
second `dvc repro` has nothing to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def make_project(tmp_path: Path, overrides: dict) -> Path:
    """A throwaway copy of the project (code, dvc.yaml, params) in its own git + DVC repo."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dataengine", "pipelines"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        assert _run(cmd, proj).returncode == 0
    return proj


TINY = {"data.demo.n_train": 12, "data.demo.n_val": 6, "data.demo.n_pool": 10, "data.demo.n_test": 6,
        "data.demo.image_size": 64}


@pytest.mark.slow
def test_prepare_stage_and_noop_second_run(tmp_path: Path) -> None:
    proj = make_project(tmp_path, TINY)
    first = _run(["dvc", "repro", "prepare"], proj)
    assert first.returncode == 0, first.stdout + first.stderr
    metrics = json.loads((proj / "metrics/data.json").read_text())
    assert metrics["general_train"]["images"] == 12 and metrics["general_val"]["images"] == 6
    assert metrics["scenario_pool"]["images"] == 10 and metrics["bad_entries"] == 0
    assert (proj / "data/prepared/general/train.json").exists()
    second = _run(["dvc", "repro", "prepare"], proj)
    assert second.returncode == 0
    assert "didn't change, skipping" in second.stdout or "up to date" in second.stdout, second.stdout
    assert "Running stage" not in second.stdout


@pytest.mark.slow
def test_prepare_refuses_bad_params(tmp_path: Path) -> None:
    proj = make_project(tmp_path, {**TINY, "data.on_bad": "ignore"})
    result = _run(["dvc", "repro", "prepare"], proj)
    assert result.returncode != 0
    assert "data.on_bad" in result.stderr + result.stdout and "one of 'stop', 'skip'" in result.stderr + result.stdout
    assert not (proj / "data/prepared").exists()


def test_dvc_plots_name_every_student_and_baseline_by_its_curves_folder() -> None:
    # dvc.yaml cannot loop over distill.students outside a stage, so its top-level plots name the students; a student
    # added to params.yaml must be added there too. A run's own folder holds metrics.json and params.yaml, which
    # `dvc plots show` cannot draw (it warned on each), hence the plots/metrics folder.
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    students = list(yaml.safe_load((ROOT / "params.yaml").read_text())["distill"]["students"])
    curves = sorted(name for entry in plots for name in (entry if isinstance(entry, dict) else {entry: None})
                    if name.startswith("dvclive/"))
    assert curves == sorted(["dvclive/teacher/plots/metrics",
                             *(f"dvclive/{kind}/{s}/plots/metrics" for kind in ("students", "baselines")
                               for s in students)])
    pr = next(entry for entry in plots if isinstance(entry, dict) and next(iter(entry)).startswith("Precision-recall"))
    assert next(iter(pr.values()))["y"]["plots/evaluate/pr_curves.csv"] == [
        "teacher", *(f"student/{s}" for s in students), *(f"baseline/{s}" for s in students)]
    assert "data/filtered/reliability.png" in plots
