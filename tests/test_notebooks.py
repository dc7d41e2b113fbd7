"""The notebooks run: each is executed top to bottom in a real Jupyter kernel (nbclient + ipykernel),
in a temporary directory, with ``ZEROSEG_NOTEBOOK_STEPS`` set to a few steps so that a notebook takes
seconds, not minutes; a cell that raises fails the test with the cell's traceback. Each notebook then
must have left the figure it promises."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# what each notebook leaves behind (paths relative to the directory it runs in)
PRODUCTS = {
    "quickstart": ["logs/notebook/quickstart/prediction.png", "logs/notebook/quickstart/metrics.json"],
    "pseudo_masks": ["logs/notebook/pseudo_masks/pseudo_masks.png"],
    "compare_methods": [
        "logs/notebook/compare/train/multiruns/*/sweep_results.md",
        "logs/notebook/compare/train/multiruns/*/sweep_results.csv",
        "logs/notebook/compare/train/multiruns/*/methods.png",
    ],
}


def test_every_notebook_is_listed() -> None:
    assert {p.stem for p in NOTEBOOKS} == set(PRODUCTS)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEROSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ZEROSEG_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("SWEEP_DIR", raising=False)
    book = nbformat.read(notebook, as_version=4)
    nbformat.validate(book)
    assert any(cell.cell_type == "code" for cell in book.cells), f"{notebook.name} has no code"
    start = time.monotonic()
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    elapsed = time.monotonic() - start
    errors = [o for cell in book.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    for pattern in PRODUCTS[notebook.stem]:
        assert list(tmp_path.glob(pattern)), f"{notebook.name} did not write {pattern}"
    print(f"{notebook.name}: {elapsed:.1f} s")
