"""Structured config schemas for ``scene3d train`` / ``scene3d eval`` and the hydra compose helpers.

The yaml files under ``configs/`` (repo root, or ``$SCENE3D_CONFIG_DIR``) are composed with hydra's compose
API onto the dataclass schemas below, registered in hydra's ``ConfigStore`` as ``train_schema`` /
``eval_schema``: a misspelled key or a wrongly typed value fails at composition time, and
:func:`to_objects` then instantiates every dataclass so the ``__post_init__`` checks of the model configs run.

================  ===========================================================================================
top-level key     schema
================  ===========================================================================================
``experiment``    name of the run (``runs/<experiment>/<timestamp>`` when ``out_dir`` is unset)
``stage``         ``alignment`` (stage 1: object <-> identifier/class text), ``referring`` (stage 2), or
                  ``tokens`` (object-token pretraining: tokenizer + projector on class names, no LLM)
``out_dir``       run directory (None: ``runs/<experiment>/<timestamp>`` under the working directory)
``resume``        continue the newest checkpoint of ``out_dir``
``data``          :class:`DataSchema` (processed scenes + referring jsonl; optional synthetic generation)
``model``         :class:`PipelineSchema` == :class:`~scene3d.models.pipeline.PipelineConfig` (the dict a
                  checkpoint's ``config.yaml`` keeps under ``model``; :func:`scene3d.models.loading.load_model`)
``trainer``       :class:`~scene3d.engine.trainer.TrainerConfig` (reused as is)
``eval``          :class:`EvalSchema` (validation during training; ``scene3d eval``)
================  ===========================================================================================

Hydra is used only to compose: it does not change the working directory, set up logging or write
``.hydra`` / ``outputs`` directories. The model-config schemas subclass the real dataclasses and only
re-declare the fields whose annotations OmegaConf cannot type (``Sequence[int]`` -> ``List[int]``, a
``Union[str, list]`` -> ``Any``), so a field added to a model config shows up in the schema by itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from scene3d.data.augment import check_turns
from scene3d.engine.evaluate import MASK_SOURCES, OBJECT_SOURCES
from scene3d.engine.trainer import TrainerConfig
from scene3d.llm.loader import LLMConfig
from scene3d.models.pipeline import PipelineConfig
from scene3d.models.referring import ReferringConfig
from scene3d.tokenizer.backbone import BackboneConfig
from scene3d.tokenizer.model import IN_CHANNELS, ObjectTokenizerConfig
from scene3d.utils.io import expand_path  # noqa: F401  (scene3d.config.expand_path: the old name)

#: Environment variable pointing at another configs directory (same layout as the repo's ``configs/``).
CONFIG_DIR_ENV = "SCENE3D_CONFIG_DIR"
#: Environment variable for the cache of generated data (default ``~/.cache/scene3d``).
CACHE_ENV = "SCENE3D_CACHE"

TASKS = ("referring", "alignment")
STAGES = ("referring", "alignment", "tokens")


# ---------------------------------------------------------------------------------------------------------
# model schemas (subclasses of the real configs; see the module docstring)


@dataclass
class BackboneSchema(BackboneConfig):
    channels: List[int] = field(default_factory=lambda: [32, 64, 96, 128])


@dataclass
class ObjectTokenizerSchema(ObjectTokenizerConfig):
    backbone: BackboneSchema = field(default_factory=lambda: BackboneSchema(in_channels=IN_CHANNELS))


@dataclass
class LLMSchema(LLMConfig):
    lora_target_modules: Any = "all-linear"  # "all-linear" or a list of module names


@dataclass
class ReferringSchema(ReferringConfig):
    llm: LLMSchema = field(default_factory=LLMSchema)


@dataclass
class PipelineSchema(PipelineConfig):
    tokenizer: ObjectTokenizerSchema = field(default_factory=ObjectTokenizerSchema)
    referring: ReferringSchema = field(default_factory=ReferringSchema)


# ---------------------------------------------------------------------------------------------------------
# data / eval / top level


@dataclass
class SyntheticDataSchema:
    """The embedded synthetic benchmark, generated on first use by :func:`data_prep.synthetic.prepare_synthetic`."""

    root: str = MISSING  # where it is (re)made; the yaml derives it from $SCENE3D_CACHE
    num_scenes: int = 12
    seed: int = 0
    preset: str = "tiny"
    val_fraction: float = 0.25


@dataclass
class ExtraTrainSchema:
    """Another set of training rows on another processed directory, trained together with ``data.train``
    (e.g. a real scan and its generated expressions beside the synthetic benchmark; see
    :func:`scene3d.data.assembly.training_dataset`)."""

    name: str = MISSING
    processed_dir: str = MISSING  # scene dirs or mmdetection3d exports (what load_processed_scene reads)
    train: str = MISSING  # referring jsonl of rows on those scenes
    repeat: int = 1  # the rows' items appear this many times per epoch (a small real set beside many scenes)

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise ValueError(f"data.extra_train[{self.name}].repeat must be >= 1, got {self.repeat}")


@dataclass
class DataSchema:
    """Processed scenes + referring samples (``scene3d prep scannet`` / ``scene3d prep refer`` outputs).

    ``task``: ``referring`` trains on the jsonl rows; ``alignment`` (stage 1) trains on rows generated from
    each training scene's ``objects.json`` (see :func:`scene3d.data.assembly.alignment_rows`).
    """

    name: str = MISSING
    processed_dir: str = MISSING
    train: str = MISSING  # referring jsonl for training
    val: Optional[str] = MISSING  # referring jsonl for validation / evaluation (null: none)
    synthetic: Optional[SyntheticDataSchema] = None  # set: generate the synthetic benchmark first
    task: str = "referring"
    max_points: Optional[int] = None  # training-time subsampling per scene (evaluation uses every point)
    jitter: float = 0.0
    scale_range: float = 0.0
    #: training: turn each scene item a random number of quarter turns about z, its rows' compass words
    #: ("north", "facing the west wall") with it (scene3d/data/augment.py): scans of one room differ by such
    #: turns, and a model trained on one orientation does not recognise another
    rotate: bool = False
    #: training: one random brightness gain (1 +- c) and per-channel shift (+- c/2) per scene item
    color_jitter: float = 0.0
    #: training: each scene item drops a share of its points drawn uniformly from [0, point_dropout] (every object
    #: keeps a few, scene3d/data/referring.py: keep_every_object): a rescan samples the same surfaces at another
    #: density. The real-rescan experiment's token stage uses it (README)
    point_dropout: float = 0.0
    max_train_samples: Optional[int] = None
    #: training items are up to this many questions on one scene, tokenized once (trainer.batch_size counts
    #: items); 1: one question per item
    questions_per_scene: int = 1
    #: training: the probability that a row whose text is its synthetic program's template gets another wording
    #: of that program, drawn per item and epoch (data_prep/rewording.py; never the paraphrase split's words)
    rewording: float = 0.0
    alignment_negatives: int = 2  # alignment: absent classes per scene asked about (zero-target rows)
    alignment_skip_labels: List[str] = field(default_factory=lambda: ["wall", "floor", "ceiling"])
    #: more training rows on other processed directories, mixed into every epoch (task=alignment: alignment
    #: rows of their scenes)
    extra_train: List[ExtraTrainSchema] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"data.task must be one of {TASKS}, got {self.task!r}")
        if not 0.0 <= float(self.rewording) <= 1.0:
            raise ValueError(f"data.rewording must be a probability in [0, 1], got {self.rewording!r}")


@dataclass
class EvalSchema:
    """Evaluation: validation during training (``max_samples`` rows) and ``scene3d eval``."""

    split: str = "val"  # val | train: which jsonl of ``data`` to evaluate
    samples: Optional[str] = None  # another referring jsonl (overrides ``split``)
    processed_dir: Optional[str] = None  # another processed dir (default: data.processed_dir)
    in_training: bool = True  # validate during training (every trainer.eval_every steps and at the end)
    max_samples: Optional[int] = 32  # None: all rows
    strict: bool = False  # IoU > k instead of >= k
    mask: str = "reconciled"  # reconciled | identifier | decoder: which mask of a Prediction is scored
    progress: bool = True
    #: gt: objects are the scene's instances; proposals: geometric proposals, masks scored against GT points
    objects: str = "gt"
    #: with objects=proposals: a learned instance-proposal model directory (``scene3d prep proposals``)
    #: instead of the geometric proposals
    proposal_model: Optional[str] = None
    #: an instance-proposal model directory that names the objects for a model whose prompt writes class names
    #: (``model.referring.object_labels``); None: the checkpoint's ``model.label_model``
    label_model: Optional[str] = None
    #: test-time quarter turns: each question is also answered on the scene turned 1..turns-1 quarter turns
    #: about z (its compass words with it) and keeps the answer most orientations gave (scene3d.models.turns);
    #: 1: the scene as given only
    turns: int = 1

    def __post_init__(self) -> None:
        check_turns(self.turns, "eval.turns")
        if self.split not in ("val", "train"):
            raise ValueError(f"eval.split must be 'val' or 'train', got {self.split!r}")
        if self.mask not in MASK_SOURCES:
            raise ValueError(f"eval.mask must be one of {MASK_SOURCES}, got {self.mask!r}")
        if self.objects not in OBJECT_SOURCES:
            raise ValueError(f"eval.objects must be one of {OBJECT_SOURCES}, got {self.objects!r}")
        if self.proposal_model is not None and self.objects != "proposals":
            raise ValueError("eval.proposal_model needs eval.objects=proposals")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"eval.max_samples must be >= 1 or null, got {self.max_samples}")


@dataclass
class TrainConfig:
    experiment: str = "default"
    stage: str = "referring"
    out_dir: Optional[str] = None
    resume: bool = False
    data: DataSchema = field(default_factory=DataSchema)
    model: PipelineSchema = field(default_factory=PipelineSchema)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalSchema = field(default_factory=EvalSchema)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")


@dataclass
class EvalConfig:
    """``scene3d eval CKPT [overrides]``: ``data`` None means the checkpoint's own training data config."""

    checkpoint: str = MISSING
    out_dir: Optional[str] = None  # None: <run dir>/eval/<split>_step<step>
    device: Optional[str] = None  # None: cuda if available else cpu
    data: Optional[DataSchema] = None
    eval: EvalSchema = field(default_factory=lambda: EvalSchema(max_samples=None))


_REGISTERED = False


def register_configs() -> None:
    """Put the schemas into hydra's ConfigStore (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    _REGISTERED = True


# ---------------------------------------------------------------------------------------------------------
# compose


def config_dir() -> Path:
    """``$SCENE3D_CONFIG_DIR`` or the repository's ``configs/`` (located relative to this package)."""
    env = os.environ.get(CONFIG_DIR_ENV)
    pkg = Path(__file__).resolve().parent
    # an explicit directory is the only candidate (a typo must not fall back silently to the repo's configs)
    candidates = [Path(env).expanduser()] if env else [pkg.parent / "configs", pkg / "configs"]
    for c in candidates:
        if (c / "train.yaml").is_file():
            return c.resolve()
    where = f"${CONFIG_DIR_ENV}={env}" if env else " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no hydra configs (train.yaml) found at {where}")


def compose(config_name: str = "train", overrides: Optional[List[str]] = None) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with hydra overrides (``key=value``, ``group=option``,
    ``+key=value``) onto its structured schema. Raises hydra/omegaconf errors on unknown keys or groups."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=f"scene3d_{config_name}"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return cfg


def to_objects(cfg: DictConfig) -> Any:
    """Instantiate the schema dataclasses (runs their ``__post_init__`` validation); returns the
    :class:`TrainConfig` / :class:`EvalConfig` object.

    The values are first merged into a fresh copy of the schema: keys added with hydra's ``+key=value``
    (which bypasses struct mode) fail here instead of being dropped silently."""
    import dataclasses

    schema = OmegaConf.get_type(cfg)
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise ValueError(f"expected a config composed onto a schema dataclass, got one of type {schema}")
    checked = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg, resolve=False))
    return OmegaConf.to_object(checked)


def pipeline_config(model_cfg: Any) -> PipelineConfig:
    """The real :class:`PipelineConfig` from the ``model`` node (DictConfig, schema object or dict)."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    elif not isinstance(model_cfg, dict):
        import dataclasses

        model_cfg = dataclasses.asdict(model_cfg)
    return PipelineConfig.from_dict(dict(model_cfg))
