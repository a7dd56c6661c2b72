"""The chat page in a real browser: headless Chromium driven over its DevTools protocol.

Types a message, sees the streamed reply with its reasoning block and stats, stops a long reply,
checks that markdown from the model cannot inject HTML, and that conversations survive a reload.
A screenshot is kept in the test's tmp_path (printed with -s)."""

import base64
import itertools
import json
import os
import shutil
import subprocess
import time

import pytest
from server_helpers import free_port, r1_tiny, running_server

websocket = pytest.importorskip("websocket")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
if CHROMIUM is None and os.environ.get("CI") == "true":
    raise RuntimeError("CI needs Chromium for the page test: .ci/run installs Debian's chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")


class Browser:
    """The few DevTools commands the test needs, over one websocket."""

    def __init__(self, tmp_path):
        import httpx2 as httpx

        port = free_port()
        self.proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}",
                                      "--window-size=1100,800", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30)
        self.ids = itertools.count(1)

    def send(self, method, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def type_and_enter(self, text):
        self.js("document.getElementById('input').focus()")
        self.send("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def click(self, element_id):
        box = self.js(f"(() => {{ const r = document.getElementById('{element_id}').getBoundingClientRect();"
                      f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def close(self):
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def url():
    with running_server(r1_tiny(), "--max-tokens", "4000") as u:
        yield u


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()


LAST_REPLY = "document.querySelector('.msg.assistant:last-child')"


def test_page_streams_a_reply_with_reasoning_and_stats_and_stops(url, browser, tmp_path):
    import httpx2 as httpx

    browser.send("Page.navigate", url=url + "/")
    browser.wait("document.readyState === 'complete' && document.getElementById('model').textContent.startsWith('Model')")
    browser.js("document.getElementById('temp').value = '0'; document.getElementById('maxtokens').value = '24'")
    browser.type_and_enter("Hello there")
    stats = browser.wait(f"{LAST_REPLY} && {LAST_REPLY}.querySelector('.stats').textContent")
    assert stats.startswith("24 tokens")
    # R1's template opens <think>: what the model says streams into the reasoning block
    reasoning = browser.js(f"{LAST_REPLY}.querySelector('details.reasoning .text').textContent")
    assert reasoning and browser.js(f"{LAST_REPLY}.querySelector('details.reasoning').style.display") == ""
    assert "tok/s" in stats and "cached" in stats
    assert browser.js("document.querySelector('.msg.user').textContent").endswith("Hello there")
    shot = tmp_path / "page.png"
    shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
    print(f"screenshot: {shot}")

    # a long reply (the server's 4000 tokens at most), stopped from the page: the server frees the slot
    browser.js("document.getElementById('maxtokens').value = ''")
    browser.type_and_enter("Now a very long one")
    browser.wait(f"document.querySelectorAll('.msg.assistant').length === 2 && "
                 f"{LAST_REPLY}.querySelector('details.reasoning .text').textContent.length > 20")
    browser.click("stop")
    assert "stopped" in browser.wait(f"{LAST_REPLY}.querySelector('.stats').textContent")
    deadline = time.time() + 20
    while httpx.get(url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(url + "/health").json()["running"] == 0
    assert browser.js("document.getElementById('send').disabled") is False

    # conversations are kept in the browser
    browser.send("Page.reload")
    browser.wait("document.readyState === 'complete' && document.querySelectorAll('.msg').length === 4")
    assert browser.js("document.querySelector('#convs .conv').textContent") == "Hello there"


def test_markdown_from_the_model_cannot_inject_html(url, browser):
    browser.send("Page.navigate", url=url + "/")
    browser.wait("document.readyState === 'complete' && typeof markdown === 'function'")
    evil = ("<img src=x onerror=\"window.pwned=1\"> **bold** and `x<y` "
            "[link](javascript:alert(1)) [ok](https://example.com)\n\n```html\n<script>window.pwned=1</script>\n```")
    summary = browser.js(f"""(() => {{
        const root = markdown({json.dumps(evil)});
        document.getElementById('log').appendChild(root);
        return {{img: root.querySelectorAll('img, script').length, strong: root.querySelector('strong').textContent,
                 code: root.querySelector('p code').textContent, pre: root.querySelector('pre code').textContent,
                 links: [...root.querySelectorAll('a')].map(a => a.href), pwned: window.pwned || 0}};
    }})()""")
    assert summary == {"img": 0, "strong": "bold", "code": "x<y", "pre": "<script>window.pwned=1</script>",
                       "links": ["https://example.com/"], "pwned": 0}
