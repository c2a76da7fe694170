"""A model-agnostic training loop: AdamW + warmup/cosine, accumulation, clipping, AMP, DDP, exact resume.

The model contract (nothing else is assumed)::

    out = model(batch)          # batch = collate_fn(list of dataset items), moved to the device
    out["loss"]                 # scalar tensor to minimise (mean-reduced over the micro-batch)
    out[k]                      # any other scalar (0-dim tensor / number) is averaged and logged

Optional model methods: ``trainable_state_dict()`` / ``load_trainable_state_dict(sd)`` choose what a
checkpoint stores (default: parameters with ``requires_grad`` + buffers), ``optim_param_groups()`` returns
AdamW param groups (default: weight decay on tensors with ndim >= 2 only). The optimizer only ever sees
parameters with ``requires_grad``.

Typical use (what ``scene3d/train.py`` does)::

    seed_everything(cfg.trainer.seed)          # before building the model: same init on every run
    model, train_set, collate = build(cfg)
    summary = Trainer(TrainerConfig(**cfg.trainer), model, train_set, collate,
                      eval_fn=evaluate, out_dir=run_dir, resolved_config=cfg).fit(resume=cfg.resume)

Exact resume: the data order is a function of (seed, epoch) only (``DistributedSampler`` permutation,
DataLoader worker seeds from a per-epoch generator), and the checkpoint stores the position in the epoch,
optimizer / scheduler / grad-scaler state and every RNG state; so a run killed after a checkpoint and
resumed reaches bit-identical weights on CPU. Caveat: random augmentations drawn inside DataLoader workers
(``num_workers > 0``) restart their worker RNG streams at the resume point; derive them from the sample
index for exactness.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, default_collate
from tqdm.auto import tqdm

from scene3d.engine import checkpoint as ckpt_mod
from scene3d.engine.distributed import (
    DistEnv,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    is_distributed,
    wrap_ddp,
)
from scene3d.utils.io import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainerConfig:
    """Training loop settings (a hydra structured-config schema: plain types, no catch-alls).

    Steps count optimizer updates; one step consumes ``grad_accum`` micro-batches of ``batch_size``
    samples per process, so the global batch is ``batch_size * grad_accum * world_size``.
    """

    max_steps: int = 1000
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    grad_clip: Optional[float] = 1.0  # max global L2 grad norm; None or 0 disables clipping
    lr: float = 1e-4
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    schedule: str = "cosine"  # cosine | constant (after warmup)
    precision: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    device: Optional[str] = None  # None: cuda if available else cpu
    seed: int = 0
    deterministic: Optional[bool] = None  # None: on for CPU, off for CUDA
    shuffle: bool = True
    drop_last: bool = True
    num_workers: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    keep_last: int = 2  # newest checkpoints kept (0: keep all)
    keep_every: int = 0  # also keep every step that is a multiple of this (0: none)
    eval_every: int = 0  # 0: only at the end (if an eval_fn is given)
    progress: bool = True  # tqdm bar (rank 0)
    tensorboard: bool = True
    find_unused_parameters: bool = False  # DDP option for models with conditionally used parameters
    init_from: Optional[str] = None  # weights of an earlier stage (checkpoint/run dir), ignored on resume
    #: wall-clock seconds for this fit's steps (0: off). The loop then plans its step count from its own
    #: measured pace (:class:`StepBudget`): after a few steps, and again as it goes, the cosine schedule's
    #: end is moved to the step the budget reaches (never past ``max_steps``), and it stops when the time is
    #: up. For benchmarks under a time limit; such a run is not step-for-step reproducible.
    time_budget_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "log_every", "ckpt_every", "keep_last", "keep_every",
                     "eval_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TrainerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"TrainerConfig.precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"TrainerConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainerConfig.lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"TrainerConfig.grad_clip must be >= 0 or None, got {self.grad_clip}")
        if not (self.time_budget_s >= 0 and math.isfinite(self.time_budget_s)):
            raise ValueError(f"TrainerConfig.time_budget_s must be >= 0 seconds, got {self.time_budget_s}")


class StepBudget:
    """Plans the number of steps that fit a wall-clock budget from the loop's own pace.

    ``plan(step, elapsed)`` is called after steps ``first, 2 * first, 4 * first, ...`` (doubling, so the
    schedule moves early and rarely): the pace is measured over the steps since the first check (the first
    steps carry one-off costs: allocator warm-up, first batches), and the end is put where the remaining time
    at that pace runs out, less ``reserve_s`` (the final checkpoint) — capped by ``max_steps``, never before the
    next step. ``out_of_time(elapsed)`` is the hard stop. Steps and time count from the start of this fit (a
    resumed run: from its checkpoint's step)."""

    def __init__(self, budget_s: float, max_steps: int, first: int = 16, reserve_s: float = 5.0) -> None:
        self.budget_s, self.max_steps, self.reserve_s = float(budget_s), int(max_steps), float(reserve_s)
        self.next_check, self.ref = int(first), None  # (step, elapsed) at the first check

    def due(self, step: int) -> bool:
        return step >= self.next_check

    def plan(self, step: int, elapsed: float) -> int:
        self.next_check = 2 * max(step, 1)
        if self.ref is None or step <= self.ref[0]:
            pace = elapsed / max(step, 1)
            if self.ref is None:
                self.ref = (step, elapsed)
        else:
            pace = (elapsed - self.ref[1]) / (step - self.ref[0])
        left = self.budget_s - self.reserve_s - elapsed
        return max(step + 1, min(self.max_steps, step + int(left / max(pace, 1e-9))))

    def out_of_time(self, elapsed: float) -> bool:
        return elapsed >= self.budget_s - self.reserve_s


class FitSummary(NamedTuple):
    """What :meth:`Trainer.fit` returns (paths are None on ranks other than 0 or when not written)."""

    step: int
    train_metrics: dict[str, float]  # last logged train row (loss, lr, grad_norm, samples_per_s, ...)
    eval_metrics: dict[str, float]  # last eval (empty without eval_fn)
    out_dir: Path
    checkpoint: Optional[Path]
    metrics_csv: Optional[Path]
    tensorboard_dir: Optional[Path]
    plot: Optional[Path]
    resumed_from: Optional[Path]


# ---------------------------------------------------------------------------------------------------------
# seeding, precision, schedule


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LinearWarmupCosine:
    """LR multiplier for ``LambdaLR``; an object (not a lambda) so its settings travel in the state dict.

    For the update with index ``s`` (0-based): ``(s+1)/W`` while ``s < W``; then
    ``m + (1-m) * (1 + cos(pi * (s-W) / (T-W))) / 2`` (cosine) or ``1`` (constant), with W warmup steps,
    T total steps and m = ``min_ratio``.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, cosine: bool = True):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)
        self.cosine = bool(cosine)

    def __call__(self, s: int) -> float:
        if s < self.warmup_steps:
            return (s + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        progress = min(1.0, (s - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``precision`` on ``device`` (None: full fp32)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type != "cuda":
        raise ValueError("precision='fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
    return torch.float16


def build_param_groups(model: torch.nn.Module, weight_decay: float, lr: Optional[float] = None) -> list[dict[str, Any]]:
    """AdamW param groups over parameters with ``requires_grad`` only.

    ``model.optim_param_groups()`` wins when defined; else weight decay goes to matrices/conv kernels
    (ndim >= 2) and not to biases / norm scales (the usual practice), and ``model.lr_scales()`` (when defined:
    ``{name prefix: factor}``) gives the parameters under a prefix ``lr * factor``.
    """
    if hasattr(model, "optim_param_groups"):
        groups = []
        for g in model.optim_param_groups():
            g = dict(g)
            g["params"] = [p for p in g["params"] if p.requires_grad]
            if g["params"]:
                groups.append(g)
    else:
        # model.lr_scales(): {parameter-name prefix: factor on the learning rate} (e.g. a pretrained part that
        # should move slowly, or 0: not at all); every other parameter gets the trainer's lr
        scales = dict(model.lr_scales()) if hasattr(model, "lr_scales") else {}
        by_key: dict = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = next((v for k, v in scales.items() if name.startswith(k)), 1.0)
                by_key.setdefault((p.ndim >= 2, float(scale)), []).append(p)
        groups = []
        for (decays, scale), params in sorted(by_key.items(), key=lambda kv: (not kv[0][0], -kv[0][1])):
            g = {"params": params, "weight_decay": weight_decay if decays else 0.0}
            if scale != 1.0:
                if lr is None:
                    raise ValueError("model.lr_scales() needs the base learning rate (build_param_groups(lr=))")
                g["lr"] = lr * scale
            groups.append(g)
    if not groups:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    return groups


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Tensors anywhere in dicts / lists / tuples / NamedTuples / dataclasses / objects with ``.to``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: move_to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)
                    if f.init}
        )
    to = getattr(obj, "to", None)
    if callable(to) and not isinstance(obj, (str, bytes)):
        return to(device)
    return obj


def _scalar(v: Any) -> Optional[float]:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float()) if v.numel() == 1 else None
    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        return float(v)
    return None


# ---------------------------------------------------------------------------------------------------------
# data


class _CountingCollate:
    """Wraps a collate_fn so each batch comes with its number of samples (for throughput)."""

    def __init__(self, fn: Optional[Callable]):
        self.fn = fn if fn is not None else default_collate

    def __call__(self, samples: list) -> tuple[int, Any]:
        return len(samples), self.fn(samples)


class _BatchStream:
    """Endless micro-batches in an order fixed by (seed, epoch); resumable at (epoch, batch_in_epoch).

    Map-style datasets: ``DistributedSampler`` (also for one process) gives the epoch's permutation and this
    rank's share; batches are cut from it, so skipping to a position costs nothing. Iterable datasets are
    read in their own order and skipped batch by batch on resume (they must shard themselves under DDP).
    """

    def __init__(self, data, collate_fn, cfg: TrainerConfig, env: DistEnv, epoch: int = 0, batch_in_epoch: int = 0):
        if isinstance(data, DataLoader):
            raise ValueError("train_data must be a Dataset or IterableDataset, not a DataLoader: the trainer "
                             "builds its own loader (sampler, seeds, resume position)")
        self.iterable = isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__"))
        if not self.iterable and len(data) == 0:
            raise ValueError("train_data is empty")
        self.data, self.cfg, self.env = data, cfg, env
        self.collate = _CountingCollate(collate_fn)
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._it: Optional[Iterator] = None

    def _epoch_batches(self) -> list[list[int]]:
        cfg = self.cfg
        sampler = DistributedSampler(self.data, num_replicas=self.env.world_size, rank=self.env.rank,
                                     shuffle=cfg.shuffle, seed=cfg.seed, drop_last=cfg.drop_last)
        sampler.set_epoch(self.epoch)
        idx = list(sampler)
        bs = cfg.batch_size
        batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        if cfg.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        if not batches:
            raise ValueError(f"train_data has {len(self.data)} samples: not one full batch of batch_size={bs} "
                             f"per process (world_size={self.env.world_size}); lower batch_size or set drop_last=False")
        return batches

    def _open_epoch(self) -> Iterator:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch)  # worker seeds; spares global RNG
        common = dict(collate_fn=self.collate, num_workers=cfg.num_workers, generator=gen,
                      pin_memory=self.env.device.type == "cuda")
        if self.iterable:
            loader = DataLoader(self.data, batch_size=cfg.batch_size, drop_last=cfg.drop_last, **common)
            it = iter(loader)
            for _ in range(self.batch_in_epoch):
                next(it)
            return it
        batches = self._epoch_batches()
        if self.batch_in_epoch >= len(batches):
            raise ValueError(f"resume position {self.batch_in_epoch} is past the {len(batches)} batches of an "
                             "epoch: the dataset or batch size changed since the checkpoint")
        return iter(DataLoader(self.data, batch_sampler=batches[self.batch_in_epoch:], **common))

    def next(self) -> tuple[int, Any]:
        """(number of samples, collated batch)."""
        for _ in range(2):
            if self._it is None:
                self._it = self._open_epoch()
            try:
                item = next(self._it)
            except StopIteration:
                if self.batch_in_epoch == 0:
                    raise ValueError("train_data yielded no batch in a whole epoch") from None
                self._it, self.epoch, self.batch_in_epoch = None, self.epoch + 1, 0
                continue
            self.batch_in_epoch += 1
            return item
        raise AssertionError("unreachable")

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


# ---------------------------------------------------------------------------------------------------------
# metric sinks


class _CsvLog:
    """Wide CSV (one row per log event); the header grows when new keys appear (file rewritten atomically)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.header: list[str] = []

    def load(self, upto_step: int) -> None:
        """Keep the rows of an earlier run up to ``upto_step`` (rows after the resumed checkpoint are dropped)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    if int(row["step"]) <= upto_step:
                        self.rows.append({k: v for k, v in row.items() if v not in ("", None)})
                except (KeyError, TypeError, ValueError):
                    continue  # a torn last line of a killed run
        self._rewrite()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if all(k in self.header for k in row) and self.path.exists():
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.header).writerow(row)
        else:
            self._rewrite()

    def _rewrite(self) -> None:
        for row in self.rows:
            for k in row:
                if k not in self.header:
                    self.header.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.header)
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.rows:
            if r.get("split") == split and r.get(key) not in (None, ""):
                xs.append(int(r["step"]))
                ys.append(float(r[key]))
        return xs, ys


def plot_loss_curves(csv_log: _CsvLog, path: Path) -> Optional[Path]:
    """PNG of every train column whose name contains "loss", and the eval loss; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    keys = [k for k in csv_log.header if "loss" in k]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for split, style in (("train", "-"), ("eval", "o--")):
        for k in keys:
            xs, ys = csv_log.series(split, k)
            if xs:
                ax.plot(xs, ys, style, label=f"{split}/{k}", markersize=3)
                drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ---------------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``model`` on ``train_data``; see the module docstring.

    ``eval_fn(model, step) -> {name: float}`` runs on every rank with the unwrapped model in eval mode under
    ``torch.no_grad`` (reduce across ranks yourself if you split the eval set), every ``eval_every`` steps
    and at the end. ``on_checkpoint(step, path)`` runs on rank 0 after each checkpoint is complete.
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        model: torch.nn.Module,
        train_data: Dataset | IterableDataset,
        collate_fn: Optional[Callable[[list], Any]] = None,
        eval_fn: Optional[Callable[[torch.nn.Module, int], Mapping[str, float]]] = None,
        out_dir: str | os.PathLike = "runs/train",
        resolved_config: Any = None,
        on_checkpoint: Optional[Callable[[int, Path], None]] = None,
    ):
        if not isinstance(cfg, TrainerConfig):
            cfg = TrainerConfig(**dict(cfg))  # a hydra DictConfig / dict with the same fields
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.cfg = cfg
        self.model = model
        self.train_data = train_data
        self.collate_fn = collate_fn
        self.eval_fn = eval_fn
        self.out_dir = Path(out_dir)
        self.resolved_config = resolved_config
        self.on_checkpoint = on_checkpoint

    # -- public -----------------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitSummary:
        """Train to ``cfg.max_steps``. ``resume=True`` continues from ``out_dir``'s latest checkpoint if any."""
        owns_pg = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        env = init_distributed(self.cfg.device)
        det_prev = (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled())
        try:
            self._setup_determinism(env)
            return self._fit(env, resume)
        finally:
            torch.use_deterministic_algorithms(det_prev[0], warn_only=det_prev[1])
            if owns_pg:
                cleanup()

    # -- internals --------------------------------------------------------------------------------------

    def _setup_determinism(self, env: DistEnv) -> None:
        det = self.cfg.deterministic
        if det is None:
            det = env.device.type == "cpu"
        if det:
            if env.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
            # warn_only: an op without a deterministic kernel warns instead of stopping a long run
            torch.use_deterministic_algorithms(True, warn_only=True)

    def _fit(self, env: DistEnv, resume: bool) -> FitSummary:
        """The loop, top-down: build, restore, open the logs, then step / budget / log / eval / save."""
        seed_everything(self.cfg.seed + env.rank)
        run = self._build(env)
        self._restore(run, resume)
        run.ddp_model = wrap_ddp(run.model, env, self.cfg.find_unused_parameters)
        run.stream = _BatchStream(self.train_data, self.collate_fn, self.cfg, env, run.epoch, run.batch_in_epoch)
        self._open_logs(run)
        barrier()
        self._start_clock(run)
        run.model.train()
        try:
            while run.step < run.last_step:
                self._train_step(run)
                self._follow_budget(run)
                self._log_train(run)
                if self.cfg.eval_every and run.step % self.cfg.eval_every == 0 and run.step < run.last_step:
                    run.last_eval = self._eval(run)
                if self.cfg.ckpt_every and run.step % self.cfg.ckpt_every == 0:
                    run.last_ckpt, run.saved_at = self._save(run), run.step
            if run.saved_at != run.step:
                run.last_ckpt = self._save(run)
            if self.eval_fn is not None:
                run.last_eval = self._eval(run)
        finally:
            run.pbar.close()
            if run.writer is not None:
                run.writer.close()
        return self._summary(run)

    # -- the parts of _fit, in the order it calls them ---------------------------------------------------

    def _lr_fn(self) -> LinearWarmupCosine:
        cfg = self.cfg
        return LinearWarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule == "cosine")

    def _build(self, env: DistEnv) -> _Run:
        """Model on the device, AdamW, the LR schedule and (fp16 only) the grad scaler."""
        cfg = self.cfg
        model = self.model.to(env.device)
        amp_dtype = resolve_precision(cfg.precision, env.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(build_param_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_fn())
        scaler = torch.amp.GradScaler(env.device.type) if amp_dtype == torch.float16 else None
        return _Run(env=env, model=model, amp_dtype=amp_dtype, params=params, optimizer=optimizer,
                    scheduler=scheduler, scaler=scaler, ckpt_root=self.out_dir / ckpt_mod.CHECKPOINTS_SUBDIR,
                    last_step=cfg.max_steps)

    def _restore(self, run: _Run, resume: bool) -> None:
        """Continue from the latest checkpoint (``resume``), else start from ``cfg.init_from``'s weights if set."""
        main = run.env.is_main
        if resume and ckpt_mod.resolve_checkpoint(run.ckpt_root) is not None:
            self._resume(run, ckpt_mod.load_checkpoint(run.ckpt_root))
            if main:
                log.info("resumed from %s at step %d", run.resumed_from, run.step)
        elif resume and main:
            log.info("resume=True but no checkpoint under %s: starting from scratch", run.ckpt_root)
        if run.resumed_from is None and self.cfg.init_from:
            ck = ckpt_mod.load_model_weights(run.model, self.cfg.init_from)
            if main:
                log.info("initialised trainable weights from %s", ck.path)

    def _resume(self, run: _Run, ck) -> None:
        """Weights, optimizer / scheduler / scaler state, data position and RNG state of checkpoint ``ck``."""
        env, optimizer, scheduler = run.env, run.optimizer, run.scheduler
        ckpt_mod.load_trainable_state_dict(run.model, ck.model_state, source=str(ck.path))
        st = ck.trainer_state
        if not st:
            raise ckpt_mod.CheckpointError(f"{ck.path} holds no trainer state: cannot resume from it")
        try:
            optimizer.load_state_dict(st["optimizer"])
            scheduler.load_state_dict(st["scheduler"])
            # the schedule follows the current config (e.g. a longer max_steps), not the saved one; with
            # an unchanged config this recomputes the very same values (LambdaLR's own formula). A fresh
            # object: LambdaLR.load_state_dict wrote the saved settings into the old one's __dict__.
            lr_fn = self._lr_fn()
            scheduler.lr_lambdas = [lr_fn] * len(optimizer.param_groups)
            for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
                g["lr"] = base * lr_fn(scheduler.last_epoch)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ckpt_mod.CheckpointError(f"{ck.path}: optimizer/scheduler state does not fit ({e})") from e
        if run.scaler is not None and st.get("scaler"):
            run.scaler.load_state_dict(st["scaler"])
        run.step, run.epoch, run.batch_in_epoch = ck.step, st["position"]["epoch"], st["position"]["batch_in_epoch"]
        if st.get("world_size") != env.world_size:
            log.warning("resuming a %s-process run with %s processes: data order differs from the original",
                        st.get("world_size"), env.world_size)
        rngs = st.get("rng", [])
        if env.rank < len(rngs):
            ckpt_mod.set_rng_state(rngs[env.rank])
        run.resumed_from = ck.path

    def _open_logs(self, run: _Run) -> None:
        """Rank 0: config.yaml, metrics.csv (an earlier run's rows up to the resumed step kept), tensorboard."""
        if not run.env.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_mod.write_config_yaml(self.out_dir / ckpt_mod.CONFIG_FILE, self.resolved_config)
        run.csv_log = _CsvLog(self.out_dir / "metrics.csv")
        if run.resumed_from is not None:
            run.csv_log.load(run.step)
        elif run.csv_log.path.exists():
            run.csv_log.path.unlink()
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional, heavy: only when asked for

            run.writer = SummaryWriter(str(self.out_dir / "tb"),
                                       purge_step=run.step + 1 if run.resumed_from else None)

    def _start_clock(self, run: _Run) -> None:
        """The time budget (it counts this fit's steps: a resumed run starts at its checkpoint's step), the
        throughput clock and the progress bar."""
        cfg = self.cfg
        run.step0 = run.step
        run.budget = StepBudget(cfg.time_budget_s, cfg.max_steps - run.step0) if cfg.time_budget_s > 0 else None
        run.t_fit = time.perf_counter()
        run.pbar = tqdm(total=run.last_step, initial=run.step, desc="train", dynamic_ncols=True,
                        disable=not (cfg.progress and run.env.is_main))
        run.t_last = time.perf_counter()

    def _autocast(self, run: _Run):
        if run.amp_dtype is None:
            return nullcontext()
        return torch.autocast(run.env.device.type, dtype=run.amp_dtype)

    def _train_step(self, run: _Run) -> None:
        """One optimizer update over ``grad_accum`` micro-batches; adds its scalars to the running sums."""
        cfg, scaler, optimizer = self.cfg, run.scaler, run.optimizer
        optimizer.zero_grad(set_to_none=True)
        step_sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            n, batch = run.stream.next()
            batch = move_to_device(batch, run.env.device)
            sync = micro == cfg.grad_accum - 1 or not is_distributed()
            with (nullcontext() if sync else run.ddp_model.no_sync()):
                with self._autocast(run):
                    out = run.ddp_model(batch)
                loss = _check_output(out, run.step, check_finite=scaler is None)
                scaled = loss.float() / cfg.grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            run.n_samples += n
            for k, v in out.items():
                s = _scalar(v)
                if s is not None:
                    step_sums[k] = step_sums.get(k, 0.0) + s / cfg.grad_accum
        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
        step_sums["grad_norm"] = float(grad_norm)
        step_sums["lr"] = optimizer.param_groups[0]["lr"]  # the lr this update uses
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        run.scheduler.step()
        run.step += 1
        run.n_steps_acc += 1
        for k, v in step_sums.items():
            run.sums[k] = run.sums.get(k, 0.0) + v
        run.pbar.update(1)

    def _follow_budget(self, run: _Run) -> None:
        """With a time budget: re-plan the last step (and the cosine's end) when due, stop when time is up."""
        budget, step, step0 = run.budget, run.step, run.step0
        if budget is None or not (budget.due(step - step0) or step % 10 == 0):
            return
        # checks fall on the same steps on every rank (they gather), and every rank follows rank 0's clock,
        # so all stop at the same step; the hard stop is checked every 10 steps
        elapsed = gather_objects(time.perf_counter() - run.t_fit)[0]
        new_total = step if budget.out_of_time(elapsed) else (
            step0 + budget.plan(step - step0, elapsed) if budget.due(step - step0) else run.last_step)
        if new_total == run.last_step:
            return
        run.last_step = new_total
        for fn in run.scheduler.lr_lambdas:
            fn.total_steps = max(run.last_step, self.cfg.warmup_steps + 1)
        run.pbar.total = run.last_step
        run.pbar.refresh()
        if run.env.is_main:
            log.info("time budget %.0f s: %.1f s after step %d, planning %d steps",
                     self.cfg.time_budget_s, elapsed, step, run.last_step)

    def _log_train(self, run: _Run) -> None:
        """Every ``log_every`` steps and at the last: the means since the last row, over all ranks, to the
        csv, tensorboard and the progress bar."""
        if not (run.step % max(self.cfg.log_every, 1) == 0 or run.step == run.last_step):
            return
        now = time.perf_counter()
        means = {k: v / run.n_steps_acc for k, v in run.sums.items()}
        gathered = gather_objects((means, run.n_samples))
        if run.env.is_main:
            keys = list(gathered[0][0])
            means = {k: float(np.mean([g[0].get(k, np.nan) for g in gathered])) for k in keys}
            n_total = sum(g[1] for g in gathered)
            means["samples_per_s"] = n_total / max(now - run.t_last, 1e-9)
            run.last_train = means
            run.csv_log.append({"step": run.step, "split": "train", "epoch": run.stream.epoch, **means})
            if run.writer is not None:
                for k, v in means.items():
                    run.writer.add_scalar(f"train/{k}", v, run.step)
            run.pbar.set_postfix(loss=f"{means['loss']:.4g}", lr=f"{means['lr']:.2e}",
                                 sps=f"{means['samples_per_s']:.1f}")
        run.sums, run.n_steps_acc, run.n_samples, run.t_last = {}, 0, 0, time.perf_counter()

    def _eval(self, run: _Run) -> dict[str, float]:
        """``eval_fn`` at the current step (eval mode, no grad), its scalars logged on rank 0."""
        if self.eval_fn is None:
            return {}
        model, at_step = run.model, run.step
        model.eval()
        with torch.no_grad(), self._autocast(run):
            res = self.eval_fn(model, at_step)
        model.train()
        res = {k: s for k, v in dict(res or {}).items() if (s := _scalar(v)) is not None}
        if run.env.is_main:
            run.csv_log.append({"step": at_step, "split": "eval", **res})
            if run.writer is not None:
                for k, v in res.items():
                    run.writer.add_scalar(f"eval/{k}", v, at_step)
        return res

    def _save(self, run: _Run) -> Optional[Path]:
        """A checkpoint at the current step (every rank gathers its RNG state; rank 0 writes), then
        ``on_checkpoint``; the path on rank 0, None elsewhere."""
        state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "position": run.stream.position(),
            "world_size": run.env.world_size,
            "rng": gather_objects(_rng_for_gather()),
        }
        path = None
        if run.env.is_main:
            path = ckpt_mod.save_checkpoint(
                run.ckpt_root, run.step, ckpt_mod.trainable_state_dict(run.model), state, self.resolved_config,
                extra_meta={"world_size": run.env.world_size},
                keep_last=self.cfg.keep_last or None, keep_every=self.cfg.keep_every or None,
            )
            if self.on_checkpoint is not None:
                self.on_checkpoint(run.step, path)
        barrier()
        return path

    def _summary(self, run: _Run) -> FitSummary:
        """Rank 0: the loss plot and the newest checkpoint; every rank: the :class:`FitSummary`."""
        main = run.env.is_main
        plot = csv_path = None
        if main:
            csv_path = run.csv_log.path
            plot = plot_loss_curves(run.csv_log, self.out_dir / "loss_curves.png")
            if run.last_ckpt is None:
                run.last_ckpt = ckpt_mod.resolve_checkpoint(run.ckpt_root)
        barrier()
        return FitSummary(run.step, run.last_train, run.last_eval, self.out_dir, run.last_ckpt, csv_path,
                          (self.out_dir / "tb") if (main and run.writer is not None) else None, plot,
                          run.resumed_from)


@dataclass(eq=False)
class _Run:
    """What one :meth:`Trainer.fit` carries between its parts (built by ``_build``, filled in as it goes)."""

    env: DistEnv
    model: torch.nn.Module
    amp_dtype: Optional[torch.dtype]
    params: list                     # the parameters with requires_grad (clipped together)
    optimizer: torch.optim.Optimizer
    scheduler: Any                   # LambdaLR over LinearWarmupCosine
    scaler: Optional[Any]            # GradScaler (fp16 only)
    ckpt_root: Path
    last_step: int                   # max_steps, or where a time budget moved the end
    step: int = 0
    epoch: int = 0                   # data position to start from (a resumed run: the checkpoint's)
    batch_in_epoch: int = 0
    resumed_from: Optional[Path] = None
    ddp_model: Any = None
    stream: Optional[_BatchStream] = None
    csv_log: Optional[_CsvLog] = None
    writer: Any = None               # tensorboard SummaryWriter
    step0: int = 0                   # the step this fit started at
    budget: Optional[StepBudget] = None
    t_fit: float = 0.0
    pbar: Any = None
    t_last: float = 0.0              # start of the current log interval
    sums: dict = dataclasses.field(default_factory=dict)   # per-step scalars summed since the last log row
    n_steps_acc: int = 0
    n_samples: int = 0
    last_train: dict = dataclasses.field(default_factory=dict)
    last_eval: dict = dataclasses.field(default_factory=dict)
    last_ckpt: Optional[Path] = None
    saved_at: int = -1


def _rng_for_gather() -> dict[str, Any]:
    return ckpt_mod.get_rng_state()


def _check_output(out: Any, step: int, check_finite: bool = True) -> torch.Tensor:
    if not isinstance(out, Mapping) or "loss" not in out:
        raise ValueError(f"model(batch) must return a dict with a 'loss' entry, got {type(out).__name__}"
                         + (f" with keys {sorted(out)}" if isinstance(out, Mapping) else ""))
    loss = out["loss"]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"model(batch)['loss'] must be a scalar tensor, got {type(loss).__name__}"
                         + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    if not loss.requires_grad:
        raise ValueError("model(batch)['loss'] does not require grad: no trainable parameter contributed to it")
    # with fp16 the GradScaler skips steps with inf/nan gradients itself
    if check_finite and not torch.isfinite(loss.detach()).item():
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1}")
    return loss.reshape(())
