"""A model child that leaves processes behind in every way a real engine might (for the watchdog).

    python tests/escaper.py --port N --pids FILE KIND [KIND ...]

Before it answers ``GET /health`` with 200 it starts one ``sleep 1000`` per KIND and writes
``{"pid": its own pid, KIND: pid, ...}`` to FILE:

- ``group``: in its own process group (what a group kill already takes)
- ``pgroup``: moved to a process group of its own (``setpgid``), same session
- ``session``: in a session of its own (``setsid``)
- ``daemon``: daemonized: a helper calls ``setsid``, forks it and exits, so init adopts it
- ``nested``: a helper that stays in the group starts it in a session of its own with an empty
  environment
- ``clean``: in a session of its own with an empty environment
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

SLEEP = shutil.which("sleep") or "/bin/sleep"

DAEMONIZE = f"""
import os
os.setsid()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_RDWR), 1)
    os.execv({SLEEP!r}, [{SLEEP!r}, "1000"])
print(pid, flush=True)
os._exit(0)
"""

NESTED = f"""
import subprocess, sys, time
child = subprocess.Popen([{SLEEP!r}, "1000"], env={{}}, start_new_session=True)
print(child.pid, flush=True)
time.sleep(1000)
"""

KINDS = ("group", "pgroup", "session", "daemon", "nested", "clean")


def spawn(kind: str) -> int:
    sleep = [SLEEP, "1000"]
    if kind == "group":
        return subprocess.Popen(sleep).pid
    if kind == "pgroup":
        return subprocess.Popen(sleep, process_group=0).pid
    if kind == "session":
        return subprocess.Popen(sleep, start_new_session=True).pid
    if kind == "clean":
        return subprocess.Popen(sleep, env={}, start_new_session=True).pid
    code = DAEMONIZE if kind == "daemon" else NESTED
    helper = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert helper.stdout is not None
    pid = int(helper.stdout.readline())
    if kind == "daemon":
        helper.wait()
    return pid


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pids", required=True, metavar="FILE")
    parser.add_argument("kinds", nargs="*", choices=KINDS, metavar="KIND")
    args = parser.parse_args()
    pids = {"pid": os.getpid(), **{kind: spawn(kind) for kind in args.kinds}}
    with open(args.pids + ".tmp", "w") as f:
        json.dump(pids, f)
    os.replace(args.pids + ".tmp", args.pids)
    HTTPServer(("127.0.0.1", args.port), Health).serve_forever()


if __name__ == "__main__":
    main()
