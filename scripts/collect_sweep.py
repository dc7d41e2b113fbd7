"""Print a Hydra multirun sweep as a results table (sIoU / uIoU / hIoU / mIoU per job).

    python scripts/collect_sweep.py logs/train/multiruns/<timestamp> [--format md|csv]

Each job folder holds ``.hydra/overrides.yaml`` (Hydra), ``config.yaml`` and ``metrics.json``
(zeroseg). A job's row is named by the overrides that differ between jobs (the swept values), or by
the label the experiment gives it under ``sweep_table.rows`` (the paper's row names, e.g. "Baseline
+ CSH" for ``experiment=chimera_ablation_modules``; a row may be a config-group override such as
``+experiment/chimera_table_iii=c2s``), in the experiment's row order; ``sweep_table.title`` heads
the table. A sweep run with ``+world=toy`` (``world.proxy`` in the job config) is titled as a
toy-world proxy. A job without ``metrics.json`` (failed or still running) is listed as missing,
not dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

METRICS = ("sIoU", "uIoU", "hIoU", "mIoU")


def _normalise(text: str) -> str:
    return "".join(text.split()).lower()  # Hydra writes swept booleans as True/False


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One entry per job folder: its overrides, zeroseg config and metrics (or None)."""
    jobs = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            raise FileNotFoundError(f"{overrides_file} is missing: {job_dir} is not a Hydra multirun job folder")
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        config_file, metrics_file = job_dir / "config.yaml", job_dir / "metrics.json"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        jobs.append({"dir": job_dir, "overrides": overrides, "config": config or {}, "metrics": metrics})
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no numbered job folders; expected a Hydra multirun directory")
    return jobs


def row_names(jobs: list[dict[str, Any]]) -> list[str]:
    """Each job's swept overrides ``key=value, ...`` (keys whose value differs between jobs)."""
    split = [dict(o.split("=", 1) for o in job["overrides"] if "=" in o) for job in jobs]
    keys = [k for k in dict.fromkeys(k for overrides in split for k in overrides) if len({o.get(k) for o in split}) > 1]
    return [", ".join(f"{k}={o.get(k)}" for k in keys) for o in split]


def format_value(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.1f}"


def build_table(jobs: list[dict[str, Any]]) -> tuple[str, list[tuple[str, list[str]]]]:
    table_cfg = next((job["config"].get("sweep_table") for job in jobs if job["config"].get("sweep_table")), None) or {}
    labels = {_normalise(k): v for k, v in (table_cfg.get("rows") or {}).items()}
    order = list(labels)
    rows = []
    for name, job in zip(row_names(jobs), jobs):
        label = labels.get(_normalise(name), name or job["dir"].name)
        if job["metrics"] is None:
            values = ["missing"] * len(METRICS)
        else:
            values = [format_value(job["metrics"].get(m)) for m in METRICS]
        rank = order.index(_normalise(name)) if _normalise(name) in labels else len(order)
        rows.append((rank, label, values))
    rows.sort(key=lambda r: r[0])
    title = table_cfg.get("title", "")
    # `+world=toy` runs a paper table's sweep in the toy world: say so wherever the table goes
    world = next((job["config"].get("world") for job in jobs if job["config"].get("world")), None) or {}
    if world.get("proxy"):
        title = f"{title} — {world.get('name', 'toy')}-world proxy, not the paper's setting".lstrip(" —")
    return title, [(label, values) for _, label, values in rows]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--format", choices=["md", "csv"], default="md")
    args = parser.parse_args(argv)
    try:
        title, rows = build_table(read_jobs(args.sweep_dir))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.format == "csv":
        print(",".join(["row", *METRICS]))
        for label, values in rows:
            print(",".join([f'"{label}"', *values]))
        return 0
    if title:
        print(f"**{title}** ({args.sweep_dir})\n")
    print("| " + " | ".join(["", *METRICS]) + " |")
    print("|" + "---|" * (len(METRICS) + 1))
    for label, values in rows:
        print("| " + " | ".join([label, *values]) + " |")
    missing = [label for label, values in rows if values[0] == "missing"]
    if missing:
        print(f"\n{len(missing)} job(s) without metrics.json: {missing}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
