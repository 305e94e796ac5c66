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


def pytest_configure(config: pytest.Config) -> None:
    # Chapters executed by nbval in this session, with their outputs: the book build of the test
    # session (tests/conftest.py::built_book) reuses them instead of executing every chapter again.
    config.executed_chapters = {}


if IPyNbFile is not None:

    class MystChapter(IPyNbFile):
        """An nbval notebook collector that reads a jupytext MyST chapter.

        When every cell of the chapter ran and passed, the notebook with its outputs is kept in
        ``config.executed_chapters[path]``.
        """

        def collect(self):
            import jupytext
            import nbval.plugin

            def read(path, as_version=4):
                return jupytext.read(path, as_version=as_version)

            with mock.patch.object(nbval.plugin.nbformat, "read", read):
                self.cells = list(super().collect())
            self.failed = False
            yield from self.cells

        def teardown(self):
            super().teardown()
            if self.failed or any(cell.test_outputs is None for cell in self.cells):
                return
            for n, cell in enumerate(self.cells, start=1):
                cell.cell.outputs, cell.cell.execution_count = cell.test_outputs, n
            self.config.executed_chapters[Path(self.path)] = self.nb

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: pytest.Item, call):
        report = (yield).get_result()
        if isinstance(item.parent, MystChapter) and report.failed:
            item.parent.failed = True

    def pytest_collect_file(file_path: Path, parent: pytest.Collector):
        opt = parent.config.option
        if (getattr(opt, "nbval", False) or getattr(opt, "nbval_lax", False)) and _is_chapter(file_path):
            return MystChapter.from_parent(parent, path=file_path)
        return None
