"""benchmarks/adapt_bn.py: which teachers its default run list takes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # adapt_bn imports its sibling benchmark scripts by name
spec = importlib.util.spec_from_file_location("adapt_bn", ROOT / "benchmarks" / "adapt_bn.py")
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)


def _params(tmp_path: Path, rate: float) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["demo"]["general_confuser_rate"] = rate
    out = tmp_path / f"params_{rate:g}.yaml"
    out.write_text(yaml.safe_dump(params))
    return out


def test_default_runs_take_the_other_seeds_of_the_params_demo(tmp_path, monkeypatch):
    coverage = tmp_path / "coverage"
    for run in ("rate0_seed1", "rate0_seed2", "rate0.2_seed1"):  # rate0.2_seed2 not trained
        (coverage / run / "teacher").mkdir(parents=True)
        (coverage / run / "teacher" / "model.pt").write_bytes(b"")
    monkeypatch.setattr(ab, "COVERAGE", coverage)

    runs = ab.default_runs(_params(tmp_path, 0.2))
    assert [(name, teacher) for name, teacher, _ in runs] == [
        ("seed0", Path("models/teacher")), ("seed1", coverage / "rate0.2_seed1" / "teacher")]
    assert runs[1][2] == coverage / "rate0.2_seed1" / "prepared"

    runs = ab.default_runs(_params(tmp_path, 0.0))
    assert [name for name, _, _ in runs] == ["seed0", "seed1", "seed2"]
    assert runs[2][1] == coverage / "rate0_seed2" / "teacher"
