"""``python -m zeroseg.benchmark toy [key=value ...]``: score every method under one budget.

The benchmark named ``<name>`` is described by ``conf/benchmark/<name>.yaml``: the seeds, the
methods (``all`` = every option of ``conf/method``, so a new method joins automatically), the
overrides every run shares (dataset, teacher, backbone, steps), a method's own toy-world
overrides (``method_overrides``), extra rows (``extra_rows``: a method under other options) and
the reference rows. Each (row, seed) is one ordinary training run (``zeroseg.train.train``);
training-free methods are only evaluated.

Command-line arguments are split by key: the benchmark's own keys (``seeds``, ``methods``,
``oracle``, ``output_dir``, ...) set the benchmark; every other ``key=value`` (``trainer.max_steps=5``,
``backbone=resnet10t``, ``+foo=1``) is appended to the overrides of **every** run, after the
benchmark's and the method's own, so it wins. ``seed=`` and ``method=`` are refused: they are
chosen per run (use ``seeds=[..]`` and ``methods=[..]``).

Each invocation gets its own run directory ``<log_dir>/benchmark/<name>/<timestamp>/`` holding
the runs (``<row>/seed<k>``) and, unless ``output_dir=`` is given, the tables
``<name>_benchmark.md`` and ``.json``: a smoke run never overwrites ``results/``. The published
tables are written with ``output_dir=results``. Progress (row, seed, run k of n, elapsed time) is
logged before and after every run.

A benchmark takes long; ``resume_dir=<run directory>`` continues one: every run that finished there
(its ``benchmark_run.json`` record) is reused, the others train, and the tables cover all of them. A
record whose overrides differ from what the run would get now stops the benchmark with both lists, and
so does one whose resolved config differs from what the same overrides compose now (a YAML default
changed since; the record holds the run's config but ``paths``): never a silent mix of settings.
The same mechanism adds a new method's row to a published
benchmark without retraining the others. ``Total`` in the table is the sum of the runs' own times,
so it does not depend on how many invocations it took.

Two-stage methods (DeOP, MAFT, ``multipass_clip`` on frozen proposals) name their first stage in
``stage1: {method: row}``: each seed's run gets that row's run of the same seed as
``method.proposals.ckpt_path=<its run>/checkpoints/last.ckpt``, runs once that run has finished, and
its time in the table includes the first stage's (``Total`` counts that run once).

Runs go ``workers`` at a time (default 2: on a 2-core machine two one-thread runs finish the
benchmark in about half the time of one two-thread run, which stalls whenever anything else holds a
core). With ``workers > 1`` each run is its own process (``python -m zeroseg.toy.benchmark --run-one``)
with ``threads_per_run`` threads (default: the machine's cores divided by ``workers``) and its output in
``<row>/seed<k>/benchmark_run.log``; a two-stage run starts as soon as its seed's first stage has
finished and a worker is free. ``workers=1`` runs everything in this process, one after another. A
failed run stops new runs from starting, lets the running ones finish (their records are kept for
``resume_dir``) and then raises, naming the run and its log. The table states the wall time of the
invocation beside the sum of the runs' own times.

Reference rows bound the problem: ``clip_zero_shot`` (the teacher's own dense prediction, no
training) from below, and ``oracle`` (the first trainable method trained with
``dataset.setting=supervised``, i.e. with unseen labels too) from above. Every row names the
teacher its runs used.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from zeroseg.eval import evaluate
from zeroseg.train import train
from zeroseg.utils import compose_config
from zeroseg.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "BenchmarkRow",
    "BenchmarkRun",
    "registered_methods",
    "split_arguments",
    "run_in_order",
    "run_benchmark",
    "format_markdown",
    "main",
]

COLUMNS = ("sIoU", "uIoU", "hIoU", "mIoU")
CONF = files("zeroseg") / "conf"
# per-run keys the benchmark sets itself
RESERVED_RUN_KEYS = {"seed": "seeds=[...]", "method": "methods=[...]"}


def registered_methods() -> dict[str, bool]:
    """``{method option: trainable}`` for every YAML in ``conf/method``."""
    methods = {}
    for entry in sorted(CONF.joinpath("method").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        target = OmegaConf.create(entry.read_text())["_target_"]
        module_name, class_name = target.rsplit(".", 1)
        methods[entry.name[: -len(".yaml")]] = bool(getattr(importlib.import_module(module_name), class_name).trainable)
    return methods


@dataclass
class BenchmarkRow:
    """One table row: ``method`` run under ``overrides`` (after the shared ones) for every seed."""

    name: str
    method: str
    trainable: bool
    overrides: list[str] = field(default_factory=list)
    # the row whose run of the same seed is this row's first stage (its last checkpoint becomes
    # ``method.proposals.ckpt_path``); ``None`` for one-stage methods
    stage1: str | None = None


def _summary(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def split_arguments(arguments: Sequence[str], benchmark_keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split command-line ``key=value`` arguments into (benchmark dotlist, run overrides)."""
    bench, runs = [], []
    for argument in arguments:
        if "=" not in argument and not argument.startswith("~"):
            raise ValueError(f"benchmark argument {argument!r} is not key=value")
        key = _override_key(argument)
        if key.split(".", 1)[0] in benchmark_keys and not argument.startswith(("+", "~")):
            bench.append(argument)
        elif key in RESERVED_RUN_KEYS:
            raise ValueError(
                f"benchmark argument {argument!r}: {key} is chosen per run by the benchmark; use {RESERVED_RUN_KEYS[key]}"
            )
        else:
            runs.append(argument)
    return bench, runs


def _teacher_name(cfg: DictConfig) -> str:
    pretrained = cfg.clip.get("pretrained")
    if pretrained and Path(str(pretrained)).suffix:
        return Path(str(pretrained)).stem
    return f"{cfg.clip.arch}:{pretrained or 'random'}"


RUN_RECORD = "benchmark_run.json"


STAGE1_KEY = "method.proposals.ckpt_path"


def _run_overrides(bench: DictConfig, row: BenchmarkRow, seed: int, run_dir: Path | None = None) -> list[str]:
    overrides = [f"method={row.method}", f"seed={seed}", *bench.overrides, *row.overrides]
    if row.stage1 is not None:
        if run_dir is None:
            raise ValueError(f"benchmark row {row.name!r} has a first stage: its overrides need the run directory")
        stage1_dir = run_dir / _row_directory_name(row.stage1) / f"seed{seed}"
        overrides.append(f"{STAGE1_KEY}={stage1_dir / 'checkpoints' / 'last.ckpt'}")
    return [*overrides, *bench.run_overrides]


def _run_config(root_dir: str, run_dir: Path, trainable: bool, overrides: list[str]) -> DictConfig:
    """The config a run composes: ``train`` for a trainable row, ``eval`` for a training-free one."""
    if trainable:
        return compose_config("train", overrides, run_dir, root_dir=root_dir)
    # eval.yaml has no callbacks, and a training-free run has no training checkpoint to choose
    eval_overrides = [o for o in overrides if not _override_key(o).startswith(("callbacks", "test_checkpoint"))]
    return compose_config("eval", eval_overrides, run_dir, root_dir=root_dir)


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """What a run computes: its whole resolved config but ``paths`` (where it writes). A default changed in
    a YAML file since a record was written (a method's toy setting) shows here, not in the overrides."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.pop("paths", None)
    return json.loads(json.dumps(settings, default=str))


def _differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like trees."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        keys = sorted(set(recorded) | set(current), key=str)
        return [d for k in keys for d in _differences(recorded.get(k, "<absent>"), current.get(k, "<absent>"), f"{prefix}{k}.")]
    return [] if recorded == current else [f"{prefix[:-1]}: {recorded!r} then, {current!r} now"]


def _finished_run(run_dir: Path, overrides: list[str], settings: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """The record of a run that finished in ``run_dir`` with exactly ``overrides`` and the same resolved
    config (``settings()``, composed only when a record exists); ``None`` if none."""
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("overrides") != overrides:
        raise ValueError(
            f"{path}: this run finished with overrides {record.get('overrides')}, but the benchmark would now "
            f"run it with {overrides}; resume into a fresh directory or delete {run_dir}"
        )
    if "settings" not in record:
        raise ValueError(
            f"{path}: this record does not hold the run's resolved config (written before zeroseg recorded it), so a "
            f"YAML default changed since cannot be ruled out; resume into a fresh directory or delete {run_dir}"
        )
    differences = _differences(record["settings"], settings())
    if differences:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise ValueError(
            f"{path}: the same overrides now compose another config ({shown}); resume into a fresh directory or "
            f"delete {run_dir}"
        )
    return record["run"]


def _run_one(root_dir: str, run_dir: Path, trainable: bool, seed: int, overrides: list[str]) -> dict[str, Any]:
    started_at, started = time.time(), time.perf_counter()
    cfg = _run_config(root_dir, run_dir, trainable, overrides)
    settings = run_settings(cfg)  # before the run: nothing it adds to its config counts
    metrics, _ = train(cfg) if trainable else evaluate(cfg)
    seconds = time.perf_counter() - started
    run = {
        "seed": seed,
        "seconds": seconds,
        "teacher": _teacher_name(cfg),
        **{k: float(metrics[k]) for k in COLUMNS},
        # when and with how many threads: shows which runs shared the machine
        "started": started_at,
        "finished": time.time(),
        "threads": torch.get_num_threads(),
    }
    # written last: a run interrupted before this point is trained again by resume_dir
    record = {"overrides": overrides, "settings": settings, "run": run}
    atomic_write_text(run_dir / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    return run


RUN_LOG = "benchmark_run.log"


class _RunProcesses:
    """Runs in their own processes (``workers > 1``); ``terminate`` stops every one still running."""

    def __init__(self, root_dir: str, threads: int) -> None:
        self.root_dir, self.threads = root_dir, threads
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def __call__(self, run_dir: Path, row: BenchmarkRow, seed: int, overrides: list[str]) -> dict[str, Any]:
        spec = {"root_dir": self.root_dir, "run_dir": str(run_dir), "trainable": row.trainable, "seed": seed,
                "overrides": overrides, "threads": self.threads}  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        # one thread per run unless told otherwise: OpenMP sized by the process, not by the machine
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        log_path = run_dir / RUN_LOG
        with open(log_path, "w") as log_file:
            with self._lock:
                if self._stopping:
                    raise RuntimeError(f"benchmark run {row.name}, seed {seed}: not started, the benchmark is stopping")
                process = subprocess.Popen(
                    [sys.executable, "-m", "zeroseg.toy.benchmark", "--run-one", json.dumps(spec)],
                    stdout=log_file, stderr=subprocess.STDOUT, env=env,
                )  # fmt: skip
                self._running.add(process)
            try:
                code = process.wait()
            finally:
                with self._lock:
                    self._running.discard(process)
        record = run_dir / RUN_RECORD
        if code != 0 or not record.is_file():
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise RuntimeError(f"benchmark run {row.name}, seed {seed} failed (exit {code}); its log: {log_path}\n{tail}")
        return json.loads(record.read_text())["run"]

    def terminate(self) -> None:
        with self._lock:
            self._stopping = True
            running = list(self._running)
        for process in running:
            process.terminate()  # a training run saves its state on SIGTERM (callbacks.STOP_SIGNALS)
        for process in running:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _run_one_process(spec_json: str) -> None:
    """The child side of :class:`_RunProcesses`: one run, its record written by :func:`_run_one`."""
    spec = json.loads(spec_json)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    torch.set_num_threads(int(spec["threads"]))
    _run_one(spec["root_dir"], Path(spec["run_dir"]), spec["trainable"], spec["seed"], spec["overrides"])


def _container(node: Any, empty: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else empty


def benchmark_rows(bench: DictConfig) -> list[BenchmarkRow]:
    """The rows of a benchmark config, in table order; unknown methods raise naming the key."""
    available = registered_methods()
    methods = list(available) if bench.methods == "all" else list(bench.methods)
    method_overrides: dict[str, list[str]] = _container(bench.get("method_overrides"), {})
    extra_rows: list[dict[str, Any]] = _container(bench.get("extra_rows"), [])
    stage1_specs: dict[str, Any] = _container(bench.get("stage1"), {})
    named = {"benchmark.methods": methods, "benchmark.method_overrides": list(method_overrides)}
    named["benchmark.stage1"] = list(stage1_specs)
    named["benchmark.extra_rows"] = [r.get("method") for r in extra_rows]
    for key, names in named.items():
        unknown = [m for m in names if m not in available]
        if unknown:
            raise ValueError(f"{key} names {unknown}; registered methods are {sorted(available)}")
    # {method: row} or {method: {row: ..., train: false}} (a method with nothing left to train once its first
    # stage is given, e.g. multipass_clip on frozen proposals: evaluated for every seed)
    stage1: dict[str, str] = {}
    trains: dict[str, bool] = dict(available)
    for method, spec in stage1_specs.items():
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"row", "train"})
            if "row" not in spec or unknown:
                raise ValueError(f"benchmark.stage1.{method}={spec}: expected a row name or {{row: <row>, train: true|false}}")
            stage1[method] = spec["row"]
            trains[method] = bool(spec.get("train", available[method]))
        else:
            stage1[method] = spec
    for method, source in stage1.items():
        if method not in methods:
            continue
        if source not in methods or not available[source] or source in stage1:
            raise ValueError(
                f"benchmark.stage1: {method}'s first stage is the {source!r} row, which must be a trainable one-stage "
                f"method among benchmark.methods ({methods})"
            )
    rows = []
    for method in methods:  # a method's extra rows follow its own row
        rows.append(BenchmarkRow(method, method, trains[method], list(method_overrides.get(method, [])), stage1.get(method)))
        for extra in (e for e in extra_rows if e["method"] == method):
            overrides = [*method_overrides.get(method, []), *extra.get("overrides", [])]
            rows.append(BenchmarkRow(extra["row"], method, trains[method], overrides, stage1.get(method)))
    if bench.oracle:
        oracle_method = next((m for m in methods if available[m]), None)
        if oracle_method is None:
            raise ValueError("benchmark.oracle needs at least one trainable method in benchmark.methods")
        overrides = [*method_overrides.get(oracle_method, []), "dataset.setting=supervised"]
        rows.append(BenchmarkRow(f"oracle ({oracle_method}, all labels)", oracle_method, True, overrides))
    return rows


def _row_directory_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")


def _row_directory(row: BenchmarkRow) -> str:
    return _row_directory_name(row.name)


@dataclass(frozen=True)
class BenchmarkRun:
    """One (row, seed) run of the plan; ``after`` is the (row name, seed) run it needs finished first."""

    row: BenchmarkRow
    seed: int
    after: tuple[str, int] | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.row.name, self.seed)


def _next_ready(pending: list[BenchmarkRun], finished: dict[tuple[str, int], Any]) -> BenchmarkRun | None:
    """The next run to start: a run whose first stage has just finished goes before the rest (its
    first stage's seed is done), otherwise plan order; ``None`` if every pending run waits."""
    ready = [run for run in pending if run.after is None or run.after in finished]
    return next((run for run in ready if run.after is not None), ready[0] if ready else None)


def run_in_order(
    runs: Sequence[BenchmarkRun],
    workers: int,
    execute: Callable[[BenchmarkRun], Any],
    abort: Callable[[], None] = lambda: None,
    finished: dict[tuple[str, int], Any] | None = None,
) -> dict[tuple[str, int], Any]:
    """``execute`` every run, at most ``workers`` at a time, none before the run it comes ``after``
    (which is either among ``runs`` or already in ``finished``, e.g. reused from an earlier invocation).

    ``workers == 1`` runs in this thread and lets the first error through. Otherwise runs execute in
    worker threads; after a failure no new run starts, the running ones finish, and the first error is
    raised (the others are logged). Any interruption of the waiting thread (Ctrl-C, SIGTERM turned
    into ``SystemExit``) calls ``abort`` before the worker threads are joined.
    """
    finished = dict(finished or {})
    keys = {run.key for run in runs} | set(finished)
    missing = [run for run in runs if run.after is not None and run.after not in keys]
    if missing:
        raise ValueError(f"benchmark runs {[r.key for r in missing]} come after runs that are not planned")
    pending = list(runs)
    if workers <= 1:
        while pending:
            run = _next_ready(pending, finished)
            pending.remove(run)
            finished[run.key] = execute(run)
        return finished
    failures: list[tuple[BenchmarkRun, BaseException]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="benchmark-run") as pool:
        running: dict[Future, BenchmarkRun] = {}
        try:
            while pending or running:
                while not failures and len(running) < workers and (run := _next_ready(pending, finished)) is not None:
                    pending.remove(run)
                    running[pool.submit(execute, run)] = run
                if not running:
                    break  # a failure left the rest unstarted
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    run = running.pop(future)
                    error = future.exception()
                    if error is None:
                        finished[run.key] = future.result()
                    else:
                        failures.append((run, error))
        except BaseException:
            abort()
            raise
    if failures:
        for run, error in failures[1:]:
            log.error("benchmark run %s, seed %d also failed: %s", run.row.name, run.seed, error)
        if pending:
            log.error("benchmark: %d runs not started after the failure: %s", len(pending), [r.key for r in pending])
        raise failures[0][1]
    return finished


def _plan(rows: list[BenchmarkRow], seeds: list[int]) -> list[BenchmarkRun]:
    """Every (row, seed) run: first stages first, then the other one-stage rows, then two-stage rows.
    Training-free rows do not vary with the seed, unless their first stage does."""
    first_stages = {row.stage1 for row in rows if row.stage1 is not None}
    order = sorted(rows, key=lambda r: (r.stage1 is not None, r.name not in first_stages))
    return [
        BenchmarkRun(row, seed, None if row.stage1 is None else (row.stage1, seed))
        for row in order
        for seed in (seeds if row.trainable or row.stage1 is not None else seeds[:1])
    ]


def _threads_per_run(bench: DictConfig, workers: int) -> int:
    threads = bench.get("threads_per_run")
    if threads is None:
        return max(1, (os.cpu_count() or 1) // workers)
    if int(threads) < 1:
        raise ValueError(f"benchmark.threads_per_run={threads}: expected a positive number of threads or null")
    return int(threads)


def run_benchmark(bench: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run every row of the benchmark into ``run_dir``; returns the JSON-able results."""
    rows = benchmark_rows(bench)
    seeds = list(bench.seeds)
    workers = int(bench.get("workers", 1))
    if workers < 1:
        raise ValueError(f"benchmark.workers={workers}: expected at least 1 run at a time")
    plan = _plan(rows, seeds)
    results: dict[str, Any] = {
        "name": bench.name,
        "seeds": seeds,
        "overrides": [*bench.overrides, *bench.run_overrides],
        "run_dir": str(run_dir),
        "workers": workers,
        "rows": [],
    }
    processes = None
    if workers > 1:
        processes = _RunProcesses(str(bench.root_dir), _threads_per_run(bench, workers))
        results["threads_per_run"] = processes.threads
    started = time.perf_counter()
    index = {run.key: k for k, run in enumerate(plan, start=1)}

    def place(planned: BenchmarkRun) -> tuple[Path, list[str], tuple[Any, ...]]:
        """A planned run's directory, its overrides, and its progress fields for the log."""
        row, seed = planned.row, planned.seed
        progress = (bench.name, index[planned.key], len(plan), row.name, seed)
        return run_dir / _row_directory(row) / f"seed{seed}", _run_overrides(bench, row, seed, run_dir), progress

    # finished runs of an earlier invocation (resume_dir), checked here in this thread: composing a config
    # to compare is not thread-safe (Hydra's global state)
    reused: dict[tuple[str, int], dict[str, Any]] = {}
    for planned in plan:
        seed_dir, overrides, progress = place(planned)
        trainable = planned.row.trainable
        run = _finished_run(
            seed_dir, overrides, lambda: run_settings(_run_config(str(bench.root_dir), seed_dir, trainable, overrides))
        )
        if run is not None:
            log.info("benchmark %s: run %d/%d — %s, seed %d: reused (%s)", *progress, seed_dir / RUN_RECORD)
            reused[planned.key] = run
    results["reused_runs"] = len(reused)

    def execute(planned: BenchmarkRun) -> dict[str, Any]:
        row, seed = planned.row, planned.seed
        seed_dir, overrides, progress = place(planned)
        log.info("benchmark %s: run %d/%d — %s, seed %d (elapsed %s)", *progress, _clock(started))
        if processes is None:
            run = _run_one(str(bench.root_dir), seed_dir, row.trainable, seed, overrides)
        else:
            run = processes(seed_dir, row, seed, overrides)
        log.info(
            "benchmark %s: run %d/%d done — %s, seed %d: hIoU %.2f in %.0f s (elapsed %s)",
            *progress, run["hIoU"], run["seconds"], _clock(started),
        )  # fmt: skip
        return run

    previous_handler = None
    if processes is not None and threading.current_thread() is threading.main_thread():
        # SIGTERM (scancel, kill) reaches the waiting thread as SystemExit, so the runs are stopped too
        previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        to_run = [planned for planned in plan if planned.key not in reused]
        abort = processes.terminate if processes else lambda: None
        finished = run_in_order(to_run, workers, execute, abort=abort, finished=reused)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    runs_by_row: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
    for planned in sorted(plan, key=lambda r: (r.row.name, seeds.index(r.seed))):
        runs_by_row[planned.row.name].append(finished[planned.key])
    for row in rows:
        runs = runs_by_row[row.name]
        stage1_seconds = statistics.fmean(r["seconds"] for r in runs_by_row[row.stage1]) if row.stage1 else None
        results["rows"].append(
            {
                "row": row.name,
                "method": row.method,
                "trained": row.trainable,
                "teacher": ", ".join(sorted({r["teacher"] for r in runs})),
                "overrides": row.overrides,
                "runs": runs,
                **{k: _summary([r[k] for r in runs]) for k in COLUMNS},
                "seconds": statistics.fmean(r["seconds"] for r in runs),
                "stage1": row.stage1,
                "stage1_seconds": stage1_seconds,
            }
        )
    # the runs' own times: the same whether the benchmark ran in one go or was resumed
    results["total_seconds"] = sum(run["seconds"] for runs in runs_by_row.values() for run in runs)
    # this invocation's wall time (a resumed one covers only the runs it trained)
    results["wall_seconds"] = time.perf_counter() - started
    return results


def _clock(started: float) -> str:
    seconds = int(time.perf_counter() - started)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _wall_clause(results: dict[str, Any]) -> str:
    if "wall_seconds" not in results:
        return ""
    workers = results.get("workers", 1)
    how = f"{workers} runs at a time, {results['threads_per_run']} thread(s) each" if workers > 1 else "one run at a time"
    reused = f", {results['reused_runs']} runs reused" if results.get("reused_runs") else ""
    return f"; wall time {results['wall_seconds'] / 60:.1f} min ({how}{reused})"


def format_markdown(results: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = [
        f"# {results['name']} benchmark",
        "",
        f"Seeds {seeds}; mean ± sample std over seeds (training-free rows: one run). Shared overrides: "
        + " ".join(f"`{o}`" for o in results["overrides"])
        + f". Total {results.get('total_seconds', 0) / 60:.1f} min (sum of the runs' times)"
        + _wall_clause(results)
        + ".",
        "",
        "| method | trained | teacher | " + " | ".join(COLUMNS) + " | time per run (s) |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for row in results["rows"]:
        cells = [f"{row[k]['mean']:.1f} ± {row[k]['std']:.1f}" for k in COLUMNS]
        seconds = f"{row['seconds']:.0f}"
        if row.get("stage1"):  # its own run + the first stage's (the other row's run of the same seed)
            seconds = f"{row['seconds'] + row['stage1_seconds']:.0f} ({row['stage1_seconds']:.0f} stage 1 + {row['seconds']:.0f})"
        lines.append(
            f"| {row['row']} | {'yes' if row['trained'] else 'no'} | {row['teacher']} | " + " | ".join(cells) + f" | {seconds} |"
        )
    overridden = [row for row in results["rows"] if row.get("overrides")]
    if overridden:
        lines += ["", "Row overrides (after the shared ones):", ""]
        lines += [f"- {row['row']}: " + " ".join(f"`{o}`" for o in row["overrides"]) for row in overridden]
    two_stage = [row for row in results["rows"] if row.get("stage1")]
    if two_stage:
        lines += ["", "Two-stage rows (their time includes the first stage's run; Total counts it once):", ""]
        lines += [
            f"- {row['row']}: stage 1 = the `{row['stage1']}` row's run of the same seed "
            f"(`{STAGE1_KEY}=<its run>/checkpoints/last.ckpt`)"
            for row in two_stage
        ]
    return "\n".join(lines) + "\n"


def load_benchmark_config(name: str, arguments: Sequence[str]) -> DictConfig:
    """``conf/benchmark/<name>.yaml`` with the benchmark-level arguments merged and the rest in ``run_overrides``."""
    path = CONF / "benchmark" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(e.name[:-5] for e in CONF.joinpath("benchmark").iterdir() if e.name.endswith(".yaml"))
        raise ValueError(f"no benchmark named {name!r}; available: {options}")
    base = OmegaConf.create(path.read_text())
    bench_arguments, run_overrides = split_arguments(arguments, [*base.keys(), "output_dir", "name"])
    bench = OmegaConf.merge(base, OmegaConf.from_dotlist(bench_arguments))
    bench.name = name
    bench.run_overrides = run_overrides
    return bench


def _new_run_directory(bench: DictConfig) -> Path:
    parent = Path(bench.log_dir) / "benchmark" / bench.name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for suffix in range(1000):  # two benchmarks started in the same second get two directories
        candidate = parent / (stamp if suffix == 0 else f"{stamp}_{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {parent}")


def _resume_directory(bench: DictConfig) -> Path:
    run_dir = Path(bench.resume_dir)
    if not run_dir.is_dir():
        raise ValueError(f"resume_dir={bench.resume_dir!r}: no such directory (expected an earlier benchmark run directory)")
    return run_dir


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="benchmark name: conf/benchmark/<name>.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="benchmark keys (seeds=[0]) or overrides of every run (e.g. trainer.max_steps=5)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    bench = load_benchmark_config(args.name, args.overrides)
    if bench.get("kind") == "cost":  # what each method costs (zeroseg/cost.py): measured, not trained
        from zeroseg.cost import run_cost_benchmark, write_cost_tables

        results = run_cost_benchmark(bench)
        write_cost_tables(results, Path(bench.output_dir) if bench.get("output_dir") else _new_run_directory(bench))
        return results
    run_dir = _resume_directory(bench) if bench.get("resume_dir") else _new_run_directory(bench)
    log.info("benchmark %s: run directory %s; overrides of every run: %s", bench.name, run_dir, list(bench.run_overrides))
    results = run_benchmark(bench, run_dir)
    output_dir = Path(bench.output_dir) if bench.get("output_dir") else run_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = format_markdown(results)
    (output_dir / f"{bench.name}_benchmark.md").write_text(markdown)
    (output_dir / f"{bench.name}_benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown)
    log.info("benchmark %s: tables written to %s", bench.name, output_dir)
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run-one"]:  # one run of a benchmark with workers > 1 (see _RunProcesses)
        _run_one_process(sys.argv[2])
    else:
        main()
