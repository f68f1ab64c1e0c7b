"""The ASGI application: the raw hot path for OpenAI routes, Starlette for the rest."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
from starlette.routing import Mount

from llmux.api.auth import Authenticator
from llmux.api.control import build_control
from llmux.api.errors import send_error
from llmux.api.ollama import OllamaApi
from llmux.api.relay import (
    RELAY_PATHS,
    Receive,
    Relay,
    Scope,
    Send,
    UpstreamConnector,
)
from llmux.api.wyoming import WyomingService
from llmux.backends.sleep import HttpSleepClient
from llmux.config import Config
from llmux.errors import ConfigError, MethodNotAllowed
from llmux.gpu import GpuProbe
from llmux.gpu import host_available_gb as read_host_available_gb
from llmux.launch import launch_spec
from llmux.observe import Observer
from llmux.scheduling.launcher import Launcher, SleepClient
from llmux.scheduling.runtime import Scheduler

log = logging.getLogger("llmux")


class LlmuxApp:
    """One llmux server. Owns the scheduler and the shared upstream session for its lifetime."""

    def __init__(
        self,
        config: Config,
        launcher: Launcher,
        *,
        budget_gb: float,
        nvml_total_gb: float | None = None,
        config_source: Callable[[], Config] | None = None,
        watch_path: str | None = None,
        gpu: GpuProbe | None = None,
        sleeper: SleepClient | None = None,
        host_available_gb: float | None = None,
    ) -> None:
        """``config_source`` re-reads the config for SIGHUP (and ``watch_path`` changes).
        ``gpu``: the NVML probe (rule 10: wait for free memory, measure, learn); its total is
        ``nvml_total_gb`` when that is not given. The caller opened it and closes it.
        ``sleeper``: puts ``sleep:`` models' engines to sleep and wakes them (rules 11-12; by
        default over HTTP, ``HttpSleepClient``); ``host_available_gb``: host memory available
        at start (for ``host.ram_gb: auto``; by default MemAvailable, read now)."""
        self.config = config
        if nvml_total_gb is None and gpu is not None:
            nvml_total_gb = gpu.total_gb()
        self.nvml_total_gb = nvml_total_gb
        self.config_source = config_source
        self.watch_path = watch_path
        self._background: set[asyncio.Task[None]] = set()
        self._own_sleeper = HttpSleepClient() if sleeper is None else None
        if host_available_gb is None:
            host_available_gb = read_host_available_gb()
        self.scheduler = Scheduler(
            config,
            launcher,
            launch_spec=launch_spec,
            budget_gb=budget_gb,
            gpu=gpu,
            sleeper=sleeper or self._own_sleeper,
            host_available_gb=host_available_gb,
        )
        self.observer = Observer()
        self.observer.bind(self.scheduler.snapshot)
        self.scheduler.listeners.append(self.observer.record)
        auth = self.auth = Authenticator(config.server)
        self._session: aiohttp.ClientSession | None = None
        self.relay = Relay(
            self.scheduler,
            auth,
            self.observer,
            max_body=int(config.server.max_upload_mb * 1_000_000),
            session=self.session,
            max_speech_chars=config.server.max_speech_chars,
        )
        self.control = build_control(self.scheduler, auth, self.observer)
        # Wyoming (Home Assistant's voice protocol): its own TCP servers, same scheduler.
        self.wyoming = WyomingService(self.scheduler, self.observer, self.session)
        # The Ollama API (api/ollama.py), mounted at /api in the control plane's route table.
        self.ollama = OllamaApi(
            self.scheduler, auth, self.observer, self.session, lambda: self.relay.max_body
        )
        self.control.router.routes.append(Mount("/api", app=self.ollama.app))

    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the app has not started"
        return self._session

    async def startup(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=UpstreamConnector(limit=0, force_close=False),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            # Children's cookies are not kept: one client's Set-Cookie must never ride along
            # with another client's request (and an empty jar is cheaper per request).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.relay.start(asyncio.get_running_loop())
        await self.scheduler.start()
        try:
            await self.wyoming.start(self.config.wyoming)
        except OSError:  # a Wyoming port cannot be bound: llmux does not start
            await self.scheduler.shutdown(0)
            raise
        if self.config_source is not None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)
            if self.watch_path is not None:
                self._spawn(self._watch(self.watch_path))
        # Move everything alive after start-up (imports, config, routes) out of the collector's
        # sight: a full collection then scans only what requests create, and no longer stalls
        # the loop for ~15 ms every second or so under load (measured: p99 at c=16 12 -> 4.6 ms).
        gc.collect()
        gc.freeze()
        log.info(
            "llmux ready: %d models, budget %.2f GB, %s",
            len(self.config.models),
            self.scheduler.core.budget_gb,
            "NVML: measuring, learned peaks in " + str(self.scheduler.store.path)
            if self.scheduler.store is not None
            else "no NVML: reservations as configured",
        )

    def begin_shutdown(self) -> None:
        """SIGTERM (the server stops accepting): end the streams that never end by themselves
        (/events, followed logs), answer the requests still waiting for a model, abandon the
        loads under way. Requests in flight go on for shutdown_grace."""
        self.observer.close()
        self.scheduler.begin_shutdown()
        self.wyoming.begin_shutdown()

    async def shutdown(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.wyoming.begin_shutdown()
        await self.scheduler.shutdown(self.config.server.shutdown_grace)
        await self.wyoming.stop()
        self.relay.stop()
        if self._own_sleeper is not None:
            await self._own_sleeper.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def reload(self) -> bool:
        """Re-read the config and hand it to the scheduler. An invalid config changes nothing."""
        assert self.config_source is not None
        try:
            new = self.config_source()
        except ConfigError as exc:
            log.error(
                "config reload rejected, the running config stays: %s", "; ".join(exc.problems)
            )
            return False
        old = self.config
        if (new.server.host, new.server.port) != (old.server.host, old.server.port):
            log.warning("server.host and server.port changes take effect only after a restart")
        if new.server.state_dir != old.server.state_dir:
            log.warning("a server.state_dir change takes effect only after a restart")
        held = (
            "max_header_kb",
            "header_timeout",
            "body_timeout",
            "idle_timeout",
            "max_connections",
        )
        moved = [f"server.{k}" for k in held if getattr(new.server, k) != getattr(old.server, k)]
        if moved:
            log.warning("%s: changes take effect only after a restart", ", ".join(moved))
        added = sorted(set(new.models) - set(old.models))
        removed = sorted(set(old.models) - set(new.models))
        changed = sorted(
            m for m in set(new.models) & set(old.models) if new.models[m] != old.models[m]
        )
        self.config = new
        self.auth.update(new.server)
        self.relay.max_body = int(new.server.max_upload_mb * 1_000_000)
        self.relay.max_speech_chars = new.server.max_speech_chars
        self.scheduler.reconfigure(new, new.budget_gb(self.nvml_total_gb))
        if new.wyoming != old.wyoming:
            self._spawn(self.wyoming.reconfigure(new.wyoming))
        log.info("config reloaded: added=%s removed=%s changed=%s", added, removed, changed)
        return True

    def _spawn_reload(self) -> None:
        self.reload()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch(self, path: str) -> None:
        from watchfiles import awatch

        async for _ in awatch(path, debounce=200, step=50):
            self.reload()

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function that hands back the handler's coroutine: one coroutine layer less
        # on every resumption of every request (run it with uvicorn's interface="asgi3").
        kind = scope["type"]
        if kind == "http" and scope["path"] in RELAY_PATHS:
            if scope["method"] == "POST":
                return self.relay(scope, receive, send)
            return send_error(
                send, MethodNotAllowed(f"use POST for {scope['path']}"), ((b"allow", b"POST"),)
            )
        if kind == "lifespan":
            return self._lifespan(receive, send)
        return self.control(scope, receive, send)

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
