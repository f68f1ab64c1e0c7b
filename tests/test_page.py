"""The status page at ``GET /`` in a real headless Chromium, driven over the DevTools protocol.

A real `llmux serve` runs real upstream children; the page is loaded in Chromium and watched
through ``Runtime.evaluate``: every wait is a bounded poll of the DOM, never a fixed sleep.
``LLMUX_SCREENSHOT=1`` also writes the desktop screenshot to docs/status-page.png.
Chromium comes from ``scripts/ensure-tool.sh`` (make test); the browser tests skip without it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from llmux.scheduling.events import Notice
from llmux.scheduling.state import PUBLIC_STATES
from llmux.static import status_page
from tests.conftest import Server, StartServer, upstream_cmd, wait_until
from tests.test_api import chat, two_llms
from tests.test_sleep_surface import sleepy_config

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not on PATH (make test installs it)"
)
DOCS_SCREENSHOT = Path(__file__).parent.parent / "docs" / "status-page.png"
DESKTOP = (1200, 900)
PHONE = (390, 844)
NARROWEST = 375


class PageError(AssertionError):
    pass


class Browser:
    """One headless Chromium and one page in it, spoken to over the DevTools websocket."""

    def __init__(self, workdir: Path) -> None:
        assert CHROMIUM is not None
        profile = workdir / "chromium-profile"
        profile.mkdir()
        self.log = workdir / "chromium.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={profile}",
                    "about:blank",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its helpers share our group: one killpg ends them all
            )
        self.session: str | None = None
        self._stack = contextlib.ExitStack()
        try:
            self._connect(profile / "DevToolsActivePort")
        except BaseException:
            self.close()
            raise

    def _connect(self, active: Path) -> None:
        def endpoint() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited: {self.log.read_text(errors='replace')}")
            lines = active.read_text().split() if active.exists() else []
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}" if len(lines) >= 2 else None

        url = wait_until(endpoint, 30, "chromium's DevToolsActivePort")
        self.ws: ClientConnection = self._stack.enter_context(connect(url, max_size=None))
        self._ids = itertools.count(1)
        self.problems: list[str] = []
        """Uncaught exceptions and security (CSP) messages of the page."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if self.session is not None:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + 30
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise PageError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self._event(reply)

    def _event(self, event: dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.problems.append(
                str(details.get("exception", {}).get("description") or details.get("text"))
            )
        elif event.get("method") == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("source") == "security" or "Content Security Policy" in entry.get(
                "text", ""
            ):
                self.problems.append(entry.get("text", ""))

    def eval(self, expression: str) -> Any:
        reply = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in reply:
            raise PageError(f"{expression!r}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 15.0) -> Any:
        """Poll ``expression`` in the page until it is truthy (a bounded wait, no sleeps)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}: {self.dump()}"
                )
            time.sleep(0.05)

    def dump(self) -> str:
        return str(
            self.eval(
                "JSON.stringify({conn: document.querySelector('#conn')?.textContent, "
                "rows: rows(), bar: bar(), feed: feed().slice(0, 8), "
                "notice: document.querySelector('#notice-text')?.textContent})"
            )
            if self.eval("typeof rows === 'function'")
            else self.eval("document.documentElement.outerHTML.slice(0, 2000)")
        )

    def viewport(self, width: int, height: int, *, mobile: bool) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
            "the page to load",
        )
        self.eval(PROBES)

    def screenshot(self, path: Path, width: int, *, mobile: bool) -> bytes:
        """The whole page (not only the viewport) at this width, as PNG."""
        self.viewport(width, 800, mobile=mobile)
        height = int(self.eval("document.documentElement.scrollHeight"))
        self.viewport(width, height, mobile=mobile)
        shot = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        path.write_bytes(shot)
        return shot

    def close(self) -> None:
        if hasattr(self, "ws"):
            with contextlib.suppress(Exception):  # it may go before it answers
                self.session = None
                self.send("Browser.close")
        self._stack.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # helpers that outlived the browser
            os.killpg(self.proc.pid, signal.SIGKILL)


# Helpers defined in the page under test: what the bar, the table and the feed show.
PROBES = """
window.rows = () => Object.fromEntries([...document.querySelectorAll('#models tbody tr')].map(
  (tr) => [tr.dataset.model, {
    state: tr.querySelector('.c-state').textContent,
    inFlight: tr.querySelector('.c-inflight').textContent,
    gb: tr.querySelector('.c-gb').textContent,
    loaded: tr.querySelector('.c-loaded').textContent,
    error: tr.querySelector('.err').textContent,
    load: !tr.querySelector('[data-action=load]').disabled,
    loadText: tr.querySelector('[data-action=load]').textContent,
    unload: !tr.querySelector('[data-action=unload]').disabled,
    sleep: ((b) => b.hidden ? null : !b.disabled)(tr.querySelector('[data-action=sleep]'))}]));
window.bar = () => [...document.querySelectorAll('#bar .seg[data-model]')].map(
  (s) => [s.dataset.model, s.dataset.state, s.dataset.tier, s.style.width]);
window.freeGb = () => document.querySelector('#bar .seg.free')?.dataset.free;
window.feed = () => [...document.querySelectorAll('#feed li')].map(
  (li) => li.dataset.event + ' ' + li.dataset.model);
window.click = (model, action) => document.querySelector(
  `#models tr[data-model="${model}"] [data-action="${action}"]`).click();
true
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path)
    try:
        yield b
    finally:
        b.close()
    assert not b.problems, b.problems


def row_is(model: str, state: str) -> str:
    return f"rows()[{json.dumps(model)}]?.state === {json.dumps(state)}"


# --------------------------------------------------------------------------- tests


def test_page_is_open_static_and_locked_down(start_server: StartServer, tmp_path: Path) -> None:
    """The shell needs no key (it holds no data) while /status does; its CSP pins the inline
    script and style by hash and allows requests to this origin only."""
    server = start_server(two_llms(tmp_path, api_keys="[reader]"))
    resp = httpx.get(server.url + "/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp
    assert "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "<title>llmux</title>" in resp.text
    # Server text reaches the DOM as text only: no HTML parsing of strings anywhere.
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", resp.text)
    assert httpx.get(server.url + "/status").status_code == 401


@needs_chromium
def test_page_follows_loads_and_unloads_live(
    start_server: StartServer, tmp_path: Path, browser: Browser
) -> None:
    server = start_server(two_llms(tmp_path, budget=8.0))
    assert chat(server.client(), "a") == "a got a"
    browser.viewport(*DESKTOP, mobile=False)
    browser.open(server.url + "/")

    browser.wait("document.querySelector('#conn').dataset.mode === 'live'", "the live stream")
    browser.wait(row_is("a", "ready"), "a ready in the table")
    assert browser.eval("bar()") == [["a", "ready", "llm", "37.5%"]]  # 3 of 8 GB
    assert browser.eval("freeGb()") == "5"
    # The load time comes from the replayed loading/ready events: "HH:MM:SS · took 0.4 s".
    browser.wait("/^\\d\\d:\\d\\d:\\d\\d · took /.test(rows().a.loaded)", "a's load time")
    rows = browser.eval("rows()")
    assert rows["b"]["state"] == "unloaded"
    assert (rows["a"]["load"], rows["a"]["unload"]) == (False, True)
    assert "ready a" in browser.eval("feed()")

    # Load b with the page's own button: both resident, side by side in the bar.
    browser.eval("click('b', 'load')")
    browser.wait(row_is("b", "ready"), "b ready after its Load button")
    browser.wait("bar().length === 2", "two models in the bar")
    assert browser.eval("freeGb()") == "2"
    assert server.model("b")["state"] == "ready"

    # Unload a through the API: the page follows from the event stream.
    assert server.post("/models/a/unload").status_code == 200
    browser.wait(row_is("a", "unloaded"), "a unloaded in the table")
    browser.wait("feed().includes('unloaded a')", "the unloaded event in the feed")
    assert browser.eval("bar().map((s) => s[0])") == ["b"]
    assert browser.eval("feed()")[0] == "unloaded a"  # newest on top

    # Unload b with its button: the bar is empty, all free.
    browser.eval("click('b', 'unload')")
    browser.wait("bar().length === 0", "an empty bar")
    browser.wait(row_is("b", "unloaded"), "b unloaded in the table")
    assert browser.eval("freeGb()") == "8"
    assert server.model("b")["state"] == "unloaded"


def mixed_stack(tmp: Path) -> str:
    """Three tiers resident, one idle model, and one whose load fails printing markup."""
    broken = f"{sys.executable} -c \"print('<img src=x onerror=window.pwned=1> oops'); exit(3)\""
    return f"""
gpu: {{vram_gb: 12, reserve_gb: 0}}
tiers: [{{name: llm}}, {{name: tts}}, {{name: asr, protected: true}}, {{name: vision}}]
models:
  whisper-small:
    type: asr
    vram_gb: 2
    pinned: true
    cmd: {upstream_cmd(tmp, "whisper-small")}
  piper-joe:
    type: tts
    vram_gb: 1
    cmd: {upstream_cmd(tmp, "piper-joe")}
  qwen2.5-7b-instruct:
    type: llm
    vram_gb: 5.5
    cmd: {upstream_cmd(tmp, "qwen")}
  llava:
    type: llm
    tier: vision
    vram_gb: 1.5
    cmd: {upstream_cmd(tmp, "llava")}
  mistral-7b:
    type: llm
    vram_gb: 5
    cmd: {upstream_cmd(tmp, "mistral")}
  broken:
    type: llm
    vram_gb: 1
    ready_timeout: 10s
    cmd: {json.dumps(broken)}
"""


def resident(server: Server) -> dict[str, str]:
    return {m["id"]: m["state"] for m in server.status()["models"] if m["state"] != "unloaded"}


@needs_chromium
def test_page_on_a_phone_escapes_model_text_and_screenshots(
    start_server: StartServer, tmp_path: Path, browser: Browser
) -> None:
    server = start_server(mixed_stack(tmp_path))
    client = server.client()
    for model in ("qwen2.5-7b-instruct", "llava"):
        chat(client, model)
    speech = httpx.post(
        server.url + "/v1/audio/speech",
        json={"model": "piper-joe", "input": "hello", "voice": "joe"},
        timeout=30,
    )
    assert speech.status_code == 200
    assert server.post("/models/broken/load").status_code == 503
    server.wait_state("whisper-small", "ready")
    assert resident(server) == dict.fromkeys(
        ("whisper-small", "piper-joe", "qwen2.5-7b-instruct", "llava"), "ready"
    )

    browser.viewport(NARROWEST, 800, mobile=True)
    browser.open(server.url + "/")
    browser.wait("bar().length === 4", "four resident models")
    browser.wait("rows().broken?.error.includes('<img')", "broken's last error")
    # The markup in the error is text: no element was made from it and nothing ran.
    assert browser.eval("document.querySelectorAll('img').length") == 0
    assert browser.eval("window.pwned") is None
    assert browser.eval("[...new Set(bar().map((s) => s[2]))]") == ["llm", "tts", "asr", "vision"]
    # A phone: no horizontal scroll at 375 px; the table is a stack of cards.
    assert browser.eval("document.documentElement.scrollWidth") <= NARROWEST
    assert browser.eval("getComputedStyle(document.querySelector('#models thead')).display") == (
        "none"
    )
    # The full error on tap.
    browser.eval("document.querySelector('#models tr[data-model=broken] .err').click()")
    assert browser.eval("!!document.querySelector('#models tr[data-model=broken] .err.open')")

    phone = browser.screenshot(tmp_path / "status-phone.png", PHONE[0], mobile=True)
    assert browser.eval("document.documentElement.scrollWidth") <= PHONE[0]
    browser.eval("document.querySelector('#models tr[data-model=broken] .err').click()")
    browser.viewport(*DESKTOP, mobile=False)
    browser.wait(
        "getComputedStyle(document.querySelector('#models thead')).display !== 'none'",
        "the desktop table",
    )
    desktop = browser.screenshot(tmp_path / "status-desktop.png", DESKTOP[0], mobile=False)
    for shot in (phone, desktop):
        assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get("LLMUX_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.write_bytes(desktop)


@needs_chromium
def test_page_asks_for_keys_and_polls(
    start_server: StartServer, tmp_path: Path, browser: Browser
) -> None:
    server = start_server(
        two_llms(tmp_path, budget=8.0, api_keys="[reader-key]", admin_keys="[admin-key]"),
        api_key="reader-key",
        admin_key="admin-key",
    )
    chat(server.client("reader-key"), "a")
    browser.viewport(*DESKTOP, mobile=False)
    browser.open(server.url + "/")

    def answer_key(title: str, key: str) -> None:
        browser.wait("document.querySelector('#keydlg').open", f"the {title} prompt")
        assert browser.eval("document.querySelector('#keytitle').textContent") == title
        browser.eval(
            f"document.querySelector('#keyinput').value = {json.dumps(key)};"
            "document.querySelector('#keyok').click()"
        )

    # /status and /events need a key: the page asks, then polls (EventSource has no headers).
    answer_key("API key needed", "reader-key")
    browser.wait(row_is("a", "ready"), "a ready with the reader key")
    assert browser.eval("document.querySelector('#conn').dataset.mode") == "polling"
    assert browser.eval("sessionStorage.getItem('llmux.key')") == "reader-key"
    browser.wait("feed().includes('ready a')", "the feed, streamed by fetch with the key")

    # Load with a read-only key is 403: the page asks for the admin key and retries.
    browser.eval("click('b', 'load')")
    answer_key("Admin key needed", "admin-key")
    browser.wait(row_is("b", "ready"), "b loaded with the admin key")
    assert browser.eval("sessionStorage.getItem('llmux.key')") == "admin-key"

    # A change made elsewhere shows up by polling (no event stream needed).
    assert server.post("/models/a/unload").status_code == 200
    browser.wait(row_is("a", "unloaded"), "a unloaded, seen by polling")
    assert browser.eval("bar().map((s) => s[0])") == ["b"]


SLEEPERS = {
    "vram": {"budget_gb": 16, "reserved_gb": 11.5, "measured_gb": None},
    "host": {"budget_gb": 40, "reserved_gb": 8},
    "models": [
        {"id": "qwen", "type": "llm", "tier": "llm", "state": "sleeping", "vram_gb": 8,
         "placement": "gpu", "measured_gb": None, "pinned": False, "in_flight": 0, "queued": 0,
         "last_used": None, "pid": 11, "last_error": None, "sleep_level": 1,
         "residual_gb": 0.5, "host_gb": 8},
        {"id": "llama", "type": "llm", "tier": "llm", "state": "waking", "vram_gb": 6,
         "placement": "gpu", "measured_gb": None, "pinned": False, "in_flight": 0, "queued": 2,
         "last_used": None, "pid": 12, "last_error": None, "sleep_level": 2,
         "residual_gb": 0.4, "host_gb": 0},
        {"id": "mistral", "type": "llm", "tier": "llm", "state": "ready", "vram_gb": 4,
         "placement": "gpu", "measured_gb": None, "pinned": False, "in_flight": 0, "queued": 0,
         "last_used": None, "pid": 13, "last_error": None, "sleep_level": 1,
         "residual_gb": 0.5, "host_gb": 0},
        {"id": "ears", "type": "asr", "tier": "asr", "state": "ready", "vram_gb": 1,
         "placement": "gpu", "measured_gb": None, "pinned": True, "in_flight": 0, "queued": 0,
         "last_used": None, "pid": 14, "last_error": None, "sleep_level": None,
         "residual_gb": 0, "host_gb": 0},
    ],
}  # fmt: skip
"""A /status with sleepers: asleep at level 1 (its host memory held), waking, one that may
sleep, and one that may not."""


def event(kind: str, model: str, ts: float, state: str) -> dict[str, Any]:
    return {"ts": ts, "event": kind, "model": model, "tier": "llm", "reason": "",
            "state": state, "reserved_gb": 11.5, "budget_gb": 16}  # fmt: skip


@needs_chromium
def test_page_shows_sleepers(start_server: StartServer, tmp_path: Path, browser: Browser) -> None:
    """The page's own rendering of a /status with sleeping and waking models, and of a wake's
    events, in one synchronous evaluation (the page's next refresh draws the live server)."""
    server = start_server(two_llms(tmp_path, budget=8.0))
    browser.viewport(*DESKTOP, mobile=False)
    browser.open(server.url + "/")
    browser.wait("document.querySelector('#conn').dataset.mode === 'live'", "the live stream")
    browser.wait(row_is("a", "unloaded"), "the live table")
    assert browser.eval("document.querySelector('#host').hidden")  # no model here can sleep
    waking = event("waking", "qwen", 1_800_000_000.0, "waking")
    awake = event("awake", "qwen", 1_800_000_000.4, "ready")
    shown = browser.eval(
        f"""(() => {{
        const st = {json.dumps(SLEEPERS)};
        render(st);
        onEvent({json.dumps(waking)});
        onEvent({json.dumps(awake)});
        renderTable(st.models);
        const seg = (id) => document.querySelector(`#bar .seg[data-model="${{id}}"]`);
        return {{
          bar: bar(), free: freeGb(), rows: rows(), feed: feed(),
          hostShown: !document.querySelector('#host').hidden,
          host: document.querySelector('#host-text').textContent,
          hostFill: [document.querySelector('#host-fill').style.width,
                     document.querySelector('#host-fill').getBoundingClientRect().width /
                     document.querySelector('#host-bar').getBoundingClientRect().width],
          gbTitle: document.querySelector('#models tr[data-model=qwen] .c-gb').title,
          sleepingSeg: [seg('qwen').className, getComputedStyle(seg('qwen')).opacity,
                        seg('qwen').textContent],
          wakingSeg: seg('llama').className,
          badges: [...document.querySelectorAll('#models .badge')].map((b) => b.className),
          tags: document.querySelector('#models tr[data-model=qwen] .c-model').textContent,
        }};
        }})()"""
    )
    # The bar: a sleeper by its residual (0.5 of 16 GB), a waking model by its whole reservation.
    assert shown["bar"] == [
        ["qwen", "sleeping", "llm", "3.125%"],
        ["llama", "waking", "llm", "37.5%"],
        ["mistral", "ready", "llm", "25%"],
        ["ears", "ready", "asr", "6.25%"],
    ]
    assert shown["free"] == "4.5"
    assert shown["sleepingSeg"] == ["seg s-sleeping", "0.55", "qwen 0.5 GB · sleeping"]
    assert shown["wakingSeg"] == "seg s-waking"
    assert shown["hostShown"]
    assert shown["host"] == "8 of 40 GB held by sleeping models (qwen)"
    assert shown["hostFill"][0] == "20%"
    assert shown["hostFill"][1] == pytest.approx(0.2, abs=0.02)  # drawn, not only set
    assert shown["gbTitle"] == "asleep: holds 0.5 GB of its 8 GB on the GPU and 8 GB of host memory"
    rows = shown["rows"]
    assert rows["qwen"]["state"] == "sleeping"
    assert rows["qwen"]["gb"] == "0.5 of 8 (asleep)"
    woke = browser.eval("fmtTime(1800000000.4)")
    assert rows["qwen"]["loaded"] == f"woke {woke} · took 0.4 s"
    # Sleep is offered only to a model with sleep:, and only when it is ready; a sleeper wakes.
    assert (rows["qwen"]["load"], rows["qwen"]["loadText"], rows["qwen"]["sleep"]) == (
        True,
        "Wake",
        False,
    )
    assert (rows["qwen"]["unload"], rows["llama"]["load"], rows["llama"]["sleep"]) == (
        True,
        False,
        False,
    )
    assert rows["mistral"]["sleep"] is True
    assert rows["ears"]["sleep"] is None  # hidden: it has no sleep:
    states = ["sleeping", "waking", "ready", "ready"]
    assert shown["badges"] == [f"badge st-{state}" for state in states]
    assert "sleeps L1" in shown["tags"]
    assert shown["feed"][:2] == ["awake qwen", "waking qwen"]


@needs_chromium
def test_page_sleeps_and_wakes_a_real_sleeper(
    start_server: StartServer, tmp_path: Path, browser: Browser
) -> None:
    """A sleepable child (tests/sleepy.py): put to sleep with the page's Sleep button, shown
    asleep from the event stream, woken with its Wake button, the same process after."""
    server = start_server(sleepy_config(tmp_path))
    assert chat(server.client(), "s").startswith("s pid ")
    pid = server.model("s")["pid"]
    browser.viewport(*DESKTOP, mobile=False)
    browser.open(server.url + "/")
    browser.wait("document.querySelector('#conn').dataset.mode === 'live'", "the live stream")
    browser.wait(row_is("s", "ready"), "s ready")
    assert browser.eval("rows().s.sleep") is True

    browser.eval("click('s', 'sleep')")
    browser.wait(row_is("s", "sleeping"), "s asleep after its Sleep button")
    browser.wait("feed().includes('asleep s')", "the asleep event in the feed")
    assert browser.eval("bar()") == [["s", "sleeping", "llm", "6.25%"]]  # its 0.5 of 8 GB
    assert browser.eval("document.querySelector('#host-text').textContent") == (
        "6 of 20 GB held by sleeping models (s)"
    )
    assert browser.eval("rows().s.loadText") == "Wake"
    assert server.model("s")["state"] == "sleeping"

    browser.eval("click('s', 'load')")
    browser.wait(row_is("s", "ready"), "s awake after its Wake button")
    browser.wait("feed().includes('awake s')", "the awake event in the feed")
    browser.wait("/^woke .* · took /.test(rows().s.loaded)", "s's wake time")
    assert server.model("s")["pid"] == pid
    assert browser.eval("document.querySelector('#host-text').textContent") == (
        "0 of 20 GB held by sleeping models"
    )


def test_page_listens_for_every_notice() -> None:
    """EventSource delivers only the kinds it listens for: the page's list is every notice,
    and every public state but unloaded is drawn in the bar."""
    html, _ = status_page()
    kinds = re.search(r"const KINDS = \[(.*?)\];", html, flags=re.DOTALL)
    resident = re.search(r"const RESIDENT = new Set\(\[(.*?)\]\);", html)
    assert kinds is not None
    assert resident is not None
    assert re.findall(r"'(\w+)'", kinds.group(1)) == [n.value for n in Notice]
    assert re.findall(r"'(\w+)'", resident.group(1)) == list(PUBLIC_STATES[1:])
