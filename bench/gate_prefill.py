"""Token gating on a pretrained LLM's prefill: FLOPs and measured time of the scene prefix, with and without the
gate, on the same scenes (issue 20, item 2, measuring half).

For each keep ratio (1.0 = no gate, then e.g. 0.5 / 0.3 / 0.1) and each scene, the scene prefix (system prompt +
one identifier and one object token per object + the fixed question head, what
:class:`scene3d.models.cache.SceneCache` encodes) is built from the objects that enter the prompt: all of them
without the gate, the ones the gate keeps with it. Printed per ratio, summed over the scenes:

* prefix tokens, and the prefill FLOPs of the LLM over them, counted from the model's config
  (:func:`prefill_flops`, formula there) plus the gate scorer's FLOPs (:func:`gate_flops`, counted from its
  linear layers) where the gate runs. Two counts: the scene's own prefill (``FLOPs``), which is what a query
  costs, since the system turn shared by every scene comes from the model's system-turn cache
  (:func:`scene3d.models.cache.system_turn_cache`; its keys are still attended to and counted); and the whole
  prefix encoded from scratch, system turn included (``FLOPs all``), the count before that cache;
* the measured time: gate (query embedding, scorer, ``scene3d::token_gate``) + prefix encoding
  (``SceneCache``), median of ``--repeats`` interleaved runs on the same scenes and questions.

The gate here is freshly initialised (untrained): which objects it keeps does not change the counts or the time,
only the answers, so this bench measures cost alone. The accuracy half of the issue (fine-tuning SmolLM2 with
the gate, mIoU on the template / paraphrase splits) needs the trained model: pass it to :func:`prefill_report`
(``model`` = a trained :class:`~scene3d.models.referring.ReferringSegmenter`, ``gates`` = its trained
:class:`~scene3d.gating.adapter.ObjectTokenGate` per ratio) to get this table for the trained gate.

Note: the gate is query-conditioned, so a gated prefix differs per question and cannot be shared across the
questions of a scene through the KV cache; with several questions per scene the saving must beat the loss of
that sharing (``bench/query_cache.py`` measures the sharing).

    .venv/bin/python bench/gate_prefill.py                         # SmolLM2 (llm=smollm2), bf16, all layers
    .venv/bin/python bench/gate_prefill.py --llm tiny --objects 30,60
    .venv/bin/python bench/gate_prefill.py --keep-ratios 1.0,0.3 --layers 4 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from scene3d.gating.adapter import GateConfig, ObjectTokenGate  # noqa: E402
from scene3d.heads.mask_decoder import MaskDecoderConfig  # noqa: E402
from scene3d.llm.loader import LLMConfig  # noqa: E402
from scene3d.llm.prompt import build_query  # noqa: E402
from scene3d.llm.tiny import TinyLLMConfig  # noqa: E402
from scene3d.models.cache import SceneCache  # noqa: E402
from scene3d.models.referring import ReferringConfig, ReferringSegmenter  # noqa: E402
from scene3d.structures.scene_inputs import SceneInputs, synthetic_scene  # noqa: E402

TEXTS = ["the brown chair left of the desk", "the table near the window", "all the lamps on the desk",
         "the white cabinet behind the bed", "the trash can next to the door", "the pillow on the couch"]


def prefill_flops(cfg, length: int, past: int = 0) -> int:
    """Matmul FLOPs (2 per multiply-add) of a Llama/Qwen-style decoder over a causal prefill of ``length``
    tokens behind ``past`` cached ones, from its Hugging Face config. Per layer, with hidden ``H``, ``n_h``
    query heads and ``n_kv`` key/value heads of width ``d``, MLP width ``I`` (SwiGLU: gate, up, down):

        projections  2 L H (n_h d)  [q]  + 2 * 2 L H (n_kv d)  [k, v]  + 2 L (n_h d) H  [o]
        attention    2 * 2 n_h d * (L P + L (L + 1) / 2)   [q k^T and p v over the causal pairs, P = past]
        MLP          3 * 2 L H I

    times the number of layers. Not counted: norms, rotary embedding, softmax, the embedding lookup (no
    matmul) and the LM head (a prefix needs no logits but the last token's: 2 H V, added once).
    """
    h, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    n_h = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_h)
    d = int(getattr(cfg, "head_dim", None) or h // n_h)
    inter = int(cfg.intermediate_size)
    L, P = int(length), int(past)
    proj = 2 * L * h * n_h * d + 2 * 2 * L * h * n_kv * d + 2 * L * n_h * d * h
    attn = 2 * 2 * n_h * d * (L * P + L * (L + 1) // 2)
    mlp = 3 * 2 * L * h * inter
    return layers * (proj + attn + mlp) + 2 * h * int(cfg.vocab_size)


def gate_flops(gate: nn.Module, num_tokens: int) -> int:
    """2 * in * out per token for every linear layer of the gate's scorer (an upper bound: a layer that reads
    the query runs once per scene, not once per token)."""
    return sum(2 * m.in_features * m.out_features * num_tokens for m in gate.modules() if isinstance(m, nn.Linear))


def kept_scene(scene: SceneInputs, kept_rows: torch.Tensor) -> SceneInputs:
    """The one-scene ``scene`` with only the objects ``kept_rows`` (sorted local rows): points of dropped objects
    become unassigned (-1), so the prompt and the decoder see only the kept objects."""
    t = scene.tokens
    kept_rows = kept_rows.to(t.feat.device)
    new_row = torch.full((t.num_objects,), -1, dtype=torch.long, device=t.feat.device)
    new_row[kept_rows] = torch.arange(kept_rows.numel(), device=t.feat.device)
    p2o = torch.where(t.point2obj >= 0, new_row[t.point2obj.clamp(min=0)], t.point2obj)
    tokens = t.replace(feat=t.feat[kept_rows], center=t.center[kept_rows], size=t.size[kept_rows],
                       obj_offset=torch.tensor([kept_rows.numel()], device=t.obj_offset.device), point2obj=p2o,
                       object_ids=None if t.object_ids is None else t.object_ids[kept_rows])
    return SceneInputs(tokens, scene.point_feat, scene.points)


def gate_rows(model: ReferringSegmenter, gate: ObjectTokenGate, scene: SceneInputs, text: str) -> torch.Tensor:
    """The rows ``gate`` keeps for ``text``: the query embedding exactly as
    :meth:`ReferringSegmenter.gate_objects` builds it, then the gate."""
    dev = model.lm.new_embed.weight.device
    ids = build_query(model.text_tokenizer, text, model.config.prompt).to(dev)
    qe = model.lm.embed(ids[None])[0].mean(0, keepdim=True)  # (1, H)
    return gate(scene.tokens, qe).kept_index.long()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def prefill_report(model: ReferringSegmenter, gates: dict, scenes: list, texts: list, repeats: int = 3) -> list:
    """One row per keep ratio in ``gates`` (``{ratio: ObjectTokenGate or None}``; ``None`` = no gate): prefix
    tokens, FLOPs and median time over ``scenes`` x ``texts``. ``model`` must have no gate of its own (the
    gated prefix is built here, per question)."""
    cfg = model.lm.causal_lm.config
    device = model.lm.new_embed.weight.device

    def run_once(gate, scene, text):
        """(SceneCache of the prefix that enters the LLM, the gate's FLOPs)"""
        if gate is None:
            return SceneCache(model, scene), 0
        rows = gate_rows(model, gate, scene, text)
        sub = kept_scene(scene, rows)
        return SceneCache(model, sub), gate_flops(gate, scene.tokens.num_objects)

    rows, times = {}, {r: [] for r in gates}
    with torch.inference_mode():
        for r, gate in gates.items():  # counts (and a warm-up)
            tokens, flops, flops_all = 0, 0, 0
            for scene in scenes:
                for text in texts:
                    sc, gf = run_once(gate, scene, text)
                    tokens += sc.cached_len
                    flops += prefill_flops(cfg, sc.cached_len - sc.system_len, sc.system_len) + gf
                    flops_all += prefill_flops(cfg, sc.cached_len) + gf
            rows[r] = {"ratio": r, "tokens": tokens, "flops": flops, "flops_all": flops_all}
        for _ in range(repeats):  # interleaved, so load changes on a shared machine hit every ratio alike
            for r, gate in gates.items():
                _sync(device)
                t0 = time.perf_counter()
                for scene in scenes:
                    for text in texts:
                        run_once(gate, scene, text)
                _sync(device)
                times[r].append(time.perf_counter() - t0)
    for r in gates:
        rows[r]["ms"] = 1e3 * statistics.median(times[r])
    return [rows[r] for r in gates]


def _to(scene: SceneInputs, device) -> SceneInputs:
    return SceneInputs(scene.tokens.to(device), scene.point_feat.to(device), scene.points.to(device))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="smollm2", help="smollm2 (default), a local model dir, or tiny")
    ap.add_argument("--layers", type=int, default=None, help="keep the first k layers (llm.num_layers)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--keep-ratios", default="1.0,0.5,0.3,0.1", help="1.0 means no gate")
    ap.add_argument("--objects", default="40,80,150", help="objects per scene, one scene each")
    ap.add_argument("--questions", type=int, default=2, help="questions per scene")
    ap.add_argument("--min-keep", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    objects = [int(x) for x in args.objects.split(",")]
    if args.llm == "tiny":
        llm = LLMConfig(tiny=TinyLLMConfig(), num_obj_tokens=max(objects), lora_r=0)
    else:
        llm = LLMConfig(path=args.llm, num_layers=args.layers, num_obj_tokens=max(objects), lora_r=0,
                        dtype=args.dtype)
    model = ReferringSegmenter(ReferringConfig(
        llm=llm, decoder=MaskDecoderConfig(dim=64, num_queries=2, num_layers=1, num_heads=4))).eval().to(args.device)
    scenes = [_to(synthetic_scene((m,), points_per_object=20, seed=i), args.device) for i, m in enumerate(objects)]
    texts = TEXTS[: args.questions]
    obj_dim, h = scenes[0].tokens.feat.shape[1], model.lm.hidden_size
    gates = {}
    for r in (float(x) for x in args.keep_ratios.split(",")):
        if r >= 1.0:
            gates[r] = None
        else:
            g = ObjectTokenGate(obj_dim, h, GateConfig(enabled=True, keep_ratio=r, min_keep=args.min_keep))
            gates[r] = g.eval().to(args.device)
    report = prefill_report(model, gates, scenes, texts, args.repeats)
    cfg = model.lm.causal_lm.config
    print(f"model: {cfg.model_type} hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{model.lm.causal_lm.dtype}, {args.device}, threads {torch.get_num_threads()}; scenes of {objects} "
          f"objects x {len(texts)} questions; median of {args.repeats}; gate untrained (cost only)")
    base = next((row for row in report if row["ratio"] >= 1.0), report[0])
    print("GFLOPs: the scene's own prefill (system turn from the model's cache); all: the whole prefix from scratch")
    print(f"{'keep':>5} {'gate':>5} {'prefix tok':>10} {'GFLOPs':>9} {'vs none':>8} {'GFLOPs all':>10} "
          f"{'vs none':>8} {'ms':>9} {'time vs none':>12}")
    for row in report:
        print(f"{row['ratio']:5.2f} {'no' if row['ratio'] >= 1.0 else 'yes':>5} {row['tokens']:10d} "
              f"{row['flops'] / 1e9:9.2f} {row['flops'] / base['flops'] - 1:+8.0%} {row['flops_all'] / 1e9:10.2f} "
              f"{row['flops_all'] / base['flops_all'] - 1:+8.0%} {row['ms']:9.1f} {row['ms'] / base['ms'] - 1:+11.0%}")


if __name__ == "__main__":
    main()
