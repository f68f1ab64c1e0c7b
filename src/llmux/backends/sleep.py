"""``HttpSleepClient``: puts a child's engine to sleep and wakes it over its own HTTP API.

It implements ``llmux.scheduling.launcher.SleepClient`` (the scheduler's process effects call it,
rules 11-12). The calls, exactly as the engines serve them (docs/engines.md, "Sleep API")::

    vLLM (VLLM_SERVER_DEV_MODE=1, --enable-sleep-mode)
      sleep    POST /sleep?level=N             level in the query string, no body
      wake     POST /wake_up                   no tags: weights and KV cache together
               level 2 only, then:
               POST /collective_rpc            {"method": "reload_weights"}
               POST /reset_prefix_cache
      asleep?  GET  /is_sleeping               -> {"is_sleeping": bool}
    SGLang (--enable-memory-saver)
      sleep    POST /release_memory_occupation {}
      wake     POST /resume_memory_occupation  {}

vLLM reads ``level`` from the query string only: a level sent in the body is ignored and the
engine sleeps at level 1 (the mistake of llama-swap's wrapper script).

Each call returns once the engine answered 2xx; anything else raises ``SleepCallFailed``, whose
text names the call, the status and the start of the body (or the connection error), since the
caller keeps that text as the model's ``last_error``. There is no deadline here beyond a socket
backstop: the caller bounds the whole sleep or wake (``ready_timeout``) and cancels the call.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from llmux.scheduling.launcher import SleepApiName

__all__ = ["BODY_EXCERPT", "HttpSleepClient", "SleepCallFailed"]

BODY_EXCERPT = 200
"""Characters of a refusing answer's body kept in ``SleepCallFailed``'s text."""
CONNECT_TIMEOUT_S = 10.0
"""Longest wait for the child to accept the connection (it is on loopback)."""
READ_TIMEOUT_S = 900.0
"""Backstop for one call's silence: a level-2 wake reloads every weight from disk before it
answers. The caller's own deadline (``ready_timeout``) is normally much shorter."""


class SleepCallFailed(Exception):
    """One call of a child's sleep API failed: it answered non-2xx, an answer it cannot have
    meant, or the connection failed. ``call`` is ``"POST /sleep?level=2"`` and the like;
    ``status`` is None when no answer came."""

    def __init__(self, call: str, problem: str, status: int | None = None) -> None:
        self.call = call
        self.status = status
        super().__init__(f"{call} {problem}")


class HttpSleepClient:
    """The sleep API over HTTP, with one aiohttp session (created on first use, inside the
    running loop; ``close()`` ends it). A fresh connection per call: the calls are rare, and a
    pooled connection to a child that has since been stopped must never be reused."""

    def __init__(
        self,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float | None = READ_TIMEOUT_S,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    async def sleep(self, base_url: str, api: SleepApiName, level: int) -> None:
        _check_level(level)
        if api == "vllm":
            await self._call(base_url, "POST", "/sleep", query={"level": str(level)})
        elif api == "sglang":
            await self._call(base_url, "POST", "/release_memory_occupation", body={})
        else:
            raise ValueError(f"unknown sleep API {api!r}")

    async def wake(self, base_url: str, api: SleepApiName, level: int) -> None:
        _check_level(level)
        if api == "vllm":
            await self._call(base_url, "POST", "/wake_up")
            if level == 2:
                # Level 2 dropped the weights: /wake_up maps the memory back, empty.
                await self._call(
                    base_url, "POST", "/collective_rpc", body={"method": "reload_weights"}
                )
                await self._call(base_url, "POST", "/reset_prefix_cache")
        elif api == "sglang":
            await self._call(base_url, "POST", "/resume_memory_occupation", body={})
        else:
            raise ValueError(f"unknown sleep API {api!r}")

    async def is_sleeping(self, base_url: str) -> bool:
        """vLLM's ``GET /is_sleeping``."""
        call = "GET /is_sleeping"
        answer = await self._call(base_url, "GET", "/is_sleeping")
        value = answer.get("is_sleeping") if isinstance(answer, dict) else None
        if not isinstance(value, bool):
            raise SleepCallFailed(call, f"answered 200 without a boolean is_sleeping: {answer!r}")
        return value

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _call(
        self,
        base_url: str,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        """The answer's JSON (None for an empty or non-JSON body) once the child answered 2xx."""
        call = f"{method} {path}"
        if query:
            call += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        url = base_url.rstrip("/") + path
        try:
            async with self._client().request(
                method, url, params=query, json=body, allow_redirects=False
            ) as resp:
                text = await resp.text(errors="replace")
                if not 200 <= resp.status < 300:
                    excerpt = " ".join(text.split())[:BODY_EXCERPT] or "(empty body)"
                    raise SleepCallFailed(
                        call, f"answered {resp.status}: {excerpt}", status=resp.status
                    )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            detail = str(exc) or "no answer"
            raise SleepCallFailed(call, f"failed: {type(exc).__name__}: {detail}") from exc
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            return None


def _check_level(level: int) -> None:
    if level not in (1, 2):
        raise ValueError(f"sleep level must be 1 or 2, not {level!r}")
