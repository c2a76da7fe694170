"""Benchmark: scene3d::token_gate (compiled op) against the vectorised pure-PyTorch reference, in one run.

Prints, per configuration, the median time of the op and of the reference and their ratio (reference / op),
forward only and forward + backward (``torch.autograd.grad`` of both inputs: the gradients are returned, not
accumulated into ``.grad``), on CPU and, where a GPU is present, on CUDA. Both sides skip the input
validation of the public wrappers (one host sync and a NaN scan), so the kernels themselves are compared.

The forward is memory bound at large sizes, so it is also measured against the machine: the bytes it must
move (read the kept rows and all scores, write the kept rows: ``2 K C + M`` floats) over its time, beside a
plain copy of the same ``2 K C`` floats (``dst.copy_(src)``, device to device, into a buffer allocated once)
timed in the same run. The op returns a new tensor, as every out-of-place op does, so a copy into a fresh
allocation (``src.clone()``) is printed too: on CPU the first touch of freshly mapped pages is a large share of
a big output's time (in the firecracker VMs of this project's machines, a 64 MiB ``clone`` is several times a
``copy_`` into a warm buffer), and that cost belongs to the allocator, not to the kernel.

Every statement runs ``--warmup`` times before it is timed: the first calls of a new size fault in fresh pages
while the allocator's heap grows, which is not the steady state of a training loop.

Even in the steady state, glibc's malloc gives memory back to the kernel between calls (it trims the heap top
beyond a threshold it moves itself, and serves blocks over 32 MiB by a fresh mmap each time), and each later
first touch faults again: in this project's firecracker VMs about 0.7 ms per MiB, more than the kernels' own
time at these sizes, for the op and the reference alike. So on CPU the table is printed twice (``--heap
both``, the default): once with glibc's defaults, and once in a child process whose heap is kept
(``MALLOC_TRIM_THRESHOLD_`` beyond any size, ``MALLOC_MMAP_MAX_=0``: freed blocks are reused, as a caching
allocator such as jemalloc or tcmalloc would), which shows the kernels' cost without the faults. A user gets
the second by setting those two variables, or by preloading jemalloc / tcmalloc (PyTorch's CPU tuning guide).

    .venv/bin/python bench/token_gate.py [--keep-ratio 0.5] [--min-run-time 0.5] [--threads N]
                                         [--device cpu|cuda|all] [--heap both|default|kept] [--json FILE]

``--device all`` (the default) measures the CPU and, where a GPU is present, CUDA; ``--device cuda`` fails when
there is none. ``--json FILE`` also writes every row (times in ms, bandwidths in GB/s) for tools/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import benchmark

from scene3d.gating.op import has_native_op, token_gate_reference

CONFIGS = [(8, 300, 1024), (8, 4096, 1024)]  # (scenes B, tokens per scene, channels C)


def make_inputs(b, n, c, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # ragged: scene sizes spread around n (n/2 .. 3n/2), same total B*n
    counts = torch.full((b,), n, dtype=torch.long)
    counts += torch.linspace(-n // 2, n // 2, b).long()
    counts[-1] += b * n - int(counts.sum())
    tokens = torch.randn(int(counts.sum()), c, generator=g, dtype=dtype)
    scores = torch.rand(tokens.shape[0], generator=g, dtype=dtype)
    return tokens.to(device), scores.to(device), torch.cumsum(counts, 0).to(device)


def op_fn(tokens, scores, offset, ratio):
    return torch.ops.scene3d.token_gate(tokens, scores, offset, ratio, 1, -math.inf)[0]


def ref_fn(tokens, scores, offset, ratio):
    return token_gate_reference(tokens, scores, offset, ratio, 1, -math.inf, validate=False)[0]


def time_it(stmt, env, min_run_time, warmup):
    t = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    t.timeit(warmup)  # the steady state: the allocator's heap has grown to the working set
    return t.blocked_autorange(min_run_time=min_run_time).median


def bench_device(device, ratio, min_run_time, warmup) -> list:
    out = []
    print(f"\n== {device}  (keep_ratio={ratio}, min_keep=1, float32, threads={torch.get_num_threads()})")
    print(f"{'B x n x C':>16} {'pass':>9} {'op ms':>9} {'ref ms':>9} {'ratio':>7}   {'op GB/s':>8} "
          f"{'copy GB/s':>9} {'of copy':>7} {'clone GB/s':>10} {'of clone':>8}")
    for b, n, c in CONFIGS:
        tokens, scores, offset = make_inputs(b, n, c, device)
        # the two sides agree before we time them
        a, r = op_fn(tokens, scores, offset, ratio), ref_fn(tokens, scores, offset, ratio)
        assert torch.equal(a, r), "op and reference disagree"
        t_req, s_req = tokens.clone().requires_grad_(), scores.clone().requires_grad_()
        grad = torch.randn_like(a)
        env = dict(torch=torch, op=op_fn, ref=ref_fn, tokens=tokens, scores=scores, offset=offset, ratio=ratio,
                   t=t_req, s=s_req, grad=grad)
        rows = [
            ("fwd", "op(tokens, scores, offset, ratio)", "ref(tokens, scores, offset, ratio)"),
            # torch.autograd.grad: both gradients are computed and returned, not accumulated into .grad (an
            # add of [M, C] that autograd does the same way behind either side, and a third of the traffic)
            ("fwd+bwd", "torch.autograd.grad(op(t, s, offset, ratio), (t, s), grad)",
             "torch.autograd.grad(ref(t, s, offset, ratio), (t, s), grad)"),
        ]
        src = tokens[: a.shape[0]].clone()
        env.update(src=src, dst=torch.empty_like(src))
        t_copy = time_it("dst.copy_(src)", env, min_run_time, warmup)
        t_clone = time_it("src.clone()", env, min_run_time, warmup)
        copy_bytes = 2 * src.numel() * src.element_size()  # read and written once by copy_ and by clone
        nbytes = (2 * a.numel() + scores.numel()) * tokens.element_size()
        for name, op_stmt, ref_stmt in rows:
            t_op = time_it(op_stmt, env, min_run_time, warmup)
            t_ref = time_it(ref_stmt, env, min_run_time, warmup)
            bw = ""
            row = dict(device=device, config=f"{b}x{n}x{c}", pass_=name, op_ms=t_op * 1e3, ref_ms=t_ref * 1e3,
                       ratio=t_ref / t_op, keep_ratio=ratio, threads=torch.get_num_threads())
            if name == "fwd":
                gbs, copy_gbs, clone_gbs = nbytes / t_op / 1e9, copy_bytes / t_copy / 1e9, copy_bytes / t_clone / 1e9
                bw = f"   {gbs:8.1f} {copy_gbs:9.1f} {gbs / copy_gbs:6.0%} {clone_gbs:10.1f} {gbs / clone_gbs:7.0%}"
                row.update(op_gbs=gbs, copy_gbs=copy_gbs, of_copy=gbs / copy_gbs, clone_gbs=clone_gbs,
                           of_clone=gbs / clone_gbs)
            out.append({k.rstrip("_"): v for k, v in row.items()})
            print(f"{f'{b}x{n}x{c}':>16} {name:>9} {t_op * 1e3:9.3f} {t_ref * 1e3:9.3f} {t_ref / t_op:6.2f}x{bw}")
    return out


#: glibc malloc settings of the "kept heap" run: never trim, never mmap (freed blocks are reused)
KEPT_HEAP = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_MAX_": "0"}


def kept_heap_rows(args) -> list:
    """The CPU table again, in a child process started with :data:`KEPT_HEAP` (glibc reads it at start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, "--device", "cpu", "--heap", "kept", "--json", str(out),
               "--keep-ratio", str(args.keep_ratio), "--min-run-time", str(args.min_run_time),
               "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(cmd, env={**os.environ, **KEPT_HEAP}, check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls of each statement before timing")
    ap.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--heap", default="both", choices=["both", "default", "kept"],
                    help="CPU: glibc's default heap, a kept heap (a child process with trimming and mmap off), "
                         "or both (module docstring)")
    args = ap.parse_args()
    warmup = max(0, args.warmup)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not has_native_op():
        raise SystemExit("scene3d._C is not built: `pip install --no-build-isolation --no-deps -e .` first")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    rows = []
    if args.device in ("all", "cpu"):
        kept = all(os.environ.get(k) == v for k, v in KEPT_HEAP.items())
        if args.heap == "kept" and not kept:
            rows += kept_heap_rows(args)
        else:
            heap = "kept: " + " ".join(f"{k}={v}" for k, v in KEPT_HEAP.items()) if kept else "glibc's defaults"
            print(f"\n(CPU heap: {heap})")
            rows += [dict(r, heap="kept" if kept else "default")
                     for r in bench_device("cpu", args.keep_ratio, args.min_run_time, warmup)]
            if args.heap == "both" and not kept:
                rows += kept_heap_rows(args)
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        rows += bench_device("cuda", args.keep_ratio, args.min_run_time, warmup)
    elif args.device == "all":
        print("\n(no CUDA device: CUDA ratio not measured)")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
