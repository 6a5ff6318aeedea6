"""The tutorial notebooks in examples/ run end to end: every code cell of each notebook is executed in order, in one
namespace, in this process (nbformat reads and validates the file; no Jupyter kernel is started). A cell that raises
fails the test, so a broken API or a stale notebook is caught here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("notebook", sorted(EXAMPLES.glob("*.ipynb")), ids=lambda p: p.name)
def test_the_notebook_runs_end_to_end(notebook, monkeypatch, tmp_path, one_torch_thread):
    nbformat = pytest.importorskip("nbformat")

    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells, f"{notebook.name} has no code cells"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for k, cell in enumerate(cells):
        try:
            exec(compile(cell.source, f"{notebook.name}[cell {k}]", "exec"), namespace)
        except Exception as err:
            pytest.fail(f"{notebook.name}, code cell {k} raised {type(err).__name__}: {err}\n---\n{cell.source}")
    assert "fig" in namespace, "the notebook should end its x̂0 section with a figure"
