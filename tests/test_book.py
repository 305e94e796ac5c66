"""The book builds with Sphinx warnings (and broken references) as errors (fixture in conftest)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_every_page_is_rendered(built_book: Path):
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    for f in files:
        page = built_book / f"{f}.html"
        assert page.is_file(), f"missing page {page}"
        assert "<h1" in page.read_text(), page
    assert (built_book / "index.html").is_file()


def test_citations_resolve(built_book: Path):
    html = (built_book / "book" / "intro.html").read_text()
    assert 'class="bibtex-citation"' in html and 'href="references.html#id' in html
    refs = (built_book / "book" / "references.html").read_text()
    for name in ("Soudry", "Madry", "Carlini", "Hein", "Pang", "Cisse", "Moosavi-Dezfooli", "Rauber"):
        assert name in refs, name


def test_chapter_download_is_a_real_notebook(built_book: Path):
    """The download button of a chapter offers its source; the .md must parse as a notebook with code cells."""
    import jupytext

    source = built_book / "_sources" / "chapters" / "01_two_point_dynamics.md"
    assert source.is_file()
    nb = jupytext.read(source)
    assert any(c.cell_type == "code" for c in nb.cells)


def test_scorecards_render_as_tables_with_chapter_links(built_book: Path):
    """The scorecard page and each chapter's card use the shared renderer, one column per profile."""
    page = (built_book / "book" / "scorecard.html").read_text()
    assert 'class="ml-sc' in page
    for stem in ("01_two_point_dynamics", "04_differential_training"):
        assert f'href="../chapters/{stem}.html"' in page, stem
    chapter = (built_book / "chapters" / "01_two_point_dynamics.html").read_text()
    assert 'class="ml-sc' in chapter
    for profile in ("quick", "standard", "full"):
        assert f"<th>{profile}" in chapter, profile


def test_citation_labels_distinguish_the_two_2019_papers():
    """Nar et al. 2019a and 2019b get distinct bibliography labels (book/_ext/bib_labels.py)."""
    import sys

    from pybtex.database import parse_file

    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        from bib_labels import YearSuffixLabelStyle
    finally:
        sys.path.pop(0)
    bib = parse_file(str(ROOT / "book" / "references.bib"))
    nar = [e for e in bib.entries.values() if e.persons["author"][0].last_names == ["Nar"]]
    labels = sorted(YearSuffixLabelStyle().format_label(e) for e in nar)
    assert labels == ["NOSR19a", "NOSR19b"], labels


def test_prefilled_chapters_are_not_executed_again(tmp_path: Path):
    """The book test's build takes nbval's outputs from the jupyter-cache instead of executing the chapter;
    a chapter whose code changed since is executed."""
    import shutil
    import subprocess

    import jupytext

    from conftest import prefill_execution_cache

    if shutil.which("jupyter-book") is None:
        pytest.skip("jupyter-book is not installed")
    book = tmp_path / "book"
    book.mkdir()
    (book / "_config.yml").write_text('title: t\nexecute:\n  execute_notebooks: cache\nonly_build_toc_files: true\n')
    (book / "_toc.yml").write_text("format: jb-book\nroot: page\nchapters:\n  - file: other\n")
    header = (ROOT / "chapters" / "01_two_point_dynamics.md").read_text().split("\n# ")[0]
    cell = "```{code-cell} ipython3\nfrom pathlib import Path\nPath('executed_%s').touch()\nprint('fresh %s')\n```\n"
    for name in ("page", "other"):
        (book / f"{name}.md").write_text(f"{header}# {name}\n\n{cell % (name, name)}")
    executed = {}
    for name in ("page", "other"):
        nb = jupytext.read(book / f"{name}.md")
        code = next(c for c in nb.cells if c.cell_type == "code")
        code.outputs = [{"output_type": "stream", "name": "stdout", "text": f"cached {name}\n"}]
        executed[book / f"{name}.md"] = nb
    changed = (cell % ("other", "other")).replace("print(", "x = 1\nprint(")
    (book / "other.md").write_text(f"{header}# other\n\n{changed}")  # its code changed after nbval ran it
    out = tmp_path / "out"
    assert prefill_execution_cache(out / "_build" / ".jupyter_cache", executed) == [book / "page.md"]
    proc = subprocess.run(["jupyter-book", "build", str(book), "--path-output", str(out), "-W"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (out / "_build" / "html" / "page.html").read_text()
    other = (out / "_build" / "html" / "other.html").read_text()
    assert "cached page" in page and not (book / "executed_page").exists()
    assert "fresh other" in other and (book / "executed_other").exists()
