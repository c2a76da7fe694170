"""Training engine: updates, accumulation, clipping, schedule, metric files, checkpoints, kill -9 resume, DDP.

This file is also a script (``python tests/test_engine.py train|ddp ...``) so that subprocess runs (the
killed run, the torchrun ranks) use the very same toy model and data as the in-process tests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script
    sys.path.insert(0, str(REPO))

from scene3d.engine import (  # noqa: E402
    CheckpointError,
    LinearWarmupCosine,
    StepBudget,
    Trainer,
    TrainerConfig,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from scene3d.engine import checkpoint as ckm  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# toy model and data


class ToyData(torch.utils.data.Dataset):
    """y = x @ w_true + 0.5 (fixed by the seed), with the sample index for split checks."""

    def __init__(self, n: int = 32, dim: int = 4, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = self.x @ w + 0.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "idx": i}


class ToyModel(nn.Module):
    """MLP with optional dropout (so resume must restore the torch RNG) and a frozen part."""

    def __init__(self, dim: int = 4, hidden: int = 16, dropout: float = 0.0, loss_scale: float = 1.0):
        super().__init__()
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.loss_scale = loss_scale

    def forward(self, batch: dict) -> dict:
        x = batch["x"] + 0.01 * self.frozen(batch["x"])
        pred = self.net(x)
        mse = ((pred - batch["y"]) ** 2).mean()
        return {"loss": self.loss_scale * mse, "mse": mse.detach(), "not_scalar": pred.detach()}


def make_model(seed: int = 0, **kw) -> ToyModel:
    seed_everything(seed)
    return ToyModel(**kw)


def cfg(**kw) -> TrainerConfig:
    base = dict(max_steps=10, batch_size=4, lr=1e-2, device="cpu", progress=False, log_every=1,
                tensorboard=False, warmup_steps=0, schedule="constant", grad_clip=None)
    base.update(kw)
    return TrainerConfig(**base)


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# updates


def test_loss_goes_down_and_metric_files(tmp_path):
    model = make_model()
    c = cfg(max_steps=60, log_every=5, tensorboard=True, eval_every=20, warmup_steps=5, schedule="cosine")
    data = ToyData()

    def eval_fn(m, step):
        assert not m.training
        out = m({"x": data.x, "y": data.y})
        return {"loss": out["mse"], "step_seen": step}

    s = Trainer(c, model, data, eval_fn=eval_fn, out_dir=tmp_path, resolved_config={"a": 1}).fit()
    assert s.step == 60
    rows = read_csv(tmp_path / "metrics.csv")
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [int(r["step"]) for r in train] == list(range(5, 61, 5))
    assert [int(r["step"]) for r in evals] == [20, 40, 60]
    assert float(train[-1]["loss"]) < 0.2 * float(train[0]["loss"])
    assert float(evals[-1]["loss"]) < float(evals[0]["loss"])
    assert all(float(r["samples_per_s"]) > 0 for r in train)
    assert "not_scalar" not in rows[0]  # only scalars are logged
    # TensorBoard events, read back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tb_loss = acc.Scalars("train/loss")
    assert [e.step for e in tb_loss] == list(range(5, 61, 5))
    assert tb_loss[-1].value == pytest.approx(float(train[-1]["loss"]), rel=1e-5)
    assert [e.step for e in acc.Scalars("eval/loss")] == [20, 40, 60]
    # PNG plot decodes
    import matplotlib.image

    img = matplotlib.image.imread(str(tmp_path / "loss_curves.png"))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert s.plot == tmp_path / "loss_curves.png"
    import yaml

    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"a": 1}
    assert yaml.safe_load((s.checkpoint / "config.yaml").read_text()) == {"a": 1}


def test_matches_plain_loop_and_accumulation_equivalence(tmp_path):
    """accum 2 x batch 2 == batch 4 == a hand-written AdamW loop over the same batches of 4."""
    data = ToyData(n=16)
    steps = 6
    common = dict(max_steps=steps, shuffle=False, weight_decay=0.0)
    m_acc = make_model()
    Trainer(cfg(batch_size=2, grad_accum=2, **common), m_acc, data, out_dir=tmp_path / "a").fit()
    m_big = make_model()
    Trainer(cfg(batch_size=4, grad_accum=1, **common), m_big, data, out_dir=tmp_path / "b").fit()

    ref = make_model()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for s in range(steps):
        i = (s * 4) % 16
        opt.zero_grad()
        ref({"x": data.x[i:i + 4], "y": data.y[i:i + 4]})["loss"].backward()
        opt.step()

    init = make_model()
    for (name, p_acc), p_big, p_ref, p0 in zip(m_acc.named_parameters(), m_big.parameters(),
                                               ref.parameters(), init.parameters()):
        assert torch.allclose(p_acc, p_big, atol=1e-6, rtol=0), name
        assert torch.allclose(p_big, p_ref, atol=1e-6, rtol=0), name
        if p0.requires_grad:
            assert not torch.equal(p_big, p0), f"{name} did not train"
        else:
            assert torch.equal(p_big, p0), f"frozen {name} changed"


def test_grad_clipping_bounds_the_norm(tmp_path):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    clip = 0.5
    seen = []

    def pre_step(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(pre_step)
    try:
        Trainer(cfg(max_steps=5, grad_clip=clip), make_model(loss_scale=100.0), ToyData(),
                out_dir=tmp_path).fit()
    finally:
        handle.remove()
    rows = read_csv(tmp_path / "metrics.csv")
    raw = [float(r["grad_norm"]) for r in rows if r["split"] == "train"]
    assert len(seen) == 5
    assert all(r > 10 * clip for r in raw)  # the pre-clip norm (logged) was far above the bound
    assert all(n <= clip * (1 + 1e-5) for n in seen)
    assert all(n == pytest.approx(clip, rel=1e-4) for n in seen)


def test_cosine_schedule_values(tmp_path):
    f = LinearWarmupCosine(warmup_steps=2, total_steps=10, min_ratio=0.1)
    m = 0.1
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 6: m + (1 - m) * 0.5, 9: m + (1 - m) * 0.5 * (1 + math.cos(math.pi * 7 / 8)),
                10: m}
    for s, v in expected.items():
        assert f(s) == pytest.approx(v, abs=1e-12), s
    # the lr each update used, as the trainer logged it
    Trainer(cfg(max_steps=10, lr=0.2, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1), make_model(),
            ToyData(), out_dir=tmp_path).fit()
    lrs = {int(r["step"]): float(r["lr"]) for r in read_csv(tmp_path / "metrics.csv") if r["split"] == "train"}
    for s in (0, 1, 2, 6, 9):
        assert lrs[s + 1] == pytest.approx(0.2 * expected[s], rel=1e-9)


def test_step_budget_plans_from_the_measured_pace():
    b = StepBudget(budget_s=100.0, max_steps=1000, first=10, reserve_s=5.0)
    assert not b.due(9) and b.due(10)
    assert b.plan(10, 20.0) == 10 + int(75 / 2.0)  # first check: pace over all steps so far (2 s/step)
    assert not b.due(19) and b.due(20)
    # later checks measure the pace since the first check: steps 10 -> 20 took 5 s
    assert b.plan(20, 25.0) == 20 + int(70 / 0.5)
    assert StepBudget(100.0, max_steps=50, first=10).plan(10, 1.0) == 50  # capped by max_steps
    assert StepBudget(100.0, max_steps=50, first=10).plan(10, 99.0) == 11  # never before the next step
    assert b.out_of_time(95.0) and not b.out_of_time(94.9)


def test_time_budget_moves_the_schedule_end_and_stops(tmp_path, monkeypatch):
    """With ``time_budget_s`` the loop plans its steps from its own pace (here a fake clock: 1 s per step),
    so the cosine schedule reaches its end at the last step the budget allows, far before ``max_steps``."""
    import scene3d.engine.trainer as tr

    clock = {"t": 0.0}

    class Timed(ToyModel):
        def forward(self, batch):
            clock["t"] += 1.0
            return super().forward(batch)

    monkeypatch.setattr(tr.time, "perf_counter", lambda: clock["t"])
    seed_everything(0)
    s = Trainer(cfg(max_steps=100000, lr=0.1, schedule="cosine", time_budget_s=60.0), Timed(), ToyData(),
                out_dir=tmp_path).fit()
    assert s.step == 55  # 60 s less the 5 s reserve for the final checkpoint, at 1 s per step
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "metrics.csv") if r["split"] == "train"]
    assert len(lrs) == 55 and lrs[10] > 0.0999  # planned for 100000 steps until the first check (step 16)
    assert lrs[-1] < 1e-3 and lrs[30] < 0.06  # then for 55: decayed to ~0 at the planned end
    assert s.checkpoint is not None and s.checkpoint.name.endswith("55")
    # resumed with a new budget: the plan counts the steps of this fit, from the checkpoint's step
    clock["t"] = 0.0
    r = Trainer(cfg(max_steps=100000, lr=0.1, schedule="cosine", time_budget_s=30.0), Timed(), ToyData(),
                out_dir=tmp_path).fit(resume=True)
    assert r.step == 55 + 25
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainerConfig(time_budget_s=-1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainerConfig(grad_accum=0)
    with pytest.raises(ValueError, match="precision"):
        TrainerConfig(precision="fp8")
    with pytest.raises(ValueError, match="fp16.*needs CUDA"):
        Trainer(cfg(precision="fp16"), make_model(), ToyData(), out_dir="/nonexistent/x").fit()


def test_bad_model_output_and_data(tmp_path):
    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, batch):
            return {"mse": self.w.sum()}

    with pytest.raises(ValueError, match="'loss'"):
        Trainer(cfg(), NoLoss(), ToyData(), out_dir=tmp_path / "a").fit()
    with pytest.raises(ValueError, match="not one full batch"):
        Trainer(cfg(batch_size=64), make_model(), ToyData(n=8), out_dir=tmp_path / "b").fit()
    with pytest.raises(ValueError, match="empty"):
        Trainer(cfg(), make_model(), ToyData(n=0), out_dir=tmp_path / "c").fit()
    frozen = make_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        Trainer(cfg(), frozen, ToyData(), out_dir=tmp_path / "d").fit()

    class NaN(ToyModel):
        def forward(self, batch):
            out = super().forward(batch)
            return {**out, "loss": out["loss"] * float("nan")}

    with pytest.raises(FloatingPointError, match="step 1"):
        Trainer(cfg(), NaN(), ToyData(), out_dir=tmp_path / "e").fit()


def test_bf16_autocast_on_cpu_trains(tmp_path):
    s = Trainer(cfg(max_steps=20, precision="bf16", log_every=20), make_model(), ToyData(), out_dir=tmp_path).fit()
    assert math.isfinite(s.train_metrics["loss"])


def test_resume_with_longer_schedule_follows_new_config(tmp_path):
    """Extending max_steps on resume: the lr of each later update follows the new cosine, not the old one."""
    Trainer(cfg(max_steps=4, lr=0.1, schedule="cosine"), make_model(), ToyData(), out_dir=tmp_path).fit()
    s = Trainer(cfg(max_steps=8, lr=0.1, schedule="cosine"), make_model(), ToyData(), out_dir=tmp_path).fit(resume=True)
    assert s.step == 8 and s.resumed_from.name == "step_00000004"
    lrs = {int(r["step"]): float(r["lr"]) for r in read_csv(tmp_path / "metrics.csv") if r["split"] == "train"}
    assert sorted(lrs) == list(range(1, 9))  # rows of the first run kept, new ones appended once
    for s_idx in (4, 5, 7):  # update index s uses 0.1 * (1 + cos(pi * s / 8)) / 2
        assert lrs[s_idx + 1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * s_idx / 8)), rel=1e-9)
    assert lrs[4] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-9)  # old run's value


class ToyStream(torch.utils.data.IterableDataset):
    def __init__(self, n: int = 10):
        self.data = ToyData(n=n)

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def test_iterable_dataset_resume_is_exact(tmp_path):
    """Iterable data: resume skips the consumed batches of the epoch (10 samples / 4 -> 2 batches per epoch)."""
    c = dict(batch_size=4, schedule="cosine", warmup_steps=1)
    full = make_model(dropout=0.3)
    Trainer(cfg(max_steps=7, **c), full, ToyStream(), out_dir=tmp_path / "A").fit()
    Trainer(cfg(max_steps=3, **c), make_model(dropout=0.3), ToyStream(), out_dir=tmp_path / "B").fit()
    pos = load_checkpoint(tmp_path / "B").trainer_state["position"]
    assert pos == {"epoch": 1, "batch_in_epoch": 1}
    # the exact-resume case: a 7-step run stopped (exception from the checkpoint hook) after step 3
    shutil.rmtree(tmp_path / "B")
    b = make_model(dropout=0.3)
    try:
        Trainer(cfg(max_steps=7, ckpt_every=3, **c), b, ToyStream(), out_dir=tmp_path / "B",
                on_checkpoint=_stop_at(3)).fit()
    except _Stop:
        pass
    assert load_checkpoint(tmp_path / "B").step == 3
    resumed = make_model(dropout=0.3)
    s = Trainer(cfg(max_steps=7, ckpt_every=3, **c), resumed, ToyStream(), out_dir=tmp_path / "B").fit(resume=True)
    assert s.resumed_from.name == "step_00000003"
    for a, r in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, r)


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def hook(at_step, path):
        if at_step == step:
            raise _Stop
    return hook


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_cuda_mixed_precision_trains_and_resumes(tmp_path, precision):
    """auto = bf16 autocast where supported; fp16 = autocast + GradScaler (its state is checkpointed)."""
    c = cfg(max_steps=40, log_every=5, device="cuda", precision=precision, ckpt_every=20)
    s = Trainer(c, make_model(), ToyData(), out_dir=tmp_path).fit()
    rows = [r for r in read_csv(tmp_path / "metrics.csv") if r["split"] == "train"]
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    st = load_checkpoint(s.checkpoint).trainer_state
    assert (st["scaler"] is not None) == (precision == "fp16")
    c2 = cfg(max_steps=50, log_every=5, device="cuda", precision=precision)
    s2 = Trainer(c2, make_model(), ToyData(), out_dir=tmp_path).fit(resume=True)
    assert s2.step == 50 and s2.resumed_from == s.checkpoint


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_without_pickle(tmp_path, monkeypatch):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LinearWarmupCosine(2, 10))
    data = ToyData()
    for _ in range(3):
        opt.zero_grad()
        model({"x": data.x, "y": data.y})["loss"].backward()
        opt.step()
        sched.step()
    rng = ckm.get_rng_state()
    drawn = torch.rand(3), np.random.rand(3), __import__("random").random()  # what the saved state yields
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [rng], "position": {"epoch": 1}}
    path = save_checkpoint(tmp_path / "checkpoints", 3, model.state_dict(), state, {"lr": 0.01, "nested": {"k": [1, 2]}})
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "trainer_state.safetensors", "trainer_state.json", "config.yaml", "meta.json"])
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    import pickle

    def no_pickle(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    ck = load_checkpoint(tmp_path)  # a run dir resolves through checkpoints/ or the dir itself
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path / "checkpoints")
    assert ck.step == 3 and ck.path == path
    assert ck.config == {"lr": 0.01, "nested": {"k": [1, 2]}}
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model_state[k], v)
    osd = ck.trainer_state["optimizer"]
    assert set(osd["state"]) == set(opt.state_dict()["state"])  # int keys preserved
    assert osd["param_groups"][0]["betas"] == (0.8, 0.9)
    # a fresh optimizer loaded from the checkpoint takes the same next step as the original
    model2 = make_model(seed=5)
    model2.load_state_dict(ck.model_state)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, betas=(0.8, 0.9))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, LinearWarmupCosine(2, 10))  # before loading: its
    opt2.load_state_dict(osd)  # constructor rewrites the group lr, as in the trainer
    sched2.load_state_dict(ck.trainer_state["scheduler"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for m, o, sc in ((model, opt, sched), (model2, opt2, sched2)):
        o.zero_grad()
        m({"x": data.x, "y": data.y})["loss"].backward()
        o.step()
        sc.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # RNG states survive the round trip
    a = drawn
    torch.manual_seed(99)
    ckm.set_rng_state(ck.trainer_state["rng"][0])
    b = torch.rand(3), np.random.rand(3), __import__("random").random()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_checkpoint_errors_pruning_and_tied_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    lin = nn.Linear(3, 3)
    tied = {"a": lin.weight.data, "b": lin.weight.data}  # shared storage
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path / "ck", s, tied, keep_last=2, keep_every=2)
    assert [s for s, _ in ckm.list_checkpoints(tmp_path / "ck")] == [2, 3, 4]
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.step == 4 and torch.equal(ck.model_state["a"], ck.model_state["b"])
    # a stale "latest" (pointing at a deleted dir) falls back to the newest complete checkpoint
    (tmp_path / "ck" / "latest").write_text("step_00000099\n")
    assert load_checkpoint(tmp_path / "ck").step == 4
    (tmp_path / "ck" / "step_00000004" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck" / "step_00000004")
    with pytest.raises(CheckpointError, match="missing"):
        ckm.load_trainable_state_dict(make_model(), {"net.0.weight": torch.zeros(16, 4)})
    with pytest.raises(CheckpointError, match="shape"):
        m = make_model()
        sd = ckm.trainable_state_dict(m)
        sd["net.0.weight"] = torch.zeros(2, 2)
        ckm.load_trainable_state_dict(m, sd)


def test_trainable_state_dict_default_and_custom():
    m = make_model()
    assert set(ckm.trainable_state_dict(m)) == {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"}

    class Custom(ToyModel):
        def trainable_state_dict(self):
            return {"w": self.net[0].weight}

        def load_trainable_state_dict(self, sd):
            with torch.no_grad():
                self.net[0].weight.copy_(sd["w"])

    c = Custom()
    assert set(ckm.trainable_state_dict(c)) == {"w"}
    ckm.load_trainable_state_dict(c, {"w": torch.ones(16, 4)})
    assert torch.equal(c.net[0].weight, torch.ones(16, 4))


def test_init_from_previous_stage(tmp_path):
    s1 = Trainer(cfg(max_steps=3), make_model(), ToyData(), out_dir=tmp_path / "stage1").fit()
    stage1 = load_checkpoint(s1.checkpoint).model_state
    m2 = make_model(seed=7)
    Trainer(cfg(max_steps=1, lr=1e-12, init_from=str(tmp_path / "stage1")), m2, ToyData(),
            out_dir=tmp_path / "stage2").fit()
    for k, v in stage1.items():
        assert torch.allclose(m2.state_dict()[k], v, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# kill -9 and resume (subprocesses run this file as a script)

RESUME_STEPS = 8


def _script_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_cmd(out: Path, resume: bool, kill_at: int = 0) -> list[str]:
    return [sys.executable, __file__, "train", str(out), "1" if resume else "0", str(kill_at)]


def _main_train(out: str, resume: str, kill_at: str = "0") -> None:
    torch.set_num_threads(1)
    model = make_model(dropout=0.2)
    c = cfg(max_steps=RESUME_STEPS, batch_size=2, grad_accum=2, ckpt_every=RESUME_STEPS // 2, shuffle=True,
            warmup_steps=2, schedule="cosine", grad_clip=1.0, weight_decay=0.01, seed=3, keep_last=0)

    def kill_self(step: int, path: Path) -> None:  # kill -9 at a known point: once this checkpoint is complete
        if step == int(kill_at):
            print(f"checkpoint {path} written; SIGKILL", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    s = Trainer(c, model, ToyData(n=12), out_dir=out, on_checkpoint=kill_self if int(kill_at) else None).fit(
        resume=resume == "1")
    print("SUMMARY " + json.dumps({"step": s.step, "resumed_from": str(s.resumed_from)}), flush=True)


def test_resume_after_kill9_matches_uninterrupted(tmp_path):
    env = _script_env()
    a = subprocess.Popen(_train_cmd(tmp_path / "A", False), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    b = subprocess.run(_train_cmd(tmp_path / "B", False, kill_at=RESUME_STEPS // 2), env=env,
                       capture_output=True, text=True, timeout=120)
    assert b.returncode == -signal.SIGKILL, b.stdout + b.stderr
    assert "written; SIGKILL" in b.stdout and "SUMMARY" not in b.stdout
    ck_b = tmp_path / "B" / "checkpoints"
    assert (ck_b / "latest").read_text().strip() == f"step_{RESUME_STEPS // 2:08d}"
    assert [s for s, _ in ckm.list_checkpoints(ck_b)] == [RESUME_STEPS // 2]  # killed before step 8

    r = subprocess.run(_train_cmd(tmp_path / "B", True), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout.split("SUMMARY ", 1)[1])
    assert summary["step"] == RESUME_STEPS and summary["resumed_from"].endswith(f"step_{RESUME_STEPS // 2:08d}")
    out_a, _ = a.communicate(timeout=120)
    assert a.returncode == 0, out_a

    wa = load_checkpoint(tmp_path / "A").model_state
    wb = load_checkpoint(tmp_path / "B").model_state
    half = load_checkpoint(tmp_path / "A" / "checkpoints" / f"step_{RESUME_STEPS // 2:08d}").model_state
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert any(not torch.equal(wa[k], half[k]) for k in wa)  # the second half did train
    # optimizer moments identical too, and the metrics csv has each step exactly once
    sa = load_checkpoint(tmp_path / "A").trainer_state["optimizer"]["state"]
    sb = load_checkpoint(tmp_path / "B").trainer_state["optimizer"]["state"]
    for pid in sa:
        assert torch.equal(sa[pid]["exp_avg_sq"], sb[pid]["exp_avg_sq"])
    steps = [int(r["step"]) for r in read_csv(tmp_path / "B" / "metrics.csv") if r["split"] == "train"]
    assert steps == list(range(1, RESUME_STEPS + 1))


# ---------------------------------------------------------------------------------------------------------
# torchrun DDP with gloo on CPU

DDP_N = 16


class RecordingCollate:
    def __init__(self):
        self.seen: list[int] = []

    def __call__(self, samples):
        self.seen += [s["idx"] for s in samples]
        return torch.utils.data.default_collate(samples)


def _main_ddp(out: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    model = make_model()  # same seed on both ranks; DDP also broadcasts rank 0's weights
    rec = RecordingCollate()
    c = cfg(max_steps=4, batch_size=2, shuffle=True, seed=1)  # 16 samples / 2 ranks / 2 = 4 steps = 1 epoch
    Trainer(c, model, ToyData(n=DDP_N), rec, out_dir=Path(out) / "run").fit()
    rank = int(os.environ["RANK"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out) / f"w{rank}.safetensors"))
    (Path(out) / f"idx{rank}.json").write_text(json.dumps({"seen": rec.seen, "world": os.environ["WORLD_SIZE"]}))


def test_torchrun_ddp_two_ranks_gloo(tmp_path):
    from safetensors.torch import load_file

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "ddp", str(tmp_path)]
    r = subprocess.run(cmd, env=_script_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w0, w1 = load_file(str(tmp_path / "w0.safetensors")), load_file(str(tmp_path / "w1.safetensors"))
    init = make_model().state_dict()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert not torch.equal(w0["net.0.weight"], init["net.0.weight"])
    i0 = json.loads((tmp_path / "idx0.json").read_text())
    i1 = json.loads((tmp_path / "idx1.json").read_text())
    assert i0["world"] == i1["world"] == "2"
    assert len(i0["seen"]) == len(i1["seen"]) == DDP_N // 2
    assert set(i0["seen"]).isdisjoint(i1["seen"])
    assert sorted(i0["seen"] + i1["seen"]) == list(range(DDP_N))
    assert i0["seen"] != sorted(i0["seen"])  # shuffled
    # rank 0 alone wrote the run files; the checkpoint holds the common weights
    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == 4 and ck.meta["world_size"] == 2
    assert torch.equal(ck.model_state["net.0.weight"], w0["net.0.weight"])


class SlowModel(ToyModel):
    """Steps take a rank-dependent time, so the ranks' own clocks would plan different step counts."""

    def forward(self, batch):
        time.sleep(0.05 * (1 + int(os.environ.get("RANK", "0"))))
        return super().forward(batch)


def _main_ddp_budget(out: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    seed_everything(0)
    model = SlowModel()
    c = cfg(max_steps=100000, batch_size=2, seed=1, time_budget_s=8.0, schedule="cosine")
    s = Trainer(c, model, ToyData(n=DDP_N), out_dir=Path(out) / "run").fit()
    rank = int(os.environ["RANK"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out) / f"w{rank}.safetensors"))
    (Path(out) / f"step{rank}.json").write_text(json.dumps({"step": s.step}))


def test_torchrun_ddp_time_budget_stops_all_ranks_together(tmp_path):
    """With a time budget the ranks follow rank 0's clock: they stop at the same step (no rank waits forever in
    a collective the other skipped) with the same weights."""
    from safetensors.torch import load_file

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "ddp_budget", str(tmp_path)]
    r = subprocess.run(cmd, env=_script_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s0 = json.loads((tmp_path / "step0.json").read_text())["step"]
    s1 = json.loads((tmp_path / "step1.json").read_text())["step"]
    assert s0 == s1 and 10 <= s0 < 1000  # ~3 s of 0.1 s steps (8 s less the 5 s reserve)
    w0, w1 = load_file(str(tmp_path / "w0.safetensors")), load_file(str(tmp_path / "w1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert load_checkpoint(tmp_path / "run").step == s0


if __name__ == "__main__":
    if sys.argv[1] == "train":
        _main_train(*sys.argv[2:5])
    elif sys.argv[1] == "ddp":
        _main_ddp(sys.argv[2])
    elif sys.argv[1] == "ddp_budget":
        _main_ddp_budget(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
