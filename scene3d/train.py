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
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from data_prep.rewording import reword_row
from data_prep.synthetic import prepare_data
from scene3d.config import TrainConfig, compose, expand_path, pipeline_config, to_objects
# the data assembly lives in scene3d.data.assembly; its names stay importable from here (bench/, tests)
from scene3d.data.assembly import (  # noqa: F401
    ALIGNMENT_DATASET, SplitData, alignment_rows, split_rows, training_dataset)
from scene3d.data.referring import collate_referring
from scene3d.engine.distributed import barrier, cleanup, gather_objects, init_distributed
from scene3d.engine.evaluate import ValidationFn, spread_rows
from scene3d.engine.trainer import FitSummary, Trainer, seed_everything
from scene3d.models.pipeline import Scene3DModel

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# run directory


def default_out_dir(experiment: str) -> Path:
    return Path("runs") / experiment / time.strftime("%Y-%m-%d_%H-%M-%S")


def _agree_on_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the run dir's timestamp must not differ between processes)."""
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

        if obj.data.rotate and obj.model.canonical_frame:
            log.warning("data.rotate has no effect with model.canonical_frame: the model turns every training "
                        "item back into its canonical frame (the rows' compass words with it)")
        dataset = training_dataset(obj.data, obj.trainer.seed, reworder=reword_row)
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
