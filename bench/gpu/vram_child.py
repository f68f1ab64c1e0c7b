"""A model stand-in for the NVML check: holds a known amount of GPU memory (torch, CUDA).

    python3 bench/gpu/vram_child.py --port N --name NAME --gb X [--grow-gb Y] [--marks DIR]
    python3 bench/gpu/vram_child.py --name hog --leave-gb X --hold S --marks DIR   (no server)

As a server it answers ``GET /health`` and ``POST /v1/chat/completions`` (OpenAI-shaped, the
answer is ``"NAME holds X GB"``); the first chat request allocates ``--grow-gb`` more and keeps
it (a model whose use grows with its first requests). With ``--hold S`` it allocates, holds the
memory ``S`` seconds and exits: another program's memory that llmux must wait for.
``--leave-gb X`` allocates all the device shows free after CUDA is up, less ``X``.

``--marks DIR`` gets ``NAME.started`` (written first, before torch is imported),
``NAME.allocated`` and, with ``--hold``, ``NAME.exiting``: each holds ``time.time()``.
Sizes are GB (10^9 bytes), like llmux's. SIGTERM ends it (the default action).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def mark(marks: str | None, name: str, what: str) -> None:
    if marks:
        Path(marks, f"{name}.{what}").write_text(f"{time.time():.6f}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int)
    parser.add_argument("--name", default="child")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--gb", type=float, help="GB to allocate at start")
    size.add_argument("--leave-gb", type=float, help="allocate all that is free but this")
    parser.add_argument("--grow-gb", type=float, default=0.0, help="GB more at the first chat")
    parser.add_argument("--hold", type=float, help="no server: hold the memory S s, then exit")
    parser.add_argument("--marks", help="directory for the timestamp files")
    args = parser.parse_args(argv)
    mark(args.marks, args.name, "started")

    torch: Any = importlib.import_module("torch")
    if args.gb is None:
        torch.cuda.init()
        free, _ = torch.cuda.mem_get_info()  # with this process's CUDA context taken
        args.gb = max(free / 1e9 - args.leave_gb, 0.0)
    held = [torch.empty(int(args.gb * 1e9), dtype=torch.uint8, device="cuda")]
    torch.cuda.synchronize()
    mark(args.marks, args.name, "allocated")
    print(f"{args.name} pid {os.getpid()} holds {args.gb:.2f} GB", flush=True)

    if args.hold is not None:
        time.sleep(args.hold)
        mark(args.marks, args.name, "exiting")
        return 0
    if args.port is None:
        parser.error("--port is needed unless --hold is given")

    grow_lock = threading.Lock()
    name = args.name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *log_args: Any) -> None:
            pass

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, {"status": "ok"})
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/chat/completions":
                self._answer(404, {"error": "not found"})
                return
            with grow_lock:
                if args.grow_gb > 0 and len(held) == 1:
                    more = int(args.grow_gb * 1e9)
                    held.append(torch.empty(more, dtype=torch.uint8, device="cuda"))
                    torch.cuda.synchronize()
            total = args.gb + (args.grow_gb if len(held) > 1 else 0.0)
            answer = f"{name} holds {total:g} GB"
            self._answer(
                200,
                {
                    "id": "chatcmpl-vram",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request.get("model", name),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
