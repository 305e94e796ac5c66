"""Claim registry: paper value, our value, a stated rule, and the verdict the rule computes.

A chapter builds one :class:`Scorecard`, adds a claim per empirical statement of
the paper with :meth:`Scorecard.claim`, records the numbers and curves behind
its figures with :meth:`Scorecard.record`, and ends with :meth:`Scorecard.save`
(``results/<profile>/<chapter>.json`` with provenance) and a rendered table.
Verdicts are never written by hand: a :class:`Rule` computes them from the
measured value.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import config

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_RUN = "reproduced", "partly", "not reproduced", "not run"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_RUN)


@dataclass(frozen=True)
class Rule:
    """A verdict rule: ``check(ours) -> verdict``; a missing value (None/NaN) is ``not run``."""

    description: str
    check: Callable[[Any], str]

    def __call__(self, ours: Any) -> str:
        if ours is None or (isinstance(ours, float) and math.isnan(ours)):
            return NOT_RUN
        verdict = self.check(ours)
        if verdict not in VERDICTS:
            raise ValueError(f"rule {self.description!r} returned {verdict!r}, not one of {VERDICTS}")
        return verdict


def _graded(ok: bool, near: bool) -> str:
    return REPRODUCED if ok else PARTLY if near else NOT_REPRODUCED


def at_least(threshold: float, partly: float | None = None) -> Rule:
    """Reproduced if ours >= threshold; partly if ours >= ``partly``."""
    text = f"ours ≥ {threshold:g}" + (f" (partly if ≥ {partly:g})" if partly is not None else "")
    return Rule(text, lambda v: _graded(v >= threshold, partly is not None and v >= partly))


def at_most(threshold: float, partly: float | None = None) -> Rule:
    """Reproduced if ours <= threshold; partly if ours <= ``partly``."""
    text = f"ours ≤ {threshold:g}" + (f" (partly if ≤ {partly:g})" if partly is not None else "")
    return Rule(text, lambda v: _graded(v <= threshold, partly is not None and v <= partly))


def within(target: float, tol: float, partly: float | None = None) -> Rule:
    """Reproduced if |ours - target| <= tol; partly if within ``partly``."""
    text = f"|ours − {target:g}| ≤ {tol:g}" + (f" (partly if ≤ {partly:g})" if partly is not None else "")
    return Rule(
        text,
        lambda v: _graded(abs(v - target) <= tol, partly is not None and abs(v - target) <= partly),
    )


def is_true(description: str = "the measured statement holds") -> Rule:
    """Reproduced if the measured boolean is true."""
    return Rule(description, lambda v: REPRODUCED if bool(v) else NOT_REPRODUCED)


def fraction_true(reproduced: float = 1.0, partly: float = 0.5) -> Rule:
    """For a fraction in [0, 1] of cases where a statement held: reproduced at ≥ ``reproduced``."""
    return Rule(
        f"fraction of cases ≥ {reproduced:g} (partly if ≥ {partly:g})",
        lambda v: _graded(v >= reproduced, v >= partly),
    )


@dataclass
class Claim:
    id: str
    description: str
    paper: Any
    ours: Any
    rule: Rule
    section: str | None = None
    verdict: str = field(init=False)

    def __post_init__(self) -> None:
        self.verdict = self.rule(self.ours)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "description": self.description,
            "paper": _jsonable(self.paper),
            "ours": _jsonable(self.ours),
            "rule": self.rule.description,
            "verdict": self.verdict,
            "section": self.section,
        }


def _jsonable(value: Any) -> Any:
    """Convert tensors, arrays and numpy scalars to plain JSON types (NaN -> None)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=config.project_root(), capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=config.project_root(), capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_results(chapter: str, profile: str, root: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The stored results of ``chapter`` under ``profile``, or None when that run does not exist."""
    path = config.results_dir(root) / profile / f"{chapter}.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Scorecard:
    """The claims and recorded numbers of one chapter run."""

    def __init__(self, chapter: str, seeds: list[int] | tuple[int, ...] = (), profile: str | None = None):
        if not chapter or "/" in chapter:
            raise ValueError(f"chapter must be a file stem like '01_two_point_dynamics', got {chapter!r}")
        self.chapter = chapter
        self.profile = profile or config.run_name()
        self.seeds = list(seeds)
        self.claims: dict[str, Claim] = {}
        self.records: dict[str, Any] = {}
        self._start = time.perf_counter()

    def claim(self, id: str, description: str, paper: Any, ours: Any, rule: Rule,
              section: str | None = None) -> Claim:
        """Register a claim; its verdict is computed now by ``rule`` from ``ours``."""
        c = Claim(id, description, paper, ours, rule, section)
        self.claims[id] = c
        return c

    def record(self, key: str, value: Any) -> None:
        """Keep a number or a curve (lists, arrays, tensors) for the results file."""
        self.records[key] = _jsonable(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chapter": self.chapter,
            "profile": self.profile,
            "claims": [c.to_dict() for c in self.claims.values()],
            "records": self.records,
            "provenance": {
                **config.describe(),
                "commit": _git_commit(),
                "seconds": round(time.perf_counter() - self._start, 2),
                "seeds": self.seeds,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        }

    def save(self, root: str | os.PathLike | None = None) -> Path:
        """Write ``results/<profile>/<chapter>.json`` atomically and return its path."""
        path = config.results_dir(root) / self.profile / f"{self.chapter}.json"
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path

    def rows(self, root: str | os.PathLike | None = None) -> list[dict[str, str]]:
        """Table rows: claim | paper | ours (live) | ours (full, stored) | verdict."""
        stored = load_results(self.chapter, "full", root) if self.profile != "full" else None
        stored_claims = {c["id"]: c for c in (stored or {}).get("claims", [])}
        rows = []
        for c in self.claims.values():
            s = stored_claims.get(c.id)
            verdict = f"{c.verdict} (live)"
            if s is not None:
                verdict += f"; {s['verdict']} (full)"
            elif self.profile != "full":
                verdict += "; not run (full)"
            rows.append({
                "claim": c.description,
                "paper": _fmt(c.paper),
                "ours (live)": _fmt(_jsonable(c.ours)),
                "ours (full, stored)": _fmt(s["ours"]) if s else "not run",
                "verdict": verdict,
                "rule": c.rule.description,
            })
        return rows

    def to_markdown(self, root: str | os.PathLike | None = None) -> str:
        return markdown_table(self.rows(root))

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def show(self):
        """Display the table in a notebook (a Markdown object) and return it."""
        from IPython.display import Markdown, display

        md = Markdown(self.to_markdown())
        display(md)
        return md


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "*(no claims)*"
    cols = list(rows[0])
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def book_rows(root: str | os.PathLike | None = None, link_chapters: bool = False) -> list[dict[str, str]]:
    """Every chapter's claims, live (quick) and stored (full), for the book's scorecard page.

    ``link_chapters`` writes each chapter as a Markdown link to its page (relative to ``book/``)."""
    base = config.results_dir(root)
    chapters = sorted({p.stem for prof in ("quick", "full") for p in (base / prof).glob("*.json")})
    rows = []
    for chapter in chapters:
        quick = load_results(chapter, "quick", root) or {}
        full = load_results(chapter, "full", root) or {}
        q = {c["id"]: c for c in quick.get("claims", [])}
        f = {c["id"]: c for c in full.get("claims", [])}
        for cid in list(q) + [k for k in f if k not in q]:
            c = q.get(cid) or f[cid]
            rows.append({
                "chapter": f"[{chapter}](../chapters/{chapter}.md)" if link_chapters else chapter,
                "claim": c["description"],
                "paper": _fmt(c["paper"]),
                "ours (quick)": _fmt(q[cid]["ours"]) if cid in q else "not run",
                "ours (full)": _fmt(f[cid]["ours"]) if cid in f else "not run",
                "verdict (quick / full)": f"{q[cid]['verdict'] if cid in q else NOT_RUN} / "
                                          f"{f[cid]['verdict'] if cid in f else NOT_RUN}",
            })
    return rows
