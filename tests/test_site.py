"""The documentation site, opened page by page in headless Chromium.

The site is built with ``mkdocs build --strict`` and served over HTTP from a temporary
directory (the search index is fetched, which a ``file://`` page may not do). Every page is
loaded in Debian's Chromium driven by Selenium and checked for broken images, console
errors, and links to a page or an anchor of the site that does not exist; links to other
sites are not followed (CI has no network). A full-page screenshot of each page is written
to ``site-screenshots/`` (ignored by git) for a reviewer to look at.

Without Chromium and its driver (``apt-get install chromium chromium-driver``, which
``.ci/run`` does) the test is skipped, saying so.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "site-screenshots"

#: Tallest screenshot, in CSS pixels: a long page is cut there.
MAX_SCREENSHOT_HEIGHT = 12000


def chromium_paths() -> tuple[str, str]:
    """The Chromium binary and its driver, or a skip that says how to install them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver "
                    "(.ci/run installs them)")
    return browser, driver


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built from this checkout."""
    directory = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(directory)],
        cwd=ROOT, check=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300,
    )
    return directory


@pytest.fixture(scope="module")
def server(site):
    """An HTTP server of the built site on a free local port; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under Selenium, with the browser console log enabled."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def page_paths(site: Path) -> list[str]:
    """URL paths of the site's pages: ``/``, ``/math/``, ... (404.html excluded)."""
    pages = []
    for index in sorted(site.rglob("index.html")):
        relative = index.parent.relative_to(site).as_posix()
        pages.append("/" if relative == "." else f"/{relative}/")
    return pages


PAGE_FACTS = """
return {
  broken_images: [...document.images]
      .filter(image => !image.complete || image.naturalWidth === 0).map(image => image.src),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  ids: [...document.querySelectorAll('[id]')].map(element => element.id),
  height: document.documentElement.scrollHeight,
};
"""


def screenshot(driver, path: str, height: int) -> None:
    """A full-page screenshot (up to MAX_SCREENSHOT_HEIGHT) under site-screenshots/."""
    SCREENSHOTS.mkdir(exist_ok=True)
    name = path.strip("/").replace("/", "-") or "index"
    driver.set_window_size(1280, min(max(height, 900), MAX_SCREENSHOT_HEIGHT))
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    driver.set_window_size(1280, 900)


def test_every_page_loads_without_broken_images_links_anchors_or_console_errors(
    site, server, browser,
):
    facts = {}
    problems = []
    for path in page_paths(site):
        browser.get(server + path)
        page = browser.execute_script(PAGE_FACTS)
        facts[path] = page
        problems += [f"{path}: broken image {src}" for src in page["broken_images"]]
        problems += [
            f"{path}: console {entry['level']}: {entry['message']}"
            for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
        ]
        screenshot(browser, path, page["height"])
    assert len(facts) >= 9, f"only {len(facts)} pages found in {site}"
    for path, page in facts.items():
        for link in page["links"]:
            target, fragment = urldefrag(link)
            if not target.startswith(server):
                continue  # another site: not followed
            target_path = urlparse(target).path
            if target_path.endswith(("/index.html", ".html")):
                target_path = target_path.rsplit("/", 1)[0] + "/"
            if target_path not in facts and not (site / target_path.lstrip("/")).is_file():
                problems.append(f"{path}: link to a missing page {link}")
            elif fragment and fragment not in facts.get(target_path, {}).get("ids", [fragment]):
                problems.append(f"{path}: link to a missing anchor {link}")
    assert not problems, "\n".join(problems)
    assert len(list(SCREENSHOTS.glob("*.png"))) >= len(facts)
