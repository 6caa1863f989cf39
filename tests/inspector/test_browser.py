"""The inspector page in a real headless Chromium (Debian's chromium + chromedriver, via selenium).

The app runs under uvicorn in a thread on a free 127.0.0.1 port. The test opens a tree, expands a
node, reads its text, opens the node whose step is an HTML/script payload and asserts it shows as
literal text and ran nothing, and opens the node whose step holds Unicode bidi overrides and asserts
they are shown as marks, not applied. A second server, bound as if to the network, needs its token:
the page opened with ``?token=`` works in the browser by its cookie. It saves screenshots (to
``$TREEPLAY_ARTIFACTS`` when set, else the test's temp folder). Skips, naming what is missing,
without chromium, chromedriver or selenium.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.inspector.inspect_store import BIDI_STEP, MARKUP_STEP, XSS_RATIONALE, XSS_STEP, build_inspect_store

pytestmark = pytest.mark.browser

CHROMEDRIVER = "/usr/bin/chromedriver"


def _missing() -> list[str]:
    missing = []
    if not (shutil.which("chromium") or Path("/usr/bin/chromium").exists()):
        missing.append("chromium (apt-get install chromium)")
    if not Path(CHROMEDRIVER).exists():
        missing.append(f"{CHROMEDRIVER} (apt-get install chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium Python package")
    return missing


def _start(app):
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; returns (server, thread, port)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    return server, thread, port


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tiny_model_dir):
    if missing := _missing():
        pytest.skip("browser test needs " + " and ".join(missing))
    from treeplay.orchestrator.web.app import create_app

    data = build_inspect_store(tmp_path_factory.mktemp("inspect"), tiny_model_dir)
    server, thread, port = _start(create_app(data.url))
    yield f"http://127.0.0.1:{port}", data
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(base_url, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("TREEPLAY_ARTIFACTS")
    out = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _wait(driver, predicate, what: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: predicate(d), message=what)


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(
        driver, lambda d: d.execute_script("return document.body.dataset.ready") == "1", f"page {url} to load"
    )


def _row(driver, node_id: int):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'.row[data-node-id="{node_id}"]')


def test_tree_page_expands_shows_text_and_runs_no_model_text(base_url, browser, shots):
    from selenium.webdriver.common.by import By

    base, data = base_url
    _open(browser, f"{base}/#/tree/{data.tree_ids[1]}")
    # the root is open: its children are listed; find one that has children of its own and expand it
    rows = browser.find_elements(By.CSS_SELECTOR, ".tree > li > ul > li > .row")
    assert rows, "the root's children are shown"
    parent = next(r for r in rows if r.find_element(By.CSS_SELECTOR, ".toggle").is_enabled())
    parent_id = parent.get_attribute("data-node-id")
    parent.find_element(By.CSS_SELECTOR, ".toggle").click()
    grandkids = f'li[data-node-id="{parent_id}"] > ul > li .step'
    _wait(
        browser,
        lambda d: any(e.is_displayed() and e.text for e in d.find_elements(By.CSS_SELECTOR, grandkids)),
        "children",
    )
    child = browser.find_elements(By.CSS_SELECTOR, grandkids)[0]
    child_text = child.text
    child.click()  # open its details
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail pre.fulltext"), "node detail")
    fulltext = browser.find_element(By.CSS_SELECTOR, "#detail pre.fulltext").text
    assert child_text.strip() and child_text.strip() in fulltext
    browser.save_screenshot(str(shots / "tree.png"))

    # the hostile tree: payload and markup steps are text, nothing ran, no element was made from them
    _open(browser, f"{base}/#/node/{data.xss_node}")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail pre.step-text"), "payload node detail")
    assert browser.find_element(By.CSS_SELECTOR, "#detail pre.step-text").text == XSS_STEP
    assert _row(browser, data.xss_node).find_element(By.CSS_SELECTOR, ".step").text == XSS_STEP
    assert _row(browser, data.markup_node).find_element(By.CSS_SELECTOR, ".step").text == MARKUP_STEP
    assert XSS_RATIONALE in browser.find_element(By.CSS_SELECTOR, "#detail table.judgments").text
    assert (
        "<ul><li>1. answer is a number</li></ul>"
        in browser.find_element(By.CSS_SELECTOR, "#detail pre.rubric").text
    )
    time.sleep(0.3)  # give an <img onerror> a chance to fire, had one been made
    assert browser.execute_script("return typeof window.__xss") == "undefined"
    made = "return document.querySelectorAll('img, b, i, [onerror], [onmouseover], script:not([src])').length"
    assert browser.execute_script(made) == 0
    scripts = browser.execute_script("return [...document.scripts].map(s => s.getAttribute('src'))")
    assert scripts == ["/static/app.js"]
    browser.save_screenshot(str(shots / "xss-node.png"))
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no script errors, no CSP violations


def test_run_page_draws_curves_and_pair_browser_links_to_nodes(base_url, browser, shots):
    from selenium.webdriver.common.by import By

    base, data = base_url
    _open(browser, f"{base}/#/run/{data.run_id}")
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) == 2  # reward (the only kind this run logged) and "any metric"
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline")  # the measured series are drawn
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.iterations tbody tr")) == 2
    browser.save_screenshot(str(shots / "run.png"))

    _open(browser, f"{base}/#/run/{data.run_id}/pairs?source=panel")
    cards = browser.find_elements(By.CSS_SELECTOR, "article.pair")
    assert [c.get_attribute("data-pair-id") for c in cards] == [str(data.panel_pair)]
    assert cards[0].find_element(By.CSS_SELECTOR, "pre.rejected").text.strip() == XSS_STEP
    browser.save_screenshot(str(shots / "pairs.png"))
    cards[0].find_element(By.CSS_SELECTOR, ".label.rejected a.node-link").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail pre.step-text"), "linked node")
    assert browser.find_element(By.CSS_SELECTOR, "#detail pre.step-text").text == XSS_STEP
    assert "current" in _row(browser, data.xss_node).get_attribute("class")
    assert browser.execute_script("return typeof window.__xss") == "undefined"


def test_regression_bidi_overrides_in_model_text_are_shown_not_applied(base_url, browser, shots):
    """U+202E and friends would make "24" display as "42"; the page shows them as visible marks and
    lays each model-text element out on its own (dir=auto, unicode-bidi: isolate)."""
    from selenium.webdriver.common.by import By

    base, data = base_url
    _open(browser, f"{base}/#/node/{data.bidi_node}")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail pre.step-text"), "bidi node detail")
    shown = "The answer is \\u202e24\\u202c, checked \\u2067twice\\u2069"
    controls = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
    for element in (
        _row(browser, data.bidi_node).find_element(By.CSS_SELECTOR, ".step"),
        browser.find_element(By.CSS_SELECTOR, "#detail pre.step-text"),
        browser.find_element(By.CSS_SELECTOR, "#detail pre.fulltext"),
    ):
        assert shown in element.text, element.text
        # nothing in the DOM text is a live bidi control
        assert not any(ch in browser.execute_script("return arguments[0].textContent", element) for ch in controls)
        assert element.get_attribute("dir") == "auto"
        assert element.value_of_css_property("unicode-bidi") == "isolate"
    marks = browser.find_elements(By.CSS_SELECTOR, "#detail pre.step-text .bidi-mark")
    assert [m.text for m in marks] == ["\\u202e", "\\u202c", "\\u2067", "\\u2069"]
    assert BIDI_STEP.count("\u202e") == 1
    browser.save_screenshot(str(shots / "bidi-node.png"))


@pytest.fixture(scope="module")
def token_server(base_url):
    """The same store served as on a network bind: a token is required."""
    from treeplay.orchestrator.web.app import create_app, new_token

    _, data = base_url
    token = new_token()
    server, thread, port = _start(create_app(data.url, host="0.0.0.0", token=token))
    yield f"http://127.0.0.1:{port}", token, data
    server.should_exit = True
    thread.join(timeout=10)


def test_token_page_opens_with_the_printed_url_and_then_by_cookie(token_server, browser, shots):
    from selenium.webdriver.common.by import By

    base, token, data = token_server
    browser.get(f"{base}/")
    assert "needs its token" in browser.find_element(By.TAG_NAME, "body").text  # 401, no page, no data
    assert data.run_name not in browser.page_source
    _open(browser, f"{base}/?token={token}#/run/{data.run_id}")
    assert token not in browser.current_url  # redirected: the token lives in an HttpOnly cookie
    assert browser.find_elements(By.CSS_SELECTOR, "table.iterations tbody tr")
    assert browser.execute_script("return document.cookie") == ""  # invisible to scripts
    _open(browser, f"{base}/#/")
    assert data.run_name in browser.find_element(By.CSS_SELECTOR, "table.runs").text
    browser.save_screenshot(str(shots / "token.png"))
