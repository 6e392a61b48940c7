"""Storage faults for real (a file size limit, a read-only folder) at the atomic-write boundary, how stage scripts
report them, and a training run that resumes after a corrupt checkpoint or a kill during a save.

Stage-level versions run the real stage scripts: ``test_pseudo_label.py`` (full disk, read-only output, corrupt
teacher), ``test_distill.py`` and ``test_teacher_stage.py`` (killed mid-way).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from _tiny_model import CLASS_NAMES, SIZE, SquaresDataset, TinyNet, build_tiny
from dataengine.config import ParamsError, TrainParams
from dataengine.data.dataset import collate
from dataengine.engine import Trainer, seed_everything
from dataengine.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dataengine.io import atomic_write_json, read_json, remove_temp_files
from dataengine.stage import TRACEBACK_ENV, error_line, is_reported, run_stage
from dataengine.teacher import fit_resuming

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# The child writes over two small files that exist already: a JSON and a checkpoint, each now too big to fit.
CHILD = """
import json, sys, torch
from pathlib import Path
from dataengine.engine.checkpoint import save_checkpoint
from dataengine.io import atomic_write_json
d = Path(sys.argv[1])
out = {}
for key, write in (("json", lambda: atomic_write_json(d / "m.json", {"x": "y" * 50_000})),
                   ("new", lambda: atomic_write_json(d / "sub" / "new.json", {"x": "y" * 50_000})),
                   ("ckpt", lambda: save_checkpoint(d / "last.pt", model_state={"w": torch.zeros(50_000)},
                                                    model_config={"name": "t"}, class_names=["a"], input_size=8,
                                                    mean=[0.5] * 3, std=[0.25] * 3, epoch=2))):
    try:
        write()
        out[key] = None
    except OSError as err:
        out[key] = [err.errno, str(err), type(err.__cause__).__name__]
print(json.dumps(out))
"""


def _small_files(folder: Path) -> dict[str, bytes]:
    atomic_write_json(folder / "m.json", {"x": 1})
    save_checkpoint(folder / "last.pt", model_state={"w": torch.zeros(1)}, model_config={"name": "t"},
                    class_names=["a"], input_size=8, mean=[0.5] * 3, std=[0.25] * 3, epoch=1)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _assert_writes_fail(folder: Path, code: int, reason: str, preexec_fn: Any) -> None:
    """Run ``CHILD`` in ``folder``: each of its three writes must fail with ``code``, naming the file."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], env=ENV, capture_output=True, text=True,
                          timeout=120, preexec_fn=preexec_fn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for key, name in (("json", "m.json"), ("new", "sub/new.json"), ("ckpt", "last.pt")):
        got, message, _ = result[key]
        assert got == code, result[key]
        assert message == f"[Errno {code}] cannot write {folder / name}: {reason}"


def test_atomic_writes_under_a_real_file_size_limit_keep_the_previous_files(tmp_path: Path) -> None:
    before = _small_files(tmp_path)
    limit = 16_384  # larger than the small files, smaller than the new ones: like a disk that fills up mid-write
    assert max(len(b) for b in before.values()) < limit
    _assert_writes_fail(tmp_path, errno.EFBIG, "File too large",
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "the previous files survive, no temp file and no half-written new file is left"
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1 and read_json(tmp_path / "m.json") == {"x": 1}


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _as_unprivileged() -> None:
    """Before exec: drop root's permission override, so a read-only folder is read-only for it too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_atomic_writes_into_a_read_only_folder_fail_by_name_and_change_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    before = _small_files(folder)
    folder.chmod(0o555)
    try:
        _assert_writes_fail(folder, errno.EACCES, "Permission denied",
                            preexec_fn=_as_unprivileged if os.geteuid() == 0 else None)
    finally:
        folder.chmod(0o755)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# --------------------------------------------------------------------------------------------------------------
# Stage scripts: one line, exit status 1
# --------------------------------------------------------------------------------------------------------------


def test_run_stage_reports_storage_and_input_errors_in_one_line(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(err: BaseException) -> Any:
        def main() -> int:
            raise err
        return main

    cases = [
        (OSError(errno.ENOSPC, "cannot write out/p.json: No space left on device"),
         "cannot write out/p.json: No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied", "out/x"), "Permission denied: out/x"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "data/prepared/general/val.json"),
         "No such file or directory: data/prepared/general/val.json"),
        (CheckpointError("models/teacher/model.pt: corrupt or truncated checkpoint (x)"),
         "models/teacher/model.pt: corrupt or truncated checkpoint (x)"),
        (ParamsError("params.yaml: key 'a.b': expected int, got 'x' (str)"),
         "params.yaml: key 'a.b': expected int, got 'x' (str)"),
    ]
    from dataengine.pseudo import tta_views

    with pytest.raises(ParamsError) as collision:  # a params value only the model's input size shows to be bad
        tta_views(64, (1.0, 1.1), hflip=True)
    cases.append((collision.value, "pseudo_label.tta_scales [1.0, 1.1] give input sizes [64, 64] for a model input "
                                   "of 64 (multiples of 32); each scale must give a different size"))
    for err, line in cases:
        assert is_reported(err) and error_line(err) == line
        assert run_stage("st", failing(err)) == 1
        assert capsys.readouterr().err == f"st: error: {line}\n"
    assert run_stage("st", lambda: 0) == 0 and run_stage("st", lambda: None) == 0 and run_stage("st", lambda: 3) == 3
    # A bug keeps its traceback: a plain ValueError, a KeyError, ... are not reported.
    for bug in (ValueError("bad"), KeyError("k"), ZeroDivisionError()):
        assert not is_reported(bug)
        with pytest.raises(type(bug)):
            run_stage("st", failing(bug))
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(CheckpointError):
        run_stage("st", failing(CheckpointError("x.pt: corrupt")))


# --------------------------------------------------------------------------------------------------------------
# Training: a corrupt last.pt, and the temp file of a save cut short by a kill
# --------------------------------------------------------------------------------------------------------------


def _make_trainer(out: Path, epochs: int) -> Trainer:
    seed_everything(0)
    params = TrainParams(epochs=epochs, batch_size=8, lr=1e-2, warmup_epochs=1.0, ema_decay=0.9, num_workers=0)
    return Trainer(TinyNet(), SquaresDataset(16), params, out, collate_fn=collate, class_names=CLASS_NAMES,
                   input_size=SIZE, progress=False, build_fn=build_tiny, log_dir=out / "live")


@pytest.fixture()
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # DVCLive writes signal files in the working directory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_in_tmp")
def test_corrupt_last_checkpoint_restarts_training_from_scratch(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    reference = fit_resuming(lambda: _make_trainer(tmp_path / "ref", 2), tmp_path / "ref", resume=True)
    out = tmp_path / "run"
    _make_trainer(out, 1).fit()  # a run of the same config killed after its first epoch: keep last.pt only
    (out / "model.pt").unlink()
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(good[: len(good) // 2])  # cut inside a tensor record
    result = fit_resuming(lambda: _make_trainer(out, 2), out, resume=True)
    assert "not resuming: " in capsys.readouterr().err
    assert result["resumed_from_epoch"] is None and result["epochs"] == 2
    assert (out / "last.pt.stale").read_bytes() == good[: len(good) // 2]  # set aside, not deleted
    for key, value in load_checkpoint(out / "model.pt")["model_state"].items():  # same as a run never interrupted
        assert torch.equal(value, load_checkpoint(tmp_path / "ref" / "model.pt")["model_state"][key]), key
    assert reference["epochs"] == 2
    with pytest.raises(CheckpointError, match=r"last\.pt: corrupt or truncated checkpoint"):
        (out / "last.pt").write_bytes(good[:200])
        _make_trainer(out, 2).fit(resume=True)  # without fit_resuming the error names the file


@pytest.mark.usefixtures("_in_tmp")
def test_temp_files_of_a_save_cut_short_are_removed_when_training_starts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # What atomic_write leaves when its process is SIGKILLed between creating the temp file and the rename.
    leftovers = []
    for name in ("last.pt", "model.pt"):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
        os.write(fd, b"half a checkpoint")
        os.close(fd)
        leftovers.append(Path(tmp))
    unrelated = out / ".other.pt.x.tmp"
    unrelated.write_bytes(b"not ours")
    _make_trainer(out, 1).fit()
    assert not any(p.exists() for p in leftovers) and unrelated.exists()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [".other.pt.x.tmp", "last.pt", "model.pt"]
    assert remove_temp_files(out / "last.pt") == []
