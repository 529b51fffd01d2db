"""examples/retom_jax_colab.ipynb runs top to bottom on the demo model (as CI runs it).

The parameters cell is followed by one injected cell with small values (as papermill
does), so the notebook's own defaults stay those a Colab user wants; installing is off.
A failing cell fails the test with that cell's error.
"""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "retom_jax_colab.ipynb"
CI_PARAMETERS = """
MODEL = ""
FETCH_WEIGHTS = False
INSTALL = False
STEPS = 2
RATIOS = [0.0, 0.5, 0.75]
REPEATS = 1
"""


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", []), "parameters first"


def test_notebook_runs_on_the_demo_model(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell(CI_PARAMETERS.strip()))
    # The kernel is a subprocess: this checkout first on its path, the CPU; matplotlib's
    # inline backend (the kernel's default) makes the figures outputs.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs if o.get("output_type") == "stream")
    assert "not installing" in text and "CPU backend" in text
    assert "demo model (tiny, trained on coloured shapes)" in text
    assert "serving the page on http://127.0.0.1:" in text  # the web page cell returned
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    kinds = [k for o in outputs for k in o.get("data", {})]
    # the side-by-side images, img2img, the sweep plot and the merge map
    assert kinds.count("image/png") >= 4
    table = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(table) == 1 and "| ReToM 0.5 |" in table[0] and "| ToDo 2x2 |" in table[0]
