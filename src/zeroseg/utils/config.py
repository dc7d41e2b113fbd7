"""Compose zeroseg's Hydra configs from Python (benchmarks, notebooks, tests), as the CLI would."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

__all__ = ["compose_config"]


def compose_config(
    config_name: str, overrides: Sequence[str], output_dir: str | Path, root_dir: str | Path | None = None
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` for a run writing into ``output_dir``.

    Mirrors ``@hydra.main``: the ``${hydra:...}`` resolvers work and the returned config has no
    ``hydra`` node. ``root_dir`` (default: the current directory) anchors ``paths.*``.
    """
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if root_dir is not None:
            cfg.paths.root_dir = str(root_dir)
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg
