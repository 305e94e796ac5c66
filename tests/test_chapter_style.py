"""Chapter code fits the page: every code cell is ruff-formatted and no line exceeds 88 characters.

Fix with ``python -m marginlab.style chapters/*.md`` (formats in place; prints what is still
too long for a person to shorten).
"""
from __future__ import annotations

import ast
from pathlib import Path

import jupytext
import pytest

from marginlab import style

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.md"))

NOTEBOOK = '''---
jupytext:
  text_representation: {extension: .md, format_name: myst}
kernelspec: {display_name: Python 3, language: python, name: python3}
---

# A title with a `code span` that is    not code

```{code-cell} ipython3
:tags: [remove-input]
x = {'a':1,
  'b':2}
```

Text between cells.

````{code-cell} ipython3
---
mystnb:
  figure:
    caption: |
      A caption, kept as   it is.
---
%matplotlib inline
print(f"a long message about {x['a']} and {x['b']} that goes on and on well past the limit", len(x))
# a comment that is also far too long for the page and must therefore be wrapped onto two lines by the tool
y = 1
````
'''


def _cells(path: Path) -> list[str]:
    return [c.source for c in jupytext.read(path).cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_code_cells_fit_and_are_formatted(path: Path):
    sources = _cells(path)
    assert sources == [c.source for c in style.code_cells(path.read_text())], "parser disagrees with jupytext"
    long_lines = [f"cell {i}: {len(line)} chars: {line[:60]}…" for i, src in enumerate(sources)
                  for line in src.splitlines() if len(line) > style.LINE_LENGTH]
    unformatted = [i for i, (a, b) in enumerate(zip(sources, style.format_sources(sources))) if a.rstrip() != b]
    assert not long_lines and not unformatted, (
        f"{path.name}: run `python -m marginlab.style chapters/*.md`; lines over {style.LINE_LENGTH}: "
        f"{long_lines[:5]} ({len(long_lines)} in all); cells not ruff-formatted: {unformatted}")


def test_format_text_changes_only_code(tmp_path):
    new = style.format_text(NOTEBOOK)
    old_lines, new_lines = NOTEBOOK.splitlines(), new.splitlines()
    code = {i for c in style.code_cells(NOTEBOOK) for i in range(c.start, c.stop)}
    kept = [line for i, line in enumerate(old_lines) if i not in code]
    assert all(line in new_lines for line in kept)  # front matter, options, caption, Markdown: unchanged
    cells = style.code_cells(new)
    assert cells[0].source == 'x = {"a": 1, "b": 2}'
    assert cells[1].source.startswith("%matplotlib inline\n")  # magics survive
    assert all(len(line) <= 88 for c in cells for line in c.source.splitlines())
    # The split string is the same string: same syntax tree once the magic is set aside.
    before = style.code_cells(NOTEBOOK)[1].source.split("\n", 1)[1]
    after = cells[1].source.split("\n", 1)[1]
    assert ast.dump(ast.parse(before)) == ast.dump(ast.parse(after))
    assert style.format_text(new) == new  # idempotent
    assert style.check_text(new) == []


def test_check_reports_and_cli_fixes(tmp_path, capsys):
    problems = style.check_text(NOTEBOOK, "nb.md")
    assert any("not ruff-formatted" in p.message for p in problems)
    assert any("characters" in p.message and p.line == 25 for p in problems)
    path = tmp_path / "nb.md"
    path.write_text(NOTEBOOK)
    assert style.main(["--check", str(path)]) == 1
    assert style.main([str(path)]) == 0 and style.main(["--check", str(path)]) == 0
    assert "formatted" in capsys.readouterr().out
