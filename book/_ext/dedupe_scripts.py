"""Sphinx extension: drop duplicate <script> entries from every page.

sphinx-thebe 0.3 registers its inline configuration script each time the environment reads
documents, so an executed book declares ``const THEBE_JS_URL`` twice and the browser reports a
SyntaxError. Keeping the first of identical scripts leaves the page as intended.
"""
from __future__ import annotations


def _dedupe(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        key = (getattr(js, "filename", str(js)) or "",  # inline scripts carry None or ""
                tuple(sorted((getattr(js, "attributes", {}) or {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedupe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
