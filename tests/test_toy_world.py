"""The toy world: shipped toy CLIP quality, its pretraining script, the oracle setting, the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from zeroseg.clip import CLIPTeacher
from zeroseg.data import ClassSplit
from zeroseg.eval import evaluate
from zeroseg.toy.benchmark import COLUMNS, benchmark_rows, load_benchmark_config, registered_methods
from zeroseg.toy.benchmark import main as benchmark_main
from zeroseg.toy.clip import SEED_BASES, evaluate_toy_clip, toy_model_cfg
from zeroseg.utils import compose_config

from conftest import TINY_OVERRIDES, repo_root, subprocess_env

# K-means (k=4) best-match IoU of the shipped toy CLIP's dense tokens: measured 50.7 at build time
# (README, "The toy world"). Tokens of the same tower with random weights already reach 42.2,
# because colour alone separates most regions; the floor sits between the two, so it demands
# what pretraining adds, with room for platform noise.
PSEUDO_MASK_IOU_FLOOR = 46.0
# the issue's bar for the dense tokens (session 1's mean-pooled model: 52.0)
DENSE_MIOU_FLOOR = 50.0
ATTENTION_REGION_FLOOR = 70.0


# fresh images of the evaluation: 1,280 crops and 320 scenes (~1,000 regions; fewer leave the
# unseen accuracies a few points of sampling noise apart)
EVALUATION_IMAGES = 1280


@pytest.fixture(scope="module")
def toy_evaluation() -> dict[str, float]:
    # a seed range no other code uses: the pretraining script reports on SEED_BASES["test"]
    cfg = compose_config("train", ["clip=toy"], "/tmp/unused")
    teacher = hydra.utils.instantiate(cfg.clip, cache_dir=None)
    split = cfg.dataset.split
    return evaluate_toy_clip(
        teacher, list(split.class_names), list(split.unseen_class_names), EVALUATION_IMAGES, seed_base=SEED_BASES["test_suite"]
    )


def test_shipped_toy_clip_classifies_fresh_crops(toy_evaluation) -> None:
    assert toy_evaluation["crop_accuracy_seen"] >= 95.0
    assert toy_evaluation["crop_accuracy_unseen"] >= 95.0


def test_shipped_toy_clip_classifies_masked_ground_truth_regions(toy_evaluation) -> None:
    assert toy_evaluation["masked_region_accuracy_seen"] >= 90.0
    assert toy_evaluation["masked_region_accuracy_unseen"] >= 90.0


def test_shipped_toy_clip_pools_by_its_cls_token_and_serves_the_attention_region_encoder(toy_evaluation) -> None:
    assert toy_model_cfg()["vision_cfg"]["pool_type"] == "tok"
    # chance is 1/16; the one-pass encoder sees 4x4-8x8 token masks of the regions
    assert toy_evaluation["attention_region_accuracy_seen"] >= ATTENTION_REGION_FLOOR
    assert toy_evaluation["attention_region_accuracy_unseen"] >= ATTENTION_REGION_FLOOR


def test_shipped_toy_clip_dense_tokens_cluster_into_regions(toy_evaluation) -> None:
    assert toy_evaluation["kmeans_best_match_iou"] >= PSEUDO_MASK_IOU_FLOOR
    assert toy_evaluation["dense_zero_shot_mIoU"] >= DENSE_MIOU_FLOOR
    cfg = compose_config("train", [], "/tmp/unused")
    untrained = CLIPTeacher(arch="toy", random_init=True, model_cfg=toy_model_cfg())
    split = cfg.dataset.split
    random_iou = evaluate_toy_clip(
        untrained, list(split.class_names), list(split.unseen_class_names), EVALUATION_IMAGES, seed_base=SEED_BASES["test_suite"]
    )
    assert toy_evaluation["kmeans_best_match_iou"] > random_iou["kmeans_best_match_iou"]
    assert toy_evaluation["dense_zero_shot_mIoU"] > random_iou["dense_zero_shot_mIoU"] + 20


def test_shipped_weights_are_small_fp16_safetensors() -> None:
    path = Path(compose_config("train", ["clip=toy"], "/tmp/unused").clip.pretrained)
    assert path.suffix == ".safetensors" and path.stat().st_size < 15e6
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float16 for t in load_file(str(path)).values())


@pytest.mark.slow
def test_pretraining_script_runs_and_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "toy.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/train_toy_clip.py",
            "--steps",
            "3",
            "--bank-size",
            "64",
            "--batch-size",
            "16",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        cwd=repo_root(),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["steps"] == 3 and "crop_accuracy_unseen" in report["evaluation"]
    teacher = CLIPTeacher(arch="toy", pretrained=str(out), model_cfg=toy_model_cfg())
    assert teacher.encode_text(["red stripes"]).shape == (1, 64)


def test_supervised_oracle_setting_keeps_every_label() -> None:
    split = ClassSplit(["a", "b", "c"], ["b"])
    lut = split.train_label_lut("supervised")
    assert lut[:3].tolist() == [0, 1, 2] and lut[255] == 255
    assert split.train_class_names("supervised") == ("a", "b", "c")


def test_training_free_method_is_evaluated_without_a_checkpoint(make_cfg) -> None:
    cfg = make_cfg(["method=clip_zero_shot", "logger=none", "dataset.test_dataset.num_images=40"], config_name="eval", tiny=False)
    metrics, objects = evaluate(cfg)
    assert metrics["mIoU"] > 20  # the toy CLIP's dense tokens know the concepts
    assert not objects["model"].trainable
    with pytest.raises(ValueError, match="needs ckpt_path"):
        evaluate(make_cfg(["method=baseline"], config_name="eval", subdir="b"))


def test_registered_methods_are_discovered() -> None:
    methods = registered_methods()
    assert methods["baseline"] is True and methods["clip_zero_shot"] is False


@pytest.mark.slow
def test_benchmark_writes_both_files_with_the_documented_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zeroseg.train import train

    # shared by every method, so nothing method-specific
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("trainer.max_steps", "method.", "method="))]
    # test_checkpoint=last as the toy benchmark's own shared overrides: a training-free row must run under it too
    overrides = "[" + ",".join([*tiny, "clip=toy", "test_checkpoint=last"]) + "]"
    results = benchmark_main(
        [
            "toy",
            "seeds=[0,1]",
            "methods=[baseline,clip_zero_shot]",
            "oracle=true",
            "workers=1",
            f"root_dir={tmp_path}",
            f"overrides={overrides}",
            # not benchmark keys: overrides of every run (the benchmark's own config says 300 steps)
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ]
    )
    run_dir = Path(results["run_dir"])
    assert run_dir.parent == tmp_path / "logs" / "benchmark" / "toy"
    assert not (tmp_path / "results").exists()  # no output_dir: the tables stay in the run directory
    markdown = (run_dir / "toy_benchmark.md").read_text()
    data = json.loads((run_dir / "toy_benchmark.json").read_text())
    assert data == json.loads(json.dumps(results))
    header = next(line for line in markdown.splitlines() if line.startswith("| method"))
    assert header == "| method | trained | teacher | " + " | ".join(COLUMNS) + " | time per run (s) |"
    rows = {row["row"]: row for row in data["rows"]}
    assert set(rows) == {"baseline", "clip_zero_shot", "oracle (baseline, all labels)"}
    assert len(rows["baseline"]["runs"]) == 2 and len(rows["clip_zero_shot"]["runs"]) == 1
    for row in rows.values():
        for column in COLUMNS:
            assert set(row[column]) == {"mean", "std"}
        assert row["seconds"] > 0
        assert row["teacher"] == "toy_clip"
    trained_configs = sorted(run_dir.glob("*/seed*/config.yaml"))
    assert len(trained_configs) == 5  # 2 baseline + 2 oracle + 1 clip_zero_shot
    for path in trained_configs:
        assert OmegaConf.load(path).trainer.max_steps == 2, path
    metrics = [json.loads(p.read_text()) for p in run_dir.glob("baseline/seed*/metrics.json")]
    assert len(metrics) == 2

    # resume_dir: finished runs are reused, an unfinished one (no record) trains again
    (run_dir / "baseline" / "seed1" / "benchmark_run.json").unlink()
    trained = []
    monkeypatch.setattr("zeroseg.toy.benchmark.train", lambda cfg: trained.append(cfg.seed) or train(cfg))
    arguments = ["toy", "seeds=[0,1]", "methods=[baseline,clip_zero_shot]", "oracle=true", "workers=1", f"root_dir={tmp_path}",
                 f"overrides={overrides}", "trainer.max_steps=2", "trainer.val_check_interval=2"]  # fmt: skip
    resumed = benchmark_main([*arguments, f"resume_dir={run_dir}"])
    assert trained == [1] and resumed["reused_runs"] == 4
    again = {row["row"]: row for row in resumed["rows"]}
    assert again["oracle (baseline, all labels)"]["runs"] == rows["oracle (baseline, all labels)"]["runs"]
    assert resumed["total_seconds"] == pytest.approx(sum(r["seconds"] for row in resumed["rows"] for r in row["runs"]))
    # nor one whose overrides now compose another config (a YAML default changed since it was written)
    record_path = run_dir / "baseline" / "seed0" / "benchmark_run.json"
    record = json.loads(record_path.read_text())
    assert record["settings"]["dataset"]["batch_size"] == 8 and "paths" not in record["settings"]
    record["settings"]["dataset"]["batch_size"] = 999
    record_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"baseline/seed0/benchmark_run.json: the same overrides now compose another config \(dataset.batch_size: 999 then, 8 now\)"):
        benchmark_main([*arguments, f"resume_dir={run_dir}"])
    del record["settings"]
    record_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"does not hold the run's resolved config"):
        benchmark_main([*arguments, f"resume_dir={run_dir}"])
    # a record made under other overrides is never mixed in silently
    with pytest.raises(ValueError, match=r"baseline/seed0/benchmark_run.json: this run finished with overrides .*max_steps=2.* but the benchmark would now run it with .*max_steps=3"):
        benchmark_main([*arguments[:-2], "trainer.max_steps=3", "trainer.val_check_interval=2", f"resume_dir={run_dir}"])
    with pytest.raises(ValueError, match=r"resume_dir='/nonexistent': no such directory"):
        benchmark_main([*arguments, "resume_dir=/nonexistent"])


def test_benchmark_arguments_are_split_between_the_benchmark_and_every_run(tmp_path: Path) -> None:
    bench = load_benchmark_config("toy", ["seeds=[4]", "output_dir=/x", "trainer.max_steps=5", "backbone=resnet10t", "+foo=1"])
    assert list(bench.seeds) == [4] and bench.output_dir == "/x"
    assert list(bench.run_overrides) == ["trainer.max_steps=5", "backbone=resnet10t", "+foo=1"]
    assert "trainer" not in bench
    with pytest.raises(ValueError, match="seed is chosen per run.*seeds="):
        load_benchmark_config("toy", ["seed=3"])
    with pytest.raises(ValueError, match="method is chosen per run.*methods="):
        load_benchmark_config("toy", ["method=c2s"])
    extra = "extra_rows=[{row: c2s (attention encoder), method: c2s, overrides: [method.region_encoder=attention]}]"
    arguments = ["methods=[c2s,baseline]", "method_overrides={baseline: [backbone=resnet10t]}", extra]
    rows = benchmark_rows(load_benchmark_config("toy", arguments))
    assert [(r.name, r.method, r.overrides) for r in rows] == [
        ("c2s", "c2s", []),
        ("c2s (attention encoder)", "c2s", ["method.region_encoder=attention"]),
        ("baseline", "baseline", ["backbone=resnet10t"]),
        ("oracle (c2s, all labels)", "c2s", ["dataset.setting=supervised"]),
    ]
    with pytest.raises(ValueError, match=r"benchmark.methods names \['nope'\]"):
        benchmark_rows(load_benchmark_config("toy", ["methods=[nope]"]))


def test_a_two_stage_row_runs_after_its_first_stage_and_gets_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """``stage1: {method: row}``: each seed's run of the two-stage row gets the first-stage row's checkpoint of
    the same seed, runs after it, and its time in the table includes it."""
    import zeroseg.toy.benchmark as benchmark

    calls: list[tuple[str, int, list[str]]] = []

    def fake_compose(name, overrides, run_dir, root_dir=None):
        calls.append((name, int(next(o for o in overrides if o.startswith("seed="))[5:]), list(overrides)))
        return OmegaConf.create({"seed": 0, "clip": {"arch": "toy", "pretrained": None}})

    seconds = {"baseline": 10.0, "c2s": 3.0, "clip_zero_shot": 1.0}

    def fake_run(cfg):
        method = next(o for o in calls[-1][2] if o.startswith("method="))[7:]
        clock[0] += seconds[method]
        return {k: 50.0 for k in COLUMNS}, None

    clock = [0.0]
    monkeypatch.setattr(benchmark, "compose_config", fake_compose)
    monkeypatch.setattr(benchmark, "train", fake_run)
    monkeypatch.setattr(benchmark, "evaluate", fake_run)
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])
    bench = load_benchmark_config(
        "toy",
        ["seeds=[0,1]", "methods=[c2s,clip_zero_shot,baseline]", "oracle=false", "extra_rows=[]", "workers=1",
         "stage1={c2s: {row: baseline, train: false}, clip_zero_shot: baseline}"],  # fmt: skip
    )
    results = benchmark.run_benchmark(bench, tmp_path)
    order = [(next(o for o in overrides if o.startswith("method="))[7:], seed) for _, seed, overrides in calls]
    # a seed's second stages run as soon as its first stage is done
    assert order == [("baseline", 0), ("c2s", 0), ("clip_zero_shot", 0), ("baseline", 1), ("c2s", 1), ("clip_zero_shot", 1)]
    # train: false evaluates a trainable method (nothing left to train given its first stage), every seed
    assert [name for name, _, _ in calls] == ["train", "eval", "eval", "train", "eval", "eval"]
    for (method, _), (_, seed, overrides) in zip(order, calls):
        checkpoint = f"method.proposals.ckpt_path={tmp_path / 'baseline' / f'seed{seed}' / 'checkpoints' / 'last.ckpt'}"
        assert (checkpoint in overrides) == (method != "baseline")
    assert not any(o.startswith("method.proposals") for method_seed, (_, _, overrides) in zip(order, calls)
                   if method_seed[0] == "baseline" for o in overrides)  # fmt: skip
    rows = {row["row"]: row for row in results["rows"]}
    assert [row["row"] for row in results["rows"]] == ["c2s", "clip_zero_shot", "baseline"]  # table order kept
    assert rows["c2s"]["stage1_seconds"] == 10.0 and rows["c2s"]["seconds"] == 3.0
    assert results["total_seconds"] == 2 * 10.0 + 2 * 3.0 + 2 * 1.0  # the first stage counted once
    markdown = benchmark.format_markdown(results)
    assert "| 13 (10 stage 1 + 3) |" in next(line for line in markdown.splitlines() if line.startswith("| c2s "))
    with pytest.raises(ValueError, match=r"benchmark.stage1: c2s's first stage is the 'baseline' row, which must be"):
        benchmark_rows(load_benchmark_config("toy", ["methods=[c2s]", "stage1={c2s: baseline}"]))


def _plan_of(stage1: dict[str, str], rows: Sequence[str], seeds: Sequence[int]):
    from zeroseg.toy.benchmark import BenchmarkRow, BenchmarkRun

    return [
        BenchmarkRun(BenchmarkRow(name, name, True, stage1=stage1.get(name)), seed, (stage1[name], seed) if name in stage1 else None)  # noqa: E501
        for name in rows
        for seed in seeds
    ]


def test_parallel_runs_respect_the_worker_count_and_start_after_their_first_stage() -> None:
    import threading
    import time

    from zeroseg.toy.benchmark import run_in_order

    plan = _plan_of({"second": "first", "third": "first"}, ["first", "other", "second", "third"], [0, 1, 2])
    # the first stage of seed 2 is slow: its second stages must wait for it while others go on
    durations = {("first", 2): 0.4}
    lock, active, peak, events = threading.Lock(), [0], [0], []

    def execute(run):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            events.append(("start", run.key, time.perf_counter()))
        time.sleep(durations.get(run.key, 0.05))
        with lock:
            active[0] -= 1
            events.append(("end", run.key, time.perf_counter()))
        return {"key": run.key}

    finished = run_in_order(plan, 3, execute)
    assert finished == {run.key: {"key": run.key} for run in plan}
    assert peak[0] == 3  # never more than the workers, and they were used
    position = {(kind, key): i for i, (kind, key, _) in enumerate(events)}
    for run in plan:
        if run.after is not None:
            assert position[("start", run.key)] > position[("end", run.after)], run.key
    # seed 0's and 1's second stages did not wait for seed 2's slow first stage
    assert position[("start", ("second", 0))] < position[("end", ("first", 2))]


def test_a_failed_parallel_run_stops_new_runs_lets_running_ones_finish_and_raises_its_error() -> None:
    import threading
    import time

    from zeroseg.toy.benchmark import run_in_order

    plan = _plan_of({"second": "first"}, ["first", "second"], [0, 1, 2])
    started, finished, lock = [], [], threading.Lock()

    def execute(run):
        with lock:
            started.append(run.key)
        if run.key == ("first", 0):
            time.sleep(0.05)
            raise RuntimeError("benchmark run first, seed 0 failed")
        time.sleep(0.3)
        with lock:
            finished.append(run.key)
        return {}

    with pytest.raises(RuntimeError, match="first, seed 0 failed"):
        run_in_order(plan, 2, execute)
    # the run beside it finished; nothing started after the failure
    assert started == [("first", 0), ("first", 1)] and finished == [("first", 1)]
    with pytest.raises(ValueError, match=r"come after runs that are not planned"):
        run_in_order(_plan_of({"second": "first"}, ["second"], [0]), 2, execute)


@pytest.mark.slow
def test_benchmark_runs_two_processes_at_a_time_and_names_a_failed_run_and_its_log(tmp_path: Path) -> None:
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("trainer.max_steps", "method.", "method="))]
    # the shipped shared overrides, at tiny sizes
    shipped = list(OmegaConf.load(files("zeroseg.conf").joinpath("benchmark", "toy.yaml")).overrides)
    overrides = "[" + ",".join([*shipped, *tiny, "clip=toy"]) + "]"
    arguments = ["toy", "seeds=[0,1]", "methods=[baseline]", "oracle=false", "extra_rows=[]", "workers=2",
                 "threads_per_run=1", f"root_dir={tmp_path}", f"overrides={overrides}", "trainer.max_steps=2",
                 "trainer.val_check_interval=2"]  # fmt: skip
    results = benchmark_main(arguments)
    run_dir = Path(results["run_dir"])
    runs = results["rows"][0]["runs"]
    assert [run["seed"] for run in runs] == [0, 1]
    for run in runs:
        seed_dir = run_dir / "baseline" / f"seed{run['seed']}"
        # each run was its own process with one thread, its output in its own log
        assert run["threads"] == 1
        assert "validation at step 2" in (seed_dir / "benchmark_run.log").read_text()
        assert json.loads((seed_dir / "metrics.json").read_text())["hIoU"] == pytest.approx(run["hIoU"])
        # the table tests the last checkpoint: no best_* copy beside it (two per run doubled the disk use)
        assert sorted(p.name for p in (seed_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    # the two seeds ran side by side
    assert max(r["started"] for r in runs) < min(r["finished"] for r in runs)
    assert "; wall time " in (markdown := (run_dir / "toy_benchmark.md").read_text())
    assert "2 runs at a time, 1 thread(s) each" in markdown
    # the records the run processes wrote match the config this process composes: a resume reuses them
    assert benchmark_main([*arguments, f"resume_dir={run_dir}"])["reused_runs"] == 2

    # a run that fails names itself and its log; the benchmark fails
    failed = r"benchmark run baseline, seed 0 failed \(exit 1\); its log: .*baseline/seed0/benchmark_run.log"
    with pytest.raises(RuntimeError, match=failed):
        benchmark_main([*arguments, "seeds=[0]", "method_overrides={baseline: [backbone=no_such_backbone]}"])


@pytest.mark.slow
def test_sigterm_to_a_parallel_benchmark_stops_its_runs_and_exits_nonzero(tmp_path: Path) -> None:
    import signal
    import time

    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("trainer.max_steps", "method.", "method="))]
    overrides = "[" + ",".join([*tiny, "clip=toy"]) + "]"
    # long enough to be running when the signal comes
    arguments = ["seeds=[0,1]", "methods=[baseline]", "oracle=false", "extra_rows=[]", "workers=2", "threads_per_run=1",
                 f"root_dir={tmp_path}", f"overrides={overrides}", "trainer.max_steps=100000",
                 "trainer.val_check_interval=100000"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "zeroseg.benchmark", "toy", *arguments], env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    logs = lambda: list(tmp_path.glob("logs/benchmark/toy/*/baseline/seed*/benchmark_run.log"))  # noqa: E731
    deadline = time.monotonic() + 240
    while not (len(logs()) == 2 and all("[zeroseg.train][INFO] - training" in path.read_text() for path in logs())):
        assert process.poll() is None and time.monotonic() < deadline, "the runs never started training"
        time.sleep(0.5)
    time.sleep(3)  # into the training loop, where the stop signals are handled
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
        for path in logs():  # each run was told to stop, and saved its state (callbacks.STOP_SIGNALS)
            assert "SIGTERM received: stopped at step" in path.read_text(), path
        # and none is left running
        assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b""
    finally:  # never leave a 100,000-step run behind
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path)])


def test_no_lower_layer_imports_a_method_or_the_training_entry_points() -> None:
    # The toy CLIP's evaluation once imported methods.clip_zero_shot; the data layer instantiates the
    # toy scenes. A fresh interpreter shows what each layer pulls in.
    lower_layers = ["zeroseg.data", "zeroseg.clip", "zeroseg.toy", "zeroseg.toy.clip", "zeroseg.toolkit", "zeroseg.models"]
    code = (
        f"import importlib, sys\nfor name in {lower_layers!r}:\n    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('zeroseg.methods', 'zeroseg.train', 'zeroseg.eval'))))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), check=True)
    assert output.stdout.strip() == "[]", output.stdout


def test_methods_never_import_each_other() -> None:
    # a piece two methods need lives in toolkit/ or models/ (methods may use only their base class)
    import ast

    methods_dir = repo_root() / "src" / "zeroseg" / "methods"
    modules = {path.stem for path in methods_dir.glob("*.py")} - {"__init__", "base"}
    offenders = []
    for path in sorted(methods_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in getattr(node, "names", [])]
            if isinstance(node, (ast.Import, ast.ImportFrom)) and path.stem != "__init__":
                offenders += [(path.name, n) for n in names if n.startswith("zeroseg.methods.") and n.split(".")[2] in modules]
    assert offenders == []
