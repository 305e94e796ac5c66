"""The rendered book in a real browser: headless Chromium opens the intro, a chapter and the scorecard.

Checks what a reader sees: the page loads, every figure image has a non-zero size, math is typeset
or present as TeX source, and the browser console shows no errors from the book's own files
(external CDNs cannot be reached here and are ignored). Screenshots go to ``$MARGINLAB_ARTIFACTS``
(default ``test-artifacts/``).
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
PAGES = ["book/intro.html", "chapters/01_two_point_dynamics.html", "book/scorecard.html"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (installed by .ci/run)"),
]


@pytest.fixture(scope="module")
def server(built_book: Path):
    handler = functools.partial(_QuietHandler, directory=str(built_book))
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
                 "--disable-dev-shm-usage", "--window-size=1280,2000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_in_chromium(page, server, browser):
    browser.get(f"{server}/{page}")
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.find_elements("css selector", "article h1"), "the page has no title"

    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('article img')).map("
        "i => [i.src, i.complete, i.naturalWidth, i.naturalHeight])")
    for src, complete, w, h in images:
        assert complete and w > 0 and h > 0, f"image {src} did not load ({w}x{h})"

    text = browser.execute_script("return document.querySelector('article').innerText")
    math_nodes = browser.find_elements("css selector", "mjx-container, .math")
    if "notation" in page or "$" in text or "\\(" in text:
        assert math_nodes or "\\(" in text or "$" in text

    origin = server
    errors = [e for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and origin in e.get("message", "")]
    assert not errors, f"console errors from the book's own files: {errors}"

    artifacts = Path(os.environ.get("MARGINLAB_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / (page.replace("/", "_").replace(".html", ".png"))))


def test_chapter_page_shows_its_figures(server, browser):
    """Chapter 1 is executed in the test build: its figures must reach the reader."""
    browser.get(f"{server}/chapters/01_two_point_dynamics.html")
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('article .cell_output img')).map(i => i.naturalWidth)")
    assert sizes and min(sizes) > 0, f"chapter 1 shows no figure images: {sizes}"


def test_download_button_offers_a_notebook(server, browser):
    browser.get(f"{server}/chapters/01_two_point_dynamics.html")
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href') || '')")
    assert any(h.endswith("01_two_point_dynamics.ipynb") for h in links), "no .ipynb download link"
    import json
    import urllib.request

    with urllib.request.urlopen(f"{server}/_sources/chapters/01_two_point_dynamics.ipynb") as r:
        nb = json.load(r)
    assert nb["nbformat"] == 4 and any(c["cell_type"] == "code" for c in nb["cells"])
