"""``python -m scene3d.train [overrides]`` (= ``scene3d train``): compose the hydra configs, build, train.

``run_training(cfg) -> FitSummary`` is the importable entry (``cfg`` from :func:`scene3d.config.compose`).
Works the same under ``torchrun --nproc_per_node N -m scene3d.train ...`` (DDP; see docs/training_engine.md).

What it builds from the config (see ``configs/`` and :mod:`scene3d.config`):

* data: the processed scenes and the referring rows of ``data.train`` (``stage=referring``), or object
  alignment rows generated from the training scenes' ``objects.json`` (``stage=alignment``, see
  :func:`alignment_rows`); the synthetic benchmark is generated first when ``data.synthetic`` is set;
* the model: :class:`~scene3d.models.pipeline.Scene3DModel` from the ``model`` node, seeded by
  ``trainer.seed`` before construction (same initial weights on every run and every rank);
* validation: :class:`~scene3d.engine.evaluate.ValidationFn` on ``eval.max_samples`` rows of the eval split;
* the run directory: ``out_dir`` or ``runs/<experiment>/<timestamp>`` (rank 0 picks it, every rank uses it).
  Hydra only composes: it writes nothing into the working directory and does not change it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from scene3d.config import TrainConfig, compose, expand_path, pipeline_config, to_objects
from scene3d.engine.trainer import FitSummary, Trainer, seed_everything
from scene3d.llm.tiny import plural as _plural

log = logging.getLogger(__name__)

#: Dataset name of generated alignment rows (their ``dataset`` field).
ALIGNMENT_DATASET = "alignment"


# ---------------------------------------------------------------------------------------------------------
# data


def alignment_rows(processed_dir, scene_ids: Sequence[str], negatives: int = 2,
                   skip_labels: Sequence[str] = ("wall", "floor", "ceiling"), seed: int = 0) -> list[dict]:
    """Stage-1 rows binding object tokens to identifiers and class text, from each scene's ``objects.json``.

    Per scene and class (labels in ``skip_labels`` left out): ``"all the <plural>"`` targets every object of
    the class; ``"the <label>"`` targets the object when it is the only one of its class; and ``negatives``
    classes seen in other scenes but absent here give ``"all the <plural>"`` rows with no target. Rows have
    the referring-row keys (``dataset="alignment"``, ``ann_id``, ``scene_id``, ``targets``, ``text``,
    ``object_name``) so they train and evaluate like any referring sample.
    """
    from scene3d.data.scene import load_processed_scene

    processed_dir = Path(processed_dir)
    skip = {s.lower() for s in skip_labels}
    per_scene: dict[str, dict[str, list[int]]] = {}
    for sid in sorted(set(scene_ids)):
        scene = load_processed_scene(processed_dir / sid)
        classes: dict[str, list[int]] = {}
        for o in scene.objects:
            label = str(o.label).strip().lower()
            if label and label not in skip and o.num_points > 0:
                classes.setdefault(label, []).append(int(o.id))
        per_scene[sid] = classes
    vocab = sorted({lab for c in per_scene.values() for lab in c})
    rng = np.random.default_rng(seed)
    rows: list[dict] = []

    def add(sid: str, kind: str, label: str, text: str, targets: list[int]) -> None:
        rows.append({"dataset": ALIGNMENT_DATASET, "ann_id": f"{kind}:{label}", "scene_id": sid,
                     "targets": sorted(targets), "text": text, "object_name": label,
                     "unique": None, "eval_type": None, "easy": None, "view_dep": None,
                     "distractors": None, "anchors": None})

    for sid, classes in per_scene.items():
        for label in sorted(classes):
            ids = classes[label]
            add(sid, "all", label, f"all the {_plural(label)}", ids)
            if len(ids) == 1:
                add(sid, "the", label, f"the {label}", ids)
        absent = [lab for lab in vocab if lab not in classes]
        for label in rng.permutation(absent)[: max(0, negatives)].tolist() if absent else []:
            add(sid, "none", label, f"all the {_plural(label)}", [])
    return rows


class SplitData(NamedTuple):
    processed_dir: Path
    rows: list  # referring rows (or alignment rows) of the split


def prepare_data(data) -> None:
    """Generate the synthetic benchmark when ``data.synthetic`` is set (reuses a complete earlier one)."""
    if data.synthetic is None:
        return
    from scene3d.data.synthetic import prepare_synthetic

    s = data.synthetic
    prepare_synthetic(expand_path(s.root), num_scenes=s.num_scenes, seed=s.seed, preset=s.preset,
                      val_fraction=s.val_fraction, progress=False)


def split_rows(data, split: str, samples: Optional[str] = None, processed_dir: Optional[str] = None) -> SplitData:
    """Rows of ``split`` ("train" / "val") of ``data`` (a :class:`~scene3d.config.DataSchema`), or of the jsonl
    ``samples``; turned into alignment rows of the same scenes when ``data.task == "alignment"``."""
    from scene3d.data.referring import read_jsonl

    proc = expand_path(processed_dir or data.processed_dir)
    if not proc.is_dir():
        raise FileNotFoundError(f"processed scenes directory not found: {proc} (data.processed_dir)")
    if samples is not None:
        path = expand_path(samples)
    else:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        src = data.train if split == "train" else data.val
        if src is None:
            raise ValueError(f"data.{split} is not set: no referring rows for the {split} split")
        path = expand_path(src)
    rows = read_jsonl(path)
    if data.task == "alignment":
        rows = alignment_rows(proc, [r["scene_id"] for r in rows], data.alignment_negatives,
                              data.alignment_skip_labels, seed=0)
    return SplitData(proc, rows)


def training_dataset(data, seed: int):
    """The training :class:`~scene3d.data.referring.ReferringDataset` of ``data`` (a
    :class:`~scene3d.config.DataSchema`): its train split with the configured subsampling, augmentation and
    grouping of questions per scene; ``seed`` (the trainer's) drives the augmentation."""
    from scene3d.data.referring import ReferringDataset

    train = split_rows(data, "train")
    return ReferringDataset(train.processed_dir, data.train, max_points=data.max_points, jitter=data.jitter,
                            scale_range=data.scale_range, max_samples=data.max_train_samples, seed=seed,
                            rows=train.rows, questions_per_scene=data.questions_per_scene)


# ---------------------------------------------------------------------------------------------------------
# run directory


def default_out_dir(experiment: str) -> Path:
    return Path("runs") / experiment / time.strftime("%Y-%m-%d_%H-%M-%S")


def _agree_on_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the run dir's timestamp must not differ between processes)."""
    from scene3d.engine.distributed import gather_objects

    return gather_objects(value)[0]


# ---------------------------------------------------------------------------------------------------------
# training


def _as_dictconfig(cfg) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, TrainConfig):
        return OmegaConf.structured(cfg)
    raise ValueError(f"cfg must be a composed DictConfig or a TrainConfig, got {type(cfg).__name__}")


def run_training(cfg) -> FitSummary:
    """Train as ``cfg`` (composed ``train`` config) says; returns the trainer's :class:`FitSummary`."""
    from scene3d.data.referring import collate_referring
    from scene3d.engine.distributed import barrier, cleanup, init_distributed
    from scene3d.engine.evaluate import ValidationFn, spread_rows
    from scene3d.models.pipeline import Scene3DModel

    cfg = _as_dictconfig(cfg)
    obj: TrainConfig = to_objects(cfg)  # validates every section (runs the dataclasses' checks)
    if obj.resume and obj.out_dir is None:
        raise ValueError("resume=true needs out_dir=<the run directory to continue>")
    distributed = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    env = init_distributed(obj.trainer.device) if distributed else None
    try:
        if env is None or env.is_main:
            prepare_data(obj.data)
        barrier()
        out_dir = expand_path(obj.out_dir) if obj.out_dir else default_out_dir(obj.experiment)
        if distributed:
            out_dir = Path(_agree_on_rank0(str(out_dir)))

        dataset = training_dataset(obj.data, obj.trainer.seed)
        eval_fn = None
        if obj.eval.in_training:
            try:
                ev = split_rows(obj.data, obj.eval.split, obj.eval.samples, obj.eval.processed_dir)
            except (ValueError, FileNotFoundError) as e:
                log.warning("no validation during training: %s", e)
            else:
                rows = spread_rows(ev.rows, obj.eval.max_samples)
                if rows:
                    eval_fn = ValidationFn(ev.processed_dir, rows, obj.eval.mask, obj.eval.strict)
                else:
                    log.warning("no validation during training: the %s split has no rows", obj.eval.split)

        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["out_dir"] = str(out_dir)
        seed_everything(obj.trainer.seed)  # before building: same initial (and frozen) weights every run
        model = Scene3DModel(pipeline_config(cfg.model))
        trainer = Trainer(obj.trainer, model, dataset, collate_referring, eval_fn=eval_fn, out_dir=out_dir,
                          resolved_config=resolved)
        return trainer.fit(resume=obj.resume)
    finally:
        if env is not None:
            cleanup()


USAGE = """usage: python -m scene3d.train [--print-config] [hydra overrides ...]
       scene3d train [--print-config] [hydra overrides ...]

Composes configs/train.yaml (groups: data, tokenizer, llm, head, model, optim, trainer, stage, experiment)
with the overrides, e.g.  experiment=synthetic_cpu trainer.max_steps=200 out_dir=runs/x resume=true
--print-config prints the composed config and exits."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Thin entry: parse, compose, run. Config errors exit with status 2 and a one-line message."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    show = "--print-config" in argv
    overrides = [a for a in argv if a != "--print-config"]
    bad = [a for a in overrides if a.startswith("-")]
    if bad:
        print(f"scene3d train: error: unknown option(s) {bad}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        cfg = compose("train", overrides)
        if show:
            print(OmegaConf.to_yaml(cfg))
            return 0
        to_objects(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"scene3d train: config error: {e}", file=sys.stderr)
        return 2
    s = run_training(cfg)
    if s.checkpoint is not None:  # rank 0
        print(f"trained to step {s.step}: {s.out_dir}")
        print(f"checkpoint: {s.checkpoint}")
        if s.eval_metrics:
            print("eval: " + ", ".join(f"{k}={v:.4f}" for k, v in s.eval_metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
