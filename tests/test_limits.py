"""The HTTP server's own limits (issue 10, findings 5 and 6), against a real ``llmux serve``
over raw sockets: header size (431 before anything else runs), idle, header and body timeouts
(408), and the connection cap (the longest-idle connection makes room; 503 when every
connection is busy, but ``GET /health`` still answers)."""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from llmux.api.server import connection_cap
from tests.conftest import Server, StartServer, upstream_cmd, wait_until

pytestmark = pytest.mark.slow

KEY = "limits-key"
HEADER_KB = 8
LIMIT = HEADER_KB * 1024
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
IDLE_TIMEOUT = 1.0
CAP = 20
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
HOLD = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hold"}]}).encode()


def config(tmp: Path, **server: Any) -> str:
    settings: dict[str, Any] = {
        "api_keys": f"[{KEY}]",
        "max_header_kb": HEADER_KB,
        "header_timeout": f"{HEADER_TIMEOUT}s",
        "body_timeout": f"{BODY_TIMEOUT}s",
        "idle_timeout": f"{IDLE_TIMEOUT}s",
        "max_connections": CAP,
        **server,
    }
    lines = "".join(f"\n  {k}: {v}" for k, v in settings.items())
    return f"""
server:{lines}
gpu: {{vram_gb: 4, reserve_gb: 0}}
models:
  m:
    type: llm
    vram_gb: 1
    pinned: true
    cmd: {upstream_cmd(tmp, "m")}
"""


def connect(server: Server, timeout: float = 20.0) -> socket.socket:
    url = urlsplit(server.url)
    sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def post_head(path: str, length: int, key: str | None = KEY) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: llmux\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: llmux\r\n\r\n".encode()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def error(self) -> dict[str, Any]:
        assert self.headers["content-type"] == "application/json", self.headers
        envelope: dict[str, Any] = json.loads(self.body)
        assert set(envelope["error"]) == {"message", "type", "param", "code"}, envelope
        return envelope["error"]  # type: ignore[no-any-return]


def read_reply(sock: socket.socket) -> Reply:
    """One HTTP response with a Content-Length (what llmux and the upstream send here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return Reply(status, headers, body[:length])


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset), waiting at most the
    socket's timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def still_open(sock: socket.socket) -> bool:
    """True if the server has neither closed the connection nor sent anything on it."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def ready(server: Server) -> Server:
    """Wait until the pinned model is ready, over connections that are closed at once (the
    cap tests count connections)."""

    def is_ready() -> bool:
        resp = httpx.get(server.url + "/status", headers={"Authorization": f"Bearer {KEY}"})
        return bool(resp.json()["models"][0]["state"] == "ready")

    wait_until(is_ready, 30, "model m ready")
    return server


@pytest.fixture
def server(start_server: StartServer, tmp_path: Path) -> Server:
    return ready(start_server(config(tmp_path), api_key=KEY))


# Finding 5: header size


@pytest.mark.parametrize("where", ["header", "request line"])
def test_huge_head_without_key_gets_431_fast_without_memory(server: Server, where: str) -> None:
    size = 64 * 1024 * 1024
    if where == "header":
        data = b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmux\r\nX-Big: " + b"a" * size
    else:
        data = b"GET /v1/models?" + b"a" * size
    before = rss_kb(server.proc.pid)
    sock = connect(server)

    def send() -> None:
        # The server closes once it has answered: the rest is refused.
        with contextlib.suppress(OSError):
            sock.sendall(data)

    sender = threading.Thread(target=send)
    started = time.monotonic()
    sender.start()
    reply = read_reply(sock)
    elapsed = time.monotonic() - started
    assert reply.status == 431
    assert reply.error()["code"] == "headers_too_large"
    assert reply.headers["connection"] == "close"
    assert closed_by_server(sock)
    sender.join(30)
    sock.close()
    assert elapsed < 5, f"431 took {elapsed:.1f} s"
    grown_mb = (rss_kb(server.proc.pid) - before) / 1024
    assert grown_mb < 16, f"RSS grew {grown_mb:.0f} MB for a {size >> 20} MB head"
    # Nothing reached the model, and the server answers as before.
    assert httpx.get(server.upstream("m") + "/_stats").json()["requests"] == 0
    assert server.get("/health").status_code == 200


def padded_get(total: int) -> bytes:
    """A GET /health whose line and headers are exactly ``total`` bytes."""
    prefix = b"GET /health HTTP/1.1\r\nHost: llmux\r\nX-Pad: "
    end = b"\r\n\r\n"
    return prefix + b"p" * (total - len(prefix) - len(end)) + end


def test_head_at_the_limit_passes_and_one_byte_more_is_431(server: Server) -> None:
    with connect(server) as sock:
        head = padded_get(LIMIT)
        # In pieces: the count carries over from one read to the next.
        for i in range(0, len(head), 3000):
            sock.sendall(head[i : i + 3000])
            time.sleep(0.01)
        assert read_reply(sock).status == 200
        # The next request on the same connection has its own allowance.
        sock.sendall(padded_get(LIMIT))
        assert read_reply(sock).status == 200
    with connect(server) as sock:
        sock.sendall(padded_get(LIMIT + 1))
        reply = read_reply(sock)
        assert reply.status == 431, reply.body
        assert closed_by_server(sock)


def test_what_is_not_http_gets_the_envelope(server: Server) -> None:
    # An empty Content-Length: httptools refuses it before any route or key check.
    for raw in (
        b"GET /status HTTP/1.1\r\nHost: llmux\r\nContent-Length:\r\n\r\n",
        b"\x16\x03\x01 not http at all\r\n\r\n",
    ):
        with connect(server) as sock:
            sock.sendall(raw)
            reply = read_reply(sock)
            assert reply.status == 400
            assert reply.error()["type"] == "invalid_request_error"
            assert closed_by_server(sock)


def test_large_body_after_small_head_is_not_a_header(server: Server) -> None:
    """A first read with the headers and much more body than the header limit is fine."""
    content = "x" * (4 * LIMIT)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()
    with connect(server) as sock:
        sock.sendall(post_head("/v1/chat/completions", len(body)) + body)
        reply = read_reply(sock)
        assert reply.status == 200, reply.body


# Finding 6: timeouts


def test_idle_connections_are_closed_after_idle_timeout(server: Server) -> None:
    fresh = [connect(server) for _ in range(5)]
    used = connect(server)
    used.sendall(get("/health"))
    assert read_reply(used).status == 200
    started = time.monotonic()
    for sock in [*fresh, used]:
        assert closed_by_server(sock)
        sock.close()
    elapsed = time.monotonic() - started
    assert elapsed < 15
    # Not before its time: the kept-alive one waited at least idle_timeout after its answer.
    assert elapsed >= IDLE_TIMEOUT * 0.9


def test_stalled_headers_get_408(server: Server) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: llmux\r\n")
        reply = read_reply(sock)
        elapsed = time.monotonic() - started
        assert reply.status == 408
        assert reply.error()["code"] == "request_timeout"
        assert closed_by_server(sock)
    assert HEADER_TIMEOUT * 0.9 <= elapsed < 15


def test_stalled_body_gets_408_and_reaches_no_model(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(post_head("/v1/chat/completions", len(CHAT)) + CHAT[:10])
        started = time.monotonic()
        reply = read_reply(sock)
        elapsed = time.monotonic() - started
        assert reply.status == 408
        assert reply.error()["code"] == "request_timeout"
        assert closed_by_server(sock)
    assert BODY_TIMEOUT * 0.9 <= elapsed < 15
    assert httpx.get(server.upstream("m") + "/_stats").json()["requests"] == 0
    assert "Traceback" not in server.log.read_text()


def test_slow_but_moving_body_is_never_cut(server: Server) -> None:
    pieces = 16
    step = -(-len(CHAT) // pieces)
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(post_head("/v1/chat/completions", len(CHAT)))
        for i in range(0, len(CHAT), step):
            time.sleep(BODY_TIMEOUT / 6)
            sock.sendall(CHAT[i : i + step])
        assert time.monotonic() - started > 2 * BODY_TIMEOUT  # longer than one timeout in all
        reply = read_reply(sock)
        assert reply.status == 200, reply.body
        assert json.loads(reply.body)["choices"][0]["message"]["content"] == "m got m"


def test_openai_sdk_reuses_its_connection(server: Server) -> None:
    client = server.client()
    ports = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.parse().choices[0].message.content == "m got m"
        ports.append(raw.http_response.extensions["network_stream"].get_extra_info("client_addr"))
    assert len(set(ports)) == 1, ports  # one kept-alive connection for all three
    # Past idle_timeout the server has closed it; the SDK notices and opens a new one.
    time.sleep(IDLE_TIMEOUT * 2)
    again = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert again.choices[0].message.content == "m got m"


# Finding 6: the connection cap


@pytest.fixture
def capped(start_server: StartServer, tmp_path: Path) -> Server:
    # Long timeouts here: connections must stay open for as long as the test needs them.
    return ready(
        start_server(
            config(tmp_path, idle_timeout="60s", header_timeout="60s", body_timeout="60s"),
            api_key=KEY,
        )
    )


def test_at_the_cap_the_longest_idle_connection_makes_room(capped: Server) -> None:
    idle = []
    for _ in range(CAP):
        sock = connect(capped)
        sock.sendall(get("/health"))  # answered: the server has it, and it is idle again
        assert read_reply(sock).status == 200
        idle.append(sock)
    health = connect(capped)
    health.sendall(get("/health"))
    assert read_reply(health).status == 200
    # The longest idle went for /health's connection (closed as it came, before its answer;
    # the short wait is for the close to be carried out, far below any timeout here).
    idle[0].settimeout(2)
    assert closed_by_server(idle[0])
    chat = connect(capped)
    chat.sendall(post_head("/v1/chat/completions", len(CHAT)) + CHAT)
    assert read_reply(chat).status == 200
    idle[1].settimeout(2)
    assert closed_by_server(idle[1])
    # The others are untouched and still serve.
    assert all(still_open(sock) for sock in idle[2:])
    for sock in (idle[2], idle[-1], health, chat):
        sock.sendall(get("/health"))
        assert read_reply(sock).status == 200
    for sock in [*idle, health, chat]:
        sock.close()


def test_at_the_cap_with_every_connection_busy_health_answers_and_others_get_503(
    capped: Server,
) -> None:
    held = []
    for _ in range(CAP):
        sock = connect(capped, timeout=60)
        sock.sendall(post_head("/v1/chat/completions", len(HOLD)) + HOLD)
        held.append(sock)
    capped.upstream_wait("m", held=CAP)
    for _ in range(3):
        with connect(capped) as sock:
            sock.sendall(get("/health"))
            assert read_reply(sock).status == 200
    with connect(capped) as sock:
        sock.sendall(post_head("/v1/chat/completions", len(CHAT)) + CHAT)
        reply = read_reply(sock)
        assert reply.status == 503
        assert reply.error()["code"] == "server_busy"
        assert reply.headers["connection"] == "close"
        assert closed_by_server(sock)
    assert "every one serving a request" in capped.log.read_text()
    # The held ones were never touched: released, each gets its whole answer.
    capped.upstream_release("m")
    for sock in held:
        reply = read_reply(sock)
        assert reply.status == 200, reply.body
        sock.close()
    # Below the cap again: requests are served.
    with connect(capped) as sock:
        sock.sendall(post_head("/v1/chat/completions", len(CHAT)) + CHAT)
        assert read_reply(sock).status == 200


def test_the_soft_file_limit_is_raised_and_the_cap_logged_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard open-file limit above 256 (it is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # llmux inherits the low soft one
    try:
        server = start_server(config(tmp_path), api_key=KEY)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
    [line] = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)], line
    lines = [ln for ln in server.log.read_text().splitlines() if "connections: at most" in ln]
    assert len(lines) == 1, lines
    assert f"at most {connection_cap(CAP, hard, 1)} open" in lines[0]
    assert f"open-file limit {hard}" in lines[0]


def test_the_cap_leaves_files_for_upstreams_and_children() -> None:
    assert connection_cap(4096, 1_048_576, 3) == 4096
    # 1,024 files, 2 models: 64 + 2 * 4 kept back, two per connection.
    assert connection_cap(4096, 1024, 2) == (1024 - 64 - 8) // 2
    assert connection_cap(4096, 50, 2) == 1  # never none at all
