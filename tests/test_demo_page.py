"""The next-token demo page in real headless Chromium, against a real server."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

from serve_helpers import make_run_dir, running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    # A wide init gives peaked distributions, so temperature changes are plain to see.
    run = make_run_dir(tmp_path_factory.mktemp("demo-run"), tokenizer_dir, initializer_range=0.1)
    with running_server(run) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


def api(server: str, prompt: str, temperature: float, top_k: int = 0) -> dict:
    body = json.dumps({"prompt": prompt, "temperature": temperature, "top_k": top_k, "top": 20}).encode()
    req = urllib.request.Request(server + "/v1/next_token", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def bars(frame) -> list[tuple[int, float, str]]:
    return frame.eval_on_selector_all(
        ".bar", "els => els.map(e => [Number(e.dataset.id), Number(e.dataset.prob), e.dataset.text])")


def wait_for_bars(frame, expected: dict, timeout: float = 15) -> list[tuple[int, float, str]]:
    """Poll until the page shows the API's distribution, ids and probabilities (it refreshes a
    little after each input; temperature keeps the order, so the ids alone would match early)."""
    want = [(t["id"], t["prob"]) for t in expected["tokens"]]
    deadline = time.time() + timeout
    while True:
        got = bars(frame)
        same = len(got) == len(want) and all(g[0] == i and abs(g[1] - p) <= 1e-5 * p
                                             for g, (i, p) in zip(got, want, strict=True))
        if same:
            return got
        assert time.time() < deadline, f"bars {got[:3]} never matched the API's {want[:3]}"
        time.sleep(0.1)


def test_type_reshape_click_and_embed(server: str, browser) -> None:
    page = browser.new_page(viewport={"width": 900, "height": 900})
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready]")
    prefix = page.locator("#prefix")
    prefix.fill("")
    prefix.press_sequentially("def add(a, b", delay=20)
    text = "def add(a, b"

    expected = api(server, text, 1.0)
    shown = wait_for_bars(page, expected)
    chips = page.eval_on_selector_all(".tok", "els => els.map(e => e.textContent)")
    assert len(chips) == len(expected["prompt_tokens"]) and "".join(chips).replace("\u2423", " ") == text

    # Lower temperature: the distribution sharpens, the top bar grows.
    page.eval_on_selector("#temp", "el => { el.value = '0.4'; el.dispatchEvent(new Event('input')); }")
    sharp = api(server, text, 0.4)
    shown_sharp = wait_for_bars(page, sharp)
    assert shown_sharp[0][1] > shown[0][1] + 0.05
    assert page.inner_text("#temp-value") == "0.40"

    # top-k 3 leaves exactly three bars.
    page.fill("#topk", "3")
    wait_for_bars(page, api(server, text, 0.4, 3))
    assert len(bars(page)) == 3

    # Click a token: it is appended to the prefix and the page moves on.
    _, _, token_text = bars(page)[1]
    page.locator(".bar").nth(1).click()
    assert prefix.input_value() == text + token_text
    wait_for_bars(page, api(server, text + token_text, 0.4, 3))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-page.png"), full_page=True)

    # Embedded in an iframe of a page from another origin (another port), compact mode.
    host = browser.new_page(viewport={"width": 700, "height": 600})
    with host_page(f'<h3>host page</h3><iframe src="{server}/?embed=1" width="640" height="480"></iframe>') as url:
        host.goto(url)
        frame = host.frame_locator("iframe")
        frame.locator("body[data-ready]").wait_for()
    assert frame.locator("h1").is_hidden()
    inner = host.frames[1]
    wait_for_bars(inner, api(server, "def ", 1.0))
    host.screenshot(path=str(ARTIFACTS / "demo-embedded.png"))


@contextmanager
def host_page(html: str) -> Iterator[str]:
    """Serve one HTML page from its own loopback origin."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html.encode())

        def log_message(self, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()
