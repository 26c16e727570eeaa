"""Execute the example notebooks at small sizes (STEMGPU_NOTEBOOK_SMALL=1) and check that each
``.ipynb`` is the pairing of its jupytext ``.py`` source with outputs stripped."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")


def test_every_notebook_has_a_source():
    assert len(SOURCES) >= 4
    for src in SOURCES:
        assert src.with_suffix(".ipynb").exists(), f"{src.name} has no paired .ipynb"


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_matches_its_source_and_has_no_outputs(source):
    paired = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    expected = jupytext.read(source)
    assert [c.source for c in paired.cells] == [c.source for c in expected.cells], (
        f"{source.with_suffix('.ipynb').name} is out of date: run "
        f"`jupytext --to ipynb {source.relative_to(NOTEBOOK_DIR.parent)}`"
    )
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_executes(source, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("STEMGPU_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors
