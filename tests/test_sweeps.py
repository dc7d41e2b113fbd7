"""Every CLIP-to-Seg / Chimera-Seg ablation sweep: each job composes in its paper table's setting with
its swept value in place, every job is a labelled paper row, and ``+world=toy`` re-points the same
jobs to the toy world; collect_sweep renders the paper's row names."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf

C2S, CHIMERA = "zeroseg.methods.CLIPToSeg", "zeroseg.methods.ChimeraSeg"
# experiment -> (paper table, number of jobs, backbone, iterations)
SWEEPS: dict[str, tuple[str, int, str, int]] = {
    "c2s_ablation_modules": ("Table IV", 4, "segformer_b4", 40000),
    "c2s_ablation_distillation": ("Table V", 4, "segformer_b4", 40000),
    "c2s_ablation_losses": ("Table VI", 4, "segformer_b4", 40000),
    "c2s_ablation_decoder_keys": ("Table VII", 4, "segformer_b4", 40000),
    "c2s_ablation_calibrator": ("Table VIII", 5, "segformer_b4", 40000),
    "c2s_ablation_bank": ("Table IX", 5, "segformer_b4", 40000),
    "c2s_ablation_windows": ("Table X", 3, "segformer_b4", 40000),
    "c2s_ablation_aggregation": ("Table XI", 3, "segformer_b4", 40000),
    "c2s_ablation_pseudo_masks": ("Table XII", 3, "segformer_b4", 40000),
    "chimera_ablation_modules": ("Table III", 4, "segformer_b0", 80000),
    "chimera_ablation_projector": ("Table IV", 7, "segformer_b4", 80000),
    "chimera_ablation_projection": ("Table V", 3, "segformer_b0", 80000),
    "chimera_ablation_vencoder": ("Table VI", 4, "segformer_b0", 80000),
    "chimera_ablation_vencoder_learning": ("Table VII", 3, "segformer_b0", 80000),
    "chimera_ablation_vencoder_blocks": ("Table VIII", 4, "segformer_b0", 80000),
    "chimera_ablation_norm": ("Table IX", 5, "segformer_b0", 80000),
    "chimera_ablation_decay": ("Table X", 3, "segformer_b0", 80000),
    "chimera_ablation_start_k": ("Table XI", 3, "segformer_b0", 80000),
    "chimera_ablation_sam": ("Table XII", 4, "segformer_b0", 80000),
    "chimera_ablation_gumbel": ("no paper table", 2, "segformer_b0", 80000),
}
TABLE_III_ROWS = {  # row config -> (method, csh, sgd, sam)
    "c2s": (C2S, None, None, None),
    "csh": (CHIMERA, True, False, False),
    "csh_sgd": (CHIMERA, True, True, False),
    "csh_sgd_sam": (CHIMERA, True, True, True),
}


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def sweep_jobs(experiment: str, extra: tuple[str, ...] = ()) -> list[tuple[list[str], list[tuple[str, Any]], DictConfig]]:
    """(override strings, parsed (key, value) pairs, composed config with hydra choices) per job."""
    GlobalHydra.instance().clear()
    jobs = []
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        base = compose("train", overrides=[f"experiment={experiment}", *extra], return_hydra_config=True)
        params = OmegaConf.to_container(base.hydra.sweeper.params)
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        axes = [[(o.get_key_element(), o.key_or_group, value) for value in o.sweep_iterator()] for o in parsed]
        for combination in itertools.product(*axes):
            overrides = [f"{element}={_text(value)}" for element, _, value in combination]
            cfg = compose("train", overrides=[f"experiment={experiment}", *overrides, *extra], return_hydra_config=True)
            jobs.append((overrides, [(key, value) for _, key, value in combination], cfg))
    GlobalHydra.instance().clear()
    return jobs


def _check_swept_values(pairs: list[tuple[str, Any]], cfg: DictConfig) -> None:
    for key, value in pairs:
        if key == "experiment/chimera_table_iii":
            target, csh, sgd, sam = TABLE_III_ROWS[value]
            assert cfg.method._target_ == target, (value, cfg.method._target_)
            if target == CHIMERA:
                assert (cfg.method.csh, cfg.method.sgd, cfg.method.sam) == (csh, sgd, sam), value
            else:
                assert "csh" not in cfg.method and cfg.method.bank_size == 24
            continue
        node = OmegaConf.select(cfg, key)
        if isinstance(value, dict):
            assert all(node[k] == v for k, v in value.items()), (key, value, node)
        elif isinstance(value, list):
            assert list(node) == value, (key, value, node)
        else:
            assert node == value, (key, value, node)


@pytest.mark.parametrize("experiment", sorted(SWEEPS))
def test_each_job_composes_in_the_paper_setting_and_is_a_labelled_row(experiment: str) -> None:
    table, count, backbone, steps = SWEEPS[experiment]
    jobs = sweep_jobs(experiment)
    assert len(jobs) == count
    labels = {"".join(k.split()).lower(): v for k, v in jobs[0][2].sweep_table.rows.items()}
    assert table in jobs[0][2].sweep_table.title
    seen_labels = set()
    for overrides, pairs, cfg in jobs:
        _check_swept_values(pairs, cfg)
        choices = cfg.hydra.runtime.choices
        assert (choices.dataset, choices.backbone, choices.clip) == ("coco_stuff", backbone, "vit_b16"), experiment
        assert cfg.trainer.max_steps == steps and cfg.dataset.batch_size == 16
        # the recipe's optimisation (SegFormer's AdamW 6e-5, warm-up 1.5k, poly 1.0, head x10)
        assert cfg.method.optimizer.lr == 6e-5 and cfg.method.scheduler.warmup_steps == 1500
        assert cfg.method.scheduler.power == 1.0 and cfg.method.lr_multipliers.head == 10.0
        if cfg.method._target_ == CHIMERA:
            assert cfg.method.top_k_budget_steps is None  # the paper's per-iteration K schedule
        label = labels.get("".join(", ".join(overrides).split()).lower())
        assert label is not None, f"{experiment}: job {overrides} has no paper row name"
        seen_labels.add(label)
    assert len(seen_labels) == count


def test_c2s_table_iv_ties_local_to_global_distillation() -> None:
    for _, pairs, cfg in sweep_jobs("c2s_ablation_modules"):
        assert cfg.method.local_distillation == cfg.method.global_distillation == dict(pairs)["method.global_distillation"]


@pytest.mark.parametrize("experiment", ["c2s_ablation_decoder_keys", "chimera_ablation_modules", "chimera_ablation_decay"])
def test_world_toy_turns_the_same_jobs_into_a_toy_proxy(experiment: str) -> None:
    paper, toy = sweep_jobs(experiment), sweep_jobs(experiment, ("+world=toy",))
    assert [o for o, _, _ in paper] == [o for o, _, _ in toy]
    for _, pairs, cfg in toy:
        _check_swept_values(pairs, cfg)
        choices = cfg.hydra.runtime.choices
        assert (choices.dataset, choices.backbone, choices.clip, choices.trainer) == ("synthetic", "resnet18", "toy", "cpu")
        assert cfg.trainer.max_steps == 300 and cfg.method.optimizer.lr == 1e-3 and cfg.method.scheduler.warmup_steps == 0
        assert cfg.method.lr_multipliers == {} and cfg.world.proxy and "toy_proxy" in cfg.tags
        if cfg.method._target_ == CHIMERA:
            assert cfg.method.top_k_budget_steps == 80000  # 300 toy steps walk the paper's K range


CONF = Path(__file__).resolve().parents[1] / "src" / "zeroseg" / "conf"


@pytest.mark.parametrize(
    ("experiment", "method_yaml"),
    [
        ("maft_ablation_iters", "maft"),  # fine-tunes at 1e-5 (the recipe's rate, and its YAML's)
        ("split_matching_ablation_embedding", "split_matching"),  # 30 warm-up steps, wd 0.05, clip 0.01
        ("deop_ablation_gps", "deop"),
        ("c2s_ablation_bank", "c2s"),
    ],
)
def test_world_toy_trains_each_method_with_its_own_toy_optimisation(experiment: str, method_yaml: str) -> None:
    """The toy benchmark trains a method with its YAML's optimisation; a +world=toy proxy must too (it once
    forced AdamW 1e-3 without warm-up on every method: MAFT's 1e-5 fine-tuning ran at 1e-3)."""
    own = yaml.safe_load((CONF / "method" / f"{method_yaml}.yaml").read_text())
    jobs = sweep_jobs(experiment, ("+world=toy",))
    assert jobs
    for _, _, cfg in jobs:
        # key by key: other method values may need the run's directory (a Hydra run) to resolve
        method = {key: OmegaConf.select(cfg.method, key) for key in ("optimizer", "scheduler", "lr_multipliers", "weight_decay_exempt", "gradient_clip_norm")}
        method = {key: OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value for key, value in method.items()}
        assert method["optimizer"]["lr"] == own["optimizer"]["lr"], experiment
        assert method["optimizer"]["weight_decay"] == own["optimizer"]["weight_decay"]
        assert method["scheduler"]["warmup_steps"] == own["scheduler"]["warmup_steps"]
        assert method["scheduler"]["power"] == own["scheduler"]["power"]
        assert method["lr_multipliers"] == own["lr_multipliers"]
        assert method["weight_decay_exempt"] == own["weight_decay_exempt"]
        assert method["gradient_clip_norm"] == own.get("gradient_clip_norm")
    # the command line still wins over the toy optimisation
    _, _, cfg = sweep_jobs(experiment, ("+world=toy", "method.optimizer.lr=0.25"))[0]
    assert cfg.method.optimizer.lr == 0.25
    # eval and predict of a proxy job compose the same overrides
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        for config_name in ("eval", "predict"):
            cfg = compose(config_name, overrides=[f"experiment={experiment}", "+world=toy"])
            assert cfg.method.optimizer.lr == own["optimizer"]["lr"], config_name
    GlobalHydra.instance().clear()


def _fake_sweep(root: Path, rows: dict[str, str], jobs: list[tuple[str, float | None]], world: dict | None = None) -> None:
    for index, (override, h) in enumerate(jobs):
        job = root / str(index)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra/overrides.yaml").write_text(yaml.safe_dump(["experiment=x", override]))
        config = {"sweep_table": {"title": "Chimera-Seg Table III: modules", "rows": rows}}
        if world:
            config["world"] = world
        (job / "config.yaml").write_text(yaml.safe_dump(config))
        if h is not None:
            (job / "metrics.json").write_text(json.dumps({"sIoU": 30.0, "uIoU": 31.0, "hIoU": h, "mIoU": 20.0}))


def test_collect_sweep_renders_table_iii_with_the_c2s_row_and_marks_toy_proxies(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import collect_sweep

    rows = {f"+experiment/chimera_table_iii={k}": v for k, v in [("c2s", "Baseline"), ("csh", "Baseline + CSH")]}
    jobs = [("+experiment/chimera_table_iii=csh", 32.8), ("+experiment/chimera_table_iii=c2s", 31.5)]
    _fake_sweep(tmp_path / "paper", rows, jobs)
    _fake_sweep(tmp_path / "toy", rows, jobs, world={"name": "toy", "proxy": True})
    assert collect_sweep.main([str(tmp_path / "paper")]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[1:] == ["| Baseline | 30.0 | 31.0 | 31.5 | 20.0 |", "| Baseline + CSH | 30.0 | 31.0 | 32.8 | 20.0 |"]
    assert "proxy" not in out
    assert collect_sweep.main([str(tmp_path / "toy")]) == 0
    assert "toy-world proxy" in capsys.readouterr().out


def test_every_experiment_composes_without_unknown_top_level_keys() -> None:
    """A run warns about top-level keys nothing reads (a typo such as +seeed=1); the keys the experiments
    themselves set (a sweep's table, a world's values) must not trip it, in either world."""
    from zeroseg.utils import warn_unknown_keys

    experiments = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
    assert len(experiments) > 30
    unknown = {}
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        for experiment in experiments:
            for world in ((), ("+world=toy",)):
                keys = warn_unknown_keys(compose("train", overrides=[f"experiment={experiment}", *world]), "train")
                if keys:
                    unknown[(experiment, world)] = keys
    GlobalHydra.instance().clear()
    assert unknown == {}
