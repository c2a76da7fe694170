"""Load a trained Scene3DModel from a checkpoint (no hydra, no pickle).

A checkpoint is what :mod:`scene3d.engine.checkpoint` writes: ``model.safetensors`` (trainable weights) and
``config.yaml`` (the resolved training config, whose ``model`` key is a :class:`PipelineConfig` dict).
``path`` may be the checkpoint dir, its ``checkpoints/`` parent or the run dir (the newest checkpoint is used).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from scene3d.engine.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from scene3d.models.pipeline import PipelineConfig, Scene3DModel
from scene3d.models.referring import ARCHITECTURE


class LoadedModel(NamedTuple):
    model: Scene3DModel
    config: dict       # the whole resolved training config
    step: int
    path: str


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model of a checkpoint's config and load its weights; the model is in eval mode."""
    if resolve_checkpoint(path) is None:
        raise CheckpointError(f"no checkpoint found at {path} (expected model.safetensors + config.yaml + meta.json)")
    ckpt = load_checkpoint(path, with_trainer_state=False)
    model_cfg = ckpt.config.get("model")
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{ckpt.path / 'config.yaml'}: no 'model' section to build the model from")
    referring = model_cfg.get("referring") or {}
    arch = referring.get("architecture", 1) if isinstance(referring, dict) else None
    if arch != ARCHITECTURE:
        raise CheckpointError(f"{ckpt.path / 'config.yaml'}: model architecture {arch} (1: the decoder read the words "
                              "through its own text encoder; 2: its sentence state at [SEG], after the answer); this "
                              f"scene3d builds architecture {ARCHITECTURE}, in which the words reach the decoder only "
                              "through the LLM, its sentence state read before the answer: retrain")
    try:
        config = PipelineConfig.from_dict(model_cfg)
    except TypeError as e:
        raise CheckpointError(f"{ckpt.path / 'config.yaml'}: bad model config ({e})") from e
    model = Scene3DModel(config)
    model.load_trainable_state_dict(ckpt.model_state)
    model.to(device).eval()
    return LoadedModel(model, ckpt.config, ckpt.step, str(ckpt.path))
