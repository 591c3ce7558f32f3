"""The built documentation site, opened in headless Chromium with no network.

Build the site first (`sphinx-build -W --keep-going -b html docs docs/_build/html`); the tests
are skipped, with the reason, when the site or Debian's `chromium` is missing, unless
LPWD_REQUIRE_DOCS_SITE=1 (set by .ci/run), which turns the skip into a failure. Screenshots go
to docs/_build/screenshots (or $LPWD_DOCS_SCREENSHOTS).
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest

from tests._chromium import Browser, find_chromium

pytestmark = pytest.mark.docs

ROOT = pathlib.Path(__file__).resolve().parent.parent
SITE = ROOT / "docs" / "_build" / "html"
SCREENSHOTS = pathlib.Path(
    os.environ.get("LPWD_DOCS_SCREENSHOTS", ROOT / "docs" / "_build" / "screenshots")
)
MATH_PAGE = "api/_generated/lpwd_optax.weight_decay.html"
FIGURE_PAGE = "guides/results.html"
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

# After the page's scripts ran: wait for MathJax's first typeset, then describe every math
# element Sphinx wrote (class "math"): rendered (holds a MathJax container with a visible SVG),
# raw TeX left in it, and MathJax's error nodes.
MATH_STATE_JS = """
(async () => {
  if (!window.MathJax || !MathJax.startup) return {mathjax: false};
  await MathJax.startup.promise;
  const elements = [...document.querySelectorAll('.math')];
  const visible = (el) => {
    const svg = el.querySelector('mjx-container svg');
    return !!svg && svg.getBoundingClientRect().width > 0;
  };
  return {
    mathjax: true,
    total: elements.length,
    display: document.querySelectorAll('div.math').length,
    rendered: elements.filter(visible).length,
    raw: elements.filter((el) => /\\\\[\\[\\(a-zA-Z]/.test(el.textContent)).map(
        (el) => el.textContent.slice(0, 80)),
    errors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length,
  };
})()
"""

IMAGES_JS = """
(async () => {
  const images = [...document.querySelectorAll('article img, main img')];
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  return images.map((img) => ({
    src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth,
    height: img.naturalHeight}));
})()
"""


def _require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("LPWD_REQUIRE_DOCS_SITE") == "1":
        pytest.fail(f"{reason} (LPWD_REQUIRE_DOCS_SITE=1 requires the site check)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    _require(chromium is not None, "Debian's chromium is not installed (apt-get install chromium)")
    _require(
        (SITE / "index.html").is_file(),
        "the site is not built: sphinx-build -W --keep-going -b html docs docs/_build/html",
    )
    with Browser(chromium) as b:
        yield b


def _open(browser: Browser, page: str) -> None:
    browser.open((SITE / page).as_uri())


def _assert_offline_and_clean(browser: Browser, page: str) -> None:
    remote = [u for u in browser.requested_urls() if not u.startswith(LOCAL_SCHEMES)]
    assert not remote, f"{page} requested the network: {remote}"
    assert not browser.failures(), f"{page}: {browser.failures()}"


def _math_pages() -> list[str]:
    return sorted(
        str(p.relative_to(SITE))
        for p in SITE.rglob("*.html")
        if '<span class="math' in (text := p.read_text()) or '<div class="math' in text
    )


def test_index_page(browser):
    _open(browser, "index.html")
    title = browser.evaluate("document.title")
    links = browser.evaluate(
        "[...document.querySelectorAll('nav a.reference.internal')].map(a => a.textContent)"
    )
    browser.screenshot(SCREENSHOTS / "index.png")
    assert "lpwd_optax" in title
    assert "Getting started" in links and "API reference" in links, links
    _assert_offline_and_clean(browser, "index.html")


def test_api_page_math_rendered(browser):
    _open(browser, MATH_PAGE)
    state = browser.evaluate(MATH_STATE_JS)
    doctests = browser.evaluate("document.querySelectorAll('div.doctest pre').length")
    source = browser.evaluate(
        "[...document.querySelectorAll('a.reference.internal')].filter("
        "a => a.textContent.includes('[source]')).map(a => a.href)"
    )
    browser.screenshot(SCREENSHOTS / "api_weight_decay.png", full_page=True)
    assert state["mathjax"], "MathJax did not load"
    assert state["display"] >= 1, state  # the docstring's `.. math::` block
    assert state["rendered"] == state["total"] and not state["raw"] and not state["errors"], state
    assert doctests >= 1, "the docstring example is not rendered as a doctest block"
    assert source and source[0].endswith("_modules/lpwd_optax/decay.html#weight_decay"), source
    _assert_offline_and_clean(browser, MATH_PAGE)


def test_every_equation_renders(browser):
    pages = _math_pages()
    assert MATH_PAGE in pages and len(pages) > 10, pages
    problems = {}
    for page in pages:
        _open(browser, page)
        state = browser.evaluate(MATH_STATE_JS)
        ok = state["mathjax"] and state["rendered"] == state["total"] > 0
        if not ok or state["raw"] or state["errors"]:
            problems[page] = state
        _assert_offline_and_clean(browser, page)
    assert not problems, problems


def test_guide_figures_load(browser):
    _open(browser, FIGURE_PAGE)
    images = browser.evaluate(IMAGES_JS)
    browser.evaluate("document.querySelector('figure img').scrollIntoView({block: 'start'})")
    browser.screenshot(SCREENSHOTS / "guide_results.png")
    assert len(images) >= 6, images
    broken = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, broken
    assert all(re.search(r"_images/\w+\.png$", i["src"]) for i in images), images
    _assert_offline_and_clean(browser, FIGURE_PAGE)
