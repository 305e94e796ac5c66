"""Sphinx extension: the pages that read ``results/`` are read after the chapters, and every time.

The intro and scorecard pages show the verdicts the chapters write when they execute. Sphinx
reads documents in alphabetical order, so ``book/*`` would be read before ``chapters/*`` and a
fresh build would show the previous run's quick results; and a page whose source did not change
would not be re-read at all.
"""
from __future__ import annotations

RESULT_READERS = ("book/intro", "book/scorecard")


def _readers_last(app, env, docnames):
    docnames[:] = [d for d in docnames if d not in RESULT_READERS] + [
        d for d in docnames if d in RESULT_READERS
    ]


def _readers_always_outdated(app, env, added, changed, removed):
    return [d for d in RESULT_READERS if d in env.found_docs]


def setup(app):
    app.connect("env-before-read-docs", _readers_last)
    app.connect("env-get-outdated", _readers_always_outdated)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
