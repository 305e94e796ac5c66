"""Run a chapter headless: ``python -m marginlab run CHAPTER [--profile full|standard|quick] [--smoke]``.

The chapter's MyST source is read with jupytext and executed cell by cell by nbclient in a fresh kernel whose
working directory is ``chapters/`` — exactly what the book build and nbval do, minus the cell timeout (a full
profile cell may train for hours). The run

* sets ``MARGINLAB_PROFILE`` / ``MARGINLAB_SMOKE`` for the kernel, and ``MARGINLAB_PROGRESS=1`` so that the
  package's tqdm bars (``train.fit``, attacks) are plain text, which is forwarded to the terminal as it arrives,
  together with everything else the cells print; a status line per cell tells where the chapter is;
* exits non-zero with the failing cell's traceback (and its line in the chapter) when a cell raises;
* checks that the chapter wrote ``results/<run_name>/<chapter>.json`` during the run (the scorecard writes it
  atomically), and fails if not;
* is resumable: every trained model is cached by ``train.fit(cache=...)`` (written atomically once training has
  finished, so an interrupted fit leaves no cache file), and a rerun after an interruption loads the models
  already trained instead of training them again.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import config

__all__ = ["book_root", "list_chapters", "resolve_chapter", "results_path", "run", "main", "ChapterError"]

CHAPTER_DIR = "chapters"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ChapterError(RuntimeError):
    """A chapter failed: a cell raised, or the chapter did not write its results file."""


def book_root(root: str | os.PathLike | None = None) -> Path:
    """The book's root (holding ``chapters/``): ``root``, else the project root of the working directory, else the
    checkout this package was installed from (editable install)."""
    if root is not None:
        return Path(root).resolve()
    here = config.project_root()
    if (here / CHAPTER_DIR).is_dir():
        return here
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / CHAPTER_DIR).is_dir() else here


def list_chapters(root: str | os.PathLike | None = None) -> list[str]:
    """The chapters' file stems, in order (``01_two_point_dynamics``, ...)."""
    folder = book_root(root) / CHAPTER_DIR
    return sorted(p.stem for p in folder.glob("*.md") if p.stem[:1].isdigit())


def resolve_chapter(chapter: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The chapter file for ``"4"``, ``"04"``, ``"04_differential_training"`` (``.md``), or a word of its name
    (``"differential"``)."""
    stems = list_chapters(root)
    folder = book_root(root) / CHAPTER_DIR
    text = Path(str(chapter)).name
    for suffix in (".md", ".ipynb"):
        text = text.removesuffix(suffix)
    head = text.split("_", 1)[0]
    if text in stems:
        matches = [text]
    elif head.isdigit():
        matches = [s for s in stems if s.split("_", 1)[0].isdigit() and int(s.split("_", 1)[0]) == int(head)]
    else:
        matches = [s for s in stems if text and text.lower() in s.lower()]
    if len(matches) != 1:
        listing = ", ".join(stems) or f"none in {folder}"
        what = "is ambiguous" if matches else "is not a chapter"
        raise ValueError(f"{str(chapter)!r} {what}; give a number (4, 04) or a name: {listing}")
    return folder / f"{matches[0]}.md"


def results_path(chapter: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Where the chapter's run writes its results: ``results/<config.run_name()>/<stem>.json`` (the kernel's
    project root is the book root, or ``$MARGINLAB_RESULTS``)."""
    stem = resolve_chapter(chapter, root).stem
    base = Path(os.environ["MARGINLAB_RESULTS"]) if os.environ.get("MARGINLAB_RESULTS") else book_root(root) / "results"
    return base / config.run_name() / f"{stem}.json"


_environ = config.environ


def _source_line(text: str, source: str) -> int | None:
    """The line of the chapter file where a cell's source starts (None if not found)."""
    first = next((ln for ln in source.splitlines() if ln.strip()), "")
    pos = text.find(first) if first else -1
    return text.count("\n", 0, pos) + 1 if pos >= 0 else None


def _make_client(nb: Any, out: TextIO, err: TextIO, **kw: Any) -> Any:
    from nbclient import NotebookClient

    class StreamingClient(NotebookClient):
        """Forwards the kernel's stream output (prints, tqdm bars on stderr) to the terminal as it arrives."""

        def output(self, outs, msg, display_id, cell_index):  # noqa: D401 - nbclient hook
            if msg.get("msg_type") == "stream":
                content = msg.get("content", {})
                target = err if content.get("name") == "stderr" else out
                target.write(content.get("text", ""))
                target.flush()
            return super().output(outs, msg, display_id, cell_index)

    return StreamingClient(nb, **kw)


def run(chapter: str | os.PathLike, *, profile: str | None = None, smoke: bool | None = None,
        root: str | os.PathLike | None = None, out: TextIO | None = None, err: TextIO | None = None,
        save_notebook: str | os.PathLike | None = None, startup_timeout: int = 600) -> Path:
    """Execute a chapter headless; return the path of the results file it wrote.

    ``profile``: "quick" | "standard" | "full" (default ``$MARGINLAB_PROFILE``, else quick); ``smoke=True``
    runs the full profile's code paths at toy sizes (implies ``profile="full"``) into ``results/smoke/``;
    ``smoke=None`` follows ``$MARGINLAB_SMOKE`` (so ``MARGINLAB_PROFILE=full MARGINLAB_SMOKE=1`` never
    silently becomes a full run).
    ``save_notebook``: also write the executed notebook (with outputs and figures) there.
    Raises :class:`ChapterError` with the failing cell's traceback if a cell raises or no results were written.
    """
    import jupytext
    import nbformat
    from nbclient.exceptions import CellExecutionError

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if profile is not None and profile not in config.PROFILES:
        raise ValueError(f"profile must be one of {config.PROFILES}, got {profile!r}")
    if smoke is None:
        with _environ({"MARGINLAB_PROFILE": profile or os.environ.get("MARGINLAB_PROFILE") or "quick"}):
            smoke = config.smoke()
    if smoke and profile not in (None, "full"):
        raise ValueError(f"smoke runs the full profile's code paths; it cannot be combined with profile={profile!r}")
    path = resolve_chapter(chapter, root)
    text = path.read_text()
    nb = jupytext.reads(text, fmt="md:myst")
    env = {
        "MARGINLAB_PROFILE": "full" if smoke else (profile or os.environ.get("MARGINLAB_PROFILE") or "quick"),
        "MARGINLAB_SMOKE": "1" if smoke else "0",
        "MARGINLAB_PROGRESS": "1",
    }
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    started = time.time()
    with _environ(env):
        name = config.run_name()
        target = results_path(path, root)
        out.write(f"marginlab run {path.stem}: profile {name}, {len(code)} code cells, kernel cwd "
                  f"{path.parent}, results {target}\n")
        out.flush()
        cell_start = {"t": time.perf_counter()}

        def on_cell_start(cell: Any, cell_index: int) -> None:
            if cell.cell_type != "code":
                return
            k = code.index(cell_index) + 1 if cell_index in code else 0
            line = _source_line(text, cell.source)
            cell_start["t"] = time.perf_counter()
            out.write(f"[{k:>{len(str(len(code)))}}/{len(code)} {_clock(time.time() - started)}] "
                      f"{path.name}:{line or '?'}\n")
            out.flush()

        client = _make_client(nb, out, err, timeout=None, startup_timeout=startup_timeout,
                              kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
                              resources={"metadata": {"path": str(path.parent)}},
                              on_cell_start=on_cell_start)
        try:
            client.execute()
        except CellExecutionError as e:
            failing = _failing_cell(nb)
            where = f"{path.name}:{_source_line(text, failing.source) or '?'}" if failing is not None else path.name
            raise ChapterError(f"{path.stem} failed in the cell at {where} "
                               f"(profile {name}):\n{_ANSI.sub('', str(e))}") from None
        finally:
            if save_notebook is not None:
                nbformat.write(nb, str(save_notebook))
    if not target.is_file() or target.stat().st_mtime < started - 1:
        raise ChapterError(f"{path.stem} ran to the end but did not write {target} "
                           "(its last cells must call Scorecard.save())")
    out.write(f"done in {_clock(time.time() - started)}: {target}\n")
    out.flush()
    return target


def _failing_cell(nb: Any) -> Any:
    for cell in nb.cells:
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return cell
    return None


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m marginlab run",
        description="Execute a chapter headless (no cell timeout; resumable: trained models are cached).")
    p.add_argument("chapter", help="number (4, 04) or file stem (04_differential_training)")
    p.add_argument("--profile", choices=config.PROFILES, default=None,
                   help="default: $MARGINLAB_PROFILE, else quick")
    p.add_argument("--smoke", action="store_true", default=None,
                   help="the full profile's code paths at toy sizes, into results/smoke/")
    p.add_argument("--root", default=None, help="the book's root (default: found from the working directory)")
    p.add_argument("--save-notebook", default=None, metavar="PATH",
                   help="also write the executed notebook (outputs and figures) to PATH")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m marginlab run CHAPTER [--profile P] [--smoke]``: 0 on success, 1 if the chapter failed."""
    args = _parser().parse_args(argv)
    try:
        run(args.chapter, profile=args.profile, smoke=args.smoke, root=args.root, save_notebook=args.save_notebook)
    except ChapterError as e:
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
