"""Shared fixtures: the book built once per test session."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from marginlab import config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the unit tests: their models are tiny, so a second thread only adds
    synchronisation, which costs many times the work when the 2-core runner is shared."""
    with config.cpu_threads(1):
        yield


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> Path:
    """Build the book exactly as the README says, with warnings and broken references as errors.

    Every chapter is executed again, as in the published build (figure numbers and their
    references only exist in executed pages). The trained models are cached under
    ``$MARGINLAB_CACHE`` by the chapters' earlier nbval run, so this second execution
    does not retrain.
    """
    if shutil.which("jupyter-book") is None:
        pytest.skip("jupyter-book is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("book")
    cmd = ["jupyter-book", "build", str(ROOT), "--path-output", str(out), "-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"book build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return out / "_build" / "html"
