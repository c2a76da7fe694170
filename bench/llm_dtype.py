"""float32 or bfloat16 for SmolLM2 on this CPU? Times both on the same inputs in one run.

* inference: one forward of a 320-token prompt (about a 150-object scene prefix), no gradients;
* training: forward + backward of 16 sequences x 100 tokens through LoRA r=16 (base frozen), with logits
  only at 8 positions per row (as the training loss computes them).

Each for all 30 layers and for the first 8 (``llm.num_layers``). Medians of ``--repeats``, interleaved.
Prints figures (and the ratio fp32 / bf16: above 1 means bf16 is faster); asserts nothing about time.

    .venv/bin/python bench/llm_dtype.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scene3d.llm.loader import load_llm  # noqa: E402


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", default="30,8", help="comma-separated layer counts to keep")
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 49152, (1, 320), generator=gen)
    batch = torch.randint(0, 49152, (16, 100), generator=gen)
    at = torch.arange(92, 100).expand(16, 8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'layers':>6s} {'what':<28s} {'float32 s':>10s} {'bfloat16 s':>11s} {'fp32/bf16':>10s}")
    for k in (int(x) for x in args.layers.split(",")):
        models = {dt: load_llm("smollm2", num_layers=None if k == 30 else k, lora_r=16, lora_alpha=32, dtype=dt)
                  for dt in ("float32", "bfloat16")}

        def infer(lm):
            with torch.inference_mode():
                lm(lm.embed(prompt), logits_at=torch.tensor([319]))

        def train(lm):
            lm.train()
            out = lm(lm.embed(batch), logits_at=at)
            out.logits.float().logsumexp(-1).mean().backward()
            lm.zero_grad(set_to_none=True)

        for name, fn in (("forward 1 x 320 (inference)", infer), ("fwd+bwd 16 x 100 (LoRA)", train)):
            for lm in models.values():
                fn(lm)  # warm-up
            t = {dt: [] for dt in models}
            for _ in range(args.repeats):
                for dt, lm in models.items():
                    t[dt].append(_time(lambda: fn(lm)))
            a, b = statistics.median(t["float32"]), statistics.median(t["bfloat16"])
            print(f"{k:6d} {name:<28s} {a:10.2f} {b:11.2f} {a / b:9.2f}x")


if __name__ == "__main__":
    main()
