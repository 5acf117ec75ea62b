"""The notebooks run top to bottom (outputs are cleared in the repository)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str, env: dict, tmp_path) -> "nbformat.NotebookNode":
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = os.path.join(ROOT, "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: outputs not cleared"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def outputs(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)


@pytest.mark.slow
def test_quickstart_trains_compresses_retrieves_answers_and_scores(tmp_path):
    nb = run_notebook("quickstart.ipynb", {"CLARA_ROOT": ROOT, "CLARA_MODEL": "train",
                                           "CLARA_NOTEBOOK_WORKDIR": str(tmp_path / "w")},
                      tmp_path)
    text = outputs(nb)
    assert "compressed states of 4: (4, 8, 128)" in text
    assert "| compressed | normal |" in text and "| closed book |" in text
    assert (tmp_path / "w" / "index" / "meta.json").exists()
