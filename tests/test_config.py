"""Every option of every config group composes; train.yaml instantiates; unknown options fail clearly."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from zeroseg.build import build_run
from zeroseg.data import ZSSDataModule
from zeroseg.methods import ZSSMethod

CONF = Path(__file__).resolve().parents[1] / "src" / "zeroseg" / "conf"
GROUPS = ["method", "backbone", "dataset", "clip", "trainer", "logger", "callbacks", "paths", "experiment", "debug"]


EVAL_GROUPS = [g for g in GROUPS if g not in ("callbacks", "debug")]


def group_options() -> list[tuple[str, str, str]]:
    options = []
    for config_name, groups in (("train", GROUPS), ("eval", EVAL_GROUPS)):
        for group in groups:
            files = sorted((CONF / group).glob("*.yaml"))
            assert files, f"config group {group} has no options"
            options += [(config_name, group, f.stem) for f in files]
    return options


def test_conf_symlink_points_at_the_packaged_configs() -> None:
    top_level = Path(__file__).resolve().parents[1] / "conf"
    assert top_level.resolve() == CONF.resolve()


@pytest.mark.parametrize("config_name,group,option", group_options())
def test_every_option_composes_and_resolves(make_cfg, config_name: str, group: str, option: str) -> None:
    cfg = make_cfg([f"{group}={option}"], config_name=config_name, tiny=False)
    missing = sorted(OmegaConf.missing_keys(cfg))
    allowed = {"ckpt_path", "clip.pretrained"}  # mandatory values the user must give
    assert set(missing) <= allowed, missing
    if "clip.pretrained" in missing:
        with pytest.raises(MissingMandatoryValue, match="clip.pretrained"):
            OmegaConf.to_container(cfg.clip, resolve=True, throw_on_missing=True)
    for key in cfg:
        if key not in ("clip", "ckpt_path"):
            OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]


def test_train_config_instantiates_datamodule_model_and_trainer(make_cfg) -> None:
    cfg = make_cfg()
    objects = build_run(cfg)
    assert isinstance(objects["datamodule"], ZSSDataModule)
    assert isinstance(objects["model"], ZSSMethod)
    assert isinstance(objects["trainer"], L.Trainer)
    assert objects["trainer"].max_steps == 4


def test_unknown_option_lists_the_available_ones(make_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match=r"(?s)Could not find 'method/nope'.*Available options.*baseline"):
        make_cfg(["method=nope"])


def test_default_teacher_needs_no_files_and_real_teacher_needs_weights(make_cfg) -> None:
    cfg = make_cfg(["clip=vit_b16"])
    with pytest.raises(Exception, match="clip.pretrained"):
        hydra.utils.instantiate(cfg.clip)
