"""Training speed of the referring segmenter (LLM + LoRA + projector + mask decoder) for a fixed wall-clock budget:
steps/s, samples/s and peak memory, in bf16 autocast (or fp32), on CPU or CUDA.

The inputs are synthetic object tokens and point features (:func:`scene3d.structures.scene_inputs.synthetic_scene`),
so the sparse-conv tokenizer (spconv) is not part of the step: this times what comes after it, which is where
the LLM's cost is. ``--llm`` is ``tiny``, ``smollm2`` or any local model directory; ``--random-weights``
first writes a copy of that directory's architecture (config + tokenizer) with randomly initialised weights
into ``--work-dir`` and trains that (how tools/gpu_check.sh times SmolLM2's architecture on a machine its
weights cannot reach). Prints figures; asserts nothing about time.

    .venv/bin/python bench/train_speed.py --llm tiny --seconds 20
    python3 bench/train_speed.py --device cuda --llm CONFIG_DIR --random-weights --work-dir /tmp/x --seconds 120
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scene3d.heads.mask_decoder import MaskDecoderConfig  # noqa: E402
from scene3d.llm.loader import LLMConfig  # noqa: E402
from scene3d.llm.tiny import TinyLLMConfig  # noqa: E402
from scene3d.models.referring import QueryBatch, ReferringConfig, ReferringSegmenter  # noqa: E402
from scene3d.structures.scene_inputs import SceneInputs, synthetic_scene  # noqa: E402

TEXTS = ["the brown chair left of the desk", "the table near the window", "all the lamps on the desk",
         "the white cabinet behind the bed", "the trash can next to the door", "the pillow on the couch",
         "the monitor on the left", "the two armchairs facing the tv"]
#: Files of a model directory other than its weights (what --random-weights copies).
ARCH_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "special_tokens_map.json")


def random_weights_dir(src: Path, dst: Path, seed: int = 0) -> Path:
    """Write ``src``'s architecture (its config and tokenizer files) with randomly initialised weights
    (transformers' own init, seeded) to ``dst`` as safetensors; atomic (temporary sibling, then rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"--random-weights: no config.json in {src}")
    cfg = AutoConfig.from_pretrained(src, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".", dir=dst.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ARCH_FILES:
        if (src / f).is_file() and f != "config.json":
            shutil.copy(src / f, tmp / f)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


def make_batch(args, device) -> QueryBatch:
    g = torch.Generator().manual_seed(0)
    scene = synthetic_scene((args.objects,) * args.batch, points_per_object=args.points_per_object, seed=0)
    scene = SceneInputs(scene.tokens.to(device), scene.point_feat.to(device), scene.points.to(device))
    texts = [TEXTS[i % len(TEXTS)] for i in range(args.batch)]
    targets = [[10 * (1 + int(torch.randint(args.objects, (1,), generator=g)))] for _ in range(args.batch)]
    return QueryBatch(scene, texts, targets, seeds=list(range(args.batch)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="tiny", help="tiny, smollm2 or a local model directory")
    ap.add_argument("--random-weights", action="store_true", help="train --llm's architecture, randomly initialised")
    ap.add_argument("--work-dir", default=None, help="where --random-weights writes its model (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=None, help="keep the first k layers (llm.num_layers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 = autocast, fp32 weights")
    ap.add_argument("--seconds", type=float, default=30.0, help="timed training budget (after --warmup steps)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="questions per step, one scene each")
    ap.add_argument("--objects", type=int, default=60, help="objects per scene")
    ap.add_argument("--points-per-object", type=int, default=50)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    work = None
    llm_path = args.llm
    if args.random_weights:
        if args.llm == "tiny":
            raise SystemExit("--random-weights needs a model directory (the tiny model is random already)")
        from scene3d.llm.registry import resolve_model_path

        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="train_speed."))
        t0 = time.perf_counter()
        # a directory with config + tokenizer is enough here (no weights needed); a name resolves as usual
        src = Path(args.llm) if (Path(args.llm) / "config.json").is_file() else resolve_model_path(args.llm)
        llm_path = str(random_weights_dir(src, work / "random-llm"))
        print(f"random weights for {args.llm}'s architecture in {llm_path} ({time.perf_counter() - t0:.1f} s)")
    torch.manual_seed(0)
    if args.llm == "tiny":
        llm = LLMConfig(tiny=TinyLLMConfig(), num_obj_tokens=max(16, args.objects), lora_r=args.lora_r)
    else:
        llm = LLMConfig(path=llm_path, num_layers=args.layers, num_obj_tokens=max(16, args.objects),
                        lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    model = ReferringSegmenter(ReferringConfig(
        llm=llm, decoder=MaskDecoderConfig(dim=64, num_queries=2, num_layers=1, num_heads=4))).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    batch = make_batch(args, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> float:
        with autocast:
            loss = model(batch).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step() for _ in range(args.warmup)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        losses.append(step())  # float() syncs, so each step is finished when the clock is read
        steps += 1
    elapsed = time.perf_counter() - t0
    cfg = model.lm.causal_lm.config
    res = {
        "llm": args.llm, "random_weights": args.random_weights, "device": str(device), "precision": args.precision,
        "model_type": cfg.model_type, "layers": int(cfg.num_hidden_layers), "hidden": int(cfg.hidden_size),
        "trainable_params": sum(p.numel() for p in params), "batch": args.batch, "objects": args.objects,
        "steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed, "samples_per_s": steps * args.batch / elapsed,
        "loss_first": losses[0], "loss_last": losses[-1],
        "peak_mem_gib": (torch.cuda.max_memory_allocated() if cuda else
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "peak_mem_kind": "torch.cuda.max_memory_allocated" if cuda else "process max RSS",
    }
    print(f"{cfg.model_type} {res['layers']} layers hidden {res['hidden']}{' (random weights)' if args.random_weights else ''}, "
          f"{args.precision}, {device}: {steps} steps in {elapsed:.1f} s = {res['steps_per_s']:.2f} steps/s, "
          f"{res['samples_per_s']:.1f} samples/s (batch {args.batch}, {args.objects} objects/scene); "
          f"peak memory {res['peak_mem_gib']:.2f} GiB ({res['peak_mem_kind']}); loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(tmp, args.json)
    if work is not None and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
