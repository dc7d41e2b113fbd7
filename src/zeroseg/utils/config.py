"""Compose zeroseg's Hydra configs from Python (benchmarks, notebooks, tests), as the CLI would."""

from __future__ import annotations

import difflib
import inspect
import logging
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

__all__ = ["check_keyword_options", "compose_config", "known_top_level_keys", "warn_unknown_keys"]


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


def known_top_level_keys(config_name: str) -> set[str]:
    """The top-level keys ``conf/<config_name>.yaml`` defines, plus every config group (``dataset``, ``method``, ...)."""
    conf = files("zeroseg.conf")
    primary = OmegaConf.create(conf.joinpath(f"{config_name}.yaml").read_text())
    groups = {entry.name for entry in conf.iterdir() if entry.is_dir() and not entry.name.startswith("_")}
    # a defaults entry `group@package: option` puts a group's config at another top-level key
    packages = {
        str(key).split("@", 1)[1].split(".", 1)[0]
        for entry in primary.get("defaults", [])
        if isinstance(entry, DictConfig)
        for key in entry.keys()
        if "@" in str(key)
    }
    return (set(primary.keys()) - {"defaults"}) | groups | packages


def warn_unknown_keys(cfg: DictConfig, config_name: str) -> list[str]:
    """Warn about top-level keys no zeroseg config defines (``+foo=1``: nothing reads them), with the closest
    known key; returns the unknown keys."""
    known = known_top_level_keys(config_name)
    unknown = sorted(str(key) for key in cfg.keys() if key not in known)
    present = sorted(str(key) for key in cfg.keys() if key in known)
    for key in unknown:
        close = difflib.get_close_matches(key, present, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; the top-level keys are {', '.join(present)}"
        log.warning("config key '%s' is not a zeroseg setting and nothing reads it (added with +%s=...)%s", key, key, hint)
    return unknown


def check_keyword_options(
    function: Callable[..., Any], options: Mapping[str, Any], key: str, passed_by_caller: Sequence[str] = ()
) -> None:
    """Stop at construction, naming ``<key>.<name>``, when a config dict that will be passed to ``function`` as
    keyword arguments holds a name it does not take (otherwise the first training step fails with a TypeError).
    ``passed_by_caller``: the parameters the caller fills itself, not options."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(function).parameters
    accepted = [name for name, p in parameters.items() if p.kind in kinds and name not in passed_by_caller]
    for name in options:
        if name not in accepted:
            close = difflib.get_close_matches(str(name), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}.{name}: not an option of {function.__name__}{hint}; its options are {accepted}")
