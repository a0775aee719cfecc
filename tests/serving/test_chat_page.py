"""The chat page at `/`: served as static files (plain HTTP), then driven in headless
chromium (marker `browser`: selenium + Debian's chromium and chromium-driver)."""

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from serving_helpers import request, start_server

STATIC = Path(__file__).parents[2] / "src" / "deepseek_tf" / "serving" / "static"


@pytest.fixture(scope="module")
def page_server(loaded):
    srv, app, url = start_server(*loaded, api_key="sekret", max_tokens=32, warm_up=True)
    yield app, url
    srv.shutdown()
    srv.server_close()
    app.batcher.stop()


def _get(url, path):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def test_the_page_and_its_files_are_served_without_a_key(page_server):
    _, url = page_server
    status, headers, html = _get(url, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert _get(url, "/chat")[2] == html
    assets = re.findall(rb'(?:src|href)="(/static/[^"]+)"', html)
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    assert len(assets) == 3
    for asset in assets:
        status, headers, data = _get(url, asset.decode())
        assert status == 200 and data == (STATIC / asset.decode()[8:]).read_bytes()
        assert headers["Content-Type"].startswith(types[Path(asset.decode()).suffix])
    for path in ["/static/nope.js", "/static/../server.py", "/static/", "/index.html"]:
        status, body = request(url, "GET", path)
        assert status == 404 and body["error"]["code"] == "not_found"
    status, body = request(url, "POST", "/", {})
    assert status == 405


def test_the_page_fetches_nothing_from_elsewhere():
    for file in STATIC.iterdir():
        text = file.read_text(encoding="utf-8")
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
        assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", text, re.I), file.name
        assert "<script>" not in text and "style=" not in text  # nothing inline (CSP)


# -- in a browser ------------------------------------------------------------------------------
def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]:
        options.add_argument(arg)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _wait(driver, condition, seconds=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition(d))


def _set(driver, element_id, value):
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
        element_id,
        value,
    )


# Every length the reply's text takes on the page, in order (a MutationObserver).
RECORD = """
window.lengths = [];
new MutationObserver(() => {
  const box = document.querySelector('.msg.assistant .content');
  if (box) window.lengths.push(box.textContent.length);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""


def _severe(driver):
    """Console errors, less the 401 the page's first model lookup gets before the key."""
    logs = driver.get_log("browser")
    return [
        e["message"] for e in logs if e["level"] == "SEVERE" and "status of 401" not in e["message"]
    ]


@pytest.mark.browser
def test_a_chat_streams_into_the_page(page_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, url = page_server
    driver = _browser()
    try:
        driver.get(url + "/")
        _wait(driver, lambda d: "ready" in d.find_element(By.ID, "server-status").text)
        _set(driver, "api-key", "sekret")
        _wait(driver, lambda d: d.find_element(By.ID, "model-name").text == "model: tiny")
        _set(driver, "temperature", "0")
        _set(driver, "max-tokens", "24")
        driver.execute_script(RECORD)
        box = driver.find_element(By.ID, "message-input")
        box.send_keys("Hi", Keys.ENTER)
        reply = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
        _wait(driver, lambda d: reply.get_attribute("data-state") == "done")
        text = reply.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")
        lengths = driver.execute_script("return window.lengths")
        assert int(reply.get_attribute("data-updates")) > 1
        assert len(set(lengths)) > 1 and lengths == sorted(lengths)  # it grew, in steps
        body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
        status, direct = request(
            url,
            "POST",
            "/v1/chat/completions",
            {**body, "max_tokens": 24},
            {"Authorization": "Bearer sekret"},
        )
        assert status == 200 and text == direct["choices"][0]["message"]["content"] != ""
        tokens = reply.find_elements(By.CSS_SELECTOR, ".tok")
        assert "".join(t.get_attribute("textContent") for t in tokens) == text
        assert "p = " in tokens[0].get_attribute("title")
        assert re.fullmatch(r"[0-9.]+", driver.find_element(By.ID, "rate").text)
        assert driver.find_element(By.ID, "token-count").text == "24"
        assert _severe(driver) == []  # no script error, nothing the CSP refused
        shot = tmp_path / "chat_page.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("DEEPSEEK_TF_SCREENSHOT_DIR"):
            target = Path(os.environ["DEEPSEEK_TF_SCREENSHOT_DIR"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, target / shot.name)
        # a second turn no longer fits the 48-token context: the page shows the server's error
        box.send_keys("And how are you today, my friend?", Keys.ENTER)
        error = driver.find_element(By.ID, "error")
        _wait(driver, lambda d: error.is_displayed())
        assert "context" in error.text
    finally:
        driver.quit()


@pytest.mark.browser
def test_the_stop_button_cancels_the_generation(loaded):
    from selenium.webdriver.common.by import By

    srv, app, url = start_server(*loaded, max_tokens=32, warm_up=False)
    app.batcher.stop()  # nothing is generated: the reply waits until stopped
    jobs, submit = [], app.submit
    app.submit = lambda *args: jobs.append(submit(*args)) or jobs[-1]
    driver = _browser()
    try:
        driver.get(url + "/chat")
        driver.find_element(By.ID, "message-input").send_keys("Hi")
        driver.find_element(By.ID, "send").click()
        _wait(driver, lambda d: len(jobs) == 1, 10)
        time.sleep(0.2)
        assert not jobs[0].cancelled
        driver.find_element(By.ID, "stop").click()
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
        _wait(driver, lambda d: reply.get_attribute("data-state") == "stopped", 10)
        _wait(driver, lambda d: jobs[0].cancelled, 5)  # the server saw the fetch abort
        assert driver.find_element(By.ID, "send").is_enabled()
    finally:
        driver.quit()
        srv.shutdown()
        srv.server_close()
