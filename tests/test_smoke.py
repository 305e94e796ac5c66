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
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
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


@pytest.mark.slow
@pytest.mark.parametrize("chapter", SMOKE_CHAPTERS)
def test_chapter_smoke_run_under_the_strict_mode(chapter, tmp_path):
    env = _strict_env(tmp_path)
    results = tmp_path / "results"
    if _runner_exists():
        proc = subprocess.run([sys.executable, "-m", "marginlab", "run", chapter, "--smoke"], check=False, cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=CHAPTER_TIMEOUT)
        assert proc.returncode == 0, f"{chapter} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        strict_log = Path(env["MARGINLAB_DEVICE_STRICT_LOG"])
        kernels = [ln for ln in strict_log.read_text().splitlines() if "ipykernel" in ln] if strict_log.exists() else []
        assert kernels, "the chapter's kernel did not run under the device-strict mode"
    else:
        jupytext = pytest.importorskip("jupytext")
        nbformat = pytest.importorskip("nbformat")
        pytest.importorskip("nbclient")
        nb = jupytext.read(CHAPTERS / f"{chapter}.md", as_version=4)
        nb.cells.insert(0, nbformat.v4.new_code_cell(STRICT_CHECK))
        _execute_notebook(nb, env, CHAPTERS, timeout=CHAPTER_TIMEOUT)
    assert (results / "smoke" / f"{chapter}.json").is_file(), sorted(p.name for p in results.rglob("*"))
    assert not (results / "full").exists(), "a smoke run wrote results of the full profile"
