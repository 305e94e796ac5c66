"""Claim registry: paper value, our value, a stated rule, and the verdict the rule computes.

A chapter builds one :class:`Scorecard`, adds a claim per empirical statement of
the paper with :meth:`Scorecard.claim`, records the numbers and curves behind
its figures with :meth:`Scorecard.record`, and ends with :meth:`Scorecard.save`
(``results/<profile>/<chapter>.json`` with provenance) and a rendered table.
Verdicts are never written by hand: a :class:`Rule` computes them from the
measured value.

Verdicts of intervals
---------------------
Our value may be a plain number or a :class:`marginlab.stats.Estimate` (a value with
an interval). The threshold rules (:func:`at_least`, :func:`at_most`, :func:`within`,
:func:`fraction_true`) split the number line into a *reproduced* band, a *partly* band
(the ``partly`` tolerance; without one it is the reproduced band itself) and the rest.
A number gets the verdict of the band it falls in. An interval ``[low, high]`` is

* **reproduced** when the whole interval lies in the reproduced band,
* **not reproduced** when no point of it lies in the partly band (nor the reproduced one),
* **partly** otherwise: it straddles a threshold, or lies in the partly band.

So ``at_least(90)`` gives 93 [91, 95] → reproduced, 91 [88, 94] → partly,
85 [82, 88] → not reproduced. The interval's own point value plays no part: the
verdict says what the data can support, not where the point estimate landed.

Two methods are compared with :func:`greater_than` / :func:`less_than`: reproduced when
the two intervals are disjoint in the claimed order, not reproduced when they are disjoint
in the other order (or equal points), partly when they overlap. Overlapping separate
intervals are a weak test; where both methods are scored on the same examples, give
``ours`` as the paired difference (:func:`marginlab.stats.bootstrap_paired`) and compare
it with 0: ``greater_than(0.0)``.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import config
from .stats import Estimate

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_RUN = "reproduced", "partly", "not reproduced", "not run"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_RUN)
PROFILE_COLUMNS = ("quick", "standard", "full")

# The four papers, by the file codes the chapters cite them with.
PAPERS: dict[str, str] = {
    "000": "Nar et al. 2019, low-rank features",
    "001": "Nar et al. 2019, poor margins",
    "002": "Xu et al. 2020, weight penalization",
    "003": "Wu & Yu 2019, min vs average margin",
}
# The paper a chapter's claims come from unless the claim names another ("001 Fig 1: ...").
CHAPTER_PAPERS: dict[str, str] = {"01": "001", "02": "000", "03": "000", "04": "000", "05": "002", "06": "003"}
_PAPER_CODE = re.compile(r"(?<![\d.])(00[0-3])(?![\d.])")

# ---------------------------------------------------------------------------------------------
# Rules


Band = tuple[float, float]


@dataclass(frozen=True)
class Rule:
    """A verdict rule: ``check(ours) -> verdict``; a missing value (None/NaN) is ``not run``.

    ``check_interval(estimate) -> verdict`` decides for an :class:`~marginlab.stats.Estimate`;
    a rule without one refuses intervals.
    """

    description: str
    check: Callable[[Any], str]
    check_interval: Callable[[Estimate], str] | None = None

    def __call__(self, ours: Any) -> str:
        if ours is None or (isinstance(ours, float) and math.isnan(ours)):
            return NOT_RUN
        if isinstance(ours, Estimate):
            if self.check_interval is None:
                raise ValueError(f"rule {self.description!r} does not take an interval (ours={ours})")
            verdict = self.check_interval(ours)
        else:
            verdict = self.check(ours)
        if verdict not in VERDICTS:
            raise ValueError(f"rule {self.description!r} returned {verdict!r}, not one of {VERDICTS}")
        return verdict


def _graded(ok: bool, near: bool) -> str:
    return REPRODUCED if ok else PARTLY if near else NOT_REPRODUCED


def _inside(lo: float, hi: float, band: Band) -> bool:
    return band[0] <= lo and hi <= band[1]


def _meets(lo: float, hi: float, band: Band) -> bool:
    return lo <= band[1] and hi >= band[0]


def _band_rule(description: str, reproduce: Band, partly: Band | None) -> Rule:
    """A rule from its reproduced band and partly band (module docstring: verdicts of intervals)."""
    near = partly or reproduce

    def point(v: float) -> str:
        v = float(v)
        return _graded(_inside(v, v, reproduce), _inside(v, v, near))

    def interval(e: Estimate) -> str:
        if _inside(e.low, e.high, reproduce):
            return REPRODUCED
        if _meets(e.low, e.high, near) or _meets(e.low, e.high, reproduce):
            return PARTLY
        return NOT_REPRODUCED

    return Rule(description, point, interval)


def at_least(threshold: float, partly: float | None = None) -> Rule:
    """Reproduced if ours >= threshold; partly if ours >= ``partly`` (an interval: all of it)."""
    text = f"ours ≥ {threshold:g}" + (f" (partly if ≥ {partly:g})" if partly is not None else "")
    return _band_rule(text, (threshold, math.inf), None if partly is None else (partly, math.inf))


def at_most(threshold: float, partly: float | None = None) -> Rule:
    """Reproduced if ours <= threshold; partly if ours <= ``partly`` (an interval: all of it)."""
    text = f"ours ≤ {threshold:g}" + (f" (partly if ≤ {partly:g})" if partly is not None else "")
    return _band_rule(text, (-math.inf, threshold), None if partly is None else (-math.inf, partly))


def within(target: float, tol: float, partly: float | None = None) -> Rule:
    """Reproduced if |ours - target| <= tol; partly if within ``partly`` (an interval: all of it)."""
    if tol < 0 or (partly is not None and partly < tol):
        raise ValueError(f"within needs 0 <= tol <= partly, got tol={tol}, partly={partly}")
    text = f"|ours − {target:g}| ≤ {tol:g}" + (f" (partly if ≤ {partly:g})" if partly is not None else "")
    return _band_rule(text, (target - tol, target + tol),
                      None if partly is None else (target - partly, target + partly))


def is_true(description: str = "the measured statement holds") -> Rule:
    """Reproduced if the measured boolean is true."""
    return Rule(description, lambda v: REPRODUCED if bool(v) else NOT_REPRODUCED)


def fraction_true(reproduced: float = 1.0, partly: float = 0.5) -> Rule:
    """For a fraction in [0, 1] of cases where a statement held: reproduced at ≥ ``reproduced``."""
    return _band_rule(f"fraction of cases ≥ {reproduced:g} (partly if ≥ {partly:g})",
                      (reproduced, math.inf), (partly, math.inf))


def _as_interval(x: Any, name: str) -> tuple[float, float]:
    if isinstance(x, Estimate):
        return x.low, x.high
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number or an Estimate, got {x!r}")
    return float(x), float(x)


def _comparison(other: Estimate | float, above: bool, what: str | None) -> Rule:
    olo, ohi = _as_interval(other, "other")
    text = f"ours {'>' if above else '<'} {what or _fmt(other)}" + (
        " (intervals disjoint)" if isinstance(other, Estimate) else "")

    def decide(lo: float, hi: float) -> str:
        if (lo > ohi) if above else (hi < olo):
            return REPRODUCED
        if ((hi < olo) if above else (lo > ohi)) or (lo == hi and olo == ohi):
            return NOT_REPRODUCED  # wholly on the wrong side, or two equal points
        return PARTLY

    return Rule(text, lambda v: decide(*_as_interval(v, "ours")), lambda e: decide(e.low, e.high))


def greater_than(other: Estimate | float, what: str | None = None) -> Rule:
    """Ours > ``other``: reproduced when ours' interval lies wholly above ``other``'s,
    not reproduced when wholly below (or both are the same point), partly when they overlap.

    ``other`` is the competing method's number or :class:`~marginlab.stats.Estimate`; with a
    paired difference (:func:`marginlab.stats.bootstrap_paired`) as ours, compare it with 0.
    ``what`` names ``other`` in the rule text (e.g. ``"CE"``).
    """
    return _comparison(other, True, what)


def less_than(other: Estimate | float, what: str | None = None) -> Rule:
    """Ours < ``other``, the mirror image of :func:`greater_than`."""
    return _comparison(other, False, what)


# ---------------------------------------------------------------------------------------------
# Claims and results files


@dataclass
class Claim:
    id: str
    description: str
    paper: Any
    ours: Any
    rule: Rule
    section: str | None = None
    source: str | None = None  # paper code, e.g. "001"
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
            "source": self.source,
        }


def _jsonable(value: Any) -> Any:
    """Convert tensors, arrays, estimates and numpy scalars to plain JSON types (NaN -> None)."""
    if isinstance(value, Estimate):
        return _jsonable(value.to_dict())
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


def paper_of(description: str, chapter: str) -> str | None:
    """The paper code of a claim: the first code its description names, else its chapter's paper."""
    m = _PAPER_CODE.search(description)
    if m:
        return m.group(1)
    return CHAPTER_PAPERS.get(chapter[:2])


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=config.project_root(), capture_output=True, text=True, timeout=10
        )
        # results/ holds outputs (a previous run's results file), not the code that makes the numbers
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            cwd=config.project_root(), capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _data_sizes() -> dict[str, Any] | None:
    """``marginlab.data.loaded_sizes()`` where the data module offers it (sizes of the data sets read)."""
    try:
        from . import data

        sizes = getattr(data, "loaded_sizes", None)
        return _jsonable(sizes()) if callable(sizes) else None
    except Exception as err:  # provenance must never cost a finished run its results
        return {"error": repr(err)}


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


def glue_stored(chapter: str, profile: str = "standard", root: str | os.PathLike | None = None
                ) -> dict[str, Any] | None:
    """Glue every stored claim of ``chapter`` under ``profile`` for the chapter's prose.

    With myst-nb's ``glue``, ``{glue:md}`<profile>_<id>``` shows our value (with its interval) and
    ``{glue:md}`<profile>_<id>_verdict``` the computed verdict, so the text quotes the stored run
    and never a number typed by hand. Returns the stored results, or None (and glues nothing)
    when the run does not exist: a page quoting it then fails to build rather than showing stale text.
    """
    from IPython.display import Markdown
    from myst_nb import glue

    results = _load_or_none(chapter, profile, root)
    for cid, claim in _claims_by_id(results).items():
        glue(f"{profile}_{cid}", Markdown(_fmt(claim.get("ours"))), display=False)
        glue(f"{profile}_{cid}_verdict", Markdown(f"**{claim.get('verdict', '—')}**"), display=False)
    return results


def _fmt(value: Any) -> str:
    """A short display form of a claim value; never raises."""
    try:
        if value is None:
            return "—"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, Estimate):
            return str(value)
        if Estimate.is_estimate_dict(value):
            return str(Estimate.from_dict(value))
        if isinstance(value, (float, np.floating)):
            return f"{float(value):.4g}"
        return str(_jsonable(value))
    except Exception:
        return repr(value)


# ---------------------------------------------------------------------------------------------
# One chapter's scorecard


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
        # the code that computes the numbers is the code checked out when the run starts
        self._commit = _git_commit()
        self._changes = 0  # claims and records added; compared with the count at the last save
        self._saved_changes = -1

    def claim(self, id: str, description: str, paper: Any, ours: Any, rule: Rule,
              section: str | None = None, source: str | None = None) -> Claim:
        """Register a claim; its verdict is computed now by ``rule`` from ``ours``.

        ``ours`` is a number, a boolean or a :class:`~marginlab.stats.Estimate`; ``source``
        the paper's code ("000"–"003"), by default the code the description names first,
        else the chapter's paper.
        """
        if source is not None and source not in PAPERS:
            raise ValueError(f"source must be one of {sorted(PAPERS)}, got {source!r}")
        c = Claim(id, description, paper, ours, rule, section, source or paper_of(description, self.chapter))
        self.claims[id] = c
        self._changes += 1
        return c

    def record(self, key: str, value: Any) -> None:
        """Keep a number or a curve (lists, arrays, tensors) for the results file."""
        self.records[key] = _jsonable(value)
        self._changes += 1

    def provenance(self) -> dict[str, Any]:
        """Where and how this run was made: device, threads, commit, seconds, seeds, data sizes."""
        import torch

        return {
            **config.describe(),
            "threads": torch.get_num_threads(),
            "commit": self._commit,
            **({"commit_at_save": now} if (now := _git_commit()) != self._commit else {}),
            "seconds": round(time.perf_counter() - self._start, 2),
            "seeds": self.seeds,
            "data_sizes": _data_sizes(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "chapter": self.chapter,
            "profile": self.profile,
            "claims": [c.to_dict() for c in self.claims.values()],
            "records": self.records,
            "provenance": self.provenance(),
        }

    def save(self, root: str | os.PathLike | None = None) -> Path:
        """Write ``results/<profile>/<chapter>.json`` atomically and return its path."""
        path = config.results_dir(root) / self.profile / f"{self.chapter}.json"
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        self._saved_changes = self._changes
        return path

    def profiles(self) -> list[str]:
        """The table's profile columns: quick, standard, full, and this run's own if it is another (smoke)."""
        return list(PROFILE_COLUMNS) + ([self.profile] if self.profile not in PROFILE_COLUMNS else [])

    def entries(self, root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Each claim with its result per profile: this run live, the other profiles from their files."""
        live = {c.id: c.to_dict() for c in self.claims.values()}
        stored = {p: _claims_by_id(_load_or_none(self.chapter, p, root))
                  for p in self.profiles() if p != self.profile}
        stored[self.profile] = live
        return _merge(self.chapter, stored, self.profiles())

    def rows(self, root: str | os.PathLike | None = None) -> list[dict[str, str]]:
        """Plain-text rows: claim | paper | ours and verdict per profile | rule."""
        return [_text_row(e, self.profiles(), live=self.profile) for e in self.entries(root)]

    def to_markdown(self, root: str | os.PathLike | None = None) -> str:
        return markdown_table(self.rows(root))

    def to_html(self, root: str | os.PathLike | None = None) -> str:
        """The chapter's scorecard as a self-contained HTML table (the book's renderer)."""
        return claims_html(self.entries(root), self.profiles(), live=self.profile)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def _repr_html_(self) -> str:
        return self.to_html()

    def show(self, root: str | os.PathLike | None = None):
        """Display the table in a notebook (HTML) and return it.

        Saves first when claims or records were added since the last :meth:`save`, so that
        nothing shown can cost a finished run its results file.
        """
        from IPython.display import HTML, display

        if self._changes != self._saved_changes:
            self.save(root)
        out = HTML(self.to_html(root))
        display(out)
        return out


def _claims_by_id(results: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in (results or {}).get("claims", []) if isinstance(c, dict) and "id" in c}


def _load_or_none(chapter: str, profile: str, root: str | os.PathLike | None) -> dict[str, Any] | None:
    """:func:`load_results`, but an unreadable file counts as no run (with a warning), so that
    a damaged stored file never breaks the display of a live run."""
    try:
        return load_results(chapter, profile, root)
    except (OSError, ValueError) as err:
        import warnings

        warnings.warn(f"ignoring unreadable results/{profile}/{chapter}.json: {err}", stacklevel=3)
        return None


def _merge(chapter: str, by_profile: dict[str, dict[str, dict[str, Any]]],
           profiles: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per claim id (first-seen order over ``profiles``) with its result per profile."""
    order: list[str] = []
    for p in profiles:
        order += [cid for cid in by_profile.get(p, {}) if cid not in order]
    entries = []
    for cid in order:
        # The description, paper value and rule come from the most thorough run that has the claim.
        base = next(by_profile[p][cid] for p in reversed(profiles) if cid in by_profile.get(p, {}))
        entries.append({
            "chapter": chapter,
            "id": cid,
            "description": base.get("description", cid),
            "paper": base.get("paper"),
            "rule": base.get("rule", ""),
            "section": base.get("section"),
            "source": base.get("source") or paper_of(base.get("description", ""), chapter),
            "results": {p: ({"ours": by_profile[p][cid].get("ours"),
                             "verdict": by_profile[p][cid].get("verdict", NOT_RUN),
                             "rule": by_profile[p][cid].get("rule", "")}
                            if cid in by_profile.get(p, {}) else None) for p in profiles},
        })
    return entries


def _text_row(entry: dict[str, Any], profiles: Sequence[str], live: str | None = None) -> dict[str, str]:
    row = {"claim": entry["description"], "paper": _fmt(entry["paper"])}
    for p in profiles:
        r = entry["results"].get(p)
        label = f"{p} (live)" if p == live else p
        row[label] = NOT_RUN if r is None else f"{_fmt(r['ours'])} ({r['verdict']})"
    row["rule"] = entry["rule"]
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows``; the columns are the union of the rows' keys in first-seen
    order, and a row without a column gets an empty cell."""
    if not rows:
        return "*(no claims)*"
    cols: list[str] = []
    for r in rows:
        cols += [str(k) for k in r if str(k) not in cols]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r.get(c, "")) for c in cols) + " |"
              for r in ({str(k): v for k, v in row.items()} for row in rows)]
    return "\n".join(lines)


def show_table(rows: list[dict[str, Any]] | dict[str, dict[str, Any]], first: str = ""):
    """Display a table in a notebook (Markdown) and return it.

    ``rows``: a list of ``{column: value}`` or ``{row label: {column: value}}`` (the labels become
    the first column, headed ``first``); floats are shown to 4 significant digits.
    """
    from IPython.display import Markdown, display

    if isinstance(rows, dict):
        rows = [{first: label, **row} for label, row in rows.items()]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else v  # noqa: E731
    md = Markdown(markdown_table([{k: fmt(v) for k, v in r.items()} for r in rows]))
    display(md)
    return md


# ---------------------------------------------------------------------------------------------
# The whole book


def chapters_with_results(root: str | os.PathLike | None = None,
                          profiles: Iterable[str] = PROFILE_COLUMNS) -> list[str]:
    base = config.results_dir(root)
    return sorted({p.stem for prof in profiles for p in (base / prof).glob("*.json")})


def book_entries(root: str | os.PathLike | None = None,
                 profiles: Sequence[str] = PROFILE_COLUMNS) -> list[dict[str, Any]]:
    """Every stored claim of every chapter with its result per profile (see :meth:`Scorecard.entries`)."""
    entries = []
    for chapter in chapters_with_results(root, profiles):
        by_profile = {p: _claims_by_id(_load_or_none(chapter, p, root)) for p in profiles}
        entries += _merge(chapter, by_profile, profiles)
    return entries


def book_rows(root: str | os.PathLike | None = None, link_chapters: bool = False,
              profiles: Sequence[str] = PROFILE_COLUMNS) -> list[dict[str, str]]:
    """Plain-text rows of :func:`book_entries` (chapter | claim | paper | one column per profile | rule).

    ``link_chapters`` writes each chapter as a Markdown link to its page (relative to ``book/``)."""
    rows = []
    for e in book_entries(root, profiles):
        ch = e["chapter"]
        rows.append({"chapter": f"[{ch}](../chapters/{ch}.md)" if link_chapters else ch,
                     **_text_row(e, profiles)})
    return rows


def chapter_title(chapter: str, root: str | os.PathLike | None = None) -> str:
    """``"1. Two-point dynamics"``: the chapter's number and the first ``# `` heading of its source."""
    base = Path(root) if root is not None else config.project_root()
    number = chapter.split("_", 1)[0]
    prefix = f"{int(number)}. " if number.isdigit() else ""
    try:
        for line in (base / "chapters" / f"{chapter}.md").read_text().splitlines():
            if line.startswith("# "):
                return prefix + line[2:].strip()
    except OSError:
        pass
    return prefix + chapter.split("_", 1)[-1].replace("_", " ").capitalize()


# ---------------------------------------------------------------------------------------------
# HTML rendering, shared by the chapters and the book's scorecard page

BADGE = {REPRODUCED: ("✓", "yes"), PARTLY: ("◐", "partly"), NOT_REPRODUCED: ("✗", "no"), NOT_RUN: ("–", "not run")}
COLOURS = {REPRODUCED: "#2e7d32", PARTLY: "#c77c02", NOT_REPRODUCED: "#c62828", NOT_RUN: "#8a8a8a"}

STYLE = """<style>
.ml-sc{margin:.4em 0 1em 0;max-width:100%}
.ml-sc table{width:100%;table-layout:fixed;border-collapse:collapse;font-size:.82em;line-height:1.35;margin:0}
.ml-sc th,.ml-sc td{padding:.3em .35em;vertical-align:top;text-align:left;overflow-wrap:anywhere;
  border-bottom:1px solid rgba(127,127,127,.3)}
.ml-sc th{font-weight:600;border-bottom:2px solid rgba(127,127,127,.5)}
.ml-sc col.ml-c-claim{width:43%}.ml-sc col.ml-c-paper{width:15%}
.ml-sc .ml-badge{display:inline-block;padding:0 .45em;border-radius:.8em;color:#fff;font-size:.85em;
  font-weight:600;white-space:nowrap;line-height:1.5}
.ml-sc .ml-val{display:block}.ml-sc .ml-ci{display:block;color:#666;font-size:.9em}
.ml-sc details{margin-top:.15em;color:#555;font-size:.92em}.ml-sc summary{cursor:pointer;color:#777}
.ml-sc .ml-legend{font-size:.8em;color:#555;margin:.2em 0}
.ml-sc .ml-legend .ml-badge{margin-right:.2em}
.ml-sc h3{margin:1.2em 0 .3em 0;font-size:1.15em}
@media (max-width:640px){
 .ml-sc table,.ml-sc tbody,.ml-sc tr,.ml-sc td{display:block;width:100%}
 .ml-sc thead,.ml-sc colgroup{display:none}
 .ml-sc tr{border-bottom:2px solid rgba(127,127,127,.5);padding:.3em 0}
 .ml-sc td{border:0;padding:.1em 0}
 .ml-sc td[data-label]:not(.ml-td-claim)::before{content:attr(data-label) ": ";font-weight:600}
 .ml-sc .ml-val,.ml-sc .ml-ci{display:inline;margin-left:.3em}
}
</style>"""


def badge(verdict: str, title: str | None = None) -> str:
    """A short coloured verdict badge (symbol + word, so it reads without colour too)."""
    symbol, word = BADGE.get(verdict, ("?", verdict))
    tip = f' title="{html.escape(title)}"' if title else ""
    return (f'<span class="ml-badge ml-v-{verdict.replace(" ", "-")}" style="background:'
            f'{COLOURS.get(verdict, "#555")}"{tip}>{symbol} {word}</span>')


def legend() -> str:
    """The four verdicts as badges with their full names."""
    return ('<div class="ml-legend">' + " ".join(
        f'<span class="ml-badge" style="background:{COLOURS[v]}">{BADGE[v][0]} {v}</span>' for v in VERDICTS)
        + "</div>")


def _value_html(value: Any) -> str:
    est = None
    if isinstance(value, Estimate):
        est = value
    elif Estimate.is_estimate_dict(value):
        try:
            est = Estimate.from_dict(value)
        except (TypeError, ValueError):
            est = None
    if est is not None:
        text = str(est)
        point, _, ci = text.partition(" ")
        return (f'<span class="ml-val">{html.escape(point)}</span>'
                f'<span class="ml-ci">{html.escape(ci)}</span>')
    return f'<span class="ml-val">{html.escape(_fmt(value))}</span>'


def claims_html(entries: Sequence[dict[str, Any]], profiles: Sequence[str], live: str | None = None,
                style: bool = True) -> str:
    """Entries (from :meth:`Scorecard.entries` / :func:`book_entries`) as an HTML table that fits
    its column: the claim wraps, each profile cell is a verdict badge over our value, and the rule
    and claim id sit in a collapsed row detail (and in the badges' tooltips)."""
    head = "".join(f"<th>{html.escape(p)}{' <small>(live)</small>' if p == live else ''}</th>"
                   for p in profiles)
    cols = '<col class="ml-c-claim"><col class="ml-c-paper">' + "<col>" * len(profiles)
    body = []
    for e in entries:
        cells = []
        for p in profiles:
            r = e["results"].get(p)
            verdict = NOT_RUN if r is None else r["verdict"]
            value = "" if r is None else _value_html(r["ours"])
            tip = f"{p}: {verdict} — rule: {(r or {}).get('rule') or e['rule']}"
            cells.append(f'<td data-label="{html.escape(p)}">{badge(verdict, tip)}{value}</td>')
        detail = f"rule: {e['rule']}" + (f" · {e['section']}" if e.get("section") else "") + f" · id {e['id']}"
        body.append(
            f'<tr><td class="ml-td-claim" data-label="claim">{html.escape(str(e["description"]))}'
            f"<details><summary>rule</summary>{html.escape(detail)}</details></td>"
            f'<td data-label="paper">{html.escape(_fmt(e["paper"]))}</td>' + "".join(cells) + "</tr>")
    table = (f"<table><colgroup>{cols}</colgroup><thead><tr><th>claim</th><th>paper</th>{head}</tr></thead>"
             f"<tbody>{''.join(body)}</tbody></table>") if body else "<p><em>(no claims)</em></p>"
    return (STYLE if style else "") + f'<div class="ml-sc">{legend()}{table}</div>'
