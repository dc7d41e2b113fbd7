"""The notebooks run: their code cells are executed in order, in a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_run(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZEROSEG_CACHE_DIR", str(tmp_path / "cache"))
    cells = json.loads(notebook.read_text())["cells"]
    namespace: dict = {}
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, f"{notebook.name} has no code"
    for cell in code:
        exec(compile("".join(cell["source"]), f"{notebook.name}", "exec"), namespace)
    if notebook.stem == "quickstart":
        assert (tmp_path / "logs" / "notebook" / "quickstart" / "prediction.png").is_file()
