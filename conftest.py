"""Collect the MyST-markdown chapters as notebooks for nbval (``pytest --nbval-lax``).

The chapters are jupytext ``md:myst`` files and the source of truth; no ``.ipynb`` is
committed. nbval reads notebooks with ``nbformat.read``; here the chapter is read with
jupytext instead and handed to nbval's own collector, so every code cell of every
chapter is a test item executed in a fresh kernel started in ``chapters/``.
"""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

try:
    from nbval.plugin import IPyNbFile
except ImportError:  # nbval is a dev extra; without it chapters are simply not collected
    IPyNbFile = None

CHAPTERS = Path(__file__).parent / "chapters"


def _is_chapter(path: Path) -> bool:
    return path.suffix == ".md" and path.parent.resolve() == CHAPTERS.resolve()


if IPyNbFile is not None:

    class MystChapter(IPyNbFile):
        """An nbval notebook collector that reads a jupytext MyST chapter."""

        def collect(self):
            import jupytext
            import nbval.plugin

            def read(path, as_version=4):
                return jupytext.read(path, as_version=as_version)

            with mock.patch.object(nbval.plugin.nbformat, "read", read):
                yield from super().collect()

    def pytest_collect_file(file_path: Path, parent: pytest.Collector):
        opt = parent.config.option
        if (getattr(opt, "nbval", False) or getattr(opt, "nbval_lax", False)) and _is_chapter(file_path):
            return MystChapter.from_parent(parent, path=file_path)
        return None
