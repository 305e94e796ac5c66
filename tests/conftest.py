"""Shared fixtures: the book built once per test session."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: Executed in every book build of the tests; the other chapters are executed by nbval already.
EXECUTED_IN_TESTS = ("chapters/01_two_point_dynamics.md", "book/scorecard.md")


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> Path:
    """Build the book with warnings and broken references as errors; return the HTML folder.

    Executing every chapter again here would double CI time (``pytest --nbval-lax`` executes
    them already), so only chapter 1 and the scorecard page are executed — enough to check
    rendered figures and tables in a browser. ``MARGINLAB_BOOK_EXECUTE=1`` executes everything.
    """
    if shutil.which("jupyter-book") is None:
        pytest.skip("jupyter-book is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    if os.environ.get("MARGINLAB_BOOK_EXECUTE") != "1":
        chapters = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "chapters").glob("*.md"))
        config["execute"]["exclude_patterns"] = [c for c in chapters if c not in EXECUTED_IN_TESTS]
    # paths in the config are relative to its own folder: keep them pointing into the repository
    config["sphinx"]["local_extensions"] = {
        name: str(ROOT / path) for name, path in config["sphinx"].get("local_extensions", {}).items()}
    config_path = out / "_config.yml"
    config_path.write_text(yaml.safe_dump(config))
    cmd = ["jupyter-book", "build", str(ROOT), "--path-output", str(out), "--config", str(config_path),
           "-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"book build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return out / "_build" / "html"
