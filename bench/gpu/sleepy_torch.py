"""A sleepable model stand-in for the GPU sleep check: vLLM's sleep API, served for real.

    python3 bench/gpu/sleepy_torch.py --port N --name NAME --gb W [--cache-gb K] [--seed S]
        [--weights-file F] [--cold-start-s S] [--stats FILE] [--backend torch|bytes]
    python3 bench/gpu/sleepy_torch.py --prepare --weights-file F --gb W [--seed S]

It holds ``--gb`` GB of CUDA memory as "weights" (a deterministic pattern of ``--seed``) and
``--cache-gb`` more as a "KV cache", and serves (stdlib ``http.server``, like vram_child.py):

- ``POST /sleep?level=N`` (the level in the query string, as vLLM reads it): level 1 copies the
  weights to pinned host memory, level 2 drops them; both drop the cache and give the CUDA
  memory back to the driver (``torch.cuda.empty_cache``), so NVML sees it free. Only the CUDA
  context stays.
- ``POST /wake_up`` (optional ``tags=weights``/``tags=kv_cache``, as vLLM's): allocates again
  (zeroed, so a wake that forgot the copy is caught) and copies the weights back (level 1); after
  level 2 the weights stay empty until ``POST /collective_rpc`` ``{"method": "reload_weights"}``
  reads them again from ``--weights-file`` (or regenerates them without one).
- ``POST /reset_prefix_cache``, ``GET /is_sleeping`` (``{"is_sleeping": bool}``), ``GET /health``.
- ``POST /v1/chat/completions``: the answer is ``"NAME pid=PID checksum=HEX"``, a checksum of
  the weights read on the device, so a wake that lost data shows (checksum before sleep ==
  after wake). While asleep it answers 503, and with unloaded weights 500; both are counted
  (``refused_asleep``, ``refused_no_weights``): llmux must never relay to a sleeping engine.
- ``GET /_stats``: what ``--stats FILE`` holds too (rewritten after every call): the cold start
  phases, every sleep/wake with its timings, the counts.

The cold start reads the weights from ``--weights-file`` (writing it first if it is missing),
as a real engine loads them from disk; ``--prepare`` only writes that file, prints its checksum
and exits. ``--cold-start-s`` adds that many seconds before it serves (a slow engine's init);
by default the cold start is what it really takes (Python, torch, the CUDA context, the weights).

``--backend bytes`` keeps the "device" memory in a bytearray instead (no torch): for the tests
of this file on machines without CUDA, never for the GPU check. Sizes are GB (10^9 bytes),
rounded up to whole MiB. Exit status 3: no torch or no CUDA.
"""

from __future__ import annotations

import time

STARTED_AT = time.time()
"""Before the heavy imports: the cold start counts from here."""

import argparse  # noqa: E402  (the start time is taken first)
import hashlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Protocol  # noqa: E402
from urllib.parse import parse_qs, urlsplit  # noqa: E402

CHUNK = 1 << 20
"""Checksum granularity (bytes): the checksum hashes the sum of each MiB, in order."""
BLOCK = 256 << 20
"""Generation and file I/O go by blocks of this many bytes (a multiple of CHUNK)."""
SUM_CHUNKS = 8
"""Chunks summed at once on the device (their int64 copy: 64 MiB)."""
NO_CUDA_EXIT = 3


def nbytes_of(gb: float) -> int:
    """``gb`` GB (10^9 bytes) rounded up to whole chunks."""
    chunks = -(-round(gb * 1e9) // CHUNK)
    return max(chunks, 0) * CHUNK


def digest(sums: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, sums)).encode()).hexdigest()[:16]


class Memory(Protocol):
    """The stand-in's memory operations. Buffers are opaque to the engine: a CUDA tensor
    (``TorchMemory``) or a bytearray (``BytesMemory``)."""

    kind: str

    def init(self) -> None:
        """Bring the device up (the CUDA context)."""

    def zeros(self, nbytes: int) -> Any:
        """A zeroed device buffer of ``nbytes``."""

    def fill(self, buf: Any, seed: int) -> None:
        """Fill ``buf`` with the pattern of ``seed`` (the same bytes ``write_pattern`` writes)."""

    def write_pattern(self, path: Path, nbytes: int, seed: int) -> str:
        """Write ``nbytes`` of the pattern of ``seed`` to ``path``; return their checksum."""

    def load(self, path: Path, buf: Any) -> None:
        """Read ``path`` (exactly the buffer's size) into ``buf``."""

    def to_host(self, buf: Any) -> tuple[Any, bool]:
        """A host copy of ``buf`` (pinned where possible) and whether it is pinned."""

    def from_host(self, host: Any, buf: Any) -> None:
        """Copy a host copy back into ``buf``."""

    def checksum(self, buf: Any) -> str:
        """A checksum of the bytes in ``buf``, read where they live."""

    def release(self) -> None:
        """Give the freed device memory back to the driver (after the engine dropped it)."""


class TorchMemory:
    """CUDA memory through torch (imported at construction: raises ImportError without it)."""

    kind = "torch"

    def __init__(self) -> None:
        self.torch: Any = importlib.import_module("torch")

    def init(self) -> None:
        torch = self.torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        torch.cuda.init()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()

    def zeros(self, nbytes: int) -> Any:
        buf = self.torch.zeros(nbytes, dtype=self.torch.uint8, device="cuda")
        self.torch.cuda.synchronize()
        return buf

    def _blocks(self, nbytes: int, seed: int) -> Any:
        """The pattern of ``seed``, block by block, generated on the device."""
        torch = self.torch
        gen = torch.Generator(device="cuda")
        gen.manual_seed(seed)
        for off in range(0, nbytes, BLOCK):
            size = min(BLOCK, nbytes - off)
            block = torch.empty(size, dtype=torch.uint8, device="cuda")
            block.random_(generator=gen)  # uniform over the whole uint8 range
            yield off, block

    def fill(self, buf: Any, seed: int) -> None:
        for off, block in self._blocks(buf.numel(), seed):
            buf[off : off + block.numel()].copy_(block)
        self.release()  # the blocks: the process holds the weights, no more

    def _sums(self, buf: Any) -> list[int]:
        # A few chunks at a time: sum(dtype=int64) first casts its input to int64 (8x the
        # bytes), which on the whole buffer would not fit.
        torch = self.torch
        n = buf.numel() // CHUNK
        out = torch.empty(n, dtype=torch.int64, device=buf.device)
        for i in range(0, n, SUM_CHUNKS):
            j = min(n, i + SUM_CHUNKS)
            part = buf[i * CHUNK : j * CHUNK].view(j - i, CHUNK)
            out[i:j] = part.sum(dim=1, dtype=torch.int64)
        sums: list[int] = out.cpu().tolist()
        return sums

    def write_pattern(self, path: Path, nbytes: int, seed: int) -> str:
        torch = self.torch
        staging = bytearray(min(BLOCK, nbytes))
        host = torch.frombuffer(staging, dtype=torch.uint8) if staging else None
        sums: list[int] = []
        with path.open("wb") as f:
            for _, block in self._blocks(nbytes, seed):
                size = block.numel()
                sums += self._sums(block)
                assert host is not None
                host[:size].copy_(block)  # device to host, synchronous
                f.write(memoryview(staging)[:size])
        self.release()
        return digest(sums)

    def load(self, path: Path, buf: Any) -> None:
        torch = self.torch
        nbytes = buf.numel()
        if path.stat().st_size != nbytes:
            raise ValueError(f"{path} holds {path.stat().st_size} bytes, not {nbytes}")
        staging = bytearray(min(BLOCK, nbytes))
        host = torch.frombuffer(staging, dtype=torch.uint8) if staging else None
        with path.open("rb") as f:
            for off in range(0, nbytes, BLOCK):
                size = min(BLOCK, nbytes - off)
                read_exactly(f, memoryview(staging)[:size])
                assert host is not None
                buf[off : off + size].copy_(host[:size])  # host to device, synchronous
        torch.cuda.synchronize()

    def to_host(self, buf: Any) -> tuple[Any, bool]:
        torch = self.torch
        try:
            host = torch.empty(buf.numel(), dtype=torch.uint8, pin_memory=True)
            pinned = True
        except RuntimeError:  # no pinned memory here: a pageable copy (slower)
            host = torch.empty(buf.numel(), dtype=torch.uint8)
            pinned = False
        host.copy_(buf)
        torch.cuda.synchronize()
        return host, pinned

    def from_host(self, host: Any, buf: Any) -> None:
        buf.copy_(host)
        self.torch.cuda.synchronize()

    def checksum(self, buf: Any) -> str:
        return digest(self._sums(buf))

    def release(self) -> None:
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()


class BytesMemory:
    """A bytearray "device": the same engine without torch or CUDA (tests only)."""

    kind = "bytes"

    def init(self) -> None:
        pass

    def zeros(self, nbytes: int) -> bytearray:
        return bytearray(nbytes)

    @staticmethod
    def _blocks(nbytes: int, seed: int) -> Any:
        rng = random.Random(seed)
        for off in range(0, nbytes, BLOCK):
            yield off, rng.randbytes(min(BLOCK, nbytes - off))

    def fill(self, buf: bytearray, seed: int) -> None:
        for off, block in self._blocks(len(buf), seed):
            buf[off : off + len(block)] = block

    def write_pattern(self, path: Path, nbytes: int, seed: int) -> str:
        sums: list[int] = []
        with path.open("wb") as f:
            for _, block in self._blocks(nbytes, seed):
                sums += chunk_sums(block)
                f.write(block)
        return digest(sums)

    def load(self, path: Path, buf: bytearray) -> None:
        if path.stat().st_size != len(buf):
            raise ValueError(f"{path} holds {path.stat().st_size} bytes, not {len(buf)}")
        with path.open("rb") as f:
            read_exactly(f, memoryview(buf))

    def to_host(self, buf: bytearray) -> tuple[bytes, bool]:
        return bytes(buf), False

    def from_host(self, host: bytes, buf: bytearray) -> None:
        buf[:] = host

    def checksum(self, buf: bytearray) -> str:
        return digest(chunk_sums(buf))

    def release(self) -> None:
        pass


def chunk_sums(data: bytes | bytearray) -> list[int]:
    return [sum(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]


def read_exactly(f: Any, view: memoryview) -> None:
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"{f.name}: ended {len(view) - done} bytes early")
        done += got


def open_memory(kind: str) -> Memory:
    return BytesMemory() if kind == "bytes" else TorchMemory()


class Asleep(Exception):
    """A request reached the engine while it sleeps."""


class NoWeights(Exception):
    """A request reached the engine after a level-2 wake, before reload_weights."""


class Engine:
    """The stand-in's state: weights and cache on the device, or asleep. One call at a time."""

    def __init__(
        self,
        memory: Memory,
        *,
        name: str,
        weights_bytes: int,
        cache_bytes: int,
        seed: int,
        weights_file: Path | None,
        stats_path: Path | None = None,
    ) -> None:
        self.memory = memory
        self.name = name
        self.weights_bytes = weights_bytes
        self.cache_bytes = cache_bytes
        self.seed = seed
        self.weights_file = weights_file
        self.stats_path = stats_path
        self.lock = threading.Lock()
        self.weights: Any = None
        self.cache: Any = None
        self.host: Any = None
        """The level-1 copy of the weights while asleep."""
        self.level: int | None = None
        """1 or 2 while asleep; None awake."""
        self.weights_valid = False
        self.stats: dict[str, Any] = {
            "name": name,
            "pid": os.getpid(),
            "backend": memory.kind,
            "started_at": STARTED_AT,
            "ready_at": None,
            "weights_bytes": weights_bytes,
            "cache_bytes": cache_bytes,
            "seed": seed,
            "weights_file": str(weights_file) if weights_file else None,
            "cold": {},
            "checksum_at_start": None,
            "calls": [],
            "counts": {
                "sleep": 0,
                "wake_up": 0,
                "reload_weights": 0,
                "reset_prefix_cache": 0,
                "is_sleeping": 0,
                "chat": 0,
                "refused_asleep": 0,
                "refused_no_weights": 0,
            },
        }

    # ------------------------------------------------------------------ state

    @property
    def sleeping(self) -> bool:
        return self.weights is None or self.cache is None

    def device_bytes(self) -> int:
        return (self.weights_bytes if self.weights is not None else 0) + (
            self.cache_bytes if self.cache is not None else 0
        )

    def snapshot(self) -> dict[str, Any]:
        out = dict(self.stats)
        out.update(
            state="asleep" if self.sleeping else "awake",
            level=self.level,
            weights_valid=self.weights_valid,
            device_bytes=self.device_bytes(),
        )
        return out

    def save_stats(self) -> None:
        if self.stats_path is None:
            return
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1))
        tmp.replace(self.stats_path)

    def _record(self, op: str, took: float, **detail: Any) -> None:
        self.stats["calls"].append({"op": op, "at": time.time(), "s": round(took, 6), **detail})
        words = " ".join(f"{k}={v}" for k, v in detail.items())
        print(f"{self.name} {op} {took:.3f} s {words}".rstrip(), flush=True)
        self.save_stats()

    def _load_weights(self) -> str:
        """Fill the (allocated) weights from the file, writing it first if it is missing, or
        generate them without a file. Returns where they came from."""
        if self.weights_file is None:
            self.memory.fill(self.weights, self.seed)
            return "generated"
        source = "file"
        if not self.weights_file.exists():
            self.memory.write_pattern(self.weights_file, self.weights_bytes, self.seed)
            source = "file (written first)"
        self.memory.load(self.weights_file, self.weights)
        return source

    # -------------------------------------------------------------- lifecycle

    def cold_start(self, import_s: float, init_s: float, extra_s: float) -> None:
        """After ``memory.init()`` (which took ``init_s``): weights, cache, ready."""
        t1 = time.perf_counter()
        self.weights = self.memory.zeros(self.weights_bytes)
        source = self._load_weights()
        self.weights_valid = True
        t2 = time.perf_counter()
        self.cache = self.memory.zeros(self.cache_bytes)
        t3 = time.perf_counter()
        if extra_s > 0:
            time.sleep(extra_s)
        checksum = self.memory.checksum(self.weights)
        self.stats["checksum_at_start"] = checksum
        self.stats["ready_at"] = time.time()
        self.stats["cold"] = {
            "import_s": round(import_s, 6),
            "init_s": round(init_s, 6),
            "weights_s": round(t2 - t1, 6),
            "weights_from": source,
            "cache_s": round(t3 - t2, 6),
            "extra_s": extra_s,
            "total_s": round(self.stats["ready_at"] - STARTED_AT, 6),
        }
        print(
            f"{self.name} pid {os.getpid()} ready: {self.weights_bytes / 1e9:.2f} GB weights "
            f"({source}) + {self.cache_bytes / 1e9:.2f} GB cache, checksum {checksum}, "
            f"cold start {self.stats['cold']['total_s']:.2f} s",
            flush=True,
        )
        self.save_stats()

    def sleep(self, level: int) -> None:
        with self.lock:
            self.stats["counts"]["sleep"] += 1
            if self.sleeping:
                self._record("sleep", 0.0, level=level, noop="already asleep")
                return
            t0 = time.perf_counter()
            pinned = None
            if level == 1:
                self.host, pinned = self.memory.to_host(self.weights)
            t1 = time.perf_counter()
            self.weights = None
            self.cache = None
            self.weights_valid = False
            self.memory.release()
            t2 = time.perf_counter()
            self.level = level
            self._record(
                "sleep",
                t2 - t0,
                level=level,
                offload_s=round(t1 - t0, 6),
                free_s=round(t2 - t1, 6),
                pinned=pinned,
            )

    def wake(self, tags: list[str]) -> None:
        with self.lock:
            self.stats["counts"]["wake_up"] += 1
            wanted = set(tags) or {"weights", "kv_cache"}
            if not self.sleeping:
                self._record("wake_up", 0.0, noop="awake")
                return
            t0 = time.perf_counter()
            copied = False
            if "weights" in wanted and self.weights is None:
                self.weights = self.memory.zeros(self.weights_bytes)
                if self.host is not None:
                    self.memory.from_host(self.host, self.weights)
                    self.host = None
                    self.weights_valid = True
                    copied = True
            t1 = time.perf_counter()
            if "kv_cache" in wanted and self.cache is None:
                self.cache = self.memory.zeros(self.cache_bytes)
            t2 = time.perf_counter()
            level = self.level
            if not self.sleeping:
                self.level = None
            self._record(
                "wake_up",
                t2 - t0,
                level=level,
                tags=sorted(wanted),
                weights_s=round(t1 - t0, 6),
                copied_back=copied,
                cache_s=round(t2 - t1, 6),
            )

    def reload_weights(self) -> None:
        with self.lock:
            self.stats["counts"]["reload_weights"] += 1
            if self.weights is None:
                raise Asleep("reload_weights while the weights are asleep: wake_up first")
            t0 = time.perf_counter()
            source = self._load_weights()
            self.weights_valid = True
            self._record("reload_weights", time.perf_counter() - t0, source=source)

    def reset_prefix_cache(self) -> None:
        with self.lock:
            self.stats["counts"]["reset_prefix_cache"] += 1
            self._record("reset_prefix_cache", 0.0)

    def is_sleeping(self) -> bool:
        with self.lock:
            self.stats["counts"]["is_sleeping"] += 1
            return self.sleeping

    def chat(self) -> str:
        """The answer's text, with the weights' checksum read now."""
        with self.lock:
            self.stats["counts"]["chat"] += 1
            if self.sleeping:
                self.stats["counts"]["refused_asleep"] += 1
                self.save_stats()
                raise Asleep(f"{self.name} is asleep (level {self.level}): not served")
            if not self.weights_valid:
                self.stats["counts"]["refused_no_weights"] += 1
                self.save_stats()
                raise NoWeights(f"{self.name}: weights not loaded (reload_weights after wake_up)")
            checksum = self.memory.checksum(self.weights)
            self.save_stats()
            return f"{self.name} pid={os.getpid()} checksum={checksum}"


def make_handler(engine: Engine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *log_args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, code: str) -> None:
            error = {"message": message, "type": code, "param": None, "code": code}
            self._answer(status, {"error": error})

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/health":
                self._answer(200)
            elif path == "/is_sleeping":
                self._answer(200, {"is_sleeping": engine.is_sleeping()})
            elif path == "/_stats":
                with engine.lock:
                    self._answer(200, engine.snapshot())
            else:
                self._error(404, f"no route {path}", "not_found")

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                self._error(400, "the body is not JSON", "invalid_request_error")
                return
            try:
                self._post(url.path, query, body)
            except Asleep as exc:
                self._error(503, str(exc), "engine_asleep")
            except NoWeights as exc:
                self._error(500, str(exc), "weights_not_loaded")
            except Exception as exc:  # a real failure of the engine: say it, keep serving
                self._error(500, f"{type(exc).__name__}: {exc}", "engine_error")

        def _post(self, path: str, query: dict[str, list[str]], body: Any) -> None:
            if path == "/sleep":
                level = query.get("level", ["1"])[0]
                if level not in ("1", "2"):
                    self._error(400, f"level must be 1 or 2, not {level!r}", "bad_level")
                    return
                engine.sleep(int(level))
                self._answer(200)
            elif path == "/wake_up":
                engine.wake(query.get("tags", []))
                self._answer(200)
            elif path == "/collective_rpc":
                method = body.get("method") if isinstance(body, dict) else None
                if method != "reload_weights":
                    self._error(400, f"unknown method {method!r}", "unknown_method")
                    return
                engine.reload_weights()
                self._answer(200, {"results": [None]})
            elif path == "/reset_prefix_cache":
                engine.reset_prefix_cache()
                self._answer(200)
            elif path == "/v1/chat/completions":
                text = engine.chat()
                model = body.get("model", engine.name) if isinstance(body, dict) else engine.name
                self._answer(200, chat_answer(model, text))
            else:
                self._error(404, f"no route {path}", "not_found")

    return Handler


def chat_answer(model: str, text: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-sleepy-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    first = __doc__.splitlines()[0] if __doc__ else None
    parser = argparse.ArgumentParser(description=first)
    parser.add_argument("--port", type=int, help="serve on this port (127.0.0.1)")
    parser.add_argument("--name", default="sleepy")
    parser.add_argument("--gb", type=float, required=True, help="GB of weights")
    parser.add_argument("--cache-gb", type=float, default=0.0, help="GB of KV cache")
    parser.add_argument("--seed", type=int, default=1, help="the weights' pattern")
    parser.add_argument("--weights-file", type=Path, help="where the weights live on disk")
    parser.add_argument("--cold-start-s", type=float, default=0.0, help="extra init seconds")
    parser.add_argument("--stats", type=Path, help="rewrite this JSON file after every call")
    parser.add_argument("--backend", choices=("torch", "bytes"), default="torch")
    parser.add_argument("--prepare", action="store_true", help="write --weights-file and exit")
    args = parser.parse_args(argv)
    if args.prepare and args.weights_file is None:
        parser.error("--prepare needs --weights-file")
    if not args.prepare and args.port is None:
        parser.error("--port is needed (unless --prepare)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        memory = open_memory(args.backend)
        t1 = time.perf_counter()
        memory.init()
    except (ImportError, RuntimeError, AssertionError) as exc:
        print(f"{args.name}: no torch with CUDA here: {exc}", file=sys.stderr, flush=True)
        return NO_CUDA_EXIT
    t2 = time.perf_counter()
    if args.prepare:
        nbytes = nbytes_of(args.gb)
        checksum = memory.write_pattern(args.weights_file, nbytes, args.seed)
        done = {
            "weights_file": str(args.weights_file),
            "bytes": nbytes,
            "seed": args.seed,
            "checksum": checksum,
            "write_s": round(time.perf_counter() - t2, 3),
        }
        print(json.dumps(done), flush=True)
        return 0
    engine = Engine(
        memory,
        name=args.name,
        weights_bytes=nbytes_of(args.gb),
        cache_bytes=nbytes_of(args.cache_gb),
        seed=args.seed,
        weights_file=args.weights_file,
        stats_path=args.stats,
    )
    engine.cold_start(import_s=t1 - t0, init_s=t2 - t1, extra_s=args.cold_start_s)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(engine))
    server.daemon_threads = True
    print(f"{args.name} serving on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
