"""The walkthrough notebook runs top to bottom (on the embedded digits), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_walkthrough_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("DISTILL_NOTEBOOK_EPOCHS", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    nb = nbformat.read(REPO / "notebooks" / "walkthrough.ipynb", as_version=4)
    resources = {"metadata": {"path": str(REPO)}}  # run from the repository root, as a user would
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources)
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert list((tmp_path / "runs").rglob("*.dstl")), "the notebook wrote no compressed file"
    assert list((tmp_path / "runs").rglob("summary.md")), "the notebook wrote no report"
