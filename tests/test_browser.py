"""The rendered book in a real browser: headless Chromium opens every page as a reader would.

Checks what a reader sees, at a desktop width (1280 px) and a phone width (390 px): the page
loads, nothing runs past the content column (no table, code block or output scrolls sideways:
``scrollWidth <= clientWidth`` of each, and nothing ends right of the article), every figure
image has a non-zero size, the scorecard and intro pages open with the verdict overview,
chapters are named by their titles, math is typeset or present as TeX source, and the browser
console shows no errors from the book's own files (external CDNs cannot be reached here and
are ignored). A screenshot of each page at each width goes to ``$MARGINLAB_ARTIFACTS``
(default ``test-artifacts/``) for review.

``MARGINLAB_BOOK_HTML=<dir>`` checks an existing build (``<out>/_build/html``) instead of
building the book.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
WIDTHS = {"desktop": 1280, "phone": 390}
HEIGHT = 2400


def _toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return [f"{f}.html" for f in files]


PAGES = _toc_pages()
CHAPTER_PAGES = [p for p in PAGES if p.startswith("chapters/")]
OVERVIEW_PAGES = ["book/intro.html", "book/scorecard.html"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (installed by .ci/run)"),
]

# Everything that must fit the content column: tables (and the theme's scroll wrappers around
# them), code blocks, cell outputs and the scorecards.
OVERFLOW_JS = """
const article = document.querySelector('article');
const right = article.getBoundingClientRect().right;
const sel = 'table, pre, div.highlight, div.cell_output, div.output, .pst-scrollable-table-container, '
          + '.ml-sc, div.cell_input, img';
const out = [];
for (const el of article.querySelectorAll(sel)) {
  const r = el.getBoundingClientRect();
  if (r.width === 0 && r.height === 0) continue;            // hidden (e.g. collapsed details)
  const label = el.tagName.toLowerCase() + (el.className ? '.' + String(el.className).split(' ')[0] : '')
              + ': ' + (el.innerText || el.getAttribute('src') || '').slice(0, 60).replace(/\\s+/g, ' ');
  if (el.scrollWidth > el.clientWidth + 1 && el.tagName !== 'IMG')
    out.push(`scrolls sideways (${el.scrollWidth} > ${el.clientWidth}) ${label}`);
  if (r.right > right + 1) out.push(`ends ${Math.round(r.right - right)} px right of the column: ${label}`);
}
return out;
"""


@pytest.fixture(scope="module")
def book_html(request) -> Path:
    env = os.environ.get("MARGINLAB_BOOK_HTML")
    if env:
        return Path(env)
    return request.getfixturevalue("built_book")


@pytest.fixture(scope="module")
def server(book_html: Path):
    handler = functools.partial(_QuietHandler, directory=str(book_html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size=1280,{HEIGHT}", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(browser, url: str, width: int) -> None:
    """Load ``url`` in a viewport ``width`` px wide (a phone's when narrow: the page's viewport meta applies)."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": width < 600})
    browser.get(url)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    # Images load asynchronously after readyState in some builds: wait for them (bounded).
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).filter(i => !i.complete).map("
        "i => new Promise(r => { i.onload = i.onerror = r; }))).then(() => done());")


def _artifact(browser, page: str, kind: str) -> None:
    artifacts = Path(os.environ.get("MARGINLAB_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / f"{page.replace('/', '_').replace('.html', '')}-{kind}.png"))


@pytest.mark.parametrize("kind", list(WIDTHS))
@pytest.mark.parametrize("page", PAGES)
def test_page_fits_and_renders(page, kind, server, browser):
    _open(browser, f"{server}/{page}", WIDTHS[kind])
    _artifact(browser, page, kind)
    assert browser.find_elements("css selector", "article h1"), "the page has no title"

    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('article img')).map("
        "i => [i.src, i.complete, i.naturalWidth, i.naturalHeight])")
    for src, complete, w, h in images:
        assert complete and w > 0 and h > 0, f"image {src} did not load ({w}x{h})"

    overflow = browser.execute_script(OVERFLOW_JS)
    assert not overflow, f"{page} at {WIDTHS[kind]} px: " + "; ".join(overflow[:8]) + f" ({len(overflow)} in all)"

    text = browser.execute_script("return document.querySelector('article').innerText")
    math_nodes = browser.find_elements("css selector", "mjx-container, .math")
    if "notation" in page or "$" in text or "\\(" in text:
        assert math_nodes or "\\(" in text or "$" in text

    errors = [e for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and server in e.get("message", "")]
    assert not errors, f"console errors from the book's own files: {errors}"


@pytest.mark.parametrize("page", OVERVIEW_PAGES)
def test_overview_comes_first(page, server, browser):
    """The verdict overview (a figure drawn from the results files, then the counts per paper)
    opens the page, before any per-claim table."""
    _open(browser, f"{server}/{page}", WIDTHS["desktop"])
    found = browser.execute_script("""
        const outputs = Array.from(document.querySelectorAll('article div.cell_output'));
        const first = outputs[0];
        if (!first) return null;
        const img = first.querySelector('img');
        const counts = document.querySelector('article .ml-counts');
        const detail = Array.from(document.querySelectorAll('article .ml-sc:not(.ml-counts) table'))[0];
        return {img: img ? img.naturalWidth : 0,
                counts: counts ? counts.querySelectorAll('tbody tr').length : 0,
                order: !detail || !counts ||
                       (counts.compareDocumentPosition(detail) & Node.DOCUMENT_POSITION_FOLLOWING) > 0};
    """)
    assert found is not None, f"{page} has no cell output"
    assert found["img"] > 0, "the overview figure is missing or did not load"
    assert found["counts"] >= 1, "the counts per paper are missing"
    assert found["order"], "a claim table comes before the overview"


def test_scorecard_names_chapters_by_title_and_links_them(server, browser):
    _open(browser, f"{server}/book/scorecard.html", WIDTHS["desktop"])
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('article .ml-sc h3 a')).map(a => [a.innerText, a.href])")
    assert links, "the scorecard page has no chapter sections"
    for text, href in links:
        assert not re.match(r"^\d\d_", text), f"chapter named by its file stem: {text}"
        with urllib.request.urlopen(href) as r:
            assert r.status == 200, href
    # Verdicts are badges inside the column, one per profile and claim.
    badges = browser.execute_script(
        "return document.querySelectorAll('article .ml-sc:not(.ml-counts) td .ml-badge').length")
    rows = browser.execute_script("return document.querySelectorAll('article .ml-sc:not(.ml-counts) tbody tr').length")
    assert rows > 0 and badges == 3 * rows


def test_chapter_scorecard_uses_the_shared_renderer(server, browser):
    _open(browser, f"{server}/{CHAPTER_PAGES[0]}", WIDTHS["desktop"])
    headers = browser.execute_script(
        "return Array.from(document.querySelectorAll('article .ml-sc thead th')).map(t => t.innerText)")
    assert headers[:2] == ["claim", "paper"] and any(h.startswith("quick") for h in headers)
    assert {"standard", "full"} <= {h.split()[0] for h in headers}


def test_chapter_page_shows_its_figures(server, browser):
    """Chapter 1 is executed in the test build: its figures must reach the reader."""
    _open(browser, f"{server}/{CHAPTER_PAGES[0]}", WIDTHS["desktop"])
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('article .cell_output img')).map(i => i.naturalWidth)")
    assert sizes and min(sizes) > 0, f"chapter 1 shows no figure images: {sizes}"


def test_download_button_offers_a_notebook(server, browser):
    stem = Path(CHAPTER_PAGES[0]).stem
    _open(browser, f"{server}/{CHAPTER_PAGES[0]}", WIDTHS["desktop"])
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href') || '')")
    assert any(h.endswith(f"{stem}.ipynb") for h in links), "no .ipynb download link"
    import json

    with urllib.request.urlopen(f"{server}/_sources/chapters/{stem}.ipynb") as r:
        nb = json.load(r)
    assert nb["nbformat"] == 4 and any(c["cell_type"] == "code" for c in nb["cells"])
