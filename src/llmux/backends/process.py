"""``ProcessLauncher``: each model runs as a real child process in its own process group.

Lifecycle of one child::

    spawn: own session and process group, PR_SET_PDEATHSIG=SIGKILL (Linux),
           stdout+stderr merged into one pipe, registered with the process watchdog
      -> GET {health} answers 200   -> ready: ``launch`` returns a ``ProcessChild``
      -> it exits first             -> LaunchFailed("exited with status N during start")
      -> ``ready_timeout`` passes   -> SIGKILL group, LaunchFailed("not ready after N s")
      -> ``launch`` is cancelled    -> SIGKILL group, reap, re-raise
    ready
      -> ``stop(timeout)``          -> SIGTERM group, SIGKILL group after ``timeout``
      -> it exits by itself         -> ``wait_exit()`` resolves (a crash)

Whenever the group leader is gone, the whole group gets one more SIGKILL so that helpers it
started (a worker, a ``sleep``) never keep GPU memory or the output pipe. The process watchdog
(``llmux.backends.reaper``) then kills what left the group (``setpgid``, ``setsid``), and, if
llmux itself dies in any way, everything any child started: the parent-death signal reaches
the children only, not what they started.

Notes for callers:

- The output pipe is read by a ``SubprocessProtocol`` rather than ``asyncio.subprocess.Process``:
  on Python 3.11 ``Process.wait()`` only returns once *every* holder of the pipe has closed it,
  so a grandchild that inherited stdout would hide the exit of the child itself.
- The parent-death signal is tied to the *thread* that spawned the child (the event loop's
  thread): run the loop in a thread that lives as long as llmux (the main thread).
- Nothing from a request reaches ``argv``; ``${PORT}`` is the only substitution.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from typing import cast

import aiohttp

from llmux.backends.base import LaunchFailed, LaunchSpec
from llmux.backends.reaper import WATCHDOG_ENV, Watchdog

__all__ = ["ProcessChild", "ProcessLauncher"]

_PR_SET_PDEATHSIG = 1
_PROBE_FIRST_DELAY = 0.02
"""Seconds between the first readiness probes; doubles up to ``_PROBE_MAX_DELAY``."""
_PROBE_MAX_DELAY = 0.05
"""A ready child is noticed within 50 ms (the bench showed ~125 ms lost at 250 ms)."""
_PROBE_REQUEST_TIMEOUT = 5.0
"""Longest one probe request may take (a child that accepts but never answers)."""
_OUTPUT_DRAIN_GRACE = 1.0
"""After the child exits, how long to keep reading output still in the pipe (or held open by
an escaped grandchild) before closing it."""
_MAX_LINE_BYTES = 16 * 1024
"""A longer run of output without a newline is cut into lines of this size."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's pick)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def parent_death_preexec(
    then: Callable[[], None] | None = None,
) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when llmux dies, then runs
    ``then``; only ``then`` off Linux."""
    if not sys.platform.startswith("linux"):
        return then
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return then
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:  # runs in the forked child, before exec
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # llmux died before prctl took effect
            os.kill(os.getpid(), sigkill)
        if then is not None:
            then()

    return preexec


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"status {returncode} ({name})"
    return f"status {returncode}"


class _ChildProtocol(asyncio.SubprocessProtocol):
    """Collects the merged output and notices the exit of one child."""

    def __init__(
        self,
        model_id: str,
        log_lines: int,
        logger: logging.Logger,
        on_spawn: Callable[[int], None] | None = None,
        on_reaped: Callable[[int], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._model_id = model_id
        self._logger = logger
        self._on_spawn = on_spawn
        """Called with the pid in ``connection_made``: before ``process_exited`` can be."""
        self._on_reaped = on_reaped
        """Called with the pid once the leader is reaped and its group killed."""
        self.lines: deque[str] = deque(maxlen=max(log_lines, 1))
        self.lines_total = 0
        """Lines seen since start (for followers: what is new since they last looked)."""
        self._partial = bytearray()
        self.transport: asyncio.SubprocessTransport | None = None
        self.exited: asyncio.Future[int] = loop.create_future()
        """Resolved with the return code once the group leader has exited and been reaped."""
        self.finished: asyncio.Future[None] = loop.create_future()
        """Resolved once the process exited, its output is read (or given up) and all is closed."""
        self._output_closed = False
        self._close_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transport only quacks like SubprocessTransport.
        self.transport = cast(asyncio.SubprocessTransport, transport)
        if self._on_spawn is not None:
            self._on_spawn(self.transport.get_pid())

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buffer = self._partial
        buffer += data
        start = 0
        while True:
            cut = buffer.find(b"\n", start, start + _MAX_LINE_BYTES + 1)
            if cut >= 0:
                self._add_line(bytes(buffer[start:cut]))
                start = cut + 1
            elif len(buffer) - start > _MAX_LINE_BYTES:  # cut an endless line into pieces
                self._add_line(bytes(buffer[start : start + _MAX_LINE_BYTES]))
                start += _MAX_LINE_BYTES
            else:
                break
        del buffer[:start]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if self._partial:
            self._add_line(bytes(self._partial))
            self._partial.clear()
        self._output_closed = True
        if self.exited.done():
            self._close()

    def process_exited(self) -> None:
        assert self.transport is not None
        returncode = self.transport.get_returncode()
        assert returncode is not None
        # The leader is reaped; take any stragglers of its group with it (and the watchdog
        # those that left the group).
        self.kill_group(signal.SIGKILL)
        if self._on_reaped is not None:
            self._on_reaped(self.transport.get_pid())
        if not self.exited.done():
            self.exited.set_result(returncode)
        if self._output_closed:
            self._close()
        else:
            self._close_timer = self._loop.call_later(_OUTPUT_DRAIN_GRACE, self._close)

    # -- helpers
    def _add_line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if "\r" in text:  # progress bars redraw with \r: keep what a terminal would show
            text = next((part for part in reversed(text.split("\r")) if part), "")
        self.lines.append(text)
        self.lines_total += 1
        self._logger.debug("[%s] %s", self._model_id, text)

    def _close(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self.transport is not None:
            self.transport.close()  # the process has exited: this only closes the pipe
        if not self.finished.done():
            self.finished.set_result(None)

    def kill_group(self, sig: signal.Signals) -> None:
        """Signal the child's process group (its pgid is its pid); a gone group is fine."""
        if self.transport is None:
            return
        pid = self.transport.get_pid()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


class ProcessChild:
    """A ready child process (implements ``llmux.backends.base.Child``)."""

    def __init__(self, model_id: str, host: str, port: int, protocol: _ChildProtocol) -> None:
        assert protocol.transport is not None
        self._model_id = model_id
        self._port = port
        self._pid = protocol.transport.get_pid()
        self._proto = protocol
        url_host = f"[{host}]" if ":" in host else host
        self._base_url = f"http://{url_host}:{port}"

    def __repr__(self) -> str:
        return f"<ProcessChild {self._model_id} pid={self._pid} port={self._port}>"

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def returncode(self) -> int | None:
        exited = self._proto.exited
        return exited.result() if exited.done() else None

    def log_tail(self) -> list[str]:
        return list(self._proto.lines)

    def log_since(self, seen: int) -> tuple[list[str], int]:
        lines, total = self._proto.lines, self._proto.lines_total
        new = min(total - seen, len(lines))
        return (list(lines)[len(lines) - new :] if new > 0 else []), total

    async def wait_exit(self) -> int:
        """The exit status, once the process has exited and its last output is read.

        Any number of callers may wait; cancelling one does not affect the others.
        """
        returncode = await asyncio.shield(self._proto.exited)
        await asyncio.shield(self._proto.finished)
        return returncode

    async def stop(self, timeout: float) -> int:
        """SIGTERM the group, SIGKILL it after ``timeout`` s; return the exit status once gone.

        Idempotent and safe after the process exited by itself. If cancelled, the group is
        SIGKILLed before the cancellation propagates, so a stop never leaves a child behind.
        """
        try:
            if not self._proto.exited.done():
                self._proto.kill_group(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(self._proto.exited), timeout)
                except TimeoutError:
                    self._proto.kill_group(signal.SIGKILL)
            return await self.wait_exit()
        except asyncio.CancelledError:
            self._proto.kill_group(signal.SIGKILL)
            raise


class ProcessLauncher:
    """Spawns children with ``${PORT}`` filled and waits until their health probe answers 200.

    ``watchdog``: the process watchdog its children are registered with (default: its own,
    started at the first launch and ended with llmux or by ``close()``).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        log_lines: int = 50,
        logger: logging.Logger | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self._host = host
        self._log_lines = log_lines
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self.watchdog = watchdog if watchdog is not None else Watchdog()

    def close(self) -> None:
        """End the watchdog; anything still running that a child started is killed with it."""
        self.watchdog.close()

    async def launch(self, spec: LaunchSpec) -> ProcessChild:
        if not spec.argv:
            raise LaunchFailed(f"{spec.model_id}: empty command", [])
        port = free_port(self._host)
        argv = [arg.replace("${PORT}", str(port)) for arg in spec.argv]
        env = {**os.environ, **spec.env} if spec.inherit_env else dict(spec.env)
        watchdog = self.watchdog
        token = watchdog.token()
        if token is not None:
            env[WATCHDOG_ENV] = token
        loop = asyncio.get_running_loop()
        protocol = _ChildProtocol(
            spec.model_id,
            self._log_lines,
            self._logger,
            on_spawn=lambda pid: watchdog.register(pid, token),
            on_reaped=watchdog.unregister,
        )
        try:
            await loop.subprocess_exec(
                lambda: protocol,
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=parent_death_preexec(then=watchdog.child_hook(token)),
            )
        except OSError as exc:
            watchdog.abandon(token)
            reason = exc.strerror or str(exc)
            raise LaunchFailed(f"{spec.model_id}: cannot start {argv[0]!r}: {reason}", []) from exc
        child = ProcessChild(spec.model_id, self._host, port, protocol)
        self._logger.debug("[%s] spawned pid %d on port %d", spec.model_id, child.pid, port)
        try:
            await self._wait_ready(child, spec)
        except BaseException:
            # Not ready (or cancelled): nothing of it may survive.
            protocol.kill_group(signal.SIGKILL)
            await child.wait_exit()
            raise
        return child

    async def _wait_ready(self, child: ProcessChild, spec: LaunchSpec) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.ready_timeout
        url = child.base_url + spec.health
        exited = child._proto.exited
        delay = _PROBE_FIRST_DELAY
        async with aiohttp.ClientSession() as session:
            while True:
                if exited.done():
                    returncode = await child.wait_exit()  # also reads the last output
                    raise LaunchFailed(
                        f"{spec.model_id}: exited with {_describe_status(returncode)} during start",
                        child.log_tail(),
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    child._proto.kill_group(signal.SIGKILL)
                    await child.wait_exit()
                    raise LaunchFailed(
                        f"{spec.model_id}: not ready after {spec.ready_timeout:g} s",
                        child.log_tail(),
                    )
                request_timeout = aiohttp.ClientTimeout(
                    total=min(remaining, _PROBE_REQUEST_TIMEOUT)
                )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url, timeout=request_timeout) as response:
                        if response.status == 200:
                            return
                # Sleep before the next probe, but wake at once if the process exits.
                await asyncio.wait([exited], timeout=min(delay, max(deadline - loop.time(), 0)))
                delay = min(delay * 2, _PROBE_MAX_DELAY)
