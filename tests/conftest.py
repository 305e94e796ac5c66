"""Shared fixtures (one intra-op thread; the book built once per session) and the hypothesis profiles."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from marginlab import config, threads

# Hypothesis profiles. In CI (CI=true, set by .ci/run and by every CI service) the examples are
# derandomized: the same examples on every run, so a submission's CI cannot fail by the luck of the
# draw; a local run keeps exploring new examples, which is how the bugs get found. Both print the
# failing example's reproduction blob (@reproduce_failure) and neither has a per-example deadline or
# the too-slow health check, which only measure how busy the machine is. HYPOTHESIS_PROFILE picks
# one explicitly; `pytest --hypothesis-seed=N` replays a local run's exploration.
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
# Parent "default" explicitly: hypothesis itself loads its own "ci" profile at import when a CI variable
# exists (even CI=""), and a profile's unset fields come from the profile loaded when it is registered.
_BASE = settings.get_profile("default")
settings.register_profile("ci", _BASE, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", _BASE, **_COMMON)
_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _CI else "dev"))

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Let a test module start its long subprocess work early: ``start_in_background(items)``, called once
    per module with the selected items (tests/test_smoke.py runs the chapters' smoke runs this way)."""
    seen = set()
    for item in session.items:
        module = getattr(item, "module", None)
        start = getattr(module, "start_in_background", None)
        if start is not None and module not in seen:
            seen.add(module)
            start(session.items)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the unit tests: their models are tiny, so a second thread only adds
    synchronisation, which costs many times the work when the 2-core runner is shared. Fixed: the
    balancer would also stand aside inside the block, but tests that compare two runs bit for bit need
    the count not to move between them (float sums depend on it)."""
    balancer = threads.balancer()
    threads.install(None)
    with config.cpu_threads(1):
        yield
    threads.install(balancer)


def prefill_execution_cache(cache_dir: Path, executed: dict[Path, Any]) -> list[Path]:
    """Put the outputs of chapters already executed (by nbval) into the book build's jupyter-cache.

    ``execute_notebooks: cache`` looks a notebook up by its code cells as myst-nb reads the
    Markdown source; each chapter is read that way here, and its outputs are copied in only
    if the code cells are exactly the ones nbval ran, so the build executes any other chapter
    itself. Returns the chapters put into the cache.
    """
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from myst_nb.core.read import read_myst_markdown_notebook

    cache = get_cache(str(cache_dir))
    filled = []
    for path, ran in executed.items():
        nb = read_myst_markdown_notebook(path.read_text(), path=path)
        code = [c for c in nb.cells if c.cell_type == "code"]
        done = [c for c in ran.cells if c.cell_type == "code"]
        if [c.source.strip() for c in code] != [c.source.strip() for c in done]:
            continue
        for cell, result in zip(code, done):
            cell.outputs = [nbformat.from_dict(o) for o in result.outputs]
            cell.execution_count = result.execution_count
        cache.cache_notebook_bundle(CacheBundleIn(nb, str(path)), check_validity=False, overwrite=True)
        filled.append(path)
    return filled


@pytest.fixture(scope="session")
def built_book(tmp_path_factory, request) -> Path:
    """Build the book exactly as the README says, with warnings and broken references as errors.

    Every chapter page is built from an executed notebook, as in the published build (figure
    numbers and their references only exist in executed pages). Chapters that the nbval pass
    of this session ran without error are not executed a second time: their outputs are put
    into the build's jupyter-cache first (:func:`prefill_execution_cache`); the build
    executes any other chapter, with the models nbval trained cached under ``$MARGINLAB_CACHE``.
    """
    if shutil.which("jupyter-book") is None:
        pytest.skip("jupyter-book is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("book")
    prefill_execution_cache(out / "_build" / ".jupyter_cache", getattr(request.config, "executed_chapters", {}))
    cmd = ["jupyter-book", "build", str(ROOT), "--path-output", str(out), "-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"book build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return out / "_build" / "html"
