"""Checkpoints of a :class:`ReferringSegmenter`: trainable weights as safetensors + the config as json.

A checkpoint directory holds

* ``trainable.safetensors`` — every parameter with ``requires_grad`` (LoRA A/B, the new-token tables
  ``lm.new_embed`` / ``lm.new_head``, projector, decoder, an ``nn.Module`` gate), keyed by parameter name;
* ``config.json`` — :meth:`ReferringConfig.to_dict` plus a format version.

The frozen base LLM is not copied: it is reloaded from ``config.llm.path`` (a local directory) or, for the
tiny model, rebuilt from its seed. Loading never unpickles (safetensors + json only) and checks that the
stored names and shapes match the model's trainable parameters exactly. Both files are written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from scene3d.models.referring import ReferringConfig, ReferringSegmenter
from scene3d.utils.io import atomic_path, write_json_atomic

CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS_FILE = "trainable.safetensors"
CONFIG_FILE = "config.json"


def trainable_state_dict(model: torch.nn.Module) -> dict:
    """``{name: tensor}`` of the parameters that train (contiguous CPU copies)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(model: ReferringSegmenter, path: str | os.PathLike) -> Path:
    """Write ``trainable.safetensors`` and ``config.json`` into directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(trainable_state_dict(model), str(tmp), metadata={"format_version": str(CHECKPOINT_FORMAT_VERSION)})
    write_json_atomic(path / CONFIG_FILE, {"format_version": CHECKPOINT_FORMAT_VERSION,
                                           "config": model.config.to_dict()})
    return path


def read_config(path: str | os.PathLike) -> ReferringConfig:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint config {file} not found")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt checkpoint config {file}: {e}") from e
    if data.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {data.get('format_version')} != {CHECKPOINT_FORMAT_VERSION}")
    return ReferringConfig.from_dict(data["config"])


def load_trainable(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy the stored trainable weights into ``model``; names and shapes must match exactly."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint weights {file} not found")
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises its own error type on a truncated / corrupt header
        raise ValueError(f"corrupt checkpoint weights {file}: {e}") from e
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            if state[n].shape != p.shape:
                raise ValueError(f"{file}: {n} has shape {tuple(state[n].shape)}, model wants {tuple(p.shape)}")
            p.copy_(state[n].to(p.dtype))


def load_checkpoint(path: str | os.PathLike, gate: Optional[torch.nn.Module] = None) -> ReferringSegmenter:
    """Rebuild the model from ``config.json`` (base LLM from its local path) and load the trainable weights."""
    model = ReferringSegmenter(read_config(path), gate=gate)
    load_trainable(model, path)
    model.eval()
    return model
