"""`scene3d demo`: the whole pipeline on the embedded default, in minutes on a laptop CPU.

1. make a small synthetic ScanNet-format dataset (``scene3d synth``: raw ``*_vh_clean_2.ply``, segs,
   aggregation, axis alignment, label tsv, ScanRefer / Multi3DRefer / Sr3D-format annotations);
2. preprocess it with the real tools (``scene3d prep scannet`` and ``scene3d prep refer`` code paths);
3. train the tiny model (``experiment=synthetic_cpu``) briefly through the same hydra configs and engine as
   ``scene3d train``;
4. evaluate the checkpoint on the held-out scenes (``scene3d eval`` code path: predictions + metrics);
5. answer a few queries on a held-out scene through the Python API and write coloured PLYs and PNG renders.

Everything goes under ``out_dir`` (default ``demo_out/``); the paths are printed at the end.
``quick=True`` (``--quick``, used by CI) shrinks every stage so the whole run takes about a minute.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional


@dataclass(frozen=True)
class DemoSettings:
    num_scenes: int
    max_steps: int
    eval_samples: Optional[int]
    queries: int


FULL = DemoSettings(num_scenes=12, max_steps=500, eval_samples=None, queries=4)
QUICK = DemoSettings(num_scenes=3, max_steps=8, eval_samples=6, queries=2)


class DemoResult(NamedTuple):
    out_dir: Path
    run_dir: Path
    checkpoint: Path
    metrics: dict          # overall metrics of the held-out evaluation
    metrics_file: Path
    pictures: list         # [(query, png, ply)]
    minutes: float


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(out_dir="demo_out", quick: bool = False, seed: int = 0, max_steps: Optional[int] = None) -> DemoResult:
    from scene3d.api import Segmenter
    from scene3d.config import compose
    from scene3d.data.referring import read_jsonl
    from scene3d.data.synthetic import prepare_synthetic
    from scene3d.engine.evaluate import run_checkpoint_eval
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

    _say(f"3/5 training the tiny model for {steps} steps (experiment=synthetic_cpu) -> {run_dir}")
    overrides = [
        "experiment=synthetic_cpu", f"out_dir={run_dir}", f"data.synthetic.root={data_root}",
        f"data.synthetic.num_scenes={s.num_scenes}", f"data.synthetic.seed={seed}",
        "data.synthetic.val_fraction=0.25", f"trainer.max_steps={steps}", f"trainer.seed={seed}",
        "trainer.ckpt_every=0", "eval.in_training=false",
    ]
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

    _say("5/5 answering queries on a held-out scene through the Python API")
    seg = Segmenter.from_pretrained(run_dir)
    rows = read_jsonl(data.val) or read_jsonl(data.train)
    scene_id = rows[0]["scene_id"]
    texts = [r["text"] for r in rows if r["scene_id"] == scene_id][: s.queries]
    scene = seg.load_scene(data.processed / scene_id)
    pictures = []
    for res in seg.segment(scene, texts):
        saved = save_result(scene, res, out_dir / "queries")
        ids = ", ".join(str(int(i)) for i in res.object_ids) or "none"
        _say(f'     "{res.text}" -> objects [{ids}] ({int(res.point_mask.sum())} points) via {res.source}')
        pictures.append((res.text, Path(saved.png), Path(saved.ply)))

    minutes = (time.perf_counter() - t0) / 60
    _say(f"done in {minutes:.1f} min. Outputs:")
    _say(f"     data        {data_root}")
    _say(f"     run         {run_dir} (metrics.csv, loss_curves.png, tb/, checkpoints/)")
    _say(f"     evaluation  {ev.metrics_file}")
    for _, png, _ in pictures:
        _say(f"     picture     {png}")
    return DemoResult(out_dir, run_dir, Path(summary.checkpoint), overall, ev.metrics_file, pictures, minutes)
