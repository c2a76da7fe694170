"""Per-query time on one scene with and without the scene cache (tiny model, CPU).

Without the cache every query re-encodes the scene prefix (system prompt + one identifier and one object
token per object); with it the prefix is encoded once into a DynamicCache and each query only runs its own
tokens (question, generated answer, [SEG]) on a copy. Both paths run the same greedy decoding and mask
decoder, so the ratio is what the cache saves per query. Prints the figures; asserts nothing about time.

    .venv/bin/python bench/query_cache.py --objects 150 --queries 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scene3d.heads.mask_decoder import MaskDecoderConfig  # noqa: E402
from scene3d.llm.loader import LLMConfig  # noqa: E402
from scene3d.llm.tiny import TinyLLMConfig  # noqa: E402
from scene3d.models.cache import SceneCache  # noqa: E402
from scene3d.models.referring import ReferringConfig, ReferringSegmenter, synthetic_scene  # noqa: E402

TEXTS = ["the brown chair left of the desk", "the table near the window", "all the lamps on the desk",
         "the white cabinet behind the bed", "the trash can next to the door", "the pillow on the couch",
         "the monitor on the left", "the largest bookshelf in the room", "the piano", "the two armchairs facing the tv"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=150)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tiny = TinyLLMConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = ReferringSegmenter(ReferringConfig(
        llm=LLMConfig(tiny=tiny, num_obj_tokens=max(200, args.objects)),
        decoder=MaskDecoderConfig(dim=64, num_queries=2, num_layers=1, num_heads=4),
        max_new_tokens=args.max_new_tokens)).eval()
    scene = synthetic_scene((args.objects,), points_per_object=20, seed=0)
    texts = [TEXTS[i % len(TEXTS)] for i in range(args.queries)]
    prefix_len = SceneCache(model, scene).prefix_len

    model.predict(scene, texts[:1], use_cache=True)  # warm-up (allocator, first-call overheads)
    model.predict(scene, texts[:1], use_cache=False)
    t0 = time.perf_counter()
    cached = model.predict(scene, texts, use_cache=True)  # includes encoding the prefix once
    t1 = time.perf_counter()
    plain = model.predict(scene, texts, use_cache=False)
    t2 = time.perf_counter()
    # prefill only (teacher-forced query + answer in one pass, as in scoring / evaluation of the LM loss):
    # the part of a query the cache changes, without the per-token decoding steps both paths share
    from scene3d.llm.prompt import build_prompt

    prompts = [build_prompt(model.tokenizer, model.vocab, args.objects, t, [i % args.objects]) for i, t in enumerate(texts)]
    with torch.no_grad():
        t3 = time.perf_counter()
        for p in prompts:
            model.lm(model._embed_prompt(scene, 0, p, scene.tokens.feat)[None])
        t4 = time.perf_counter()
        sc = SceneCache(model, scene)
        for p in prompts:
            model.lm(model.lm.embed(p.input_ids[None, p.prefix_len:]), cache=sc.fork(), use_cache=True)
        t5 = time.perf_counter()
    same = all(a.answer_ids == b.answer_ids and torch.equal(a.point_mask, b.point_mask) for a, b in zip(cached, plain))
    n = args.queries
    print(f"scene: {args.objects} objects, prefix {prefix_len} tokens; model: Qwen2 hidden {args.hidden}, "
          f"{args.layers} layers; {n} queries, up to {args.max_new_tokens} new tokens; {args.threads} thread(s)")
    print(f"without cache: {1e3 * (t2 - t1) / n:8.1f} ms/query")
    print(f"with cache   : {1e3 * (t1 - t0) / n:8.1f} ms/query  (prefix encoded once, included)")
    print(f"speed-up     : {(t2 - t1) / (t1 - t0):8.2f}x   identical results: {same}")
    print(f"prefill only : {1e3 * (t4 - t3) / n:8.1f} -> {1e3 * (t5 - t4) / n:6.1f} ms/query, "
          f"speed-up {(t4 - t3) / (t5 - t4):.2f}x (prefix encoded once, included)")


if __name__ == "__main__":
    main()
