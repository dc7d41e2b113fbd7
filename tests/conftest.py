"""Shared fixtures: the real config, composed once per test and pointed at the test's tmp_path,
shrunk to a size that trains in seconds on one CPU core."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from zeroseg.utils import compose_config

# Small and fast: 32x32 scenes, 48 training images, resnet10t, a handful of steps.
# The shared machinery (resume, eval, DDP, CLI) is tested on the cheapest trainable method; each
# method's own tests (test_chimera.py, test_c2s.py) select it explicitly, which drops this entry.
TINY_OVERRIDES: tuple[str, ...] = (
    "method=baseline",
    "backbone=resnet10t",
    "logger=none",
    "callbacks=minimal",
    "dataset.train_dataset.num_images=48",
    "dataset.train_dataset.scene.image_size=32",
    "dataset.val_dataset.num_images=9",
    "dataset.test_dataset.num_images=11",
    "dataset.batch_size=8",
    "dataset.eval_batch_size=4",
    "method.head.width=32",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)


# a narrow proposal network (the stack under method.proposals: DeOP, multipass_clip) for 64-px scenes
PROPOSALS_TINY = [
    "method.proposals.segmenter.dim=32",
    "method.proposals.segmenter.conv_dim=32",
    "method.proposals.segmenter.mask_dim=32",
    "method.proposals.segmenter.ffn_dim=64",
    "method.proposals.segmenter.encoder_ffn_dim=64",
    "method.proposals.segmenter.num_queries=6",
    "method.proposals.segmenter.decoder_layers=2",
    "method.proposals.segmenter.encoder_layers=1",
    "method.proposals.matcher.num_points=128",
    "method.proposals.criterion.num_points=128",
    "method.proposals.input_scale=1.0",
]


QUERY_METHODS = {"method=query_baseline", "method=split_matching", "method=deop", "method=multipass_clip", "method=maft"}


def compose_test_config(
    tmp_path: Path, overrides: Sequence[str] = (), config_name: str = "train", tiny: bool = True
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as ``python -m zeroseg.<config_name>`` would, inside tmp_path."""
    explicit_keys = {o.split("=", 1)[0] for o in overrides}
    real_dataset = any(o.startswith("dataset=") and o != "dataset=synthetic" for o in overrides)
    tiny_overrides = [
        o
        for o in TINY_OVERRIDES
        if (config_name == "train" or not o.startswith("callbacks="))
        and o.split("=", 1)[0] not in explicit_keys
        # the scene-generator sizes exist only in the synthetic dataset
        and not (real_dataset and o.startswith(("dataset.train_dataset.", "dataset.val_dataset.", "dataset.test_dataset.")))
        # the query methods have no dense decode head
        and not (QUERY_METHODS & set(overrides) and o.startswith("method.head."))
    ]
    cfg = compose_config(config_name, [*(tiny_overrides if tiny else ()), *overrides], tmp_path / "run", root_dir=tmp_path)
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def compose_sweep_jobs(
    experiment: str, config_name: str = "train", extra: Sequence[str] = ()
) -> list[tuple[list[str], DictConfig]]:
    """Every job of ``-m experiment=<experiment>``: (its overrides, its composed config), checking
    that each swept value lands in the composed config."""
    import itertools

    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    jobs = []
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        base = compose(config_name, overrides=[f"experiment={experiment}"], return_hydra_config=True)
        sweeps = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in base.hydra.sweeper.params.items()])
        axes = [[(o.key_or_group, value) for value in o.sweep_iterator()] for o in sweeps]
        for combination in itertools.product(*axes):
            overrides = [f"{key}={_override_text(value)}" for key, value in combination]
            cfg = compose(config_name, overrides=[f"experiment={experiment}", *overrides, *extra])
            for key, value in combination:
                node = OmegaConf.select(cfg, key)
                if isinstance(value, dict):
                    assert all(node[k] == v for k, v in value.items()), (key, value)
                else:
                    assert node == value, (key, value, node)
            jobs.append((overrides, cfg))
    GlobalHydra.instance().clear()
    return jobs


def _override_text(value) -> str:
    """A parsed sweep value written back as Hydra override text."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_text(v)}" for k, v in value.items()) + "}"
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def factory(overrides: Sequence[str] = (), config_name: str = "train", tiny: bool = True, subdir: str = "") -> DictConfig:
        root = tmp_path / subdir if subdir else tmp_path
        root.mkdir(parents=True, exist_ok=True)
        return compose_test_config(root, overrides, config_name, tiny)

    yield factory
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _single_thread_and_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # a 2-core CI box: keep each test on one thread; never reach for a hub
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


# Real-benchmark configs on the miniature trees of tests/dataset_trees.py (60x80 images):
# 64-pixel crops, test images resized to short side 64 and evaluated by 64-pixel sliding windows.
REAL_TINY_OVERRIDES: tuple[str, ...] = (
    "dataset.num_workers=0",
    "dataset.pin_memory=false",
    "dataset.batch_size=2",
    "dataset.eval_batch_size=2",
    "dataset.train_dataset.transform.scale=[160,64]",
    "dataset.train_dataset.transform.crop_size=[64,64]",
    "dataset.val_dataset.transform.scale=[160,64]",
    "inference.crop_size=[64,64]",
    "inference.stride=[48,48]",
)

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture
def tiny_teacher():
    from zeroseg.clip import CLIPTeacher

    return CLIPTeacher(arch="tiny", random_init=True, model_cfg=TINY_CLIP_CFG)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})
    return env
