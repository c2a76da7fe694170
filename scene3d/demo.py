"""`scene3d demo`: the whole pipeline on the embedded default, in minutes on a laptop CPU.

1. make a small synthetic ScanNet-format dataset (``scene3d synth``: raw ``*_vh_clean_2.ply``, segs,
   aggregation, axis alignment, label tsv, ScanRefer / Multi3DRefer / Sr3D-format annotations);
2. preprocess it with the real tools (``scene3d prep scannet`` and ``scene3d prep refer`` code paths);
3. train briefly through the same hydra configs and engine as ``scene3d train`` (``experiment=synthetic_cpu``):
   on the pretrained LLM (SmolLM2-135M-Instruct, its first :data:`DEMO_LAYERS` layers, LoRA) wherever set-up
   installed it, else on the tiny random model (said so); the pretrained run trains for a time budget;
4. evaluate the checkpoint on the held-out scenes (``scene3d eval`` code path: predictions + metrics);
5. answer held-out queries through the Python API — chosen by a fixed rule (:func:`pick_queries`), not by
   hand — print each answer beside the ground truth and how many were right (IoU > 0.5), and write coloured
   PLYs and PNG renders with the ground truth in a second row.

Everything goes under ``out_dir`` (default ``demo_out/``); the paths are printed at the end.
``quick=True`` (``--quick``, used by CI) shrinks every stage so the whole run takes about a minute.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from scene3d.llm.registry import DEFAULT_MODEL, default_model_path


@dataclass(frozen=True)
class DemoSettings:
    num_scenes: int
    max_steps: int
    eval_samples: Optional[int]
    queries: int
    train_seconds: float = 0.0  # time budget of the pretrained-LLM training (0: max_steps alone)


FULL = DemoSettings(num_scenes=12, max_steps=500, eval_samples=None, queries=8, train_seconds=270.0)
QUICK = DemoSettings(num_scenes=3, max_steps=8, eval_samples=6, queries=2)
#: decoder layers of SmolLM2 the demo keeps (of 30): what fits a ~5-minute demo on 2 CPU cores
DEMO_LAYERS = 4


def choose_llm(llm: str = "auto") -> str:
    """``"smollm2"`` or ``"tiny"``: ``auto`` takes the pretrained model wherever set-up converted it."""
    if llm not in ("auto", "smollm2", "tiny"):
        raise ValueError(f"llm must be auto, smollm2 or tiny, got {llm!r}")
    if llm == "auto":
        return DEFAULT_MODEL if default_model_path() is not None else "tiny"
    return llm


def pick_queries(rows: list, n: int) -> list:
    """``n`` held-out rows by a fixed rule: rows sorted by (scene, ann_id), then evenly spaced (the first,
    then every ``len / n``-th), so different scenes and kinds of question come up and nobody picks them."""
    rows = sorted(rows, key=lambda r: (r["scene_id"], str(r.get("ann_id", ""))))
    if n <= 0 or not rows:
        return []
    step = max(len(rows) / n, 1.0)
    return [rows[int(i * step)] for i in range(min(n, len(rows)))]


class DemoResult(NamedTuple):
    out_dir: Path
    run_dir: Path
    checkpoint: Path
    metrics: dict          # overall metrics of the held-out evaluation
    metrics_file: Path
    pictures: list         # [(query, png, ply)]
    minutes: float
    llm: str = "tiny"      # "smollm2" or "tiny"
    right: int = 0         # queries answered with IoU > 0.5 against the ground truth
    asked: int = 0


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(out_dir="demo_out", quick: bool = False, seed: int = 0, max_steps: Optional[int] = None,
             llm: str = "auto") -> DemoResult:
    # in-function: the whole stack (torch, spconv, transformers, matplotlib) loads only when the demo runs,
    # not for `scene3d --help`
    from data_prep.synthetic import prepare_synthetic
    from scene3d.api import Segmenter
    from scene3d.config import compose
    from scene3d.data.referring import read_jsonl
    from scene3d.evaluate import run_checkpoint_eval
    from scene3d.metrics import mask_iou
    from scene3d.train import run_training
    from scene3d.viz import save_result

    t0 = time.perf_counter()
    s = QUICK if quick else FULL
    steps = max_steps if max_steps is not None else s.max_steps
    out_dir = Path(out_dir).resolve()
    data_root, run_dir = out_dir / "data", out_dir / "run"

    _say(f"1-2/5 synthetic ScanNet-format scenes -> prep scannet -> prep refer  ({s.num_scenes} scenes, {data_root})")
    data = prepare_synthetic(data_root, num_scenes=s.num_scenes, seed=seed, preset="tiny", val_fraction=0.25,
                             progress=True)
    ready = json.loads((data.root / "READY.json").read_text())
    _say(f"     {len(ready['scenes']['train'])} train / {len(ready['scenes']['val'])} val scenes, "
         f"{ready['counts']['train']} train / {ready['counts']['val']} val referring samples")

    which = choose_llm(llm)
    overrides = [
        "experiment=synthetic_cpu", f"out_dir={run_dir}", f"data.synthetic.root={data_root}",
        f"data.synthetic.num_scenes={s.num_scenes}", f"data.synthetic.seed={seed}",
        "data.synthetic.val_fraction=0.25", f"trainer.max_steps={steps}", f"trainer.seed={seed}",
        "trainer.ckpt_every=0", "eval.in_training=false",
    ]
    if which == "tiny":
        if llm == "auto":
            _say("     note: the pretrained LLM is not installed (make setup converts it; `scene3d llm list`), "
                 "so the demo trains the tiny random model")
        _say(f"3/5 training the tiny random LLM for {steps} steps (experiment=synthetic_cpu) -> {run_dir}")
    else:
        # ~2 s a step here: a short warm-up, or a few hundred steps spend a large share warming up
        overrides += [f"llm={which}", f"model.referring.llm.num_layers={DEMO_LAYERS}", "trainer.warmup_steps=10"]
        budget = "" if quick or not s.train_seconds else f", at most {s.train_seconds / 60:.0f} min"
        if budget:
            overrides.append(f"trainer.time_budget_s={s.train_seconds}")
        _say(f"3/5 training on SmolLM2-135M-Instruct (first {DEMO_LAYERS} of 30 layers, LoRA r=16) for up to "
             f"{steps} steps{budget} (experiment=synthetic_cpu) -> {run_dir}")
    if quick:
        overrides += ["trainer.batch_size=2", "trainer.warmup_steps=0", "data.max_points=1500"]
    if (run_dir / "checkpoints").exists():
        overrides.append("resume=true")  # a rerun continues (or just reloads) the earlier run
    summary = run_training(compose("train", overrides))

    _say("4/5 evaluating on the held-out scenes")
    eval_over = [f"checkpoint={run_dir}", f"out_dir={out_dir / 'eval'}"]
    if s.eval_samples is not None:
        eval_over.append(f"eval.max_samples={s.eval_samples}")
    ev = run_checkpoint_eval(compose("eval", eval_over))
    overall = ev.metrics["overall"]
    _say("     " + ", ".join(f"{k}={overall[k]:.3f}" for k in ("miou", "acc@0.25", "acc@0.5") if k in overall)
         + f" over {overall.get('count', '?')} samples")

    _say(f"5/5 answering {s.queries} held-out queries through the Python API (every len/{s.queries}-th "
         "held-out row by scene and ann_id)")
    seg = Segmenter.from_pretrained(run_dir)
    rows = read_jsonl(data.val) or read_jsonl(data.train)
    pictures, right = [], 0
    scenes: dict = {}
    for row in pick_queries(rows, s.queries):
        sid = row["scene_id"]
        if sid not in scenes:
            scenes[sid] = seg.load_scene(data.processed / sid)
        scene = scenes[sid]
        res = seg.segment(scene, row["text"])
        saved = save_result(scene, res, out_dir / "queries", targets=row["targets"])
        gt = np.isin(scene.instance, np.asarray(row["targets"], dtype=np.int64))
        iou = mask_iou(res.point_mask, gt)
        ok = iou > 0.5
        right += int(ok)
        got = ", ".join(f"{int(i)} {scene.labels.get(int(i), '')}".strip() for i in res.object_ids) or "none"
        want = ", ".join(f"{int(i)} {scene.labels.get(int(i), '')}".strip() for i in row["targets"]) or "none"
        _say(f'     {"RIGHT" if ok else "wrong"}  {sid} "{res.text}" -> [{got}]  (truth [{want}], IoU {iou:.2f}, '
             f"via {res.source})")
        pictures.append((res.text, Path(saved.png), Path(saved.ply)))
    _say(f"     {right} of {len(pictures)} queries right (IoU > 0.5)")

    minutes = (time.perf_counter() - t0) / 60
    _say(f"done in {minutes:.1f} min. Outputs:")
    _say(f"     data        {data_root}")
    _say(f"     run         {run_dir} (metrics.csv, loss_curves.png, tb/, checkpoints/)")
    _say(f"     evaluation  {ev.metrics_file}")
    for _, png, _ in pictures:
        _say(f"     picture     {png}")
    return DemoResult(out_dir, run_dir, Path(summary.checkpoint), overall, ev.metrics_file, pictures, minutes,
                      which, right, len(pictures))
