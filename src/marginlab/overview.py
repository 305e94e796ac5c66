"""The book's verdict overview: every claim of every chapter, per paper and profile, at a glance.

Everything here is drawn from the results files (``results/<profile>/<chapter>.json``:
the live quick run of this build and the stored standard and full runs) through
:func:`marginlab.scorecard.book_entries`; nothing is written by hand.
"""
from __future__ import annotations

import html
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from . import scorecard as S

PAPER_SHORT = {"000": "Nar et al. 2019a", "001": "Nar et al. 2019b", "002": "Xu et al. 2020",
               "003": "Wu & Yu 2019"}
PROFILE_TITLES = {"quick": "quick (live, CPU)", "standard": "standard (stored, CPU)",
                  "full": "full (stored, GPU)"}


def verdict_counts(entries: Sequence[dict[str, Any]], profiles: Sequence[str] = S.PROFILE_COLUMNS,
                   key: Callable[[dict[str, Any]], Any] = lambda e: e["source"]) -> dict[Any, dict[str, Counter]]:
    """``{group: {profile: Counter(verdict)}}`` over ``entries``; a claim absent from a profile is "not run"."""
    out: dict[Any, dict[str, Counter]] = {}
    for e in entries:
        group = out.setdefault(key(e), {p: Counter() for p in profiles})
        for p in profiles:
            r = e["results"].get(p)
            group[p][S.NOT_RUN if r is None else r["verdict"]] += 1
    return out


def _row_label(chapter: str, source: str | None, root: str | os.PathLike | None) -> str:
    title = S.chapter_title(chapter, root).split(":", 1)[0]
    return f"{title}\n{PAPER_SHORT.get(source or '', 'other')}"


def overview_figure(entries: Sequence[dict[str, Any]], profiles: Sequence[str] = S.PROFILE_COLUMNS,
                    root: str | os.PathLike | None = None):
    """Claims per chapter and paper as bars coloured by verdict, one panel per profile."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    counts = verdict_counts(entries, profiles, key=lambda e: (e["chapter"], e["source"] or ""))
    groups = sorted(counts)
    height = 1.4 + 0.5 * max(len(groups), 1)
    fig, axes = plt.subplots(1, len(profiles), figsize=(8, height), sharey=True, sharex=True,
                             layout="constrained", squeeze=False)
    y = list(range(len(groups)))
    most = max((sum(counts[g][profiles[0]].values()) for g in groups), default=1)
    for ax, p in zip(axes[0], profiles):
        left = [0] * len(groups)
        for v in S.VERDICTS:
            widths = [counts[g][p][v] for g in groups]
            ax.barh(y, widths, left=left, color=S.COLOURS[v], height=0.7, edgecolor="white", linewidth=0.6)
            for yi, (l0, w) in enumerate(zip(left, widths)):
                if w:
                    ax.text(l0 + w / 2, yi, str(w), ha="center", va="center", fontsize=8.5, color="white")
            left = [a + b for a, b in zip(left, widths)]
        ran = sum(counts[g][p][v] for g in groups for v in S.VERDICTS if v != S.NOT_RUN)
        ax.set_title(PROFILE_TITLES.get(p, p) + ("" if ran else "\nno run stored"), fontsize=10)
        ax.set_xlim(0, most * 1.02 + 0.5)
        ax.set_xlabel("claims", fontsize=9)
        ax.tick_params(labelsize=8.5)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][0].set_yticks(y, [_row_label(c, s, root) for c, s in groups], fontsize=9)
    axes[0][0].invert_yaxis()
    handles = [Patch(color=S.COLOURS[v], label=v) for v in S.VERDICTS]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=9.5)
    return fig


def counts_html(entries: Sequence[dict[str, Any]], profiles: Sequence[str] = S.PROFILE_COLUMNS,
                style: bool = True) -> str:
    """A short table: per paper, how many claims each profile reproduced, partly, did not, or did not run."""
    counts = verdict_counts(entries, profiles)
    totals = Counter(e["source"] for e in entries)
    head = "".join(f"<th>{html.escape(p)}</th>" for p in profiles)
    rows = []
    for src in sorted(counts, key=lambda s: s or "~"):
        cells = []
        for p in profiles:
            chips = " ".join(
                f'<span class="ml-badge" style="background:{S.COLOURS[v]}" title="{html.escape(v)}: '
                f'{counts[src][p][v]}">{S.BADGE[v][0]} {counts[src][p][v]}</span>'
                for v in S.VERDICTS if counts[src][p][v])
            cells.append(f'<td data-label="{html.escape(p)}">{chips}</td>')
        name = S.PAPERS.get(src or "", "other")
        rows.append(f'<tr><td class="ml-td-claim" data-label="paper">{html.escape(name)}</td>'
                    f'<td data-label="claims">{totals[src]}</td>' + "".join(cells) + "</tr>")
    cols = '<col style="width:31%"><col style="width:9%">' + "<col>" * len(profiles)
    table = (f'<table><colgroup>{cols}</colgroup><thead><tr><th>paper</th><th>claims</th>{head}</tr></thead>'
             f"<tbody>{''.join(rows)}</tbody></table>")
    return (S.STYLE if style else "") + f'<div class="ml-sc ml-counts">{S.legend()}{table}</div>'


def chapters_html(entries: Sequence[dict[str, Any]], profiles: Sequence[str] = S.PROFILE_COLUMNS,
                  href: Callable[[str], str] = lambda stem: f"../chapters/{stem}.html",
                  root: str | os.PathLike | None = None) -> str:
    """Per-claim detail, a section per chapter headed by its title (a link to the chapter)."""
    parts = [S.STYLE, '<div class="ml-sc">']
    chapters = list(dict.fromkeys(e["chapter"] for e in entries))
    for ch in chapters:
        parts.append(f'<h3 id="sc-{html.escape(ch)}"><a href="{html.escape(href(ch))}">'
                     f"{html.escape(S.chapter_title(ch, root))}</a></h3>")
        parts.append(S.claims_html([e for e in entries if e["chapter"] == ch], profiles, style=False))
    parts.append("</div>")
    return "".join(parts)


PARTS = ("figure", "counts", "chapters")


def show(parts: Sequence[str] = PARTS, results: str | os.PathLike | None = None,
         href: Callable[[str], str] = lambda stem: f"../chapters/{stem}.html",
         project: str | os.PathLike | None = None) -> None:
    """Display ``parts`` of the overview: the figure, the counts per paper, every chapter's claims.

    ``results`` is the results folder (default :func:`marginlab.config.results_dir`), ``project``
    the book's root holding ``chapters/`` (for the chapter titles); ``href`` maps a chapter's
    file stem to its page, relative to the page showing the overview.
    """
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts must be among {PARTS}, got {sorted(unknown)}")
    entries = S.book_entries(results)
    if not entries:
        display(HTML("<p><em>No chapter has written results yet: run the chapters "
                     "(<code>pytest --nbval-lax chapters</code>) before building the book.</em></p>"))
        return
    for part in parts:
        if part == "figure":
            fig = overview_figure(entries, root=project)
            display(fig)
            plt.close(fig)
        elif part == "counts":
            display(HTML(counts_html(entries)))
        else:
            display(HTML(chapters_html(entries, href=href, root=project)))
