"""scripts/collect_sweep.py on hand-made multirun trees: seeds aggregate to mean ± sample std (checked
against numbers worked out by hand), paper row names and order survive the aggregation, the Markdown
and CSV files are written, and the plot draws the hand-computed means against the swept value."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Optional

import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import collect_sweep  # noqa: E402

# hIoU of (gamma, seed); sIoU = hIoU + 10, uIoU = hIoU - 10, mIoU = 50 in every job
H_IOU = {
    (0.0, 0): 30.0, (0.0, 1): 32.0, (0.0, 2): 34.0,   # mean 32, std sqrt((4+0+4)/2) = 2
    (0.5, 0): 40.0, (0.5, 1): 42.0, (0.5, 2): 47.0,   # mean 43, std sqrt((9+1+16)/2) = sqrt(13)
    (1.0, 0): 36.0, (1.0, 1): None, (1.0, 2): 38.0,   # seed 1 failed: mean 37, std sqrt(2)
}  # fmt: skip
HAND = {0.0: (32.0, 2.0), 0.5: (43.0, math.sqrt(13.0)), 1.0: (37.0, math.sqrt(2.0))}


def _write_job(job: Path, overrides: list[str], h: Optional[float], config: Optional[dict] = None) -> None:
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "config.yaml").write_text(yaml.safe_dump(config or {}))
    if h is not None:
        (job / "metrics.json").write_text(json.dumps({"sIoU": h + 10, "uIoU": h - 10, "hIoU": h, "mIoU": 50.0}))


def gamma_sweep(root: Path) -> Path:
    """``-m method.gamma=0.0,0.5,1.0 seed=0,1,2`` in Hydra's job order (the last key varies fastest)."""
    for index, ((gamma, seed), h) in enumerate(H_IOU.items()):
        _write_job(root / str(index), ["experiment=chimera_gamma", f"method.gamma={gamma}", f"seed={seed}"], h)
    return root


def test_seeds_aggregate_to_mean_and_sample_std(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = gamma_sweep(tmp_path / "sweep")
    rows = collect_sweep.group_rows(collect_sweep.read_jobs(sweep))
    assert [row.name for row in rows] == ["method.gamma=0.0", "method.gamma=0.5", "method.gamma=1.0"]
    assert [(len(row.finished), row.missing) for row in rows] == [(3, 0), (3, 0), (2, 1)]
    for row, gamma in zip(rows, HAND):
        mean, std = row.stats("hIoU")
        assert mean == pytest.approx(HAND[gamma][0]) and std == pytest.approx(HAND[gamma][1])
        assert row.stats("sIoU") == pytest.approx((HAND[gamma][0] + 10, HAND[gamma][1]))
        assert row.stats("mIoU") == pytest.approx((50.0, 0.0))

    assert collect_sweep.main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0] == "|  | sIoU | uIoU | hIoU | mIoU | n |"
    assert lines[1:] == [
        "| method.gamma=0.0 | 42.0 ± 2.0 | 22.0 ± 2.0 | 32.0 ± 2.0 | 50.0 ± 0.0 | 3/3 |",
        "| method.gamma=0.5 | 53.0 ± 3.6 | 33.0 ± 3.6 | 43.0 ± 3.6 | 50.0 ± 0.0 | 3/3 |",
        "| method.gamma=1.0 | 47.0 ± 1.4 | 27.0 ± 1.4 | 37.0 ± 1.4 | 50.0 ± 0.0 | 2/3 |",
    ]
    assert "1 job(s) without metrics.json" in err and "method.gamma=1.0 (1 of 3)" in err


def test_markdown_and_csv_files_are_written(tmp_path: Path) -> None:
    sweep = gamma_sweep(tmp_path / "sweep")
    assert collect_sweep.main([str(sweep), "--out", str(tmp_path / "out"), "--format", "csv"]) == 0
    markdown = (tmp_path / "out" / "sweep_results.md").read_text()
    assert "| method.gamma=0.5 | 53.0 ± 3.6 | 33.0 ± 3.6 | 43.0 ± 3.6 | 50.0 ± 0.0 | 3/3 |" in markdown
    with open(tmp_path / "out" / "sweep_results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["row"] for r in table] == ["method.gamma=0.0", "method.gamma=0.5", "method.gamma=1.0"]
    for record, gamma in zip(table, HAND):
        assert float(record["hIoU"]) == pytest.approx(HAND[gamma][0], abs=1e-4)
        assert float(record["hIoU_std"]) == pytest.approx(HAND[gamma][1], abs=1e-4)
    assert [(r["seeds"], r["missing"]) for r in table] == [("3", "0"), ("3", "0"), ("2", "1")]
    assert not (sweep / "sweep_results.md").exists()  # --out, not the sweep directory


def test_plot_draws_the_seed_means_against_the_swept_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    drawn: list[tuple[str, list[float], list[float], list[float]]] = []
    errorbar = Axes.errorbar

    def recording_errorbar(self: Axes, x, y, yerr=None, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append((kwargs.get("label"), list(x), list(y), list(yerr)))
        return errorbar(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", recording_errorbar)
    summary = collect_sweep.summarize(gamma_sweep(tmp_path / "sweep"))
    assert summary["x"] == "method.gamma"  # the seed is aggregated, never an axis
    assert len(drawn) == 3  # hIoU, sIoU, uIoU panels, one line each
    _, xs, means, stds = drawn[0]  # the hIoU panel
    assert xs == [0.0, 0.5, 1.0]
    assert means == pytest.approx([HAND[g][0] for g in HAND]) and stds == pytest.approx([HAND[g][1] for g in HAND])
    assert drawn[2][2] == pytest.approx([HAND[g][0] - 10 for g in HAND])  # uIoU
    png = summary["written"]["png"]
    assert png == tmp_path / "sweep" / "sweep_results.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 400 and len(image.convert("RGB").getcolors(1 << 16) or []) > 10


def test_plot_draws_one_line_per_other_swept_value_and_rejects_a_non_numeric_x(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for index, (method, k, h) in enumerate([("c2s", 3, 30.0), ("c2s", 7, 32.0), ("chimera", 3, 33.0), ("chimera", 7, 31.0)]):
        _write_job(sweep / str(index), [f"method={method}", f"method.window={k}"], h)
    summary = collect_sweep.summarize(sweep)
    assert summary["x"] == "method.window"
    assert {row.swept["method"] for row in summary["rows"]} == {"c2s", "chimera"}
    assert summary["written"]["png"].is_file()
    with pytest.raises(ValueError, match="not a numeric swept value"):
        collect_sweep.summarize(sweep, x_key="method")
    assert collect_sweep.main([str(sweep), "--x", "method"]) == 1


def test_paper_row_names_and_order_survive_seed_aggregation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = {"+experiment/chimera_table_iii=c2s": "Baseline", "+experiment/chimera_table_iii=csh": "Baseline + CSH"}
    config = {"sweep_table": {"title": "Chimera-Seg Table III: modules", "rows": rows}, "world": {"name": "toy", "proxy": True}}
    jobs = [("csh", 0, 32.0), ("csh", 1, 34.0), ("c2s", 0, 31.0), ("c2s", 1, 31.0)]  # sweep order: csh first
    for index, (row, seed, h) in enumerate(jobs):
        _write_job(tmp_path / str(index), [f"+experiment/chimera_table_iii={row}", f"seed={seed}"], h, config)
    assert collect_sweep.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["Baseline", "Baseline + CSH"]  # the paper's order
    assert "| 31.0 ± 0.0 |" in lines[1] and "| 33.0 ± 1.4 |" in lines[2]
    assert "Table III" in out and "toy-world proxy" in out
    assert "png" not in collect_sweep.summarize(tmp_path)["written"]  # nothing numeric to plot against
