"""Training cost with and without the shared scene prefix, tiny LLM and SmolLM2, in one run.

One training step of ``experiment=synthetic_cpu`` (2 scenes x up to 16 questions, the shipped head and 3D
tokenizer; forward + backward + optimizer step of the whole pipeline) is timed with the questions of a scene
behind one encoding of its prefix (:meth:`ReferringSegmenter.shares_prefix`, the default) and with every
question given its own copy of the prefix (what the model did before, and what Chat-Scene does). The same
batches are used for both, interleaved, medians of ``--steps``. Prints steps/s and samples (questions)/s of
each and their ratio; asserts nothing about time.

    .venv/bin/python bench/train_step.py                       # tiny, and SmolLM2 at 8 and 30 layers
    .venv/bin/python bench/train_step.py --llm smollm2 --layers 30 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _batches(cfg, n: int):
    from scene3d.config import to_objects
    from scene3d.data.referring import collate_referring
    from data_prep.rewording import reword_row
    from scene3d.train import prepare_data, training_dataset

    obj = to_objects(cfg)
    prepare_data(obj.data)
    ds = training_dataset(obj.data, 0, reworder=reword_row)
    b = obj.trainer.batch_size
    return [collate_referring([ds[(i * b + j) % len(ds)] for j in range(b)]) for i in range(n)]


def run(which: str, layers, steps: int) -> tuple:
    from scene3d.config import compose, pipeline_config
    from scene3d.models.pipeline import Scene3DModel

    over = ["experiment=synthetic_cpu"]
    if which != "tiny":
        over += [f"llm={which}", f"model.referring.llm.num_layers={'null' if layers is None else layers}"]
    cfg = compose("train", over)
    torch.manual_seed(0)
    model = Scene3DModel(pipeline_config(cfg.model)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = _batches(cfg, steps + 1)
    seg = model.segmenter
    shared = seg.shares_prefix

    def step(batch, share: bool) -> float:
        seg.shares_prefix = (lambda: share) if not share else shared
        t0 = time.perf_counter()
        loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    step(batches[0], True), step(batches[0], False)  # warm-up
    times = {True: [], False: []}
    for b in batches[1:]:
        for share in (True, False):
            times[share].append(step(b, share))
    seg.shares_prefix = shared
    questions = statistics.mean(len(b.samples) for b in batches[1:])
    return {k: statistics.median(v) for k, v in times.items()}, questions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="tiny,smollm2")
    ap.add_argument("--layers", default="8,30", help="SmolLM2 layer counts (llm.num_layers; 30: all)")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    from scene3d.llm.registry import default_model_path

    rows = []
    for which in args.llm.split(","):
        if which != "tiny" and default_model_path() is None:
            print(f"{which}: not installed (make setup converts it); skipped")
            continue
        for layers in ([None] if which == "tiny" else [None if int(k) >= 30 else int(k) for k in args.layers.split(",")]):
            t, q = run(which, layers, args.steps)
            name = which if which == "tiny" else f"{which} x{30 if layers is None else layers}"
            rows.append((name, t, q))
            print(f"{name}: shared {t[True]:.2f} s/step, per question {t[False]:.2f} s/step", flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps} steps, "
          "experiment=synthetic_cpu (2 scenes a step)")
    print(f"{'LLM':14s} {'questions/step':>14s} | {'shared prefix':>24s} | {'prefix per question':>24s} | {'speed-up':>8s}")
    print(f"{'':14s} {'':>14s} | {'steps/s':>11s} {'samples/s':>12s} | {'steps/s':>11s} {'samples/s':>12s} |")
    for name, t, q in rows:
        print(f"{name:14s} {q:14.1f} | {1 / t[True]:11.3f} {q / t[True]:12.2f} | {1 / t[False]:11.3f} "
              f"{q / t[False]:12.2f} | {t[False] / t[True]:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
