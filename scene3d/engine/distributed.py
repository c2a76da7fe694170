"""torchrun / DistributedDataParallel helpers.

``torchrun --nproc_per_node N -m scene3d.train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`init_distributed` reads
them, picks the backend (nccl with CUDA, gloo on CPU), sets the CUDA device of the process and returns a
:class:`DistEnv`. Without those variables (or with ``WORLD_SIZE=1``) everything runs as a single process and
no process group is created, so the same code path serves both.
"""

from __future__ import annotations

import datetime
import os
from typing import Mapping, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


class DistEnv(NamedTuple):
    """Where this process stands.

    ===========  ================================================================
    rank         global rank (0 .. world_size-1)
    world_size   number of processes (1 without torchrun)
    local_rank   rank on this node; selects the CUDA device
    device       ``cuda:<local_rank>`` with CUDA, else ``cpu``
    backend      "nccl" / "gloo" / "" (no process group)
    ===========  ================================================================
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(
    device: str | None = None, backend: str | None = None, timeout_s: float = 1800.0
) -> DistEnv:
    """Join the process group described by torchrun's environment variables (idempotent).

    ``device``: "cpu" / "cuda" / None (CUDA when available). ``backend``: None picks nccl for CUDA and
    gloo for CPU.
    """
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for CUDA but torch.cuda.is_available() is False")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return DistEnv(0, 1, local_rank, dev, "")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"WORLD_SIZE={world_size} but {var} is not set (start with torchrun)")
        kwargs = {}
        if use_cuda:
            kwargs["device_id"] = dev  # binds the group to this GPU, avoids a guessed device in barrier()
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s), **kwargs,
        )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of the run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``env.device``); the model itself if single."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def all_reduce_mean(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar over ranks (keys must be the same on every rank, in the same order)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_objects(obj):
    """Every rank's ``obj`` as a list on every rank (small, json-able objects only)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
