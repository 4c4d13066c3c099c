"""Every notebook runs top to bottom. Its first code cell (the settings) is followed by an injected
cell, as papermill does, that points it at the tiny world (or, until the tiny world's space is
built, at a toy world) with few steps."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # the fast tier (make test-fast) leaves these out

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.relative_to(ROOT) for p in ROOT.glob("*/*.ipynb"))
TINY = ROOT / "files" / "tiny"


@pytest.fixture(scope="module")
def world(toy_world, toy_space):
    """(base, space) of the tiny world when it is built, else the toy pipeline with a random space."""
    if (TINY / "space" / "space.json").is_file() and (TINY / "base" / "model_index.json").is_file():
        return TINY / "base", TINY / "space"
    return toy_world / "base", toy_space


def test_every_notebook_is_committed_without_outputs():
    assert len(NOTEBOOKS) == 8, NOTEBOOKS
    for path in NOTEBOOKS:
        notebook = nbformat.read(ROOT / path, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), path
        assert "sys.path" not in "".join(cell.source for cell in code), path
        assert code[0].source.lstrip().startswith("# Settings"), path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_notebook_runs(path, world, tmp_path):
    base, space = world
    notebook = nbformat.read(ROOT / path, as_version=4)
    first = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
    overrides = (f"BASE, SPACE, DEVICE, OUT = {str(base)!r}, {str(space)!r}, 'cpu', {str(tmp_path)!r}\n"
                 f"STEPS = INVERSION_STEPS = TRAIN_STEPS = 2\nIDENTITIES = 3\n"
                 f"WORK = {str(tmp_path / 'work')!r}\nDATASET = {str(tmp_path / 'no_dataset')!r}\n"
                 "import torch; torch.set_num_threads(1)")
    notebook.cells.insert(first + 1, nbformat.v4.new_code_cell(overrides))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str((ROOT / path).parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    texts = [output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [text for text in texts if "it/s]" in text or "s/it]" in text], path  # no progress bars kept
