"""Code cells of the chapters fit the page: formatted by ruff (black style), at most 88 columns.

``python -m marginlab.style chapters/*.md`` formats the code cells of MyST-markdown notebooks
in place (only the code between a ``{code-cell}`` fence and its closing fence changes; the
cell options, the Markdown and the front matter are kept byte for byte);
``python -m marginlab.style --check chapters/*.md`` reports, and exits 1 on, cells that are
not formatted or lines longer than 88 characters. Needs ``ruff`` (``pip install -e ".[dev]"``).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LINE_LENGTH = 88
_FENCE = re.compile(r"^(`{3,})\{code-cell\}")
_OPTION = re.compile(r"^:[\w-]+:")
# A line that is one string literal (an argument inside brackets), e.g. `    f"text {x} more",`
_STRING_LINE = re.compile(
    r"^(?P<indent>\s+)(?P<prefix>[fFrRbBuU]{0,2})(?P<q>[\"'])(?P<body>.*)(?P=q)(?P<tail>[,)\]}]*\s*)$"
)


@dataclass(frozen=True)
class Cell:
    """A code cell of a MyST notebook: its code occupies ``lines[start:stop]`` of the file."""

    start: int
    stop: int
    source: str


@dataclass(frozen=True)
class Problem:
    path: str
    line: int  # 1-based line of the file
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def code_cells(text: str) -> list[Cell]:
    """The code cells of a MyST-markdown notebook, with where their code sits in the text."""
    lines = text.splitlines()
    cells, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, i = m.group(1), i + 1
        if i < len(lines) and lines[i].strip() == "---":  # YAML options block
            i += 1
            while i < len(lines) and lines[i].strip() != "---":
                i += 1
            i += 1
        else:
            while i < len(lines) and _OPTION.match(lines[i]):
                i += 1
        start = i
        while i < len(lines) and lines[i].rstrip() != fence:
            i += 1
        cells.append(Cell(start, i, "\n".join(lines[start:i])))
        i += 1
    return cells


def _ruff() -> list[str]:
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    try:
        import ruff  # noqa: F401  (the PyPI wheel ships the binary and a module)
    except ImportError:
        raise RuntimeError("ruff is not installed: pip install -e '.[dev]' (or pip install ruff)") from None
    return [sys.executable, "-m", "ruff"]


def format_sources(sources: Sequence[str], line_length: int = LINE_LENGTH) -> list[str]:
    """The code cells ``sources`` formatted by ``ruff format`` as one notebook (magics are kept)."""
    if not sources:
        return []
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}},
          "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
                     "outputs": [], "source": s} for i, s in enumerate(sources)]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.ipynb"
        path.write_text(json.dumps(nb))
        proc = subprocess.run([*_ruff(), "format", "--isolated", "--line-length", str(line_length), str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ValueError(f"ruff format failed: {proc.stderr.strip() or proc.stdout.strip()}")
        cells = json.loads(path.read_text())["cells"]
    out = []
    for c in cells:
        src = c["source"]
        out.append(("".join(src) if isinstance(src, list) else src).rstrip("\n"))
    return out


def _bracket_depths(source: str) -> dict[int, int] | None:
    """Bracket depth at the start of each line (1-based) of ``source``; None if it does not tokenize."""
    depth, depths, in_fstring = 0, {}, 0
    try:
        for tok in tokenize.generate_tokens(iter(source.splitlines(keepends=True)).__next__):
            depths.setdefault(tok.start[0], depth)
            name = tokenize.tok_name[tok.type]
            if name == "FSTRING_START":
                in_fstring += 1
            elif name == "FSTRING_END":
                in_fstring -= 1
            elif tok.type == tokenize.OP and not in_fstring:
                depth += tok.string in "([{"
                depth -= tok.string in ")]}"
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    return depths


def _split_string_body(body: str, width: int) -> list[str] | None:
    """Cut a string literal's body at spaces outside ``{...}`` into pieces of at most ``width``."""
    words, level, current = [], 0, ""
    for ch in body:
        current += ch
        level += (ch == "{") - (ch == "}")
        if ch == " " and level == 0:
            words.append(current)
            current = ""
    words.append(current)
    pieces, line = [], ""
    for w in words:
        if line and len(line) + len(w) > width:
            pieces.append(line)
            line = ""
        line += w
    pieces.append(line)
    return pieces if len(pieces) > 1 and all(len(p) <= width for p in pieces) else None


def _shorten(source: str, line_length: int) -> str:
    """Split long string literals (inside brackets) into implicitly joined pieces and wrap long
    comments: the two kinds of long line that ``ruff format`` leaves alone."""
    depths = _bracket_depths(source)
    out = []
    for number, line in enumerate(source.splitlines(), start=1):
        if len(line) <= line_length:
            out.append(line)
            continue
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            out += textwrap.wrap(text, line_length, initial_indent=indent + "# ", subsequent_indent=indent + "# ",
                                 break_long_words=False, break_on_hyphens=False) or [line]
            continue
        m = _STRING_LINE.match(line)
        if m and depths and depths.get(number, 0) > 0 and '"""' not in line and "\\" not in m["body"] \
                and m["q"] not in m["body"]:
            prefix, q, tail = m["prefix"], m["q"], m["tail"].rstrip()
            room = line_length - len(m["indent"]) - len(prefix) - 2
            pieces = _split_string_body(m["body"], room - len(tail))
            if pieces:
                for k, piece in enumerate(pieces):
                    pre = prefix
                    if "f" in prefix.lower() and "{" not in piece and "}" not in piece:
                        pre = prefix.replace("f", "").replace("F", "")
                    out.append(f"{m['indent']}{pre}{q}{piece}{q}" + (tail if k == len(pieces) - 1 else ""))
                continue
        out.append(line)
    return "\n".join(out)


def check_text(text: str, path: str = "<text>", line_length: int = LINE_LENGTH) -> list[Problem]:
    """Lines longer than ``line_length`` and cells that ``ruff format`` would change."""
    cells = code_cells(text)
    problems = []
    for cell, formatted in zip(cells, format_sources([c.source for c in cells], line_length)):
        for k, line in enumerate(cell.source.splitlines()):
            if len(line) > line_length:
                problems.append(Problem(path, cell.start + k + 1, f"line of {len(line)} > {line_length} characters"))
        if formatted != cell.source.rstrip("\n"):
            problems.append(Problem(path, cell.start + 1, "cell is not ruff-formatted"))
    return problems


def format_text(text: str, line_length: int = LINE_LENGTH) -> str:
    """``text`` with every code cell formatted; everything outside the code is kept as it was.

    Long string literals inside brackets are split into implicitly joined pieces and long
    comments wrapped, since ruff leaves both alone; what is still too long is left to a person.
    """
    cells = code_cells(text)
    lines = text.splitlines()
    sources = format_sources([c.source for c in cells], line_length)
    sources = format_sources([_shorten(src, line_length) for src in sources], line_length)
    for cell, formatted in reversed(list(zip(cells, sources))):
        lines[cell.start:cell.stop] = formatted.splitlines() if formatted else []
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marginlab.style", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="MyST-markdown notebooks (chapters/*.md)")
    parser.add_argument("--check", action="store_true", help="report problems instead of formatting")
    parser.add_argument("--line-length", type=int, default=LINE_LENGTH)
    args = parser.parse_args(argv)
    status = 0
    for p in args.paths:
        text = Path(p).read_text()
        if args.check:
            problems = check_text(text, p, args.line_length)
            for problem in problems:
                print(problem)
            status |= bool(problems)
        else:
            new = format_text(text, args.line_length)
            if new != text:
                Path(p).write_text(new)
                print(f"formatted {p}")
            left = [q for q in check_text(new, p, args.line_length) if "characters" in q.message]
            for problem in left:  # long strings and comments: ruff does not split them
                print(f"{problem} (shorten by hand)")
            status |= bool(left)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
