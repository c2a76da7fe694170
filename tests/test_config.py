"""Hydra configs (configs/) composed onto the structured schemas of scene3d/config.py."""

from __future__ import annotations

import dataclasses
import os
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from scene3d.config import (CONFIG_DIR_ENV, EvalConfig, PipelineSchema, TrainConfig, compose, config_dir,
                            pipeline_config, to_objects)
from scene3d.models.pipeline import PipelineConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("data", "tokenizer", "llm", "head", "model", "optim", "trainer", "stage", "experiment")
#: values the user must give for the GPU / ScanNet options (``???`` in the yaml)
REQUIRED = {"data": ["data.processed_dir=/d/processed", "data.train=/d/train.jsonl", "data.val=/d/val.jsonl"],
            "llm": ["model.referring.llm.path=/models/llm"]}
REAL = {"scanrefer", "multi3drefer", "nr3d", "sr3d"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def required_for(group: str, option: str) -> list[str]:
    if group == "data" and option in REAL:
        return REQUIRED["data"]
    if group == "llm" and option == "local":
        return REQUIRED["llm"]
    if group == "experiment" and option in REAL:
        return REQUIRED["data"]  # the LLM defaults to SmolLM2 (llm=smollm2): no path to give
    return []


def test_every_group_has_options_and_the_config_dir_is_the_repos():
    assert config_dir() == CONFIGS.resolve()
    for g in GROUPS:
        assert options(g), f"configs/{g}/ is empty"
    assert set(options("experiment")) == {"synthetic_cpu", "overfit_one_scene", "scanrefer", "multi3drefer",
                                          "nr3d", "sr3d", "real_rescan"}
    assert set(options("data")) == {"synthetic"} | REAL
    for exp in options("experiment"):  # lightning-hydra-template habit: experiments override groups globally
        text = (CONFIGS / "experiment" / f"{exp}.yaml").read_text()
        assert text.startswith("# @package _global_") and "override /" in text


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_instantiates(group, option):
    cfg = compose("train", [f"{group}={option}", *required_for(group, option)])
    obj = to_objects(cfg)
    assert isinstance(obj, TrainConfig)
    if group == "experiment":
        assert obj.experiment == option
    # the model section is exactly what load_model() reads back from a checkpoint's config.yaml
    pc = pipeline_config(cfg.model)
    assert isinstance(pc, PipelineConfig)
    assert pc.tokenizer.relation.dim == pc.tokenizer.out_dim


def test_values_come_from_the_chosen_yaml_files():
    cfg = compose("train", ["experiment=synthetic_cpu", "tokenizer=base", "trainer=gpu"])
    obj = to_objects(cfg)
    tok = yaml.safe_load((CONFIGS / "tokenizer" / "base.yaml").read_text())
    gpu = yaml.safe_load((CONFIGS / "trainer" / "gpu.yaml").read_text())
    exp = yaml.safe_load((CONFIGS / "experiment" / "synthetic_cpu.yaml").read_text())
    assert obj.model.tokenizer.voxel_size == tok["voxel_size"]
    assert list(obj.model.tokenizer.backbone.channels) == tok["backbone"]["channels"]
    assert obj.model.tokenizer.relation.dim == tok["out_dim"]  # interpolated
    assert obj.trainer.precision == gpu["precision"] and obj.trainer.device == gpu["device"]
    # the experiment's own values win over the group defaults it does not override
    assert obj.trainer.max_steps == exp["trainer"]["max_steps"]
    assert obj.trainer.lr == exp["trainer"]["lr"]


def test_stage_configs_set_the_task():
    assert to_objects(compose("train", ["stage=alignment"])).data.task == "alignment"
    assert to_objects(compose("train", ["stage=referring"])).data.task == "referring"
    obj = to_objects(compose("train", ["experiment=synthetic_cpu", "stage=alignment", "trainer.init_from=/r/s1"]))
    assert (obj.stage, obj.data.task, obj.trainer.init_from) == ("alignment", "alignment", "/r/s1")


@pytest.mark.parametrize("override", ["trainer.lrr=1", "model.tokenizer.voxel_sizee=0.1", "data.procesed_dir=/x",
                                      "experiment=synthetic_gpu", "tokenizer=smal", "trainer.max_steps=many"])
def test_misspelled_keys_and_options_fail_at_compose(override):
    with pytest.raises((ConfigCompositionException, HydraException, OmegaConfBaseException)):
        compose("train", [override])


@pytest.mark.parametrize("override", ["+trainer.lrr=1", "+model.referring.bce_weigth=2", "+data.foo=1",
                                      "+bogus=1"])
def test_appended_unknown_keys_fail_at_instantiation(override):
    cfg = compose("train", [override])  # hydra's "+" bypasses struct mode ...
    with pytest.raises(ConfigKeyError):
        to_objects(cfg)  # ... the schema check does not


@pytest.mark.parametrize("override,match", [("trainer.precision=fp8", "precision"), ("data.task=captioning", "task"),
                                            ("model.tokenizer.relation.dim=32", "relation.dim"),
                                            ("eval.mask=union", "mask"), ("stage=alignment", None)])
def test_bad_values_fail_in_the_dataclass_checks(override, match):
    if match is None:  # a valid override, for contrast
        to_objects(compose("train", [override]))
        return
    with pytest.raises(ValueError, match=match):
        to_objects(compose("train", [override]))


def test_required_values_of_real_datasets_are_enforced():
    cfg = compose("train", ["experiment=scanrefer", *REQUIRED["llm"]])
    with pytest.raises(MissingMandatoryValue):
        to_objects(cfg)


def test_schema_mirrors_the_model_configs():
    """Schema subclasses re-declare types only: same field names as the real configs, recursively."""

    def names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    checked = []

    def check(schema, real):
        assert issubclass(schema, real) and names(schema) == names(real), schema
        checked.append(schema)
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            t = hints[f.name]
            if isinstance(t, type) and dataclasses.is_dataclass(t) and t.__module__ == "scene3d.config":
                check(t, next(b for b in t.__mro__[1:] if dataclasses.is_dataclass(b)))

    check(PipelineSchema, PipelineConfig)
    assert len(checked) == 5  # pipeline, tokenizer, backbone, referring, llm
    # a resolved model node builds the real config with identical values
    cfg = compose("train", ["experiment=synthetic_cpu"])
    pc = pipeline_config(cfg.model)
    assert dataclasses.asdict(pc) == {**OmegaConf.to_container(cfg.model, resolve=True),
                                      "tokenizer": dataclasses.asdict(pc.tokenizer)}
    assert pc.tokenizer.backbone.channels == tuple(cfg.model.tokenizer.backbone.channels)


def test_eval_config_with_and_without_a_data_option():
    obj = to_objects(compose("eval", ["checkpoint=/runs/x"]))
    assert isinstance(obj, EvalConfig) and obj.data is None and obj.eval.max_samples is None
    for ds in options("data"):
        extra = REQUIRED["data"] if ds in REAL else []
        obj = to_objects(compose("eval", ["checkpoint=/runs/x", f"data={ds}", *extra]))
        assert obj.data.name == ds
    with pytest.raises(MissingMandatoryValue):
        to_objects(compose("eval", []))  # the checkpoint is required
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose("eval", ["checkpoint=/runs/x", "eval.splitt=val"])


def test_compose_leaves_the_working_directory_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    compose("train", ["experiment=synthetic_cpu"])
    assert Path.cwd() == tmp_path and list(tmp_path.iterdir()) == []  # no .hydra / outputs / logs


def test_config_dir_override(tmp_path, monkeypatch):
    other = tmp_path / "configs"
    shutil.copytree(CONFIGS, other)
    p = other / "trainer" / "cpu.yaml"
    p.write_text(p.read_text().replace("max_steps: 1000", "max_steps: 777"))
    monkeypatch.setenv(CONFIG_DIR_ENV, str(other))
    assert config_dir() == other.resolve()
    assert to_objects(compose("train", [])).trainer.max_steps == 777
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        config_dir()


def test_synthetic_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SCENE3D_CACHE", str(tmp_path))
    obj = to_objects(compose("train", ["data.synthetic.num_scenes=3", "data.synthetic.seed=5"]))
    root = Path(obj.data.synthetic.root)
    assert root.parent == tmp_path and "s5" in root.name and "n3" in root.name
    assert obj.data.processed_dir == str(root / "processed") and obj.data.train == str(root / "refer" / "train.jsonl")
    monkeypatch.delenv("SCENE3D_CACHE")
    obj = to_objects(compose("train", []))
    assert obj.data.synthetic.root.startswith("~/.cache/scene3d/")
    assert os.path.expanduser("~") not in obj.data.synthetic.root  # expanded only where used
