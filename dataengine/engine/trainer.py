"""One training loop for the teacher, the students and the baselines.

:class:`Trainer` runs the epochs of :class:`~dataengine.config.TrainParams`: AdamW or SGD without weight decay on
biases and norms, a per-iteration warm-up + cosine/one-cycle schedule (:mod:`dataengine.engine.schedule`), an EMA of
the weights used for evaluation and for the final model (:mod:`dataengine.engine.ema`), gradient clipping, bf16
autocast on CUDA, per-epoch seeding (:mod:`dataengine.engine.seeding`), a DVCLive row per epoch for every loss term
and metric, an atomic ``last.pt`` after every epoch and ``model.pt`` at the end. The same code runs in one process
or under ``torchrun`` (:mod:`dataengine.engine.distributed`).

Order within an epoch: train, evaluate the EMA (every ``eval_every`` epochs and after the last one), log to DVCLive,
write ``last.pt``. A run killed at any point resumes from the last completed epoch: DVCLive rows of later epochs
are dropped first, so the curves never hold two rows for one epoch.

Resume guarantee: the randomness of epoch ``e`` depends only on ``(seed, e, rank)`` and the checkpoint restores
model, EMA, optimizer, scheduler and extra modules exactly, so on the CPU a resumed run ends with bit-identical
weights to an uninterrupted one (tested). On CUDA, kernels that are not deterministic (atomics in convolution
backward, ...) make the two runs differ by rounding, as two uninterrupted CUDA runs do. Changing ``num_workers``
between the two parts moves augmentation randomness between processes and also breaks bit-equality.

Example:
    >>> trainer = Trainer(model, train_set, params.train, "models/teacher", collate_fn=collate,
    ...                   evaluate_fn=evaluate, class_names=names, input_size=128)  # doctest: +SKIP
    >>> result = trainer.fit(resume=True)  # doctest: +SKIP
    >>> sorted(result)  # doctest: +SKIP
    ['epochs', 'final_losses', 'metrics', 'resumed_from_epoch', 'steps', 'stopped_early', 'train_seconds']
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from dvclive import Live
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, WeightedRandomSampler
from tqdm.auto import tqdm

from dataengine.config import TrainParams
from dataengine.engine.checkpoint import CheckpointError, check_compatible, load_checkpoint, load_model, save_checkpoint
from dataengine.engine.distributed import (
    DistributedWeightedSampler,
    all_reduce_grads,
    all_reduce_mean,
    barrier,
    broadcast_module,
    check_sampler_weights,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    process_device,
)
from dataengine.engine.ema import create_ema
from dataengine.engine.schedule import build_optimizer, build_scheduler
from dataengine.engine.seeding import derive_seed, rng_state, set_rng_state
from dataengine.evaluation import flatten_metrics
from dataengine.io import atomic_write_text, remove_temp_files

__all__ = ["Trainer", "LossFn", "EvaluateFn", "RESUME_FREE_PARAMS"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, list[dict[str, Any]]], Mapping[str, torch.Tensor]]
"""``loss_fn(model, images, targets) -> {"loss": scalar, ...}``; ``model`` may be DDP-wrapped (see ``unwrap_model``)."""

EvaluateFn = Callable[[nn.Module], Mapping[str, Any]]
"""``evaluate_fn(ema_model) -> metrics`` (numbers, possibly nested dicts; ``None`` values are skipped). The model is
in eval mode on the training device; it runs under ``torch.no_grad`` and on rank 0 only."""

RESUME_FREE_PARAMS = frozenset({"max_train_seconds", "num_workers", "eval_every"})
"""TrainParams keys that may change between a run and its resume; any other change is refused."""


class Trainer:
    """Train ``model`` on ``train_dataset`` with ``params``; :meth:`fit` runs it.

    Args:
        model: ``model(images [B, 3, S, S] in [0, 1]) -> outputs``, with ``model.loss(outputs, targets,
            det_weight=..., seg_weight=...) -> {"loss": ..., ...}`` and a JSON-able ``model.config``.
        train_dataset: Map-style dataset of ``(image, target)``.
        params: Optimisation params.
        out_dir: Where ``last.pt`` and ``model.pt`` go.
        collate_fn: DataLoader collate, ``batch -> (images [B, 3, S, S], targets list)``.
        evaluate_fn: Scores the EMA model; its metrics are logged and returned.
        loss_fn: Replaces the default ``model.loss(model(images), targets, ...)`` (distillation).
        sampler_weights: One sampling weight per dataset item (class rebalancing); sampling with replacement.
        epoch_size: Items drawn per epoch with ``sampler_weights`` (default: the dataset's length).
        extra_modules: Modules trained with the model (adapters); optimised, saved in ``last.pt``, not in the EMA.
        class_names: Label ``i`` is ``class_names[i]``; stored in the checkpoints.
        input_size: Square input side; stored in the checkpoints.
        build_fn: ``build_fn(model.config) -> nn.Module``; when given, ``model.pt`` is reloaded through it at the end
            to prove it rebuilds.
        log_dir: DVCLive directory (default ``out_dir / "dvclive"``).
        progress: Show a tqdm bar per epoch (rank 0 only).
        mean: Normalisation mean for the checkpoints (default: the model's ``mean`` buffer).
        std: Normalisation std (default: the model's ``std`` buffer).
        resume: Continue from ``out_dir / "last.pt"`` when it exists (``fit(resume=...)`` overrides).
        device: Training device (default ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU).

    ``params.batch_size`` is the global batch: under ``torchrun`` each of the ``N`` ranks takes
    ``batch_size / N`` images per step, so the schedule and the results do not depend on ``N`` (up to the per-rank
    BatchNorm statistics on CPU).

    Raises:
        ValueError: Empty dataset, wrong number of sampler weights, a batch size not divisible by the world size,
            a model without ``config`` or without mean/std.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset[Any],
        params: TrainParams,
        out_dir: str | Path,
        *,
        collate_fn: Callable[[list[Any]], tuple[torch.Tensor, list[dict[str, Any]]]],
        evaluate_fn: EvaluateFn | None = None,
        loss_fn: LossFn | None = None,
        sampler_weights: Sequence[float] | torch.Tensor | None = None,
        epoch_size: int | None = None,
        extra_modules: nn.Module | None = None,
        class_names: Sequence[str],
        input_size: int,
        build_fn: Callable[[dict[str, Any]], nn.Module] | None = None,
        log_dir: str | Path | None = None,
        progress: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resume: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        init_distributed()
        self.params = params
        self.out_dir = Path(out_dir)
        self.log_dir = Path(log_dir) if log_dir is not None else self.out_dir / "dvclive"
        self.evaluate_fn = evaluate_fn
        self.loss_fn = loss_fn
        self.class_names = list(class_names)
        self.input_size = int(input_size)
        self.build_fn = build_fn
        self.progress = progress
        self.resume = resume
        self.rank, self.world_size = get_rank(), get_world_size()
        self.device = torch.device(device) if device is not None else process_device()

        config = getattr(model, "config", None)
        if not isinstance(config, Mapping):
            raise ValueError(f"{type(model).__name__} has no dict `config`; the engine needs it to rebuild the model "
                             "from a checkpoint (create_model(**model.config))")
        self.model_config = dict(config)
        self.mean = _normalisation(model, "mean", mean)
        self.std = _normalisation(model, "std", std)

        self.model = model.to(self.device)
        self.extra_modules = extra_modules.to(self.device) if extra_modules is not None else None
        # The EMA copies the plain model, before SyncBatchNorm conversion, so model.pt loads into a plain model.
        self.ema = create_ema(self.model, params.ema_decay)
        trained = [self.model] + ([self.extra_modules] if self.extra_modules is not None else [])
        self.optimizer = build_optimizer(trained, params)
        self._trained_params = [p for m in trained for p in m.parameters() if p.requires_grad]

        if epoch_size is not None and (sampler_weights is None or epoch_size < 1):
            raise ValueError(f"epoch_size={epoch_size} needs sampler_weights and must be >= 1")
        self.epoch_size = epoch_size
        self.loader, self.sampler = self._build_loader(train_dataset, collate_fn, sampler_weights)
        self.steps_per_epoch = len(self.loader)
        self.scheduler = build_scheduler(self.optimizer, params, self.steps_per_epoch)

        self.net: nn.Module = self.model  # what the forward goes through (DDP wrapper under torchrun)
        if self.world_size > 1:
            if self.device.type == "cuda" and dist.get_backend() == "nccl":
                # Batch statistics over all ranks; CPU tensors are refused by SyncBatchNorm (see distributed.py), and
                # ranks sharing a GPU run Gloo: per-rank statistics there, as on CPU.
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # DDP's default syncs rank 0's buffers at construction and before every forward (``broadcast_buffers``,
            # renamed ``forward_sync_buffers`` in recent torch; left at its default to work with both names).
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids)
            if self.extra_modules is not None:
                broadcast_module(self.extra_modules)  # DDP only broadcasts the module it wraps
        self.use_amp = params.amp and self.device.type == "cuda"

    # ----------------------------------------------------------------------------------------------------------
    # Data
    # ----------------------------------------------------------------------------------------------------------

    def _build_loader(self, dataset: Dataset[Any], collate_fn: Callable[..., Any],
                      weights: Sequence[float] | torch.Tensor | None) -> tuple[DataLoader[Any], Sampler[int]]:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("the training dataset is empty")
        if self.params.batch_size % self.world_size:
            raise ValueError(f"batch_size {self.params.batch_size} is the global batch and must be divisible by the "
                             f"number of processes ({self.world_size})")
        per_rank_batch = self.params.batch_size // self.world_size
        # Reseeded every epoch (_seed_epoch): the sampler order and worker seeds depend on (seed, epoch) only.
        self._sampler_generator = torch.Generator()
        self._loader_generator = torch.Generator()
        sampler: Sampler[int]
        if weights is not None:
            w = check_sampler_weights(weights)
            if len(w) != n:
                raise ValueError(f"sampler_weights has {len(w)} weights for a dataset of {n} items")
            if self.world_size > 1:
                sampler = DistributedWeightedSampler(w, seed=self.params.seed, num_samples=self.epoch_size)
            else:
                sampler = WeightedRandomSampler(w, num_samples=self.epoch_size or n, replacement=True,
                                                generator=self._sampler_generator)
        elif self.world_size > 1:
            sampler = DistributedSampler(dataset, shuffle=True, seed=self.params.seed)
        else:
            sampler = RandomSampler(dataset, generator=self._sampler_generator)
        loader = DataLoader(
            dataset,
            batch_size=per_rank_batch,
            sampler=sampler,
            num_workers=self.params.num_workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            # Full batches only (BatchNorm on a last batch of 1), unless the data does not fill a single batch.
            drop_last=len(sampler) >= per_rank_batch,  # type: ignore[arg-type]
            generator=self._loader_generator,
        )
        return loader, sampler

    def _seed_epoch(self, epoch: int) -> None:
        s = derive_seed(self.params.seed, epoch, self.rank)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        self._loader_generator.manual_seed(s)  # worker seeds (torch seeds each worker's random/numpy/torch from it)
        self._sampler_generator.manual_seed(derive_seed(self.params.seed, epoch))  # same order on every rank
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    # ----------------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------------

    def fit(self, resume: bool | None = None) -> dict[str, Any]:
        """Train for ``params.epochs`` (or until the time budget), write ``model.pt`` and return the result.

        Args:
            resume: Continue from ``out_dir/last.pt`` if it exists (``None``: the constructor's ``resume``).

        Returns:
            ``train_seconds`` (over all parts of a resumed run), ``epochs`` (completed), ``steps``,
            ``final_losses`` (mean of each loss term over the last epoch), ``metrics`` (the last evaluation;
            empty on ranks other than 0), ``stopped_early`` (time budget) and ``resumed_from_epoch`` (or ``None``).

        Raises:
            CheckpointError: ``last.pt`` is unreadable or belongs to another model, class list or params.
            FloatingPointError: The loss became NaN or infinite.
        """
        resume = self.resume if resume is None else resume
        last_path = self.out_dir / "last.pt"
        if is_main_process():  # a run killed while saving left a temp file; never read, but DVC would cache it
            for name in ("last.pt", "model.pt"):
                for tmp in remove_temp_files(self.out_dir / name):
                    logger.info("removed %s, left by a run killed while saving", tmp)
        start_epoch, step, seconds_before = 0, 0, 0.0
        losses: dict[str, float] = {}
        metrics: dict[str, float] = {}
        resumed_from: int | None = None
        if resume and last_path.is_file():
            start_epoch, step, seconds_before, losses, metrics = self._load_last(last_path)
            resumed_from = start_epoch
            logger.info("resuming %s at epoch %d/%d", last_path, start_epoch, self.params.epochs)

        budget = self.params.max_train_seconds
        epoch = start_epoch
        done = epoch >= self.params.epochs or (budget > 0 and seconds_before >= budget)
        live = self._open_live(resumed_from) if is_main_process() and not done else None
        t0 = time.perf_counter()
        while not done:
            losses = self._train_epoch(epoch)
            step += self.steps_per_epoch
            epoch += 1
            if self.world_size > 1:
                # Per-rank BatchNorm statistics (CPU) drift apart between DDP's per-forward broadcasts: end each
                # epoch with rank 0's buffers everywhere, in the model and in the EMA.
                broadcast_module(self.model, params=False)
                broadcast_module(self.ema, params=False)
            elapsed = seconds_before + time.perf_counter() - t0
            over_budget = all_reduce_mean({"over": float(budget > 0 and elapsed >= budget)}, self.device)["over"] > 0
            done = epoch >= self.params.epochs or over_budget
            evaluated: dict[str, float] = {}
            if self.evaluate_fn is not None and is_main_process() and (epoch % self.params.eval_every == 0 or done):
                evaluated = metrics = self._evaluate()
            if live is not None:
                self._log_epoch(live, losses, evaluated)
            if is_main_process():
                self._save_last(last_path, epoch, step, seconds_before + time.perf_counter() - t0, losses, metrics)
        train_seconds = seconds_before + time.perf_counter() - t0

        barrier()  # every rank has finished training before rank 0 writes the final outputs
        if is_main_process():
            self._save_final(epoch, step, train_seconds, losses, metrics)
            if live is not None:
                live.end()
        barrier()  # and model.pt exists for every rank once fit returns
        return {
            "train_seconds": train_seconds,
            "epochs": epoch,
            "steps": step,
            "final_losses": losses,
            "metrics": metrics if is_main_process() else {},
            "stopped_early": epoch < self.params.epochs,
            "resumed_from_epoch": resumed_from,
        }

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self._seed_epoch(epoch)
        self.model.train()
        if self.extra_modules is not None:
            self.extra_modules.train()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        images_seen, loss_total, t0 = 0, 0.0, time.perf_counter()
        bar = tqdm(self.loader, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.params.epochs}",
                   unit="batch", leave=True, dynamic_ncols=True, disable=not (self.progress and is_main_process()))
        with bar:
            for i, (images, targets) in enumerate(bar):
                images = images.to(self.device, non_blocking=True)  # [B, 3, S, S]
                targets = _to_device(targets, self.device)
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                    terms = self._losses(images, targets)
                loss = terms["loss"]
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    shown = {k: float(v.detach()) for k, v in terms.items()}
                    raise FloatingPointError(f"loss is {loss_value} at epoch {epoch + 1}, batch {i} (terms {shown}); "
                                             "lower the lr or check the targets")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.extra_modules is not None:
                    all_reduce_grads(self.extra_modules)
                if self.params.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self._trained_params, self.params.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.ema.update_parameters(self.model)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                    counts[key] = counts.get(key, 0) + 1
                images_seen += images.shape[0] * self.world_size
                loss_total += loss_value
                bar.set_postfix(loss=f"{loss_total / (i + 1):.4f}",  # running mean over the epoch (this rank)
                                img_s=f"{images_seen / (time.perf_counter() - t0):.1f}", refresh=False)
        means = {k: float(sums[k].item()) / counts[k] for k in sorted(sums)}
        return all_reduce_mean(means, self.device)

    def _losses(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.loss_fn is not None:
            terms = self.loss_fn(self.net, images, targets)
        else:
            outputs = self.net(images)
            terms = self.model.loss(outputs, targets, det_weight=self.params.det_loss_weight,  # type: ignore[operator]
                                    seg_weight=self.params.seg_loss_weight)
        if "loss" not in terms:
            raise ValueError(f"the loss dict has no 'loss' key to back-propagate (keys: {sorted(terms)})")
        return {k: torch.as_tensor(v) for k, v in terms.items()}

    def _evaluate(self) -> dict[str, float]:
        module = self.ema.module
        module.eval()
        with torch.no_grad():
            return flatten_metrics(self.evaluate_fn(module))  # type: ignore[misc]

    # ----------------------------------------------------------------------------------------------------------
    # Logging and checkpoints
    # ----------------------------------------------------------------------------------------------------------

    def _open_live(self, resumed_from: int | None) -> Live:
        resuming = resumed_from is not None
        if resuming:
            _truncate_dvclive_history(self.log_dir, resumed_from)  # type: ignore[arg-type]
        live = Live(dir=str(self.log_dir), resume=resuming, save_dvc_exp=False, dvcyaml=None)
        # DVCLive's resume continues at the step in metrics.json + 1, except after step 0, which it repeats
        # (live.py, _init_resume: `if self._step != 0: self._step += 1`); the step is the epoch index, set it.
        live.step = resumed_from or 0
        live.log_params({"train": dataclasses.asdict(self.params)})
        return live

    def _log_epoch(self, live: Live, losses: Mapping[str, float], metrics: Mapping[str, float]) -> None:
        for key, value in losses.items():
            live.log_metric(f"train/{key}", value, plot=True)
        live.log_metric("train/lr", self.scheduler.get_last_lr()[0], plot=True)
        for key, value in metrics.items():
            live.log_metric(f"eval/{key}", value, plot=True)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in {**losses, **metrics}.items())
        logger.info("epoch %d/%d: %s", live.step + 1, self.params.epochs, shown)
        live.next_step()

    def _save_last(self, path: Path, epoch: int, step: int, seconds: float, losses: Mapping[str, float],
                   metrics: Mapping[str, float]) -> None:
        save_checkpoint(
            path,
            model_state=self.model.state_dict(),
            ema_state=self.ema.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            epoch=epoch,
            step=step,
            model_config=self.model_config,
            class_names=self.class_names,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
            extra={
                "rng": rng_state(),
                "extra_modules_state": None if self.extra_modules is None else self.extra_modules.state_dict(),
                "train_seconds": float(seconds),
                "params": dataclasses.asdict(self.params),
                "world_size": self.world_size,
                "steps_per_epoch": self.steps_per_epoch,
                "losses": dict(losses),
                "metrics": dict(metrics),
            },
        )

    def _load_last(self, path: Path) -> tuple[int, int, float, dict[str, float], dict[str, float]]:
        ckpt = load_checkpoint(path)
        check_compatible(ckpt, class_names=self.class_names, model_name=self.model_config.get("name"), path=path)
        if ckpt["model_config"] != self.model_config:
            raise CheckpointError(f"{path}: made for model config {ckpt['model_config']}, this run builds "
                                  f"{self.model_config}; start afresh (resume=False) or restore the config")
        extra = ckpt["extra"]
        saved = extra.get("params", {})
        current = dataclasses.asdict(self.params)
        changed = sorted(k for k in current if k not in RESUME_FREE_PARAMS and saved.get(k) != current[k])
        if changed:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise CheckpointError(f"{path}: training params changed since the checkpoint ({shown}); resuming would "
                                  "not continue the same run. Start afresh (resume=False) or restore them")
        if extra.get("steps_per_epoch") != self.steps_per_epoch:
            raise CheckpointError(f"{path}: {extra.get('steps_per_epoch')} steps per epoch when saved, "
                                  f"{self.steps_per_epoch} now (dataset size, batch size or process count changed)")
        if extra.get("world_size") != self.world_size:
            logger.warning("%s was written by %s processes, resuming with %d: the data order differs from an "
                           "uninterrupted run", path, extra.get("world_size"), self.world_size)
        if (extra.get("extra_modules_state") is None) != (self.extra_modules is None):
            where = "the checkpoint" if self.extra_modules is None else "this run"
            raise CheckpointError(f"{path}: extra modules (adapters) are present in {where} only")
        self.model.load_state_dict(ckpt["model_state"])
        self.ema.load_state_dict(ckpt["ema_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        if self.extra_modules is not None:
            self.extra_modules.load_state_dict(extra["extra_modules_state"])
        set_rng_state(extra["rng"])
        return (int(ckpt["epoch"]), int(ckpt["step"]), float(extra.get("train_seconds", 0.0)),
                dict(extra.get("losses", {})), dict(extra.get("metrics", {})))

    def _save_final(self, epoch: int, step: int, seconds: float, losses: Mapping[str, float],
                    metrics: Mapping[str, float]) -> None:
        path = self.out_dir / "model.pt"
        save_checkpoint(
            path,
            model_state=self.ema.module.state_dict(),
            model_config=self.model_config,
            class_names=self.class_names,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
            epoch=epoch,
            step=step,
            extra={"train_seconds": float(seconds), "params": dataclasses.asdict(self.params),
                   "losses": dict(losses), "metrics": dict(metrics), "weights": "ema"},
        )
        if self.build_fn is not None:
            load_model(path, self.build_fn, class_names=self.class_names)  # raises if model.pt does not rebuild


def _normalisation(model: nn.Module, name: str, given: Sequence[float] | None) -> list[float]:
    if given is not None:
        return [float(v) for v in given]
    buf = getattr(model, name, None)
    if isinstance(buf, torch.Tensor) and buf.numel() == 3:
        return [float(v) for v in buf.flatten().tolist()]
    raise ValueError(f"{type(model).__name__} has no 3-value `{name}` buffer; pass {name}=... so the checkpoint "
                     "records the normalisation the model expects")


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) target structure to ``device``; other values are kept."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _truncate_dvclive_history(log_dir: Path, keep_below: int) -> None:
    """Drop DVCLive metric rows with ``step >= keep_below`` (epochs that the resumed run will redo).

    DVCLive appends rows and has no API to remove them; its files are plain TSV with a ``step`` column
    (``dvclive/plots/metric.py``), rewritten here atomically.
    """
    metrics_dir = log_dir / "plots" / "metrics"
    if not metrics_dir.is_dir():
        return
    for tsv in sorted(metrics_dir.rglob("*.tsv")):
        with tsv.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            fields = reader.fieldnames or []
            rows = [row for row in reader if int(row["step"]) < keep_below]
        out = io.StringIO()
        writer = csv.DictWriter(out, fields, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(tsv, out.getvalue())
