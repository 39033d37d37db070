"""Training: prioritized multi-exit loss, backward gradient masking, and the resumable training loop."""

from dynadapter.train.losses import PrioritySchedule, as_logits_list, multi_exit_loss
from dynadapter.train.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from dynadapter.train.loop import (
    evaluate,
    fit,
    fit_resumable,
    FitResult,
    flatten_metrics,
    iterate_batches,
    NonFiniteLossError,
    num_batches,
    run_epoch,
    StepOutput,
    train_step,
)
from dynadapter.train.optim import (
    AdamWStrategy,
    build_optimizer,
    build_scheduler,
    param_groups,
    Strategy,
    warmup_cosine,
    warmup_steps_for,
)
from dynadapter.train.sparsity import BatchDropout, GradientMasker

__all__ = [
    "AdamWStrategy",
    "BatchDropout",
    "CheckpointMismatchError",
    "FitResult",
    "GradientMasker",
    "NonFiniteLossError",
    "PrioritySchedule",
    "StepOutput",
    "Strategy",
    "as_logits_list",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "fit",
    "fit_resumable",
    "flatten_metrics",
    "iterate_batches",
    "load_checkpoint",
    "load_trainable_state",
    "multi_exit_loss",
    "num_batches",
    "param_groups",
    "run_epoch",
    "save_checkpoint",
    "train_step",
    "trainable_state",
    "warmup_cosine",
    "warmup_steps_for",
]
