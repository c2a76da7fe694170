"""Training engine: the loop (:mod:`.trainer`), pickle-free checkpoints (:mod:`.checkpoint`), torchrun/DDP
helpers (:mod:`.distributed`). Model-agnostic: see ``docs/training_engine.md``."""

from scene3d.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from scene3d.engine.distributed import DistEnv, init_distributed
from scene3d.engine.trainer import (FitSummary, LinearWarmupCosine, StepBudget, Trainer, TrainerConfig,
                                    seed_everything)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DistEnv",
    "FitSummary",
    "LinearWarmupCosine",
    "StepBudget",
    "Trainer",
    "TrainerConfig",
    "init_distributed",
    "load_checkpoint",
    "load_model_weights",
    "resolve_checkpoint",
    "save_checkpoint",
    "seed_everything",
]
