"""The training engine: checkpoints, schedule, EMA, seeding, samplers, and the Trainer on a tiny real model."""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiny_model import CLASS_NAMES, SIZE, SquaresDataset, TinyNet, build_tiny  # noqa: E402
from dataengine.config import TrainParams  # noqa: E402
from dataengine.data.dataset import collate  # noqa: E402
from dataengine.engine import (  # noqa: E402
    CheckpointError,
    DistributedWeightedSampler,
    Trainer,
    check_compatible,
    load_checkpoint,
    load_model,
    save_checkpoint,
    seed_everything,
)
from dataengine.engine.ema import create_ema, ema_decay_at  # noqa: E402
from dataengine.engine.schedule import build_optimizer, build_scheduler, lr_factor_fn, param_groups  # noqa: E402
from dataengine.engine.seeding import rng_state, set_rng_state  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "_train_script.py"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    # Tensors of the tiny model are far too small to gain from threads; on a busy 2-core machine OpenMP threads
    # waiting for each other made one epoch 7x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DVCLive looks for a DVC repo from the working directory and writes signal files there; keep it in tmp.
    monkeypatch.chdir(tmp_path)


def make_params(**overrides: Any) -> TrainParams:
    base = {"epochs": 4, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 1.0, "ema_decay": 0.9, "num_workers": 0,
            "seed": 0}
    return TrainParams(**{**base, **overrides})


def make_trainer(out: Path, params: TrainParams | None = None, *, n: int = 32, **kwargs: Any) -> Trainer:
    seed_everything(0)  # same initial weights in every run
    kwargs.setdefault("build_fn", build_tiny)
    dataset = kwargs.pop("dataset", None)
    return Trainer(TinyNet(), SquaresDataset(n) if dataset is None else dataset, params or make_params(), out,
                   collate_fn=collate, class_names=CLASS_NAMES, input_size=SIZE, progress=False, **kwargs)


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def ckpt_kwargs(**overrides: Any) -> dict[str, Any]:
    base = {"model_state": {"w": torch.arange(4.0)}, "model_config": {"name": "tiny_net", "width": 8},
            "class_names": ["a", "b"], "input_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    return {**base, **overrides}


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    save_checkpoint(path, **ckpt_kwargs(optimizer_state=opt.state_dict(), epoch=3, step=12,
                                        extra={"rng": rng_state(), "note": "x", "nested": [1, 2.5, None]}))
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["model_state"]["w"], torch.arange(4.0))
    assert (ckpt["class_names"], ckpt["input_size"], ckpt["epoch"], ckpt["step"]) == (["a", "b"], 32, 3, 12)
    assert ckpt["mean"] == [0.5, 0.5, 0.5] and ckpt["model_config"] == {"name": "tiny_net", "width": 8}
    assert ckpt["extra"]["nested"] == [1, 2.5, None] and ckpt["ema_state"] is None
    assert ckpt["optimizer_state"]["param_groups"][0]["betas"] == (0.9, 0.999)
    # The file itself loads with plain torch.load(weights_only=True).
    assert torch.load(path, map_location="cpu", weights_only=True)["format"] == "dataengine-checkpoint-v1"


def test_save_refuses_content_that_weights_only_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"'extra.stats' is a numpy.float64"):
        save_checkpoint(tmp_path / "a.pt", **ckpt_kwargs(extra={"stats": np.float64(1.0)}))
    with pytest.raises(TypeError, match="model_config must be JSON-able"):
        save_checkpoint(tmp_path / "b.pt", **ckpt_kwargs(model_config={"fn": print}))
    with pytest.raises(ValueError, match="mean must have 3 values"):
        save_checkpoint(tmp_path / "c.pt", **ckpt_kwargs(mean=[0.5]))
    assert not list(tmp_path.iterdir())


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, **ckpt_kwargs(epoch=1))
    before = path.read_bytes()

    def failing_save(obj: Any, fh: Any) -> None:
        fh.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="last.pt"):
        save_checkpoint(path, **ckpt_kwargs(epoch=2))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


def test_truncated_or_garbage_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint(good, **ckpt_kwargs())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: corrupt or truncated"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: corrupt or not a torch checkpoint \(Unsupported operand"):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


class Payload:
    """A custom class: ``weights_only=True`` must refuse to unpickle it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getcwd, ())


def test_pickled_object_and_foreign_dicts_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({**ckpt_kwargs(), "format": "dataengine-checkpoint-v1", "epoch": 0, "step": 0, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load, it holds a pickled object .*getcwd"):
        load_checkpoint(evil)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointError, match=r"plain\.pt: not a dataengine checkpoint, missing keys \['format'"):
        load_checkpoint(plain)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_checkpoint(tensor)


def test_check_compatible_names_the_difference(tmp_path: Path) -> None:
    ckpt = {"class_names": ["a", "b"], "model_config": {"name": "tiny_net"}}
    check_compatible(ckpt, class_names=["a", "b"], model_name="tiny_net")
    with pytest.raises(CheckpointError, match=r"missing \['c'\], extra \['b'\]"):
        check_compatible(ckpt, class_names=["a", "c"])
    with pytest.raises(CheckpointError, match="same names in another order"):
        check_compatible(ckpt, class_names=["b", "a"])
    with pytest.raises(CheckpointError, match="holds model 'tiny_net', expected 'other'"):
        check_compatible(ckpt, model_name="other")


def test_load_model_rebuilds_and_refuses_misfit_weights(tmp_path: Path) -> None:
    model = TinyNet(width=4)
    path = tmp_path / "m.pt"
    save_checkpoint(path, **ckpt_kwargs(model_state=model.state_dict(), model_config=model.config,
                                        class_names=CLASS_NAMES))
    rebuilt, ckpt = load_model(path, build_tiny, class_names=CLASS_NAMES, model_name="tiny_net")
    assert_states_equal(rebuilt.state_dict(), model.state_dict())
    assert not rebuilt.training and ckpt["input_size"] == 32
    save_checkpoint(path, **ckpt_kwargs(model_state=model.state_dict(), model_config={**model.config, "width": 8}))
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(path, build_tiny)


# ------------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, EMA, seeding, samplers
# ------------------------------------------------------------------------------------------------------------------


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    adapter = nn.Linear(2, 2, bias=False)
    decay, no_decay = param_groups([model, adapter, model], 0.05)  # model twice: parameters counted once
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight), id(adapter.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                   id(model[2].bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    sgd = build_optimizer([model], make_params(optimizer="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    assert isinstance(build_optimizer([model], make_params()), torch.optim.AdamW)


def test_lr_schedules() -> None:
    cosine = lr_factor_fn("cosine", warmup_steps=4, total_steps=15)
    assert [round(cosine(i), 6) for i in range(5)] == [0.001, 0.25075, 0.5005, 0.75025, 1.0]
    # Cosine from 1 at step 4 to 0.01 at the last step (14): half-way at step 9.
    assert math.isclose(cosine(9), 0.505) and math.isclose(cosine(14), 0.01) and math.isclose(cosine(20), 0.01)
    values = [cosine(i) for i in range(4, 15)]
    assert all(a > b for a, b in zip(values, values[1:]))
    onecycle = lr_factor_fn("onecycle", warmup_steps=4, total_steps=14)
    assert [round(onecycle(i), 6) for i in (0, 2, 4)] == [0.04, 0.52, 1.0]
    assert math.isclose(onecycle(13), 1 / 25 / 1e4)
    assert lr_factor_fn("cosine", warmup_steps=0, total_steps=5)(0) == 1.0
    # Warm-up longer than the run: all of it is warm-up, the last step is still below the peak.
    assert lr_factor_fn("cosine", warmup_steps=50, total_steps=10)(9) < 1.0

    opt = build_optimizer([nn.Linear(2, 2)], make_params(lr=0.1))
    sched = build_scheduler(opt, make_params(lr=0.1, epochs=3, warmup_epochs=0.5), steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert math.isclose(lrs[0], 1e-4) and math.isclose(lrs[2], 0.1) and math.isclose(lrs[11], 1e-3)


def test_ema_warm_up_and_update() -> None:
    assert ema_decay_at(0.999, 0) == 0.1 and ema_decay_at(0.999, 10**6) == 0.999 and ema_decay_at(0.5, 90) == 0.5
    model = nn.BatchNorm1d(2)
    ema = create_ema(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(4.0)
    ema.update_parameters(model)  # copies
    assert torch.equal(ema.module.weight, model.weight) and torch.equal(ema.module.running_mean, model.running_mean)
    with torch.no_grad():
        model.weight.fill_(12.0)
        model.running_mean.fill_(0.0)
    ema.update_parameters(model)  # n = 1: decay (1 + 1) / (10 + 1)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, torch.full((2,), 2.0 * d + 12.0 * (1 - d)))
    assert torch.allclose(ema.module.running_mean, torch.full((2,), 4.0 * d))
    assert ema.n_averaged.item() == 2


def test_rng_state_round_trip_is_weights_only_loadable() -> None:
    import random

    seed_everything(5)
    state = rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(loaded)
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_distributed_weighted_sampler_splits_one_draw_over_ranks() -> None:
    weights = [0.0, 1.0, 0.0, 3.0, 1.0]
    ranks = [DistributedWeightedSampler(weights, num_replicas=2, rank=r, seed=7) for r in range(2)]
    draws = [list(s) for s in ranks]
    assert [len(d) for d in draws] == [3, 3]  # ceil(5 / 2) each
    assert set(draws[0] + draws[1]) <= {1, 3, 4}
    assert draws == [list(s) for s in ranks]  # deterministic
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != draws
    with pytest.raises(ValueError, match="sampler weight 1 is -1.0"):
        DistributedWeightedSampler([1.0, -1.0], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="all zero"):
        DistributedWeightedSampler([0.0, 0.0], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        DistributedWeightedSampler([1.0], num_replicas=2, rank=2)


# ------------------------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------------------------


def test_fit_learns_and_writes_model_and_curves(tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen: list[bool] = []

    def evaluate(model: nn.Module) -> dict[str, Any]:
        seen.append(model.training)
        return {"score": 0.5, "per_class": {"square": 0.25}, "skipped": None}

    trainer = make_trainer(out, make_params(epochs=6, weight_decay=0.0), n=64, evaluate_fn=evaluate)
    result = trainer.fit()
    losses = [float(r["loss"]) for r in read_tsv(out / "dvclive/plots/metrics/train/loss.tsv")]
    assert len(losses) == 6 and losses[-1] < 0.15 * losses[0], losses  # measured: 0.96 -> 0.08
    assert result["epochs"] == 6 and result["steps"] == 48 and not result["stopped_early"]
    assert set(result["final_losses"]) == {"loss", "box", "color"}
    assert math.isclose(result["final_losses"]["loss"], losses[-1])
    assert result["metrics"] == {"score": 0.5, "per_class/square": 0.25} and seen == [False] * 6
    assert result["resumed_from_epoch"] is None and result["train_seconds"] > 0

    final = load_checkpoint(out / "model.pt")  # weights_only load
    assert_states_equal(final["model_state"], trainer.ema.module.state_dict())
    assert final["class_names"] == CLASS_NAMES and final["input_size"] == SIZE and final["std"] == [0.25] * 3
    assert final["optimizer_state"] is None and final["extra"]["weights"] == "ema"
    last = load_checkpoint(out / "last.pt")
    assert (last["epoch"], last["step"]) == (6, 48) and last["optimizer_state"] is not None
    assert_states_equal(last["model_state"], trainer.model.state_dict())
    # The EMA is not the raw model, and it predicts better than the untrained one did.
    assert not torch.equal(final["model_state"]["head.weight"], last["model_state"]["head.weight"])
    lrs = [float(r["lr"]) for r in read_tsv(out / "dvclive/plots/metrics/train/lr.tsv")]
    assert math.isclose(lrs[-1], 1e-2 * 0.01)  # the cosine reached its floor at the last step
    assert [r["step"] for r in read_tsv(out / "dvclive/plots/metrics/eval/per_class/square.tsv")] == list("012345")


def test_resume_after_a_crash_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"score": 1.0}

    make_trainer(tmp_path / "full", evaluate_fn=evaluate).fit()

    out = tmp_path / "crashed"
    calls: list[int] = []

    class Killed(Exception):
        pass

    def crashing(model: nn.Module) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:  # evaluating epoch 2: last.pt still holds epoch 1, DVCLive has row 0
            shutil.copy(out / "last.pt", tmp_path / "after_epoch_1.pt")
        if len(calls) == 3:
            raise Killed
        return {"score": 1.0}

    with pytest.raises(Killed):
        make_trainer(out, evaluate_fn=crashing).fit()
    assert load_checkpoint(out / "last.pt")["epoch"] == 2 and not (out / "model.pt").exists()
    # Worst case for the curves: DVCLive is one epoch ahead of the checkpoint (killed between the two writes).
    shutil.copy(tmp_path / "after_epoch_1.pt", out / "last.pt")
    assert [r["step"] for r in read_tsv(out / "dvclive/plots/metrics/train/loss.tsv")] == ["0", "1"]

    result = make_trainer(out, evaluate_fn=evaluate, resume=True).fit()
    assert result["resumed_from_epoch"] == 1 and result["epochs"] == 4
    for name in ("model.pt", "last.pt"):
        assert_states_equal(load_checkpoint(out / name)["model_state"],
                            load_checkpoint(tmp_path / "full" / name)["model_state"])
    for term in ("loss", "box", "color", "lr"):
        rows = read_tsv(out / f"dvclive/plots/metrics/train/{term}.tsv")
        full = read_tsv(tmp_path / f"full/dvclive/plots/metrics/train/{term}.tsv")
        assert [r["step"] for r in rows] == ["0", "1", "2", "3"], term
        assert rows == full, term  # same values, exactly
    assert [r["step"] for r in read_tsv(out / "dvclive/plots/metrics/eval/score.tsv")] == ["0", "1", "2", "3"]


def test_resume_refuses_changed_params_or_classes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    make_trainer(out, make_params(epochs=1)).fit()
    with pytest.raises(CheckpointError, match=r"params changed since the checkpoint \(lr: 0.01 -> 0.02\)"):
        make_trainer(out, make_params(epochs=1, lr=2e-2), resume=True).fit()
    seed_everything(0)
    trainer = Trainer(TinyNet(), SquaresDataset(32), make_params(epochs=1), out, collate_fn=collate,
                      class_names=["circle"], input_size=SIZE, progress=False)
    with pytest.raises(CheckpointError, match=r"made for classes \['square'\], expected \['circle'\]"):
        trainer.fit(resume=True)
    # A finished run resumes to "nothing left to do"; max_train_seconds may change.
    result = make_trainer(out, make_params(epochs=1, max_train_seconds=100.0), resume=True).fit()
    assert (result["epochs"], result["resumed_from_epoch"]) == (1, 1)


def test_time_budget_stops_after_the_epoch_that_exceeds_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = make_trainer(out, make_params(epochs=5, max_train_seconds=1e-6)).fit()
    assert (result["epochs"], result["steps"], result["stopped_early"]) == (1, 4, True)
    assert load_checkpoint(out / "model.pt")["epoch"] == 1
    # The budget is spent: resuming does not train further.
    again = make_trainer(out, make_params(epochs=5, max_train_seconds=1e-6), resume=True).fit()
    assert (again["epochs"], again["stopped_early"]) == (1, True)


def test_sampler_weights_pick_only_weighted_items(tmp_path: Path) -> None:
    dataset = SquaresDataset(32)
    weights = [1.0 if i < 4 else 0.0 for i in range(32)]
    result = make_trainer(tmp_path / "run", make_params(epochs=2), dataset=dataset, sampler_weights=weights).fit()
    assert result["steps"] == 8  # an epoch still draws len(dataset) items
    assert len(dataset.seen) == 64 and set(dataset.seen) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="3 weights for a dataset of 32 items"):
        make_trainer(tmp_path / "bad", sampler_weights=[1.0, 1.0, 1.0])


def test_loss_fn_and_extra_modules_are_trained_and_saved(tmp_path: Path) -> None:
    torch.manual_seed(1)
    adapter = nn.Linear(3, 3)
    initial = {k: v.clone() for k, v in adapter.state_dict().items()}

    def loss_fn(net: nn.Module, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        outputs = net(images)
        colors = torch.stack([t["color"] for t in targets])  # [B, 3]
        kd = F.mse_loss(adapter(outputs["color"]), colors)
        return {"loss": kd, "kd": kd}

    out = tmp_path / "run"
    result = make_trainer(out, make_params(epochs=2), loss_fn=loss_fn, extra_modules=adapter).fit()
    assert set(result["final_losses"]) == {"loss", "kd"}
    assert not torch.equal(adapter.weight, initial["weight"])
    assert_states_equal(load_checkpoint(out / "last.pt")["extra"]["extra_modules_state"], adapter.state_dict())
    assert (out / "dvclive/plots/metrics/train/kd.tsv").is_file()


def test_gradient_clipping_bounds_the_step(tmp_path: Path) -> None:
    # One SGD step (lr 1, no momentum, no decay, no warm-up): the update is exactly the clipped gradient.
    params = make_params(epochs=1, optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, warmup_epochs=0.0,
                         grad_clip=0.05)
    trainer = make_trainer(tmp_path / "run", params, n=8)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
    assert math.isclose(change.norm().item(), 0.05, rel_tol=1e-4)


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset is empty"):
        make_trainer(tmp_path / "a", dataset=SquaresDataset(0))
    plain = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Linear has no dict `config`"):
        Trainer(plain, SquaresDataset(4), make_params(), tmp_path, collate_fn=collate, class_names=CLASS_NAMES,
                input_size=SIZE)

    def nan_loss(net: nn.Module, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"loss": net(images)["box"].sum() * float("nan")}

    with pytest.raises(FloatingPointError, match="loss is nan at epoch 1, batch 0"):
        make_trainer(tmp_path / "b", loss_fn=nan_loss).fit()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "full")], check=True, env=env, timeout=120)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--delay", "0.02"], env=env)
    deadline = time.monotonic() + 60
    while not (out / "last.pt").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= load_checkpoint(out / "last.pt")["epoch"] < 4 and not (out / "model.pt").exists()

    subprocess.run([sys.executable, str(SCRIPT), str(out), "--resume"], check=True, env=env, timeout=120)
    for name in ("model.pt", "last.pt"):
        assert_states_equal(load_checkpoint(out / name)["model_state"],
                            load_checkpoint(tmp_path / "full" / name)["model_state"])
    rows = read_tsv(out / "dvclive/plots/metrics/train/loss.tsv")
    assert rows == read_tsv(tmp_path / "full/dvclive/plots/metrics/train/loss.tsv")
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
