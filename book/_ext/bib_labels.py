"""Sphinx extension: a pybtex "alpha" bibliography style that keeps a year suffix in its labels.

Two papers with the same authors and year carry ``year = {2019a}`` and ``year = {2019b}`` in
``references.bib``, so that sphinxcontrib-bibtex's author-year citations read "Nar et al., 2019a"
and "Nar et al., 2019b" (its year template prints the field as written). pybtex's alpha labels take
the last two characters of the year ("9a"); this style takes the last two digits and appends the
suffix ("NOSR19a"). Select it with ``bibtex_default_style: alpha_year_suffix``.
"""
from __future__ import annotations

import re

from pybtex.database import Entry
from pybtex.plugin import register_plugin
from pybtex.style.formatting.alpha import Style as AlphaStyle
from pybtex.style.labels.alpha import LabelStyle as AlphaLabelStyle

STYLE_NAME = "alpha_year_suffix"
_YEAR_WITH_SUFFIX = re.compile(r"(\d{4})([a-z]+)")


class YearSuffixLabelStyle(AlphaLabelStyle):
    """Alpha labels computed from the four-digit year, with the letter suffix of ``year`` appended."""

    def format_label(self, entry: Entry) -> str:
        match = _YEAR_WITH_SUFFIX.fullmatch(entry.fields.get("year", ""))
        if match is None:
            return super().format_label(entry)
        fields = dict(entry.fields)
        fields["year"] = match.group(1)
        plain = Entry(entry.type, fields=fields, persons=entry.persons)
        return super().format_label(plain) + match.group(2)


class Style(AlphaStyle):
    """pybtex's alpha style with :class:`YearSuffixLabelStyle` labels."""

    default_label_style = YearSuffixLabelStyle


def setup(app):
    register_plugin("pybtex.style.formatting", STYLE_NAME, Style, force=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
