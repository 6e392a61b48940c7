"""benchmarks/gpu_path.py: the params each case writes, the stage commands it runs, its refusal without CUDA."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dataengine.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_path", ROOT / "benchmarks" / "gpu_path.py")
gp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gp)


def test_default_case_writes_the_params_unchanged(tmp_path: Path) -> None:
    out = gp.write_params(ROOT / "params.yaml", gp.case_overrides("default", size=256, epochs=60, workers=8),
                          tmp_path / "params.yaml")
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())


def test_large_case_changes_the_teacher_only(tmp_path: Path) -> None:
    override = gp.case_overrides("large", size=256, epochs=60, workers=8)
    out = gp.write_params(ROOT / "params.yaml", override, tmp_path / "params.yaml")
    base, params = load_params(ROOT / "params.yaml"), load_params(out)
    assert (params.teacher.model.name, params.teacher.model.input_size) == ("resnet50_bifpn_gfl", 256)
    assert (params.teacher.train.epochs, params.teacher.train.num_workers) == (60, 8)
    assert params.teacher.train.max_train_seconds == 0
    assert params.pseudo_label == base.pseudo_label and params.filter == base.filter
    assert params.distill == base.distill and params.data == base.data
    with pytest.raises(ValueError, match="unknown case 'huge'"):
        gp.case_overrides("huge", size=256, epochs=60, workers=8)


def test_a_bad_override_stops_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="input_size"):
        gp.write_params(ROOT / "params.yaml", gp.case_overrides("large", size=-1, epochs=60, workers=8),
                        tmp_path / "params.yaml")


def test_stage_commands_follow_dvc_yaml_and_distil_only_with_a_student(tmp_path: Path) -> None:
    kw = {"curated": Path("c.json"), "plan": Path("p.json"), "mined": Path("m")}
    run = tmp_path / "default"
    stages = gp.stage_commands(Path("params.yaml"), Path("data/prepared"), run, student=None, **kw)
    assert [s for s, _, _ in stages] == ["train_teacher", "pseudo_label", "filter"]
    with_student = gp.stage_commands(Path("params.yaml"), Path("data/prepared"), run, student="mobilenet_v3_small",
                                     **kw)
    name, done, cmd = with_student[-1]
    assert (name, done) == ("distill", run / "student.json")
    assert cmd[cmd.index("--teacher") + 1] == str(run / "teacher" / "model.pt")  # the teacher this case trained
    assert cmd[cmd.index("--student") + 1] == "mobilenet_v3_small"
    filter_cmd = stages[2][2]
    assert filter_cmd[filter_cmd.index("--decisions") + 1] == str(run / "decisions.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "benchmarks/gpu_path.py", "--work", str(tmp_path / "w"),
                             "--out", str(tmp_path / "out.json")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "no CUDA device" in result.stderr
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "w").exists()
