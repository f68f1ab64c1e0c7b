"""The ASGI application: the raw hot path for OpenAI routes, FastAPI for the rest."""

from __future__ import annotations

import logging

import aiohttp

from llmux.api.auth import Authenticator
from llmux.api.control import build_control
from llmux.api.relay import RELAY_PATHS, Receive, Relay, Scope, Send, send_error
from llmux.backends.base import Launcher
from llmux.config import Config
from llmux.errors import MethodNotAllowed
from llmux.observe import Observer
from llmux.scheduling.runtime import Scheduler

log = logging.getLogger("llmux")


class LlmuxApp:
    """One llmux server. Owns the scheduler and the shared upstream session for its lifetime."""

    def __init__(self, config: Config, launcher: Launcher, *, budget_gb: float) -> None:
        self.config = config
        self.scheduler = Scheduler(config, launcher, budget_gb=budget_gb)
        self.observer = Observer()
        self.observer.bind(self.scheduler.gauges)
        self.scheduler.listeners.append(self.observer.record)
        auth = Authenticator(config.server)
        self._session: aiohttp.ClientSession | None = None
        self.relay = Relay(
            self.scheduler,
            auth,
            self.observer,
            max_body=int(config.server.max_upload_mb * 1_000_000),
            session=self.session,
        )
        self.control = build_control(self.scheduler, auth, self.observer)

    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the app has not started"
        return self._session

    async def startup(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        await self.scheduler.start()
        log.info(
            "llmux ready: %d models, budget %.2f GB",
            len(self.config.models),
            self.scheduler.core.budget_gb,
        )

    async def shutdown(self) -> None:
        await self.scheduler.shutdown(self.config.server.shutdown_grace)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"] in RELAY_PATHS:
            if scope["method"] == "POST":
                await self.relay(scope, receive, send)
            else:
                await send_error(send, MethodNotAllowed(f"use POST for {scope['path']}"))
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.control(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
