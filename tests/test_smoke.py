"""Chapters 3-6 at the full profile's smoke size under the device-strict mode, so that a device bug (a CPU
tensor handed to a model on the GPU, ``.numpy()`` on a GPU tensor) fails in CI on a CPU.

Each chapter runs in a fresh interpreter with ``PYTHONPATH=tests/strict_site MARGINLAB_DEVICE_STRICT=1``
(``tests/strict_site/sitecustomize.py`` turns the mode on; see ``tests/device_strict.py``) and
``MARGINLAB_DEVICE=meta``, ``MARGINLAB_PROFILE=full``, ``MARGINLAB_SMOKE=1``, results into a temporary
``MARGINLAB_RESULTS`` and a fresh model cache (a cache hit would skip the training code paths).
With the headless runner (``python -m marginlab run CHAPTER --smoke``) it is called as a user would, and
the log of ``MARGINLAB_DEVICE_STRICT_LOG`` proves that the runner's kernel had the mode on; without the
runner the chapter notebook is executed with jupytext + nbclient, in a kernel that inherits the
environment, after a first cell that checks the mode.

The runner's smoke runs start in the background as soon as collection is done
(:func:`start_in_background`), one after another on one thread: they take the second core while the
session runs the chapters and the unit tests on the first, and each test waits for its chapter.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
STRICT_SITE = ROOT / "tests" / "strict_site"
SMOKE_CHAPTERS = ("03_low_rank_features", "04_differential_training", "05_angular_margin_penalty",
                  "06_min_vs_average_margin")
CHAPTER_TIMEOUT = 1800  # seconds per chapter (a hung run fails instead of blocking CI)

# The first cell of every notebook run here: proof that the kernel really runs under the mode.
STRICT_CHECK = """\
import torch
from marginlab import config
_t = torch.zeros(1, device="meta")
assert type(_t).__name__ == "DeviceTensor", f"the device-strict mode is off in this kernel: {type(_t)}"
assert config.device() == torch.device("meta"), config.device()
try:
    _t + torch.ones(2)
except RuntimeError as err:
    assert "same device" in str(err), err
else:
    raise AssertionError("mixing devices did not raise")
del _t
"""


def _strict_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(STRICT_SITE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(path), MARGINLAB_DEVICE_STRICT="1", MARGINLAB_DEVICE="meta",
               MARGINLAB_PROFILE="full", MARGINLAB_SMOKE="1", MARGINLAB_RESULTS=str(tmp_path / "results"),
               MARGINLAB_CACHE=str(tmp_path / "cache"), MARGINLAB_DEVICE_STRICT_LOG=str(tmp_path / "strict.log"),
               CI=env.get("CI", "1"))
    return env


def _runner_exists() -> bool:
    return importlib.util.find_spec("marginlab.__main__") is not None


def _execute_notebook(nb, env: dict[str, str], cwd: Path, timeout: int | None) -> None:
    """Run every cell of ``nb`` in a fresh python3 kernel started with ``env`` in ``cwd``."""
    from nbclient import NotebookClient

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_jupyter_kernel_runs_under_the_strict_mode(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(STRICT_CHECK),
                nbformat.v4.new_code_cell("import numpy as np\n"
                                          "try:\n    np.asarray(torch.ones(2, device=config.device()))\n"
                                          "except TypeError as err:\n    assert 'numpy' in str(err)\n"
                                          "else:\n    raise AssertionError('.numpy() on the device worked')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    _execute_notebook(nb, _strict_env(tmp_path), tmp_path, timeout=300)
    assert any("ipykernel" in ln for ln in (tmp_path / "strict.log").read_text().splitlines())


class SmokeRun:
    """One chapter's smoke run under the strict mode, through the headless runner, in its own directory."""

    def __init__(self, chapter: str, tmp: Path):
        self.chapter, self.tmp = chapter, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.env = {**_strict_env(tmp), "MARGINLAB_THREADS": "1"}  # one core: the session runs beside it
        self.done = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.stdout = self.stderr = ""

    def run(self) -> None:
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "marginlab", "run", self.chapter, "--smoke"], cwd=ROOT,
                                         env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                self.stdout, self.stderr = self.proc.communicate(timeout=CHAPTER_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.stdout, self.stderr = self.proc.communicate()
                self.stderr += f"\n(killed after {CHAPTER_TIMEOUT} s)"
            self.returncode = self.proc.returncode
        except OSError as err:
            self.stderr = f"could not start the runner: {err}"
        finally:
            self.done.set()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


_BACKGROUND: dict[str, SmokeRun] = {}


def start_in_background(items: list[pytest.Item]) -> None:
    """Start the selected chapters' smoke runs, one after another, in a background thread.

    Called once by ``tests/conftest.py`` when collection is done. The unit tests and the
    chapters' nbval runs use one core; the smoke runs (single-threaded) take the other one
    meanwhile, instead of adding their minutes at the end of the session. Each test then
    waits for its chapter's run and checks it.
    """
    chapters = [item.callspec.params["chapter"] for item in items
                if getattr(item, "originalname", "") == "test_chapter_smoke_run_under_the_strict_mode"]
    if not chapters or _BACKGROUND or not _runner_exists():
        return
    base = Path(tempfile.mkdtemp(prefix="marginlab-smoke-"))
    _BACKGROUND.update({c: SmokeRun(c, base / c) for c in chapters})
    atexit.register(shutil.rmtree, base, True)
    for run in _BACKGROUND.values():
        atexit.register(run.stop)  # a session cut short leaves no chapter running
    threading.Thread(target=lambda: [r.run() for r in list(_BACKGROUND.values())], daemon=True).start()


@pytest.mark.slow
@pytest.mark.parametrize("chapter", SMOKE_CHAPTERS)
def test_chapter_smoke_run_under_the_strict_mode(chapter, tmp_path):
    if not _runner_exists():
        jupytext = pytest.importorskip("jupytext")
        nbformat = pytest.importorskip("nbformat")
        pytest.importorskip("nbclient")
        env = _strict_env(tmp_path)
        nb = jupytext.read(CHAPTERS / f"{chapter}.md", as_version=4)
        nb.cells.insert(0, nbformat.v4.new_code_cell(STRICT_CHECK))
        _execute_notebook(nb, env, CHAPTERS, timeout=CHAPTER_TIMEOUT)
        results = tmp_path / "results"
    else:
        run = _BACKGROUND.get(chapter)
        if run is None:  # not started in the background (the hook did not run): run it now
            run = SmokeRun(chapter, tmp_path)
            run.run()
        assert run.done.wait(2 * CHAPTER_TIMEOUT * len(SMOKE_CHAPTERS)), f"{chapter}: the smoke run never finished"
        assert run.returncode == 0, f"{chapter} failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
        strict_log = Path(run.env["MARGINLAB_DEVICE_STRICT_LOG"])
        kernels = [ln for ln in strict_log.read_text().splitlines() if "ipykernel" in ln] if strict_log.exists() else []
        assert kernels, "the chapter's kernel did not run under the device-strict mode"
        results = run.tmp / "results"
    assert (results / "smoke" / f"{chapter}.json").is_file(), sorted(p.name for p in results.rglob("*"))
    assert not (results / "full").exists(), "a smoke run wrote results of the full profile"
