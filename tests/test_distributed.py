"""Two CPU processes under torchrun (Gloo): identical weights on every rank, files written by rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _train_script import state_hash  # noqa: E402
from dataengine.engine import load_checkpoint  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "_train_script.py"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("weighted", [False, True], ids=["distributed-sampler", "weighted-sampler"])
def test_two_ranks_end_identical_and_only_rank0_writes(tmp_path: Path, weighted: bool) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(SCRIPT),
           str(out), "--epochs", "2", "--num-workers", "0", "--report", *(["--weighted"] if weighted else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # Gloo on the CPU
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Parameters, BatchNorm buffers, EMA and the adapter (trained outside DDP) agree bit for bit.
    for key in ("model", "ema", "adapter"):
        assert ranks[0][key] == ranks[1][key], key
    assert ranks[0]["result"]["final_losses"] == ranks[1]["result"]["final_losses"]  # averaged over ranks
    assert set(ranks[0]["result"]["final_losses"]) == {"loss", "box", "color", "kd"}
    # 32 items, global batch 8 -> 4 per rank -> 4 steps per epoch.
    assert [r["result"]["steps"] for r in ranks] == [8, 8]
    # Rank 0 wrote last.pt twice and model.pt once and owned the only DVCLive logger; rank 1 wrote nothing.
    assert [(r["saves"], r["lives"]) for r in ranks] == [(3, 1), (0, 0)]
    assert sorted(p.name for p in out.iterdir()) == ["dvclive", "last.pt", "model.pt", "rank0.json", "rank1.json"]
    final = load_checkpoint(out / "model.pt")
    assert state_hash(final["model_state"]) == ranks[0]["ema"]
    last = load_checkpoint(out / "last.pt")
    assert (last["epoch"], last["extra"]["world_size"]) == (2, 2)
    assert state_hash(last["extra"]["extra_modules_state"]) == ranks[0]["adapter"]


@pytest.mark.parametrize(("cuda", "gpus", "local_world", "backend", "device"), [
    (False, 0, "2", "gloo", "cpu"),       # CPU ranks
    (True, 2, "2", "nccl", "cuda:1"),     # one GPU per rank
    (True, 1, "2", "gloo", "cuda:0"),     # two ranks share one GPU: NCCL refuses that
    (True, 4, "8", "gloo", "cuda:1"),     # rank 5 of 8 on 4 GPUs
])
def test_backend_and_device_follow_the_gpus_per_machine(monkeypatch: pytest.MonkeyPatch, cuda: bool, gpus: int,
                                                        local_world: str, backend: str, device: str) -> None:
    import torch

    from dataengine.engine.distributed import default_backend, process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    monkeypatch.setenv("LOCAL_RANK", "5" if local_world == "8" else "1")
    assert default_backend() == backend
    assert str(process_device()) == device
