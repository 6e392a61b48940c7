"""Params profiles: merged onto params.yaml, validated like params.yaml, and run as a DVC experiment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dataengine.cli import main
from dataengine.config import ParamsError
from dataengine.profiles import flatten, merge, profile_overrides

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "data" / "bccd"


def test_flatten_and_merge_exact() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    base = {"a": {"b": 1, "c": 2}, "x": 1}
    assert merge(base, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}, "x": 1}
    assert base == {"a": {"b": 1, "c": 2}, "x": 1}, "merge must not mutate its input"


def test_bccd_profile_validates() -> None:
    overrides = profile_overrides(ROOT / "profiles/bccd.yaml", ROOT / "params.yaml")
    assert overrides["data.source"] == "bccd" and overrides["teacher.model.segmentation"] is False


@pytest.mark.parametrize("profile", sorted((ROOT / "profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_validates(profile: Path) -> None:
    assert profile_overrides(profile, ROOT / "params.yaml")


def test_reviewed_profile_is_the_measured_configuration() -> None:
    """The README's and curation_ablation.json's numbers for this profile were measured with exactly these values."""
    assert profile_overrides(ROOT / "profiles/reviewed.yaml", ROOT / "params.yaml") == {
        "distill.train.epochs": 36, "distill.train.eval_every": 6, "mine.score_threshold": 0.3,
        "mine.unreviewed_rejects": True}
    measured = json.loads((ROOT / "benchmarks/results/curation_ablation.json").read_text())[
        "simulated_review_audit_epochs36_mine_score_0.3"]
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert measured["budget_images"] == 36 * base["distill"]["epoch_size"]
    # measured before mine.unreviewed_rejects existed, with the rule it now names (the filter's rejects count)
    assert "unreviewed_rejects" not in measured["mine"]
    assert {**measured["mine"], "unreviewed_rejects": True} == {**base["mine"], "score_threshold": 0.3,
                                                                 "unreviewed_rejects": True}


def test_bad_profile_names_key_and_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {train: {epocs: 3}}\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: unknown key 'teacher\.train\.epocs'"):
        profile_overrides(bad, ROOT / "params.yaml")


def test_cli_dry_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["profile", "bccd", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dvc exp run -n bccd ") and "-S data.source=bccd" in out
    assert "-S teacher.model.segmentation=false" in out
    assert main(["profile", "nope", "--dry-run"]) == 2
    assert "available: bccd" in capsys.readouterr().err


@pytest.mark.skipif(not BCCD.exists(), reason=f"BCCD not found at {BCCD}")
def test_prepare_stage_accepts_bccd_profile(tmp_path: Path) -> None:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    merged = merge(base, yaml.safe_load((ROOT / "profiles/bccd.yaml").read_text()))
    merged["data"]["bccd"]["root"] = str(BCCD)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merged))
    result = subprocess.run([sys.executable, str(ROOT / "pipelines/prepare.py"), "--params", "params.yaml",
                             "--out", "prepared", "--metrics", "data.json"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "data.json").read_text())
    assert metrics["source"] == "bccd" and metrics["bad_entries"] == 0
    assert metrics["general_train"]["images"] + metrics["general_val"]["images"] == 51  # 25% of 205 train images
    assert metrics["scenario_pool"]["images"] == 205 - 51 + 87 and metrics["scenario_test"]["images"] == 72
    assert set(metrics["general_train"]["per_class"]) == {"WBC", "RBC", "Platelets"}


def test_null_in_a_profile_removes_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert merge({"s": {"a": 1, "b": 2}}, {"s": {"b": None}}) == {"s": {"a": 1}}
    overrides = profile_overrides(ROOT / "profiles/bccd.yaml", ROOT / "params.yaml")
    assert overrides["distill.students.mobilenet_v2_050"] is None
    monkeypatch.chdir(ROOT)
    assert main(["profile", "bccd", "--dry-run"]) == 0
    assert "-S '~distill.students.mobilenet_v2_050'" in capsys.readouterr().out
