"""Per-query time on one scene with and without the scene cache, for the tiny model and SmolLM2 (CPU).

Both sides call ``ReferringSegmenter.predict`` on the same 10 questions and do the same batched work except
the cache:

* without the cache: every question's whole prompt (system prompt + one identifier and one object token per
  object + question) is encoded, all questions as one right-padded batch;
* with the cache: the shared start (system prompt + object tokens + the fixed question head) is encoded
  once — included in the timing — and only the questions' own words run, packed behind one copy of it.

Then both decode greedily as one batch (one LLM call per step for all unfinished questions; an untrained model
runs to ``--max-new-tokens``) and run the mask decoder: the scene's keys (points, superpoints, objects) are
encoded once per ``predict`` call and all questions' queries decoded against them in one call. The table also
gives the same two paths one question at a time (``predict_batch_size=1``) and where the cached path spends its time. Timings are
medians over ``--repeats`` interleaved runs. Prints figures; asserts nothing about time.

    .venv/bin/python bench/query_cache.py --objects 150 --queries 10
    python3 bench/query_cache.py --device cuda --llm DIR --json out.json     # on a GPU (tools/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scene3d.heads.mask_decoder import MaskDecoderConfig  # noqa: E402
from scene3d.llm.loader import LLMConfig  # noqa: E402
from scene3d.llm.tiny import TinyLLMConfig  # noqa: E402
from scene3d.models.cache import SceneCache  # noqa: E402
from scene3d.models import generation  # noqa: E402
from scene3d.models.referring import ReferringConfig, ReferringSegmenter  # noqa: E402
from scene3d.structures.scene_inputs import synthetic_scene  # noqa: E402

TEXTS = ["the brown chair left of the desk", "the table near the window", "all the lamps on the desk",
         "the white cabinet behind the bed", "the trash can next to the door", "the pillow on the couch",
         "the monitor on the left", "the largest bookshelf in the room", "the piano", "the two armchairs facing the tv"]


_SYNC = lambda: None  # noqa: E731  (torch.cuda.synchronize with --device cuda: time finished work)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _SYNC()
        t0 = time.perf_counter()
        fn()
        _SYNC()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _compare(a, b) -> str:
    """Answers equal?, mask points that differ, largest object-score difference (float noise can flip a point
    whose mask logit sits within ~1e-7 of the threshold)."""
    answers = all(x.answer_ids == y.answer_ids for x, y in zip(a, b))
    points = sum(int((x.point_mask != y.point_mask).sum() + (x.decoder_mask != y.decoder_mask).sum())
                 for x, y in zip(a, b))
    score = max(float((x.obj_scores - y.obj_scores).abs().max()) for x, y in zip(a, b))
    return f"{str(answers):>7s} {points:7d} {score:10.1e}"


def _model(which: str, args) -> ReferringSegmenter:
    if which == "tiny":
        llm = LLMConfig(tiny=TinyLLMConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                           num_hidden_layers=args.layers, num_attention_heads=4,
                                           num_key_value_heads=2),
                        num_obj_tokens=max(200, args.objects), lora_r=args.lora_r)
    else:
        llm = LLMConfig(path=which, num_layers=args.smollm2_layers, num_obj_tokens=max(200, args.objects),
                        lora_r=args.lora_r, lora_alpha=2 * args.lora_r, dtype=args.dtype)
    model = ReferringSegmenter(ReferringConfig(
        llm=llm, decoder=MaskDecoderConfig(dim=64, num_queries=2, num_layers=1, num_heads=4,
                                           relation_layers=args.relation_layers, rank_pairs=args.relation_layers > 0),
        max_new_tokens=args.max_new_tokens, predict_batch_size=max(16, args.queries))).eval()
    with torch.no_grad():  # trained-like adapters: LoRA is merged at inference, so this costs nothing there
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model


def main(argv=None) -> None:
    from scene3d.llm.registry import DEFAULT_MODEL, default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default=None,
                    help="comma-separated: tiny, smollm2 (default: both where SmolLM2 is installed, else tiny)")
    ap.add_argument("--smollm2-layers", type=int, default=None, help="keep the first k of SmolLM2's 30 layers")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="SmolLM2's dtype (bfloat16, as llm=smollm2 ships: faster here, bench/llm_dtype.py)")
    ap.add_argument("--objects", type=int, default=150)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--relation-layers", type=int, default=0,
                    help="the mask decoder's text-conditioned relation layers (the shipped head config uses 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--json", default=None, help="also write the side-by-side summary to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
        global _SYNC
        _SYNC = torch.cuda.synchronize
    llms = args.llm.split(",") if args.llm else (["tiny", DEFAULT_MODEL] if default_model_path() else ["tiny"])
    summary = []
    for which in llms:
        torch.manual_seed(0)
        print(f"\n=== LLM: {which}")
        summary.append((which, run(_model(which, args).to(args.device), args)))
    print("\nside by side (batched, per query):")
    print(f"{'LLM':10s} {'cache ms':>9s} {'no cache ms':>11s} {'speed-up':>9s} {'LLM half':>9s} "
          f"{'bound (prefill tokens)':>23s}")
    for which, r in summary:
        print(f"{which:10s} {r['cache']:9.1f} {r['nocache']:11.1f} {r['speedup']:8.2f}x {r['llm_speedup']:8.2f}x "
              f"{r['bound']:22.2f}x")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as fh:
            json.dump([{"llm": w, "device": args.device, **r} for w, r in summary], fh, indent=1)
        os.replace(tmp, args.json)


def run(model: ReferringSegmenter, args) -> dict:
    one = copy.copy(model)  # same modules, one question per batch
    one.config = dataclasses.replace(model.config, predict_batch_size=1)
    scene = synthetic_scene((args.objects,), points_per_object=20, seed=0)
    scene = type(scene)(scene.tokens.to(args.device), scene.point_feat.to(args.device), scene.points.to(args.device))
    texts = [TEXTS[i % len(TEXTS)] for i in range(args.queries)]
    sc = SceneCache(model, scene)
    n, r = args.queries, args.repeats

    runs = {"batch, cache": lambda: model.predict(scene, texts, use_cache=True),
            "batch, no cache": lambda: model.predict(scene, texts, use_cache=False),
            "one by one, cache": lambda: one.predict(scene, texts, use_cache=True),
            "one by one, no cache": lambda: one.predict(scene, texts, use_cache=False)}
    results = {k: f() for k, f in runs.items()}  # warm-up (allocator, first-call overheads) and results
    times = {k: [] for k in runs}
    for _ in range(r):  # interleaved, so load changes on a shared machine hit every variant alike
        for k, f in runs.items():
            times[k].append(_median_ms(f, 1))
    ms = {k: statistics.median(v) / n for k, v in times.items()}

    with torch.inference_mode(), model.lm.merged_lora():  # where the batched cached path spends its time
        # (10 questions), in the same mode as predict
        start_fn = lambda: generation.start_packed(model, sc, texts)  # noqa: E731
        steps_fn = lambda: start_fn().steps  # noqa: E731
        parts = {"encode the shared prefix": _median_ms(lambda: SceneCache(model, scene), r),
                 "questions' own tokens": _median_ms(steps_fn, r)}
        parts["greedy steps"] = _median_ms(lambda: generation.greedy(model, steps_fn()), r) - parts["questions' own tokens"]
        # the LLM half alone, both paths (what the cache changes; the mask decoder after it is the same work)
        llm_cached = _median_ms(lambda: generation.greedy(model, generation.start_packed(
            model, SceneCache(model, scene), texts).steps), r)
        llm_plain = _median_ms(lambda: generation.greedy(model, generation.start_uncached(model, scene, texts).steps), r)
        started = start_fn()
        q, w, wm = generation.greedy(model, started.steps)[1], started.words, started.word_mask
        d = model.decoder
        parts["mask decoder"] = _median_ms(lambda: d.decode(q, d.encode_scene(
            scene.point_feat, scene.points.coord, scene.tokens, scene.points.superpoint), w, wm), r)

    ref = results["one by one, no cache"]
    tails = [sc.query_tail(t).numel() for t in texts]
    bound = sum(sc.cached_len + t for t in tails) / (sc.cached_len + sum(tails))
    cfg = model.lm.causal_lm.config
    print(f"scene: {args.objects} objects, shared start {sc.cached_len} tokens (prefix {sc.prefix_len}); model: "
          f"{cfg.model_type} hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{model.lm.causal_lm.dtype}, LoRA r={args.lora_r}, decoder relation layers "
          f"{args.relation_layers}; {n} queries, up to "
          f"{args.max_new_tokens} new tokens; {args.threads} thread(s); median of {r}")
    print(f"{'':22s} {'ms/query':>9s}   vs one by one, no cache: same answers, mask points differing, "
          "max |score diff|")
    for k in runs:
        print(f"{k:22s} {ms[k]:9.1f}   {_compare(results[k], ref)}")
    print(f"speed-up of the cache, batched   : {ms['batch, no cache'] / ms['batch, cache']:6.2f}x")
    print(f"speed-up of the cache, one by one: {ms['one by one, no cache'] / ms['one by one, cache']:6.2f}x")
    print("cached batch, ms per query: " + ", ".join(f"{k} {v / n:.1f}" for k, v in parts.items()))
    print(f"LLM half only (prompt encoding + greedy steps, batched): {llm_cached / n:.1f} ms/query with the cache, "
          f"{llm_plain / n:.1f} without: {llm_plain / llm_cached:.2f}x")


    print(f"bound on the speed-up (prefill tokens without / with the cache): {bound:.2f}x")
    return {"cache": ms["batch, cache"], "nocache": ms["batch, no cache"],
            "speedup": ms["batch, no cache"] / ms["batch, cache"], "llm_speedup": llm_plain / llm_cached,
            "bound": bound}


if __name__ == "__main__":
    main()
