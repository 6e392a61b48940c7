"""One training engine for teacher, students and baselines: trainer, checkpoints, EMA, schedules, DDP helpers.

Example:
    >>> from dataengine.engine import Trainer, load_checkpoint
    >>> trainer = Trainer(model, train_set, params, "models/teacher", collate_fn=collate,
    ...                   class_names=names, input_size=128)  # doctest: +SKIP
    >>> result = trainer.fit(resume=True)  # doctest: +SKIP
    >>> load_checkpoint("models/teacher/model.pt")["class_names"] == names  # doctest: +SKIP
    True
"""

from dataengine.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from dataengine.engine.distributed import (
    DistributedWeightedSampler,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    unwrap_model,
)
from dataengine.engine.ema import create_ema
from dataengine.engine.schedule import build_optimizer, build_scheduler, param_groups
from dataengine.engine.seeding import seed_everything
from dataengine.engine.trainer import RESUME_FREE_PARAMS, EvaluateFn, LossFn, Trainer

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "DistributedWeightedSampler",
    "EvaluateFn",
    "LossFn",
    "RESUME_FREE_PARAMS",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "check_compatible",
    "cleanup",
    "create_ema",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "load_model",
    "param_groups",
    "save_checkpoint",
    "seed_everything",
    "unwrap_model",
]
