"""The process watchdog: nothing a model started outlives llmux, however llmux dies.

A model's direct child dies with llmux by itself (``PR_SET_PDEATHSIG``), but what *that*
child started does not: after a SIGKILL or an OOM kill of llmux it would be adopted by init
and keep its GPU memory. A dying process cannot clean up after itself, so a second process
does it:

- ``Watchdog`` (used by ``ProcessLauncher``) starts this module as a small separate Python
  process (``python -I -S reaper.py``, its own session, no parent-death signal) the first time
  a model is launched. The two are joined by a ``SOCK_SEQPACKET`` socket pair; only llmux holds
  its end (close-on-exec, so no model inherits it after exec).
- Each child's environment carries ``LLMUX_WATCHDOG=TOKEN`` (``INSTANCE.N``: random per
  llmux, one per launch).
- Each child announces itself (``+PID TOKEN``) from its ``preexec_fn``, before it can start
  anything, and llmux announces it again once spawned; ``-PID`` follows once llmux has reaped
  it (``! TOKEN`` if its exec failed). Nothing is sent per request. ``?`` asks for one more
  scan and an answer (``.``): for tests, see ``Watchdog.sync``.
- When the socket reaches end of file, llmux is gone (any exit: SIGKILL, OOM, a crash or a
  normal one). The watchdog then stops (SIGSTOP) and kills (SIGKILL) every live process that
  is ours, and exits. On ``-PID`` it does the same for that one model (what its process group
  kill left behind). A normal exit of llmux after its models were stopped kills nothing.

A process is ours when it is, by ``/proc``:

1. in the session of a registered child (each child leads its own session): this covers the
   whole process group, any process that moved to another group (``setpgid``), and those that
   init adopted after their parent died;
2. carrying our token in its environment (``/proc/PID/environ``: the environment it was
   started with): this covers processes that called ``setsid`` (or daemonized) even after
   their parent died and init adopted them;
3. a process seen earlier as ours (a scan every ``interval`` s while models run, reading only
   the pids that are new since the last one), checked by start time so that a reused pid is
   never taken for it, or the session led by such a process;
4. a descendant (by parent pid) of any of these.

Before killing, each target is stopped, and the search repeats until it finds nothing new, so
a process that forks while it is being killed does not leave a child behind.

What cannot be caught: a process that leaves its session *and* is started with an empty
environment (``env -i``, ``sudo``, ``systemd-run``) or hides it (not dumpable) *and* whose
parent dies, all within one scan interval (0.5 s); a
process under another user id (EPERM; reported in the log) or in another pid namespace
(``docker run`` hands the container to the Docker daemon); and anything started while the
watchdog itself was dead (it is restarted when it dies, and re-told about every child). A
subreaper (``PR_SET_CHILD_SUBREAPER``) does not help here: it only adopts the orphans of its
own descendants, and llmux, the model children's ancestor, is the process that died; making
llmux one would make it the parent of strangers it must reap, next to asyncio's child
watcher. A cgroup per model (``cgroup.kill``) would catch everything but needs a delegated
cgroup v2 subtree, which a plain user's llmux does not have.

The watchdog part (``main``) uses the standard library only: it runs with ``-I -S`` (no
site-packages) to start fast, and never imports llmux.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

__all__ = ["WATCHDOG_ENV", "Watchdog"]

WATCHDOG_ENV = "LLMUX_WATCHDOG"
"""The environment variable that marks every process a model started (value: its token)."""
_SCAN_INTERVAL = 0.5
"""Seconds between the watchdog's scans for new processes of the models (only while any run)."""
_MAX_ROUNDS = 50
"""Stop-and-search rounds of one sweep at most (each finds what forked during the last one)."""
_DEATH_WAIT = 2.0
"""Longest time (s) a sweep waits for what it killed to be dead."""
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_RESTART_AFTER = 1.0
"""A watchdog that dies is replaced at once if it lived this long (s), else at the next launch."""


# ----------------------------------------------------------------------- the watchdog process


class _Proc:
    """One process as ``/proc/PID/stat`` shows it."""

    __slots__ = ("comm", "pgrp", "pid", "ppid", "sid", "start", "zombie")

    def __init__(self, pid: int, data: bytes) -> None:
        open_paren, close_paren = data.find(b"("), data.rfind(b")")
        fields = data[close_paren + 2 :].split()
        self.pid = pid
        self.comm = data[open_paren + 1 : close_paren].decode(errors="replace")
        self.zombie = fields[0] in (b"Z", b"X")
        self.ppid = int(fields[1])
        self.pgrp = int(fields[2])
        self.sid = int(fields[3])
        self.start = int(fields[19])
        """Start time after boot in clock ticks: with the pid, it names one process for good."""

    def __repr__(self) -> str:
        return f"{self.comm} ({self.pid})"


def _pids() -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


def _read(pid: int) -> _Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return _Proc(pid, f.read())
    except (OSError, ValueError, IndexError):
        return None


def _token_of(pid: int, prefix: bytes) -> bytes | None:
    """The value of our variable in the environment of ``pid``, if it carries ``prefix``."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:  # gone, or not ours to read (another user)
        return None
    at = environ.find(prefix)
    while at > 0 and environ[at - 1] != 0:  # must start a variable, not sit inside a value
        at = environ.find(prefix, at + 1)
    if at < 0:
        return None
    end = environ.find(b"\0", at)
    return environ[at + len(WATCHDOG_ENV) + 1 : end if end >= 0 else None]


def _log(message: str, as_json: bool) -> None:
    """One warning on stderr the way llmux logs (text or JSON); llmux itself may be gone."""
    now = time.time()
    if as_json:
        record = {"ts": round(now, 6), "level": "warning", "logger": "llmux.watchdog"}
        line = json.dumps({**record, "msg": message})
    else:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        line = f"{stamp},{int(now % 1 * 1000):03d} WARNING llmux.watchdog: {message}"
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode(errors="replace"))


class _Warden:
    """The watchdog's state: which processes belong to which registered child (a root)."""

    def __init__(self, instance: bytes, llmux_pid: int, json_logs: bool = False) -> None:
        self.instance = instance
        self.json_logs = json_logs
        self.llmux_pid = llmux_pid
        self.spare = {os.getpid(), llmux_pid, 0, 1}
        self.roots: dict[int, bytes] = {}
        """Registered child pid -> its token."""
        self.tokens: dict[bytes, int] = {}
        """Token -> registered child pid."""
        self.sessions: dict[int, tuple[int, int]] = {}
        """Session id -> (start time of its leader, -1 if it was gone already; root)."""
        self.tracked: dict[int, tuple[int, int]] = {}
        """Pid -> (start time, root) of each live process seen as ours."""
        self.seen: set[int] = set()
        """The pids of the last scan: only newer ones are read by the next."""
        self.have_proc = os.path.exists("/proc/self/stat")

    # -- messages from llmux
    def register(self, pid: int, token: bytes) -> None:
        if pid in self.roots:
            if self.roots[pid] == token:  # told twice: by the child itself, then by llmux
                return
            self._forget({pid})  # a new child with the pid of one that llmux never reaped
        self.roots[pid] = token
        if token:
            self.tokens[token] = pid
        proc = _read(pid)
        start = proc.start if proc is not None else -1
        self.sessions[pid] = (start, pid)
        if proc is not None and not proc.zombie:
            self.tracked[pid] = (start, pid)
        self.seen.clear()  # read everything next time: what it started already is found too

    def unregister(self, pid: int) -> None:
        """The child was reaped: kill what its group kill left behind, then forget it."""
        if pid not in self.roots:
            return
        killed, failed = self.sweep({pid})
        # llmux killed the child's own process group itself; name only what escaped it.
        escaped = [proc for proc in killed if proc.pgrp != pid]
        if escaped:
            self.log(
                f"model process {pid} has exited; killed what it left behind: {_names(escaped)}"
            )
        if failed:
            self.log(f"model process {pid} left processes that cannot be killed: {_names(failed)}")
        self._forget({pid})

    def log(self, message: str) -> None:
        _log(message, self.json_logs)

    def _forget(self, roots: set[int]) -> None:
        for root in roots:
            token = self.roots.pop(root, b"")
            self.tokens.pop(token, None)
        self.sessions = {s: v for s, v in self.sessions.items() if v[1] not in roots}
        self.tracked = {p: v for p, v in self.tracked.items() if v[1] not in roots}

    # -- watching
    def scan(self) -> None:
        """Track the processes that appeared since the last scan and are ours."""
        if not self.have_proc or not self.roots:
            return
        listing = _pids()
        new = listing - self.seen
        self.seen = listing
        for pid in self.tracked.keys() - listing:
            del self.tracked[pid]
        procs = [proc for pid in sorted(new) if (proc := _read(pid)) is not None]
        for proc in procs:  # a session whose leader's pid now names another process is over
            session = self.sessions.get(proc.pid)
            if session is not None and session[0] != proc.start:
                del self.sessions[proc.pid]
        pending = [proc for proc in procs if not proc.zombie and proc.pid not in self.tracked]
        while pending:
            rest = []
            for proc in pending:
                root = self._owner(proc)
                if root is None:
                    rest.append(proc)
                    continue
                self.tracked[proc.pid] = (proc.start, root)
                if proc.sid == proc.pid:
                    self.sessions.setdefault(proc.pid, (proc.start, root))
            if len(rest) == len(pending):
                break
            pending = rest

    def _owner(self, proc: _Proc) -> int | None:
        session = self.sessions.get(proc.sid)
        if session is not None:
            return session[1]
        parent = self.tracked.get(proc.ppid)
        if parent is not None and parent[0] <= proc.start:
            return parent[1]
        return None

    # -- killing
    def sweep(self, roots: set[int], *, last: bool = False) -> tuple[list[_Proc], list[_Proc]]:
        """Stop, then kill, every live process of these roots (``last``: and every one that
        carries a token of ours); return (killed, not killable)."""
        if not self.have_proc:  # no /proc: the process groups are all we can name
            for root in roots:
                with contextlib.suppress(OSError):
                    os.killpg(root, signal.SIGKILL)
            return [], []
        stopped: dict[int, _Proc] = {}
        failed: dict[int, _Proc] = {}
        marked: dict[tuple[int, int], bool] = {}  # (pid, start) -> carries a token of roots
        for _ in range(_MAX_ROUNDS):
            fresh = [
                proc
                for proc in self._targets(roots, stopped, marked, last)
                if proc.pid not in stopped and proc.pid not in failed
            ]
            if not fresh:
                break
            for proc in fresh:
                try:
                    os.kill(proc.pid, signal.SIGSTOP)
                except ProcessLookupError:
                    continue
                except OSError:
                    failed[proc.pid] = proc
                    continue
                stopped[proc.pid] = proc
        for proc in stopped.values():
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
        # Until they are dead (a zombie, or reaped), so that a later sweep does not find them
        # again; a process in uninterruptible sleep (a driver's teardown) is not waited for long.
        deadline = time.monotonic() + _DEATH_WAIT
        dying = list(stopped.values())
        while dying and time.monotonic() < deadline:
            dying = [
                p
                for p in dying
                if (now := _read(p.pid)) and not now.zombie and now.start == p.start
            ]
            if dying:
                time.sleep(0.005)
        return list(stopped.values()), list(failed.values())

    def _targets(
        self,
        roots: set[int],
        stopped: dict[int, _Proc],
        marked: dict[tuple[int, int], bool],
        last: bool,
    ) -> list[_Proc]:
        procs = {pid: proc for pid in _pids() if (proc := _read(pid)) is not None}
        sessions = set()
        for sid, (start, root) in self.sessions.items():
            leader = procs.get(sid)
            if root in roots and (leader is None or leader.start == start):
                sessions.add(sid)
        prefix = f"{WATCHDOG_ENV}={self.instance.decode()}.".encode()
        targets: dict[int, _Proc] = {}
        children: dict[int, list[_Proc]] = {}
        for proc in procs.values():
            if proc.zombie or proc.pid in self.spare:
                continue
            children.setdefault(proc.ppid, []).append(proc)
            tracked = self.tracked.get(proc.pid)
            before = stopped.get(proc.pid)
            if (
                proc.sid in sessions
                or (tracked is not None and tracked[1] in roots and tracked[0] == proc.start)
                or (before is not None and before.start == proc.start)
                or self._marked(proc, prefix, roots, marked, last)
            ):
                targets[proc.pid] = proc
        stack = list(targets.values())
        while stack:  # and all their descendants
            parent = stack.pop()
            for child in children.get(parent.pid, ()):
                if child.pid not in targets and child.start >= parent.start:
                    targets[child.pid] = child
                    stack.append(child)
        return list(targets.values())

    def _marked(
        self,
        proc: _Proc,
        prefix: bytes,
        roots: set[int],
        marked: dict[tuple[int, int], bool],
        last: bool,
    ) -> bool:
        """Whether the process carries the token of one of ``roots`` (any of ours when
        ``last``: a token of a child already forgotten still marks our process)."""
        key = (proc.pid, proc.start)
        found = marked.get(key)
        if found is None:
            token = _token_of(proc.pid, prefix)
            found = token is not None and (last or self.tokens.get(token) in roots)
            marked[key] = found
        return found


def _names(procs: Iterable[_Proc]) -> str:
    return ", ".join(repr(proc) for proc in sorted(procs, key=lambda proc: proc.pid))


def main(argv: list[str]) -> int:
    """The watchdog: ``reaper.py INSTANCE LLMUX_PID INTERVAL text|json``, its socket end on
    stdin."""
    instance, llmux_pid, interval = argv[0].encode(), int(argv[1]), float(argv[2])
    json_logs = argv[3:4] == ["json"]
    # Its life is tied to llmux's socket alone: a SIGTERM meant for llmux (pkill, systemd)
    # must not leave llmux's models unwatched while llmux is still stopping them.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write("llmux-watchdog")
    conn = socket.socket(fileno=0)
    warden = _Warden(instance, llmux_pid, json_logs)
    while True:
        select.select([conn], [], [], interval if warden.roots else None)
        syncs, gone = 0, False
        while True:
            try:
                message = conn.recv(256, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                message = b""
            if not message:
                gone = True
                break
            kind, rest = message[:1], message[1:].split()
            if kind == b"+" and rest:
                warden.register(int(rest[0]), rest[1] if len(rest) > 1 else b"")
            elif kind == b"-" and rest:
                warden.unregister(int(rest[0]))
            elif kind == b"!" and rest and rest[0] in warden.tokens:  # it never ran
                warden.unregister(warden.tokens[rest[0]])
            elif kind == b"?":
                syncs += 1
        if gone:
            roots = set(warden.roots)
            killed, failed = warden.sweep(roots, last=True)
            if killed:
                warden.log(
                    f"llmux (pid {llmux_pid}) is gone; killed what its models started: "
                    f"{_names(killed)}"
                )
            if failed:
                warden.log(f"llmux (pid {llmux_pid}) is gone; cannot kill: {_names(failed)}")
            return 0
        warden.scan()
        for _ in range(syncs):
            with contextlib.suppress(OSError):
                conn.send(b".", _SEND_FLAGS)


# ----------------------------------------------------------------------- llmux's end


class Watchdog:
    """llmux's end of the process watchdog (see the module docstring).

    Used from the event loop's thread: ``token()`` before each spawn (it starts the watchdog
    the first time), ``child_hook(token)`` inside the child's ``preexec_fn``, ``register`` once
    the child is spawned and ``unregister`` once it is reaped. Off Linux each is a no-op (logged
    once). The watchdog ends when llmux's end closes: at ``close()``, when this object is
    collected, or when llmux exits in any way.
    """

    def __init__(
        self,
        *,
        interval: float = _SCAN_INTERVAL,
        logger: logging.Logger | None = None,
        log_format: str | None = None,
        restart_after: float = _RESTART_AFTER,
    ) -> None:
        """``interval``: seconds between the watchdog's scans for new processes.
        ``log_format``: how the watchdog writes its own warnings to stderr, ``text`` or
        ``json``; None: as llmux's root log handler does (``llmux.logs``) when it starts.
        ``restart_after``: a watchdog that dies is replaced at once if it lived this long (s),
        else only at the next launch or stop."""
        self._interval = interval
        self._restart_after = restart_after
        self._log_format = log_format
        self._log = logger if logger is not None else logging.getLogger("llmux.watchdog")
        self._instance = os.urandom(8).hex()
        self._count = 0
        self._children: dict[int, str] = {}
        """Pid -> token of each registered child (told again to a restarted watchdog)."""
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._close_sock: weakref.finalize[[], Watchdog] | None = None
        self._started_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_proc: subprocess.Popen[bytes] | None = None
        """The watchdog of ``wait``: the running one, or the last one after ``close``."""
        self._closed = False
        self._unsupported_logged = False

    @property
    def pid(self) -> int | None:
        """The watchdog process, while llmux's end of its socket is open."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the watchdog process unless it runs. Takes about a millisecond: the process
        gets ready on its own, and what is sent meanwhile waits in the socket."""
        if self._closed or self._sock is not None:
            return
        if not sys.platform.startswith("linux"):
            if not self._unsupported_logged:
                self._unsupported_logged = True
                self._log.info(
                    "no process watchdog on %s: what a model's process starts itself may "
                    "outlive a killed llmux",
                    sys.platform,
                )
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [
            sys.executable,
            "-I",
            "-S",
            os.path.abspath(__file__),
            self._instance,
            str(os.getpid()),
            repr(self._interval),
            self._log_format or _root_log_format(),
        ]
        try:
            with theirs:
                proc = subprocess.Popen(
                    argv,
                    stdin=theirs.fileno(),
                    stdout=subprocess.DEVNULL,
                    cwd="/",
                    start_new_session=True,  # a Ctrl-C or kill of llmux's group spares it
                )
        except OSError as exc:
            ours.close()
            self._log.error(
                "cannot start the process watchdog (%s): what a model's process starts itself "
                "may outlive a killed llmux",
                exc,
            )
            return
        self._sock, self._proc, self._started_at = ours, proc, time.monotonic()
        self._close_sock = weakref.finalize(self, ours.close)
        import asyncio  # loaded already in llmux; the watchdog process never gets here

        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        threading.Thread(
            target=_await_exit, args=(weakref.ref(self), proc), name="llmux-watchdog", daemon=True
        ).start()
        self._log.debug("process watchdog started (pid %d)", proc.pid)
        for pid, token in self._children.items():
            self._send(f"+{pid} {token}".encode(), restart=False)

    def close(self) -> None:
        """Close llmux's end. Like an exit of llmux: anything still registered is killed."""
        self._closed = True
        self._drop()

    def wait(self, timeout: float | None = None) -> int | None:
        """The watchdog's exit status once it has exited (after ``close``), None on timeout."""
        proc = self._proc or self._last_proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def token(self) -> str | None:
        """A fresh token for the next child (the watchdog is started if needed); None if there
        is no watchdog."""
        self.start()
        if self._sock is None:
            return None
        self._count += 1
        return f"{self._instance}.{self._count}"

    def child_hook(self, token: str | None) -> Callable[[], None] | None:
        """For the child's ``preexec_fn``: it registers itself before it can start anything."""
        sock = self._sock
        if token is None or sock is None:
            return None
        token_bytes = token.encode()

        def announce() -> None:  # runs in the forked child, before exec
            with contextlib.suppress(OSError):
                sock.send(b"+%d %s" % (os.getpid(), token_bytes), _SEND_FLAGS)

        return announce

    def register(self, pid: int, token: str | None) -> None:
        if token is None:
            return
        self._children[pid] = token
        self._send(f"+{pid} {token}".encode())

    def unregister(self, pid: int) -> None:
        if self._children.pop(pid, None) is not None:
            self._send(f"-{pid}".encode())

    def abandon(self, token: str | None) -> None:
        """The child of ``token`` could not be started (its exec failed after it registered)."""
        if token is not None:
            self._send(f"! {token}".encode())

    def sync(self, timeout: float = 10.0) -> bool:
        """Block until the watchdog has read all sent so far and scanned once more, so that it
        tracks every process of ours that exists now (for tests). False without a watchdog."""
        sock = self._sock
        if sock is None:
            return False
        with contextlib.suppress(BlockingIOError):
            while sock.recv(16, socket.MSG_DONTWAIT):  # answers to an earlier, timed-out sync
                pass
        try:
            sock.send(b"?", _SEND_FLAGS)
        except OSError:
            return False
        if not select.select([sock], [], [], timeout)[0]:
            return False
        return sock.recv(16) == b"."

    # -- internals
    def _send(self, message: bytes, *, restart: bool = True) -> None:
        sock = self._sock
        if sock is None:  # dropped after it died: start another (it is told every child)
            if restart and self._children:
                self.start()
            return
        try:
            sock.send(message, _SEND_FLAGS)
        except BlockingIOError:
            self._log.warning("process watchdog (pid %s) is stuck; lost: %r", self.pid, message)
        except OSError as exc:  # it is gone: start another, told about every child
            self._log.warning("process watchdog (pid %s) is gone (%s)", self.pid, exc)
            self._drop()
            if restart:
                self.start()

    def _drop(self) -> None:
        if self._close_sock is not None:
            self._close_sock()
        self._last_proc = self._proc or self._last_proc
        self._sock = self._proc = self._close_sock = None

    def _exited(self, proc: subprocess.Popen[bytes], returncode: int) -> None:
        """In the waiting thread: the watchdog exited although llmux did not close it."""
        if self._closed or self._proc is not proc:
            return
        loop = self._loop
        if loop is not None:  # else the next message finds it gone and starts another
            with contextlib.suppress(RuntimeError):  # the loop is closed: llmux is stopping
                loop.call_soon_threadsafe(self._replace, proc, returncode)

    def _replace(self, proc: subprocess.Popen[bytes], returncode: int) -> None:
        """In the loop: start another watchdog (told every child), unless this one died at once:
        then (it cannot run here, say) the next launch or stop tries again, not a loop."""
        if self._proc is not proc:
            return
        self._drop()
        if time.monotonic() - self._started_at < self._restart_after:
            self._log.error(
                "process watchdog (pid %d) exited at once with status %d; trying again with "
                "the next model",
                proc.pid,
                returncode,
            )
            return
        self._log.warning(
            "process watchdog (pid %d) exited with status %d; starting another",
            proc.pid,
            returncode,
        )
        self.start()


def _root_log_format() -> str:
    from llmux.logs import JsonFormatter

    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"


def _await_exit(ref: weakref.ref[Watchdog], proc: subprocess.Popen[bytes]) -> None:
    """The waiting thread: reap the watchdog (it holds no reference that keeps llmux's end open)."""
    returncode = proc.wait()
    watchdog = ref()
    if watchdog is not None:
        watchdog._exited(proc, returncode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
