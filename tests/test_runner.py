"""``python -m marginlab run``: headless chapter execution, progress, errors, results, and resume after a kill.

The chapters here are small fixtures in a temporary book (a ``_toc.yml`` and a ``chapters/`` folder), executed by
the real command in a subprocess with a real kernel; the kill-and-resume test kills the runner and its kernel
while the second of two cached models trains, then checks that the rerun loads the first and trains the second.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from marginlab import runner

HEADER = textwrap.dedent("""\
    ---
    jupytext:
      text_representation:
        extension: .md
        format_name: myst
        format_version: 0.13
    kernelspec:
      display_name: Python 3
      language: python
      name: python3
    ---

    # {title}
    """)

TWO_MODELS = HEADER.format(title="Two cached models") + textwrap.dedent("""\

    ```{code-cell} ipython3
    import os
    import time

    import torch

    from marginlab import config, models, train
    from marginlab.scorecard import Scorecard

    print("kernel pid", os.getpid(), "profile", config.run_name(), flush=True)
    ```

    Two trainings, each cached by its configuration.

    ```{code-cell} ipython3
    def pause(epoch, model):
        time.sleep(float(os.environ.get("FIXTURE_PAUSE", "0")))


    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0.5).long()
    for name in ("first", "second"):
        torch.manual_seed(0)
        model = models.MLP(4, hidden=(8,), num_classes=2)
        h = train.fit(model, x, y, epochs=40, batch_size=16, cache=f"fixture-{name}",
                      callbacks=(pause,) if name == "second" else ())
        print(name, "cached" if h.cached else "trained", flush=True)
    ```

    ```{code-cell} ipython3
    sc = Scorecard(chapter="91_two_models", seeds=[0])
    sc.record("accuracy", train.accuracy(model, x, y))
    print(sc.save())
    ```
    """)

FAILS = HEADER.format(title="A failing cell") + textwrap.dedent("""\

    ```{code-cell} ipython3
    print("before the error", flush=True)
    ```

    ```{code-cell} ipython3
    def broken():
        raise ValueError("fixture failure 1234")


    broken()
    ```
    """)

NO_RESULTS = HEADER.format(title="Writes nothing") + textwrap.dedent("""\

    ```{code-cell} ipython3
    print("nothing saved")
    ```
    """)


@pytest.fixture
def book(tmp_path):
    root = tmp_path / "book"
    (root / "chapters").mkdir(parents=True)
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (root / "chapters" / "91_two_models.md").write_text(TWO_MODELS)
    (root / "chapters" / "92_fails.md").write_text(FAILS)
    (root / "chapters" / "93_no_results.md").write_text(NO_RESULTS)
    return root


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARGINLAB_") and k != "CI"}
    env.update(MARGINLAB_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", **extra)
    return env


def _cli(*args):
    return [sys.executable, "-m", "marginlab", *args]


def test_chapter_names_resolve(book):
    assert runner.resolve_chapter("91", book).name == "91_two_models.md"
    assert runner.resolve_chapter("092", book).name == "92_fails.md"
    assert runner.resolve_chapter("93_no_results", book).stem == "93_no_results"
    assert runner.resolve_chapter("93_no_results.md", book).stem == "93_no_results"
    assert runner.resolve_chapter("two_models", book).stem == "91_two_models"
    for bad in ("7", "chapter", ""):
        with pytest.raises(ValueError, match="91_two_models, 92_fails, 93_no_results"):
            runner.resolve_chapter(bad, book)
    real = runner.list_chapters()
    assert real and runner.resolve_chapter("4").stem == next(s for s in real if s.startswith("04"))


def test_help_lists_the_chapters(capsys):
    from marginlab.__main__ import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "run CHAPTER" in out and "--smoke" in out
    assert all(stem in out for stem in runner.list_chapters())
    assert main(["frobnicate"]) == 2 and "unknown command" in capsys.readouterr().err
    assert main(["run", "99"]) == 2 and "is not a chapter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "4", "--profile", "huge"])


def test_failing_cell_exits_nonzero_with_its_traceback(book, tmp_path):
    out = subprocess.run(_cli("run", "92", "--root", str(book)), capture_output=True, text=True, timeout=120,
                         env=_env(tmp_path), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "before the error" in out.stdout  # kernel output forwarded
    assert "fixture failure 1234" in out.stderr and "broken()" in out.stderr and "ValueError" in out.stderr
    assert "92_fails.md:" in out.stderr  # the failing cell's line in the chapter
    # a chapter that does not write its results file fails too
    out = subprocess.run(_cli("run", "93", "--root", str(book)), capture_output=True, text=True, timeout=120,
                         env=_env(tmp_path), cwd=tmp_path)
    assert out.returncode == 1 and "did not write" in out.stderr and "results/quick/93_no_results.json" in out.stderr


def _wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_run_resumes_from_the_cached_models(book, tmp_path):
    cache = tmp_path / "cache"
    log = tmp_path / "first_run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(_cli("run", "91", "--root", str(book), "--profile", "quick"), stdout=sink,
                                stderr=subprocess.STDOUT, env=_env(tmp_path, FIXTURE_PAUSE="0.5"), cwd=tmp_path,
                                start_new_session=True)
        try:
            _wait_for(lambda: "first trained" in log.read_text() or proc.poll() is not None, 90, "the first model")
            assert proc.poll() is None, log.read_text()
            time.sleep(1.0)  # the second model is training now (0.5 s per epoch, 40 epochs)
            kernel_pid = int(log.read_text().split("kernel pid ", 1)[1].split()[0])
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner's session: the runner itself
            proc.wait(30)
    try:
        os.kill(kernel_pid, signal.SIGKILL)  # the kernel runs in its own session
    except ProcessLookupError:
        pass
    _wait_for(lambda: not Path(f"/proc/{kernel_pid}").exists(), 30, "the kernel to exit")
    text = log.read_text()
    assert "profile quick" in text and "[2/3" in text  # progress: the cell status lines
    assert "second" not in text.split("first trained", 1)[1]  # killed mid-training
    assert len(list(cache.glob("*.pt"))) == 1  # the finished model only
    assert not [p for p in cache.iterdir() if not p.name.endswith(".pt")]  # no partial cache file

    out = subprocess.run(_cli("run", "91_two_models", "--root", str(book)), capture_output=True, text=True,
                         timeout=120, env=_env(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "first cached" in out.stdout and "second trained" in out.stdout
    assert "fit MLP" in out.stderr  # the package's tqdm bar, forwarded from the kernel
    assert len(list(cache.glob("*.pt"))) == 2
    result = book / "results" / "quick" / "91_two_models.json"
    assert result.is_file() and str(result) in out.stdout
    assert json.loads(result.read_text())["records"]["accuracy"] > 0.5


def test_smoke_from_the_environment_is_kept(book, tmp_path):
    """MARGINLAB_PROFILE=full MARGINLAB_SMOKE=1 without --smoke stays a smoke run (never a silent full run)."""
    out = subprocess.run(_cli("run", "93", "--root", str(book)), capture_output=True, text=True, timeout=120,
                         env=_env(tmp_path, MARGINLAB_PROFILE="full", MARGINLAB_SMOKE="1"), cwd=tmp_path)
    assert out.returncode == 1 and "results/smoke/93_no_results.json" in out.stderr, out.stderr
    out = subprocess.run(_cli("run", "93", "--root", str(book)), capture_output=True, text=True, timeout=120,
                         env=_env(tmp_path, MARGINLAB_PROFILE="quick", MARGINLAB_SMOKE="1"), cwd=tmp_path)
    assert out.returncode != 0 and "MARGINLAB_PROFILE=full" in out.stderr, out.stderr
