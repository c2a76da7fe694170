"""Checkpoints without pickle: safetensors for tensors, json/yaml for everything else.

Layout of a run directory (``out_dir``)::

    out_dir/
      config.yaml                  resolved config given by the caller (also copied into every checkpoint)
      metrics.csv                  one row per logged step (train) or eval
      tb/                          TensorBoard event files
      loss_curves.png              written at the end of ``fit``
      checkpoints/
        latest                     text file naming the newest complete checkpoint dir ("step_00000040")
        step_00000020/             older ones kept per ``keep_last`` / ``keep_every``
        step_00000040/
          model.safetensors        trainable weights (``trainable_state_dict`` of the model)
          trainer_state.safetensors  tensors of optimizer / scheduler / grad scaler / torch RNG states
          trainer_state.json       the non-tensor part of those states (tensors referenced by key),
                                   step, epoch position, numpy + python RNG states (json lists)
          config.yaml              resolved config
          meta.json                format version, step, world size, file list

A checkpoint directory is written under a temporary name and renamed into place, and ``latest`` is
replaced atomically afterwards, so a process killed at any moment (``kill -9``) leaves either the previous
or the new checkpoint complete, never a half one. Loading reads only safetensors, json and yaml
(``yaml.safe_load``): nothing is unpickled.

Nested states (``optimizer.state_dict()`` and friends) are flattened by :func:`flatten_state`: every tensor
goes to safetensors under its path, everything else stays in a json tree. Non-str dict keys (the optimizer's
integer parameter ids) and tuples are tagged so that :func:`unflatten_state` rebuilds the exact structure.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scene3d.utils.io import write_text_atomic

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINTS_SUBDIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
STATE_TENSORS_FILE = "trainer_state.safetensors"
STATE_JSON_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
_STEP_DIR_RE = re.compile(r"^step_(\d+)$")

# json tags; a dict key starting with "__" would be ambiguous, so such dicts are stored tagged too
_T_TENSOR = "__tensor__"
_T_TUPLE = "__tuple__"
_T_ITEMS = "__items__"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the model / trainer it is loaded into."""


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns.

    ==============  =============================================================
    path            the checkpoint directory that was read
    step            optimizer steps done when it was saved
    model_state     ``{name: tensor}`` trainable weights (CPU tensors)
    trainer_state   nested dict (optimizer, scheduler, scaler, rng, position); ``{}`` if weights-only
    config          the resolved config dict (``{}`` if none was saved)
    meta            ``meta.json`` contents
    ==============  =============================================================
    """

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]
    config: dict[str, Any]
    meta: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# flatten / unflatten nested states (tensors -> safetensors, rest -> json)


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Return a json-able copy of ``obj`` with each tensor replaced by ``{"__tensor__": key}``.

    The tensors are added to ``tensors`` (detached, on CPU, contiguous) under keys derived from ``prefix``.
    Supported leaves: tensors, None, bool, int, float, str, numpy scalars/arrays (stored as tensors).
    """
    if isinstance(obj, torch.Tensor):
        key = prefix
        if key in tensors:
            raise CheckpointError(f"duplicate tensor key {key!r} while flattening state")
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {_T_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return flatten_state(torch.from_numpy(np.ascontiguousarray(obj)), prefix, tensors)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_T_TUPLE: [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
        if plain:
            return {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CheckpointError(f"cannot store dict key {k!r} ({type(k).__name__}) at {prefix!r}")
            items.append([k, flatten_state(v, f"{prefix}.{k}", tensors)])
        return {_T_ITEMS: items}
    raise CheckpointError(f"cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint")


def unflatten_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, val), = obj.items()
            if tag == _T_TENSOR:
                if val not in tensors:
                    raise CheckpointError(f"trainer state refers to missing tensor {val!r}")
                return tensors[val]
            if tag == _T_TUPLE:
                return tuple(unflatten_state(v, tensors) for v in val)
            if tag == _T_ITEMS:
                return {k: unflatten_state(v, tensors) for k, v in val}
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------------
# RNG states


def get_rng_state() -> dict[str, Any]:
    """torch (CPU + every CUDA device), numpy global and python ``random`` states; json/tensor leaves only."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": np_state[1].tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (after a round trip through a checkpoint)."""
    try:
        torch.set_rng_state(state["torch"].to(torch.uint8))
        n = state["numpy"]
        np.random.set_state(
            (n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"bad RNG state in checkpoint: {e}") from e
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda_states])


# ---------------------------------------------------------------------------------------------------------
# model weights


def _plain_config(config: Any) -> dict[str, Any]:
    """dict / OmegaConf DictConfig / dataclass -> plain dict for yaml (resolved interpolations)."""
    if config is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    except ImportError:  # omegaconf is a hydra dependency; the engine works without it
        pass
    import dataclasses

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise CheckpointError(f"resolved_config must be a dict, DictConfig or dataclass, got {type(config).__name__}")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
        else:
            return model


def select_trainable(model: torch.nn.Module, buffer: Callable[[str, set], bool] | None = None,
                     also: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The one rule for what a checkpoint stores: every parameter with ``requires_grad``, the persistent
    buffers that ``buffer(key, trainable_names)`` accepts (default: all of them) and the keys ``also`` accepts.
    A model's ``trainable_state_dict()`` hook calls it with its own ``buffer`` / ``also``."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items()
            if k in trainable or (k in buffers and (buffer is None or buffer(k, trainable)))
            or (also is not None and also(k))}


def load_selected(model: torch.nn.Module, state: Mapping[str, torch.Tensor], expected: set, source: str = "") -> None:
    """Load ``state`` into ``model`` after checking it: every ``expected`` key present, none the model lacks,
    every shape the model's. Nothing is loaded when a check fails (:class:`CheckpointError`)."""
    where = f" from {source}" if source else ""
    own = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"weights{where} do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"weights{where}: {k!r} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}")
    model.load_state_dict(dict(state), strict=False)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.trainable_state_dict()`` if defined, else :func:`select_trainable` with its defaults."""
    model = _unwrap(model)
    if hasattr(model, "trainable_state_dict"):
        return dict(model.trainable_state_dict())
    return select_trainable(model)


def load_trainable_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Load weights saved by :func:`trainable_state_dict` (the model's ``load_trainable_state_dict`` hook if
    defined, else :func:`load_selected`); every expected key must be present, none extra."""
    model = _unwrap(model)
    if hasattr(model, "load_trainable_state_dict"):
        model.load_trainable_state_dict(dict(state))
        return
    load_selected(model, state, set(trainable_state_dict(model)), source)


def _dedup_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights); store a copy of each alias."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            t = t.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[k] = t
    return out


# ---------------------------------------------------------------------------------------------------------
# save / load


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    trainer_state: Mapping[str, Any] | None = None,
    config: Any = None,
    extra_meta: Mapping[str, Any] | None = None,
    keep_last: int | None = 2,
    keep_every: int | None = None,
) -> Path:
    """Write ``ckpt_root/step_XXXXXXXX`` atomically, point ``ckpt_root/latest`` at it, prune old ones.

    ``keep_last``: how many of the newest step dirs to keep (None keeps all); ``keep_every``: also keep
    every step that is a multiple of it. Returns the checkpoint directory.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        save_file(_dedup_storage(dict(model_state)), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        files = [MODEL_FILE]
        if trainer_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            tree = flatten_state(dict(trainer_state), "state", tensors)
            save_file(_dedup_storage(tensors), str(tmp / STATE_TENSORS_FILE))
            (tmp / STATE_JSON_FILE).write_text(json.dumps({"step": step, "state": tree}) + "\n")
            files += [STATE_TENSORS_FILE, STATE_JSON_FILE]
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(_plain_config(config), sort_keys=False))
        meta = {"format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "files": files + [CONFIG_FILE]}
        meta.update(extra_meta or {})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():  # data on disk before the rename makes the directory visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if final.exists():  # the same step saved again (e.g. the final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST_FILE, final.name + "\n")
    _prune(root, keep_last, keep_every, protect=final.name)
    return final


def _remove_stale_tmp(root: Path) -> None:
    """Temporary dirs left by a process killed while saving."""
    for p in root.iterdir():
        if p.name.startswith(".step_") and p.name.endswith(".tmp") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step dirs under ``ckpt_root`` as sorted ``(step, path)``."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR_RE.match(p.name)
        if m and p.is_dir() and (p / META_FILE).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _prune(root: Path, keep_last: int | None, keep_every: int | None, protect: str) -> None:
    if keep_last is None:
        return
    ckpts = list_checkpoints(root)
    newest = {p.name for _, p in ckpts[-max(keep_last, 1):]}
    for step, p in ckpts:
        if p.name in newest or p.name == protect or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """A checkpoint dir from: a checkpoint dir, a ``checkpoints`` dir, or a run dir. None if there is none.

    ``latest`` is trusted when it names a complete dir; otherwise the highest complete step dir is used.
    """
    p = Path(path)
    if (p / META_FILE).exists():
        return p
    for root in (p / CHECKPOINTS_SUBDIR, p):
        latest = root / LATEST_FILE
        if latest.exists():
            cand = root / latest.read_text().strip()
            if (cand / META_FILE).exists():
                return cand
        ckpts = list_checkpoints(root)
        if ckpts:
            return ckpts[-1][1]
    return None


def load_checkpoint(path: str | os.PathLike, with_trainer_state: bool = True) -> Checkpoint:
    """Read a checkpoint (dir, ``checkpoints`` dir or run dir) without unpickling anything."""
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint found at {path}")
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / META_FILE}: unreadable ({e})") from e
    if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: checkpoint format {meta.get('format_version')!r} not supported")
    model_state = _load_safetensors(ckpt / MODEL_FILE)
    trainer_state: dict[str, Any] = {}
    if with_trainer_state and STATE_JSON_FILE in meta.get("files", []):
        tensors = _load_safetensors(ckpt / STATE_TENSORS_FILE)
        try:
            tree = json.loads((ckpt / STATE_JSON_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{ckpt / STATE_JSON_FILE}: unreadable ({e})") from e
        trainer_state = unflatten_state(tree["state"], tensors)
    config: dict[str, Any] = {}
    if (ckpt / CONFIG_FILE).exists():
        try:
            config = yaml.safe_load((ckpt / CONFIG_FILE).read_text()) or {}
        except yaml.YAMLError as e:
            raise CheckpointError(f"{ckpt / CONFIG_FILE}: bad yaml ({e})") from e
    return Checkpoint(ckpt, int(meta["step"]), model_state, trainer_state, config, meta)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> Checkpoint:
    """Load only the trainable weights of a checkpoint into ``model`` (for inference or a next stage)."""
    ckpt = load_checkpoint(path, with_trainer_state=False)
    load_trainable_state_dict(model, ckpt.model_state, source=str(ckpt.path))
    return ckpt


def write_config_yaml(path: str | os.PathLike, config: Any) -> None:
    write_text_atomic(path, yaml.safe_dump(_plain_config(config), sort_keys=False))
