"""Summarise a Hydra multirun sweep: a results table (sIoU / uIoU / hIoU / mIoU), seeds aggregated, and a plot.

    python scripts/collect_sweep.py logs/train/multiruns/<timestamp> [--format md|csv] [--out DIR] [--x KEY]

Each job folder holds ``.hydra/overrides.yaml`` (Hydra), ``config.yaml`` and ``metrics.json``
(zeroseg). A row is named by the overrides that differ between jobs (the swept values), or by the
label the experiment gives it under ``sweep_table.rows`` (the paper's row names, e.g. "Baseline
+ CSH" for ``experiment=chimera_ablation_modules``; a row may be a config-group override such as
``+experiment/chimera_table_iii=c2s``), in the experiment's row order; ``sweep_table.title`` heads
the table. A sweep run with ``+world=toy`` (``world.proxy`` in the job config) is titled as a
toy-world proxy.

**Seeds.** Jobs that differ only in ``seed`` are one row: each metric is the mean ± the sample
standard deviation over the seeds that finished (``-m ... seed=0,1,2``), and the ``n`` column counts
them. A job without ``metrics.json`` (failed or still running) is counted as missing, never dropped
silently: a row none of whose seeds finished reads "missing".

**Outputs.** The table is printed (Markdown, or CSV with ``--format csv``) and written into ``--out``
(default: the sweep directory) as ``sweep_results.md`` and ``sweep_results.csv`` (one column per
metric mean and one per std, for spreadsheets). When a swept value is numeric (``method.gamma``,
``method.top_k_start``, ...; chosen with ``--x`` when there are several) ``sweep_results.png`` plots
hIoU, sIoU and uIoU against it, one line per combination of the other swept values, with the seed
std as error bars.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

METRICS = ("sIoU", "uIoU", "hIoU", "mIoU")
PLOTTED = ("hIoU", "sIoU", "uIoU")
SEED_KEY = "seed"
OUTPUT_STEM = "sweep_results"


@dataclass
class Row:
    """One table row: the jobs that differ only in ``seed``."""

    name: str  # the swept overrides without the seed, "key=value, ..."
    label: str  # the paper's row name, else ``name``
    swept: dict[str, str]  # swept key -> value (the seed excluded)
    jobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [job for job in self.jobs if job["metrics"] is not None]

    @property
    def missing(self) -> int:
        return len(self.jobs) - len(self.finished)

    def stats(self, metric: str) -> tuple[Optional[float], Optional[float]]:
        """Mean and sample std over the finished seeds (std 0 for one seed; None when none finished)."""
        values = [float(v) for v in (job["metrics"].get(metric) for job in self.finished) if v is not None]
        values = [v for v in values if math.isfinite(v)]
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _normalise(text: str) -> str:
    return "".join(text.split()).lower()  # Hydra writes swept booleans as True/False


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One entry per job folder: its overrides, zeroseg config and metrics (or None)."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory; expected a Hydra multirun directory")
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


def _split_overrides(job: dict[str, Any]) -> dict[str, str]:
    # "+key=value" and "key=value" name the same setting
    return {k.lstrip("+~"): v for k, v in (o.split("=", 1) for o in job["overrides"] if "=" in o)}


def swept_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """Keys whose value differs between jobs, in the order they first appear."""
    split = [_split_overrides(job) for job in jobs]
    keys = dict.fromkeys(k for overrides in split for k in overrides)
    return [k for k in keys if len({o.get(k) for o in split}) > 1]


def row_names(jobs: list[dict[str, Any]]) -> list[str]:
    """Each job's swept overrides ``key=value, ...``, the seed included."""
    keys = swept_keys(jobs)
    return [", ".join(f"{k}={o.get(k)}" for k in keys) for o in map(_split_overrides, jobs)]


def _sweep_table(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    return next((job["config"].get("sweep_table") for job in jobs if job["config"].get("sweep_table")), None) or {}


def _label_key(name: str) -> str:
    # the experiment writes its rows as overrides, with or without the `+` of an appended group
    return _normalise(", ".join(part.strip().lstrip("+~") for part in name.split(", ")))


def group_rows(jobs: list[dict[str, Any]]) -> list[Row]:
    """Jobs grouped over seeds, labelled and ordered by the experiment's ``sweep_table`` (if any)."""
    keys = [k for k in swept_keys(jobs) if k != SEED_KEY]
    rows: dict[str, Row] = {}
    for job in jobs:
        overrides = _split_overrides(job)
        swept = {k: overrides.get(k) for k in keys}
        name = ", ".join(f"{k}={v}" for k, v in swept.items())
        rows.setdefault(name, Row(name=name, label=name, swept=swept)).jobs.append(job)
    labels = {_label_key(k): v for k, v in (_sweep_table(jobs).get("rows") or {}).items()}
    order = list(labels)
    for row in rows.values():
        row.label = labels.get(_label_key(row.name), row.name or row.jobs[0]["dir"].name)
    rank = {name: order.index(_label_key(name)) if _label_key(name) in labels else len(order) for name in rows}
    return sorted(rows.values(), key=lambda row: rank[row.name])  # stable: sweep order within a rank


def table_title(jobs: list[dict[str, Any]]) -> str:
    title = _sweep_table(jobs).get("title", "")
    # `+world=toy` runs a paper table's sweep in the toy world: say so wherever the table goes
    world = next((job["config"].get("world") for job in jobs if job["config"].get("world")), None) or {}
    if world.get("proxy"):
        title = f"{title} — {world.get('name', 'toy')}-world proxy, not the paper's setting".lstrip(" —")
    return title


def format_value(mean: Optional[float], std: Optional[float] = None, seeds: int = 1) -> str:
    if mean is None:
        return "—"
    return f"{mean:.1f}" if seeds <= 1 else f"{mean:.1f} ± {std:.1f}"


def _cells(row: Row) -> list[str]:
    if not row.finished:
        return ["missing"] * len(METRICS)
    return [format_value(*row.stats(m), seeds=len(row.finished)) for m in METRICS]


def build_table(jobs: list[dict[str, Any]]) -> tuple[str, list[tuple[str, list[str]]]]:
    """The title and ``(label, cells)`` per row (cells: "mean" or "mean ± std" per metric)."""
    return table_title(jobs), [(row.label, _cells(row)) for row in group_rows(jobs)]


def render_markdown(title: str, rows: list[Row], source: str = "") -> str:
    several_seeds = any(len(row.jobs) > 1 for row in rows)
    header = ["", *METRICS, *(["n"] if several_seeds else [])]
    lines = []
    if title:
        lines += [f"**{title}**" + (f" ({source})" if source else ""), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        seeds = [f"{len(row.finished)}/{len(row.jobs)}"] if several_seeds else []
        lines.append("| " + " | ".join([row.label, *_cells(row), *seeds]) + " |")
    if several_seeds:
        lines += ["", "Mean ± sample std over the seeds of a row; n = seeds finished / seeds launched."]
    return "\n".join(lines) + "\n"


def render_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", *[f"{m}{suffix}" for m in METRICS for suffix in ("", "_std")], "seeds", "missing"])
    for row in rows:
        values = []
        for metric in METRICS:
            mean, std = row.stats(metric)
            values += ["" if mean is None else f"{mean:.4f}", "" if std is None else f"{std:.4f}"]
        writer.writerow([row.label, *values, len(row.finished), row.missing])
    return buffer.getvalue()


def _number(text: Optional[str]) -> Optional[float]:
    try:
        value = float(str(text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numeric_keys(rows: list[Row]) -> list[str]:
    """Swept keys (seed excluded) whose values are all numbers and take at least two values."""
    keys = list(rows[0].swept) if rows else []
    return [
        k for k in keys
        if all(_number(row.swept.get(k)) is not None for row in rows) and len({_number(row.swept[k]) for row in rows}) > 1
    ]


def plot_rows(rows: list[Row], x_key: str, path: Path, title: str = "") -> Path:
    """hIoU, sIoU and uIoU (one panel each) against the swept value ``x_key``; one line per
    combination of the other swept values; error bars: the seed std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[Row]] = {}
    for row in rows:
        if not row.finished:
            continue
        rest = ", ".join(f"{k}={v}" for k, v in row.swept.items() if k != x_key)
        series.setdefault(rest, []).append(row)
    if not series:
        raise ValueError("no job of the sweep has metrics.json: nothing to plot")
    figure, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], PLOTTED):
        for rest, members in series.items():
            members = sorted(members, key=lambda row: _number(row.swept[x_key]))
            xs = [_number(row.swept[x_key]) for row in members]
            stats = [row.stats(metric) for row in members]
            means = [math.nan if m is None else m for m, _ in stats]
            stds = [0.0 if s is None else s for _, s in stats]
            axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=rest or None)
        axis.set_xlabel(x_key)
        axis.set_ylabel(metric)
        axis.set_title(metric)
        axis.grid(alpha=0.3)
    if any(series):
        axes[0][0].legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def summarize(sweep_dir: Path, out_dir: Optional[Path] = None, x_key: Optional[str] = None) -> dict[str, Any]:
    """Read a sweep, write ``sweep_results.{md,csv}`` (and ``.png`` when a swept value is numeric)
    into ``out_dir`` (default: the sweep directory); return the rows and the written paths."""
    jobs = read_jobs(sweep_dir)
    rows, title = group_rows(jobs), table_title(jobs)
    out_dir = sweep_dir if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"md": out_dir / f"{OUTPUT_STEM}.md", "csv": out_dir / f"{OUTPUT_STEM}.csv"}
    written["md"].write_text(render_markdown(title, rows, str(sweep_dir)))
    written["csv"].write_text(render_csv(rows))
    candidates = numeric_keys(rows)
    if x_key is not None and x_key not in candidates:
        raise ValueError(f"--x {x_key}: not a numeric swept value of this sweep; numeric swept values: {candidates or 'none'}")
    x_key = x_key or (candidates[0] if candidates else None)
    if x_key is not None and any(row.finished for row in rows):
        written["png"] = plot_rows(rows, x_key, out_dir / f"{OUTPUT_STEM}.png", title)
    return {"title": title, "rows": rows, "x": x_key, "written": written}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--format", choices=["md", "csv"], default="md", help="what to print (both files are written)")
    parser.add_argument("--out", type=Path, default=None, help="folder for sweep_results.{md,csv,png} (default: the sweep)")
    parser.add_argument("--x", default=None, help="the swept numeric key to plot against (default: the first one)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.sweep_dir, args.out, args.x)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    rows = summary["rows"]
    print(render_csv(rows) if args.format == "csv" else render_markdown(summary["title"], rows, str(args.sweep_dir)), end="")
    missing = [row.label if len(row.jobs) == 1 else f"{row.label} ({row.missing} of {len(row.jobs)})"
               for row in rows if row.missing]
    if missing:
        print(f"\n{sum(row.missing for row in rows)} job(s) without metrics.json: {missing}", file=sys.stderr)
    print(f"\nwrote {', '.join(str(p) for p in summary['written'].values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
