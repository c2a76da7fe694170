"""Learning check: train on the synthetic benchmark for a fixed CPU budget, score held-out scenes — for the
tiny random LLM and for the pretrained SmolLM2, side by side in one run.

    .venv/bin/python bench/learn_synthetic.py                 # tiny 15 min, then SmolLM2 30 min (if installed)
    .venv/bin/python bench/learn_synthetic.py --llm tiny --minutes 5 -- trainer.lr=2e-3 trainer.batch_size=8
    .venv/bin/python bench/learn_synthetic.py --llm smollm2 --smollm2-minutes 10 --smollm2-layers 4

``--llm`` chooses (comma-separated; default both where SmolLM2 is installed). SmolLM2 trains with
``llm=smollm2``, its first ``--smollm2-layers`` layers (``llm.num_layers``) and LoRA r=16, for
``--smollm2-minutes``, and with ``data.rewording=--smollm2-rewording`` (0.5: half the training rows, drawn
per item and epoch, get another wording of their program, data_prep/rewording.py; measured over 30 minutes
at 4 layers: template | paraphrase 0.813 | 0.447 without, 0.792 | 0.611 with; at 8 layers with the relative
clauses and training synonyms, paraphrase ~0.79-0.80, README; the tiny
model's fixed vocabulary lacks most of those words, so it trains without); everything else (data, head, hydra
overrides after ``--``) is the same.

Trains ``experiment=synthetic_cpu`` (plus any hydra overrides after ``--``) through
:func:`scene3d.train.run_training` with ``trainer.time_budget_s`` set to what is left of the budget after the
data is made: the trainer plans its step count from its own pace and moves the cosine schedule's end to fit
(:class:`scene3d.engine.trainer.StepBudget`). Then every held-out (val) row is predicted once and scored with
:mod:`scene3d.metrics` for the reconciled result, the identifier-only path (``Prediction.identifier_mask``)
and the decoder-only path (``Prediction.decoder_mask``), next to two trivial baselines (the largest object;
a random object), on the template split and on the paraphrase split (the same val programs worded as real
annotators word them, data_prep/paraphrase.py; :func:`score_split` scores one split, all paths). Gating (issue 20): the trained model is fine-tuned
for ``--gate-minutes`` more at each keep ratio of ``--gate-keep`` (``model.gate.enabled=true``; the new gate
scorer trains while the keep ratio anneals from 1), then both splits are scored on the same ``--gate-rows``
rows as the ungated model, and the scene prefix's prefill FLOPs and time are measured with and without the
trained gate on the same held-out scenes (:func:`gated`); reported as unavailable when scene3d.gating cannot be
built. A control fine-tune with the gate off (same steps, learning rate and data) runs first: the gate's cost is
a gated model's figure against the control's, not against the trained model's (the fine-tune moves it too).
``--checkpoint RUN`` scores and gates a run this bench trained before instead of training one (with the same
``--llm`` and overrides; ``--gate-steps`` then sets the fine-tune length).

Ablation (``--ablation on``, the default): each LLM is trained a second time, with the same budget, with
``model.referring.decoder_states=embeddings`` — the decoder reads the LLM's input embeddings at the question's
tokens and at its sentence position instead of its last-layer states — and scored the same way; the printed drop is what the
LLM's layers contribute to the mask. (The identifier answer, with its pointer, still runs through the LLM in
both.)

Goals (issue 18): tiny LLM, 15 CPU-minutes: template reconciled >= 0.80; SmolLM2, <= 30 CPU-minutes: template
>= 0.85, paraphrase >= 0.75, identifier-only >= 0.70, ablation drop >= 0.15.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # gate_prefill, beside this file


def baseline_rows(rows, processed_dir, kind: str, seed: int = 0) -> list:
    """Prediction rows of a trivial predictor: the scene's largest object, or a uniformly random object."""
    from scene3d.data.scene import load_processed_scene

    rng = np.random.default_rng(seed)
    out, cache = [], {}
    for r in rows:
        sid = r["scene_id"]
        if sid not in cache:
            objs = [o for o in load_processed_scene(Path(processed_dir) / sid).objects if o.num_points > 0]
            cache[sid] = objs
        objs = cache[sid]
        pick = max(objs, key=lambda o: o.num_points) if kind == "largest" else objs[int(rng.integers(len(objs)))]
        out.append({"dataset": r["dataset"], "scene_id": sid, "ann_id": r["ann_id"], "pred_object_ids": [int(pick.id)]})
    return out


def score(pred_rows, rows, processed_dir) -> dict:
    from scene3d.metrics import evaluate_rows

    table = {(p["dataset"], p["scene_id"], str(p["ann_id"])): {**p, "_where": "baseline"} for p in pred_rows}
    return evaluate_rows(table, rows, processed_dir, progress=False).metrics["overall"]


def breakdown(res, rows) -> str:
    """mIoU of ``res`` (an EvalResult over ``rows``) per expression kind (the synthetic ``program`` op) and per
    number of targets: where the model fails."""
    groups: dict = {}
    for r, s in zip(rows, res.per_sample):
        prog = r.get("program") or {}
        n = len(r["targets"])
        keys = [f"op={prog.get('op', '?')}", f"targets={min(n, 2)}{'+' if n >= 2 else ''}"]
        if str(r.get("dataset", "")).endswith("_paraphrase"):  # which of the split's sentence frames, and whether a synonym
            keys += paraphrase_groups(r["text"])
        for g in keys:
            groups.setdefault(g, []).append(float(s["iou"]))
    return "  ".join(f"{g} {np.mean(v):.2f} (n={len(v)})" for g, v in sorted(groups.items()))


def paraphrase_groups(text: str) -> list:
    """Groups of a paraphrase-split text (data_prep/paraphrase.py): its frame (ScanRefer's "this is a ..."
    sentences or Sr3D's "select the ... that is ...") and whether it names a class by a synonym."""
    from data_prep.paraphrase import OPENINGS, SYNONYMS

    t = " ".join(text.lower().split())
    scanrefer = t.startswith(tuple(OPENINGS)) or t.startswith("there are")
    syn = any(f" {w}" in f" {t}" for ws in SYNONYMS.values() for w in ws)
    return [f"frame={'scanrefer' if scanrefer else 'sr3d'}", f"synonym={'yes' if syn else 'no'}"]


PATHS = ("reconciled", "identifier", "decoder")


def paraphrase_rows(data) -> list:
    """The paraphrase split's rows of a synthetic data config: ``val_paraphrase.jsonl`` beside ``data.val``."""
    from scene3d.data.referring import read_jsonl
    from scene3d.utils.io import expand_path

    path = expand_path(data.val).with_name("val_paraphrase.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"paraphrase split not found: {path} (made by data_prep.synthetic.prepare_synthetic)")
    return read_jsonl(path)


def score_split(model, processed_dir, rows, name: str, paths=PATHS) -> dict:
    """Predict every row of one split once and score each mask path; prints one line per path and the
    reconciled breakdown by kind. Returns {path: EvalResult}."""
    from scene3d.engine.evaluate import evaluate_model_masks

    res = evaluate_model_masks(model, processed_dir, rows, tuple(paths), progress=False)
    label = {"reconciled": "model (reconciled)", "identifier": "identifier-only path", "decoder": "decoder-only path"}
    for path in paths:
        print(line(f"{name}: {label.get(path, path)}", res[path].metrics["overall"]))
    if "reconciled" in res:
        print(f"{name}: reconciled by kind: " + breakdown(res["reconciled"], rows))
    return res


def line(name: str, m: dict) -> str:
    return f"{name:<36s} mIoU {m['miou']:.4f}   Acc@0.25 {m['acc@0.25']:.4f}   Acc@0.5 {m['acc@0.5']:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default=None, help="comma-separated: tiny, smollm2 (default: both where installed)")
    ap.add_argument("--minutes", type=float, default=15.0, help="CPU budget for training the tiny model")
    ap.add_argument("--smollm2-minutes", type=float, default=30.0, help="CPU budget for training on SmolLM2")
    ap.add_argument("--smollm2-layers", type=int, default=8, help="SmolLM2 layers kept (llm.num_layers; 30: all)")
    ap.add_argument("--smollm2-rewording", type=float, default=0.5,
                    help="data.rewording of the SmolLM2 runs: the share of training rows worded another way "
                         "(data_prep/rewording.py; the tiny model's fixed vocabulary lacks those words: 0 there)")
    ap.add_argument("--gate-minutes", type=float, default=2.0, help="budget of each gated fine-tune (0: skip)")
    ap.add_argument("--gate-keep", default="0.5,0.3,0.1", help="keep ratios of the gated fine-tunes")
    ap.add_argument("--gate-steps", type=int, default=None,
                    help="steps of each gated fine-tune (default: what --gate-minutes allows at the training pace; "
                         "needed with --checkpoint)")
    ap.add_argument("--checkpoint", default=None,
                    help="score (and gate) this trained run instead of training one: its checkpoint directory, "
                         "trained by this bench with the same --llm and overrides (one --llm, --ablation off)")
    ap.add_argument("--gate-rows", type=int, default=400,
                    help="rows per split scored for the gated models and the ungated one (evenly spread; a gated "
                         "model encodes a prefix per question, so all 1722 would take ~4x the ungated time)")
    ap.add_argument("--gate-scenes", type=int, default=8, help="held-out scenes of the prefill cost")
    ap.add_argument("--gate-repeats", type=int, default=3, help="interleaved repeats of the prefill timing")
    ap.add_argument("--ablation", choices=("on", "off", "only"), default="on",
                    help="also train, with the same budget, a model whose decoder reads the LLM's input embeddings "
                         "at the same positions instead of its states (model.referring.decoder_states=embeddings); "
                         "'only': just that model (to run the two halves as two processes, one core each)")
    ap.add_argument("--cache", default=None, help="where the synthetic scenes are made (default $SCENE3D_CACHE)")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("overrides", nargs="*", help="hydra overrides for the training config (after --)")
    args = ap.parse_args(argv)
    if args.checkpoint and (args.ablation != "off" or not args.llm or "," in args.llm):
        ap.error("--checkpoint scores one trained run: give one --llm and --ablation off")
    if args.checkpoint and args.gate_minutes > 0 and not args.gate_steps:
        ap.error("--checkpoint with gating needs --gate-steps (the training pace is not known)")
    if args.threads:
        torch.set_num_threads(args.threads)
    import os

    if args.cache:
        os.environ["SCENE3D_CACHE"] = args.cache
    from scene3d.llm.registry import DEFAULT_MODEL, default_model_path

    llms = args.llm.split(",") if args.llm else (["tiny", DEFAULT_MODEL] if default_model_path() else ["tiny"])
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="learn_synthetic_"))
    table = []
    for which in llms:
        if which == "tiny":
            extra, minutes = [], args.minutes
        else:
            layers = None if args.smollm2_layers >= 30 else args.smollm2_layers
            extra = [f"llm={which}", f"model.referring.llm.num_layers={'null' if layers is None else layers}",
                     "trainer.warmup_steps=20", f"data.rewording={args.smollm2_rewording:g}"]
            minutes = args.smollm2_minutes
        print(f"\n===== LLM: {which} ({minutes:g} CPU-minutes{'' if which == 'tiny' else ', ' + ' '.join(extra)})",
              flush=True)
        if args.ablation != "only":
            table.append((which, "LLM states", learn(args, extra, minutes, out / which)))
        if args.ablation != "off":
            print(f"\n===== LLM: {which}, ablation: the decoder reads the input embeddings at the same positions "
                  f"({minutes:g} CPU-minutes)", flush=True)
            table.append((which, "embeddings", learn(args, extra + ["model.referring.decoder_states=embeddings"],
                                                      minutes, out / f"{which}_ablation", gate=False)))
    print("\nside by side (held-out mIoU; template split | paraphrase split):")
    print(f"{'LLM':10s} {'decoder reads':14s} {'minutes':>8s} {'steps':>6s} {'reconciled':>11s} {'identifier':>11s} "
          f"{'decoder':>8s} {'largest':>8s} {'random':>7s} | {'reconciled':>11s} {'identifier':>11s} {'decoder':>8s}")
    for which, reads, r in table:
        print(f"{which:10s} {reads:14s} {r['minutes']:8.2f} {r['steps']:6d} {r['reconciled']:11.4f} "
              f"{r['identifier']:11.4f} {r['decoder']:8.4f} {r['largest']:8.4f} {r['random']:7.4f} | "
              f"{r['para_reconciled']:11.4f} {r['para_identifier']:11.4f} {r['para_decoder']:8.4f}")
    results = {(w, reads): r for w, reads, r in table}
    for which in llms:
        full, abl = results.get((which, "LLM states")), results.get((which, "embeddings"))
        if full and abl:
            print(f"ablation drop ({which}, LLM states -> input embeddings): template reconciled "
                  f"{full['reconciled'] - abl['reconciled']:+.4f}, decoder {full['decoder'] - abl['decoder']:+.4f}; "
                  f"paraphrase reconciled {full['para_reconciled'] - abl['para_reconciled']:+.4f}, decoder "
                  f"{full['para_decoder'] - abl['para_decoder']:+.4f}")
    print(f"total minutes: {(time.perf_counter() - t0) / 60:.2f}")
    return 0


def learn(args, extra: list, minutes: float, out: Path, gate: bool = True) -> dict:
    """Train one LLM choice for ``minutes`` (data included), score the held-out rows; returns the overall
    mIoU of each path and of the baselines."""
    from scene3d.config import compose, to_objects
    from scene3d.models.loading import load_model
    from scene3d.train import prepare_data, run_training, split_rows

    t0 = time.perf_counter()
    base = ["experiment=synthetic_cpu", "eval.in_training=false", "trainer.progress=false", *extra, *args.overrides]
    cfg = compose("train", base + [f"out_dir={out / 'main'}"])
    obj = to_objects(cfg)
    prepare_data(obj.data)
    if args.checkpoint:  # a run this bench trained before: score it (and gate it) as it is
        loaded = load_model(args.checkpoint)
        model, checkpoint, steps, sps, train_min = loaded.model, loaded.path, loaded.step, None, float("nan")
        print(f"checkpoint {checkpoint}: step {steps}, not trained here", flush=True)
    else:
        budget = minutes * 60 - (time.perf_counter() - t0) - 10.0  # building the model, loading the data
        print(f"data ready after {(time.perf_counter() - t0) / 60:.2f} min; training budget {budget / 60:.2f} min",
              flush=True)
        cfg = compose("train", base + [f"out_dir={out / 'main'}", "trainer.max_steps=1000000", "trainer.ckpt_every=0",
                                       f"trainer.time_budget_s={budget:.1f}"])
        t_fit = time.perf_counter()
        summary = run_training(cfg)
        checkpoint, steps = summary.checkpoint, int(summary.step)
        sps = (time.perf_counter() - t_fit) / max(summary.step, 1)
        train_min = (time.perf_counter() - t0) / 60
        print(f"trained {summary.step} steps in {train_min:.2f} min; last train row: "
              + ", ".join(f"{k}={v:.4g}" for k, v in summary.train_metrics.items()), flush=True)
        model = load_model(checkpoint).model

    val = split_rows(obj.data, "val")
    print(f"\nheld-out: {len(val.rows)} rows of {len({r['scene_id'] for r in val.rows})} unseen scenes "
          f"(synthetic, {obj.data.synthetic.num_scenes} scenes, val_fraction {obj.data.synthetic.val_fraction})")
    res = score_split(model, val.processed_dir, val.rows, "template")
    para_rows = paraphrase_rows(obj.data)
    print(f"paraphrase split: the same {len(para_rows)} programs, worded as real annotators word them")
    para = score_split(model, val.processed_dir, para_rows, "paraphrase")
    largest = score(baseline_rows(val.rows, val.processed_dir, "largest"), val.rows, val.processed_dir)
    rand = score(baseline_rows(val.rows, val.processed_dir, "random"), val.rows, val.processed_dir)
    print(line("baseline: largest object", largest))
    print(line("baseline: random object", rand))
    print(f"minutes used (data + training): {train_min:.2f}", flush=True)

    if gate and args.gate_minutes > 0:
        gated(args, base, out, checkpoint, val, para_rows, sps)
    return {"minutes": train_min, "steps": steps,
            "reconciled": res["reconciled"].metrics["overall"]["miou"],
            "identifier": res["identifier"].metrics["overall"]["miou"],
            "decoder": res["decoder"].metrics["overall"]["miou"], "largest": largest["miou"], "random": rand["miou"],
            **{f"para_{p}": para[p].metrics["overall"]["miou"] for p in PATHS}}


def gated(args, base, out: Path, checkpoint, val, para_rows, sps) -> list:
    """Issue 20, item 2: for each keep ratio of ``--gate-keep``, fine-tune the trained model with the gate on
    (the new gate scorer trains, the keep ratio anneals from 1 over the first half of the fine-tune), then
    score both splits on the same ``--gate-rows`` rows per split (evenly spread) as the ungated model, and
    measure the scene prefix's prefill FLOPs and time with and without the trained gate on the same held-out
    scenes and questions (``bench/gate_prefill.prefill_report``).

    A **control** fine-tune runs first: the same steps, learning rate and data with the gate off. What the gate
    costs is a gated model's figure against the control's (the fine-tune itself moves the figures too: a
    shorter schedule at a lower learning rate after the main run's cosine end); the change against the
    ungated trained model is printed beside it. Returns one dict per ratio."""
    from gate_prefill import prefill_report

    from scene3d.config import compose, pipeline_config, to_objects
    from scene3d.data.referring import collate_referring, scene_to_tensors
    from scene3d.data.scene import load_processed_scene
    from scene3d.engine.checkpoint import load_checkpoint
    from scene3d.engine.evaluate import evaluate_model_masks, spread_rows
    from scene3d.engine.trainer import Trainer, seed_everything
    from scene3d.models.loading import load_model
    from scene3d.models.pipeline import Scene3DModel
    from scene3d.structures.points import PointBatch
    from data_prep.rewording import reword_row
    from scene3d.train import training_dataset

    ratios = [float(x) for x in args.gate_keep.split(",")]
    rows_t = spread_rows(val.rows, args.gate_rows)
    rows_p = spread_rows(para_rows, args.gate_rows)
    ungated = load_model(checkpoint).model.eval()
    state = load_checkpoint(checkpoint, with_trainer_state=False).model_state

    def miou(model, rows):
        """(reconciled, identifier-only) mIoU: the decoder scores every object, kept or not, so the identifier
        answer is where pruning the LLM's input shows first."""
        res = evaluate_model_masks(model, val.processed_dir, rows, ("reconciled", "identifier"), progress=False)
        return res["reconciled"].metrics["overall"]["miou"], res["identifier"].metrics["overall"]["miou"]

    def fine_tune(ratio, steps):
        """The trained model fine-tuned for ``steps`` with the gate at ``ratio`` (None: gate off, the control);
        None where the gate cannot be built."""
        name = "control" if ratio is None else f"gated_{ratio:g}"
        gate = [] if ratio is None else ["model.gate.enabled=true", f"model.gate.keep_ratio={ratio}",
                                         f"model.gate.anneal_steps={max(1, steps // 2)}"]
        try:
            cfg = compose("train", base + gate + [f"trainer.max_steps={steps}", "trainer.warmup_steps=0",
                                                  f"out_dir={out / name}"])
            obj = to_objects(cfg)
            seed_everything(obj.trainer.seed)
            model = Scene3DModel(pipeline_config(cfg.model))
        except Exception as e:  # scene3d.gating missing or broken: report, do not hide
            print(f"gating at keep ratio {ratio:g}: unavailable ({type(e).__name__}: {e})")
            return None
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("segmenter.gate.") or not p.requires_grad
                                      for k, p in model.named_parameters() if k in missing), "weights do not fit"
        ds = training_dataset(obj.data, obj.trainer.seed, reworder=reword_row)
        trainer_cfg = dataclasses.replace(obj.trainer, lr=obj.trainer.lr * 0.3)
        Trainer(trainer_cfg, model, ds, collate_referring, out_dir=out / name, resolved_config=cfg).fit()
        return model.eval()

    (base_t, ident_t), (base_p, ident_p) = miou(ungated, rows_t), miou(ungated, rows_p)
    # the prefill half: the first --gate-scenes held-out scenes, each with its first 2 template questions
    sids = sorted({r["scene_id"] for r in rows_t})[: args.gate_scenes]
    scenes = []
    for sid in sids:
        sc = load_processed_scene(val.processed_dir / sid)
        points = PointBatch.from_list([scene_to_tensors(sc)], scene_ids=[sid])
        with torch.inference_mode():
            scenes.append(ungated.encode(points, points.instance)[0])
    texts = [r["text"] for r in rows_t if r["scene_id"] == sids[0]][:2]
    # gated steps cost about twice an ungated one (a prefix per question)
    steps = args.gate_steps or max(10, int(0.9 * args.gate_minutes * 60 / (sps * 2.0)))
    t = time.perf_counter()
    control = fine_tune(None, steps)
    (ctl_t, cid_t), (ctl_p, cid_p) = miou(control, rows_t), miou(control, rows_p)
    print(f"control fine-tune (gate off, {steps} steps, {(time.perf_counter() - t) / 60:.2f} min): template "
          f"{ctl_t:.4f} ({ctl_t - base_t:+.4f}), paraphrase {ctl_p:.4f} ({ctl_p - base_p:+.4f}); identifier-only "
          f"{cid_t:.4f} | {cid_p:.4f}", flush=True)
    results = []
    for ratio in ratios:
        t = time.perf_counter()
        model = fine_tune(ratio, steps)
        if model is None:
            continue
        (m_t, i_t), (m_p, i_p) = miou(model, rows_t), miou(model, rows_p)
        gate = model.segmenter.gate
        model.segmenter.gate = None  # prefill_report builds the gated prefix itself, per question
        try:
            cost = prefill_report(model.segmenter, {1.0: None, ratio: gate}, scenes, texts, repeats=args.gate_repeats)
        finally:
            model.segmenter.gate = gate
        none, with_gate = cost
        row = {"ratio": ratio, "steps": steps, "minutes": (time.perf_counter() - t) / 60, "template": m_t,
               "paraphrase": m_p, "identifier": (i_t, i_p), "flops": with_gate["flops"] / none["flops"] - 1,
               "flops_all": with_gate["flops_all"] / none["flops_all"] - 1,
               "time": with_gate["ms"] / none["ms"] - 1, "tokens": (none["tokens"], with_gate["tokens"]),
               "ms": (none["ms"], with_gate["ms"])}
        results.append(row)
        print(f"gated, keep ratio {ratio:g}: template {m_t:.4f} ({m_t - ctl_t:+.4f} vs control), paraphrase "
              f"{m_p:.4f} ({m_p - ctl_p:+.4f}); identifier-only {i_t:.4f} ({i_t - cid_t:+.4f}) | {i_p:.4f} "
              f"({i_p - cid_p:+.4f}); prefix {row['tokens'][0]} -> {row['tokens'][1]} tokens, FLOPs "
              f"{row['flops']:+.0%} (system turn included: {row['flops_all']:+.0%}), time {row['ms'][0]:.0f} -> "
              f"{row['ms'][1]:.0f} ms ({row['time']:+.0%}); "
              f"{steps} fine-tune steps, {row['minutes']:.2f} min", flush=True)
    if results:
        print(f"\ngating (issue 20; {len(rows_t)} template + {len(rows_p)} paraphrase rows, the same for every "
              f"row; {steps} fine-tune steps each; changes against the control fine-tune (gate off); FLOPs: the "
              f"scene's own prefill, the system turn coming from the model's cache; all: the whole prefix; "
              f"prefill over "
              f"{len(scenes)} held-out scenes x {len(texts)} questions, median of {args.gate_repeats}):")
        print(f"{'keep':>8} {'template':>9} {'change':>7} {'paraphr.':>9} {'change':>7} {'identifier t|p':>15} "
              f"{'prefix tok':>11} {'FLOPs':>6} {'all':>5} {'ms':>8} {'time':>6}")
        print(f"{'trained':>8} {base_t:9.4f} {'':7s} {base_p:9.4f} {'':7s} {ident_t:7.4f}|{ident_p:.4f} "
              f"{results[0]['tokens'][0]:11d} {'':6s} {results[0]['ms'][0]:8.0f}")
        print(f"{'control':>8} {ctl_t:9.4f} {ctl_t - base_t:+7.4f} {ctl_p:9.4f} {ctl_p - base_p:+7.4f} "
              f"{cid_t:7.4f}|{cid_p:.4f} {results[0]['tokens'][0]:11d}")
        for r in results:
            it, ip = r["identifier"]
            print(f"{r['ratio']:8.2f} {r['template']:9.4f} {r['template'] - ctl_t:+7.4f} {r['paraphrase']:9.4f} "
                  f"{r['paraphrase'] - ctl_p:+7.4f} {it:7.4f}|{ip:.4f} {r['tokens'][1]:11d} {r['flops']:+6.0%} "
                  f"{r['flops_all']:+5.0%} "
                  f"{r['ms'][1]:8.0f} {r['time']:+6.0%}")
    return results


if __name__ == "__main__":
    sys.exit(main())
