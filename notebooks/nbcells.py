"""Write a notebook from ``(kind, text)`` cells: no outputs, fixed cell ids (a rebuild is byte-stable)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def write_notebook(cells: list[tuple[str, str]], path: Path, prefix: str) -> Path:
    """Write ``cells`` (``"md"`` or ``"code"``, source) to ``path``; returns the path."""
    notebook = new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    for index, (kind, text) in enumerate(cells):
        cell = new_markdown_cell(text) if kind == "md" else new_code_cell(text)
        cell["id"] = f"{prefix}-{index:02d}"
        notebook.cells.append(cell)
    nbformat.write(notebook, path)
    return path
