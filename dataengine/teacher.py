"""The ``train_teacher`` stage: train the multi-task teacher on general train and score it.

The teacher is evaluated on general val (its own domain) and, as a diagnostic, on the labelled scenario test set:
the gap between the two is the domain shift the rest of the engine exists to close.

Example:
    >>> from dataengine.config import load_params
    >>> params = load_params("params.yaml", ["teacher"]).teacher  # doctest: +SKIP
    >>> metrics = train_teacher(params, "data/prepared", "models/teacher", "dvclive/teacher")  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataengine.config import ModelParams, TeacherParams
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.dataset import CocoDetectionSegDataset, collate
from dataengine.data.layout import PreparedLayout
from dataengine.data.transforms import build_transforms
from dataengine.engine import Trainer
from dataengine.engine.checkpoint import CheckpointError, load_model
from dataengine.engine.distributed import is_main_process
from dataengine.engine.seeding import seed_everything
from dataengine.inference import evaluate_model
from dataengine.models import count_gflops, count_params_m, create_model

__all__ = ["adopt_teacher", "build_model", "train_teacher", "fit_resuming"]


def build_model(params: ModelParams, num_classes: int, *, segmentation: bool | None = None) -> Any:
    """Create the model named in ``params`` (``segmentation`` overrides the param, e.g. for box-only data)."""
    return create_model(
        params.name,
        num_classes=num_classes,
        input_size=params.input_size,
        width_mult=params.width_mult,
        neck_channels=params.neck_channels,
        detection=params.detection,
        segmentation=params.segmentation if segmentation is None else segmentation,
        pretrained=params.pretrained,
    )


def fit_resuming(make_trainer: Callable[[], Trainer], out_dir: str | Path, *, resume: bool) -> dict[str, Any]:
    """Fit, resuming from ``out_dir/last.pt`` when it belongs to this run; otherwise start again cleanly.

    DVC re-runs a stage when its code, data or params change, and ``last.pt`` persists across runs (so that a
    killed run can resume). Only an unfinished run is continued: the checkpoint of a finished run, of another
    configuration, or a corrupt one is set aside as ``last.pt.stale`` with a message, and training starts from
    scratch -- never silently continuing a different run.
    """
    last, final = Path(out_dir) / "last.pt", Path(out_dir) / "model.pt"
    if resume and last.exists() and final.exists() and final.stat().st_mtime >= last.stat().st_mtime:
        # The previous run finished (model.pt is written last). DVC re-runs a finished stage only because its code,
        # data or params changed, so continuing that run would silently keep the old weights: start again.
        print(f"previous run in {out_dir} finished; training from scratch (old checkpoint kept as last.pt.stale)",
              file=sys.stderr)
        if is_main_process():
            last.replace(last.with_name(last.name + ".stale"))
    try:
        return make_trainer().fit(resume=resume)
    except CheckpointError as err:
        if not (resume and last.exists()):
            raise
        print(f"not resuming: {err}; starting from scratch (old checkpoint kept as {last.name}.stale)",
              file=sys.stderr)
        if is_main_process():
            last.replace(last.with_name(last.name + ".stale"))
        return make_trainer().fit(resume=False)


def adopt_teacher(checkpoint: str | Path, out_dir: str | Path, class_names: list[str]) -> dict[str, Any]:
    """Use an existing checkpoint (e.g. a distilled student) as the teacher: checked, then copied to ``model.pt``.

    The next round of the loop then pseudo-labels, filters, mines and distils with it (noisy-student style: the
    student of round ``n`` is the teacher of round ``n + 1``). The copy is atomic; ``last.pt`` is removed so that a
    later training run does not resume from another model's state.

    Raises:
        CheckpointError: Unreadable, not a dataengine checkpoint, or made for other classes (named).
    """
    import hashlib

    from dataengine.io import atomic_write

    source = Path(checkpoint)
    load_model(source, lambda config: create_model(**config), class_names=class_names)  # validates; weights_only
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    with atomic_write(out / "model.pt", "wb") as fh:
        fh.write(data)
    (out / "last.pt").unlink(missing_ok=True)
    print(f"train_teacher: adopted {source} as the teacher (no training)", file=sys.stderr)
    return {"train_seconds": 0.0, "epochs": 0, "adopted_from": {"path": str(source),
                                                                "sha256": hashlib.sha256(data).hexdigest()}}


def train_teacher(
    params: TeacherParams,
    data_root: str | Path,
    out_dir: str | Path,
    log_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the teacher and return ``metrics/teacher.json``'s content (only meaningful on rank 0).

    Segmentation is switched off automatically when the general set has no masks (e.g. BCCD), with a note in
    the metrics, so one params file serves box-only data too.
    """
    layout = PreparedLayout(data_root)
    train_coco = load_coco(layout.general_train)
    cats = CategoryMap.from_coco(train_coco)
    size = params.model.input_size
    train_set = CocoDetectionSegDataset(train_coco, layout.general_images, build_transforms(params.augment, size, True),
                                        categories=cats)
    segmentation = params.model.segmentation and train_set.has_masks
    val_coco = load_coco(layout.general_val)

    def evaluate(m: Any) -> dict[str, float]:
        scores = evaluate_model(m, val_coco, layout.general_images, input_size=size)
        return {k: v for k, v in scores.items() if isinstance(v, float)}

    def make_trainer() -> Trainer:
        seed_everything(params.train.seed)  # the initial weights are drawn before the trainer seeds its epochs
        model = build_model(params.model, len(cats), segmentation=segmentation)
        n = params.epoch_size
        uniform = {"sampler_weights": [1.0] * len(train_set), "epoch_size": n} if n else {}
        return Trainer(model, train_set, params.train, out_dir, collate_fn=collate, evaluate_fn=evaluate,
                       class_names=list(cats.names), input_size=size, log_dir=log_dir, progress=progress,
                       build_fn=lambda config: create_model(**config), **uniform)

    start = time.perf_counter()
    if params.checkpoint:
        result = adopt_teacher(params.checkpoint, out_dir, list(cats.names))
    else:
        result = fit_resuming(make_trainer, out_dir, resume=resume)
    if not is_main_process():
        return {}
    if result.get("resumed_from_epoch") is not None:
        print(f"train_teacher: resumed from the checkpoint of epoch {result['resumed_from_epoch']}", file=sys.stderr)
    final, _ = load_model(Path(out_dir) / "model.pt", lambda config: create_model(**config),
                          class_names=list(cats.names))
    size = int(getattr(final, "input_size", size))  # an adopted checkpoint brings its own input size
    metrics: dict[str, Any] = {
        "general_val": evaluate_model(final, val_coco, layout.general_images, input_size=size, progress=progress),
        "params_m": round(count_params_m(final), 3),
        "gflops": round(count_gflops(final, size), 4),
        "train_seconds": round(float(result.get("train_seconds", time.perf_counter() - start)), 1),
        "epochs": result.get("epochs"),
        "steps": result.get("steps"),
        "images_per_epoch": params.epoch_size or len(train_set),
        "segmentation": bool(getattr(final, "segmentation", segmentation)),
        "model": getattr(final, "name", params.model.name),
    }
    if params.checkpoint:
        metrics["adopted_from"] = result["adopted_from"]
    if layout.test_json.exists():
        metrics["scenario_test"] = evaluate_model(final, load_coco(layout.test_json), layout.test_images,
                                                  input_size=size, progress=progress)
    return metrics
