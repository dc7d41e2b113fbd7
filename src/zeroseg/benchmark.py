"""``python -m zeroseg.benchmark toy [key=value ...]``: score every method under one budget.

The benchmark named ``<name>`` is described by ``conf/benchmark/<name>.yaml``: the seeds, the
methods (``all`` = every option of ``conf/method``, so a new method joins automatically), the
overrides every run shares (dataset, teacher, backbone, steps), and the reference rows. Each
(method, seed) is one ordinary training run (``zeroseg.train.train``) under
``<log_dir>/benchmark/<name>/<row>/seed<k>``; training-free methods are only evaluated. Results
are written to ``<output_dir>/<name>_benchmark.md`` and ``.json`` and printed: per row sIoU, uIoU,
hIoU, mIoU as mean ± sample standard deviation over seeds, and the mean wall time per run.

Reference rows bound the problem: ``clip_zero_shot`` (the teacher's own dense prediction, no
training) from below, and ``oracle`` (the first trainable method trained with
``dataset.setting=supervised``, i.e. with unseen labels too) from above.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import statistics
import time
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from zeroseg.eval import evaluate
from zeroseg.train import train
from zeroseg.utils import compose_config

log = logging.getLogger(__name__)

__all__ = ["registered_methods", "run_benchmark", "format_markdown", "main"]

COLUMNS = ("sIoU", "uIoU", "hIoU", "mIoU")
CONF = files("zeroseg") / "conf"


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


def _summary(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}


def _run_one(bench: DictConfig, row: str, method: str, trainable: bool, seed: int, extra: Sequence[str]) -> dict[str, Any]:
    run_dir = Path(bench.log_dir) / "benchmark" / bench.name / row / f"seed{seed}"
    overrides = [f"method={method}", f"seed={seed}", *bench.overrides, *extra]
    started = time.perf_counter()
    if trainable:
        cfg = compose_config("train", overrides, run_dir, root_dir=bench.root_dir)
        metrics, _ = train(cfg)
    else:
        eval_overrides = [o for o in overrides if not o.startswith("callbacks")]  # eval.yaml has no callbacks
        cfg = compose_config("eval", eval_overrides, run_dir, root_dir=bench.root_dir)
        metrics, _ = evaluate(cfg)
    seconds = time.perf_counter() - started
    return {"seed": seed, "seconds": seconds, **{k: float(metrics[k]) for k in COLUMNS}}


def run_benchmark(bench: DictConfig) -> dict[str, Any]:
    """Run every row of the benchmark; returns the JSON-able results."""
    available = registered_methods()
    methods = list(available) if bench.methods == "all" else list(bench.methods)
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ValueError(f"benchmark.methods names {unknown}; registered methods are {sorted(available)}")
    rows: list[tuple[str, str, bool, list[str]]] = [(m, m, available[m], []) for m in methods]
    if bench.oracle:
        oracle_method = next((m for m in methods if available[m]), None)
        if oracle_method is None:
            raise ValueError("benchmark.oracle needs at least one trainable method in benchmark.methods")
        rows.append((f"oracle ({oracle_method}, all labels)", oracle_method, True, ["dataset.setting=supervised"]))
    results: dict[str, Any] = {"name": bench.name, "seeds": list(bench.seeds), "overrides": list(bench.overrides), "rows": []}
    for row, method, trainable, extra in rows:
        seeds = list(bench.seeds) if trainable else list(bench.seeds)[:1]  # training-free rows do not vary
        runs = [_run_one(bench, row.split(" ")[0], method, trainable, seed, extra) for seed in seeds]
        summary = {k: _summary([r[k] for r in runs]) for k in COLUMNS}
        results["rows"].append(
            {
                "row": row,
                "method": method,
                "trained": trainable,
                "runs": runs,
                **summary,
                "seconds": statistics.fmean(r["seconds"] for r in runs),
            }
        )
        log.info("benchmark %s: %s done", bench.name, row)
    return results


def format_markdown(results: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = [
        f"# {results['name']} benchmark",
        "",
        f"Seeds {seeds}; mean ± sample std over seeds (training-free rows: one run). Shared overrides: "
        + " ".join(f"`{o}`" for o in results["overrides"]),
        "",
        "| method | trained | " + " | ".join(COLUMNS) + " | time per run (s) |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for row in results["rows"]:
        cells = [f"{row[k]['mean']:.1f} ± {row[k]['std']:.1f}" for k in COLUMNS]
        lines.append(
            f"| {row['row']} | {'yes' if row['trained'] else 'no'} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def load_benchmark_config(name: str, overrides: Sequence[str]) -> DictConfig:
    path = CONF / "benchmark" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(e.name[:-5] for e in CONF.joinpath("benchmark").iterdir() if e.name.endswith(".yaml"))
        raise ValueError(f"no benchmark named {name!r}; available: {options}")
    bench = OmegaConf.merge(OmegaConf.create(path.read_text()), OmegaConf.from_dotlist(list(overrides)))
    bench.name = name
    return bench


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="benchmark name: conf/benchmark/<name>.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the benchmark config (e.g. seeds=[0])")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    bench = load_benchmark_config(args.name, args.overrides)
    results = run_benchmark(bench)
    output_dir = Path(bench.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = format_markdown(results)
    (output_dir / f"{bench.name}_benchmark.md").write_text(markdown)
    (output_dir / f"{bench.name}_benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown)
    return results


if __name__ == "__main__":
    main()
