"""``llmux``: serve, check-config, and the client commands (status, load, unload, sleep,
logs)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

import yaml

from llmux.config import Config, default_config_text, load_config, print_config_error
from llmux.errors import ConfigError

if TYPE_CHECKING:
    import httpx
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from llmux.api.wire import HostStatus, ModelStatus, Status, VramStatus

DEFAULT_URL = "http://127.0.0.1:8080"


def _resolved_yaml(config: Config) -> str:
    data = config.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)


def _serve(args: argparse.Namespace) -> int:
    if args.print_config:
        sys.stdout.write(default_config_text() if args.config is None else _read(args.config))
        return 0
    from llmux.serve import ServeOptions, serve

    return serve(
        ServeOptions(
            config_path=args.config,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            log_format=args.log_format,
            watch=args.watch,
        )
    )


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _unloadable_models(config: Config) -> list[str]:
    """Engine models whose ``model:`` cannot be found on this machine (a packaged model whose
    package is missing, a path that does not exist). Not a config error: llmux serves the rest,
    and each load of such a model fails with this message."""
    from llmux.engines import EngineError, check_model

    problems = []
    for model_id, m in config.models.items():
        if m.engine is not None and m.model is not None:
            try:
                check_model(m.engine, m.model)
            except EngineError as exc:
                problems.append(f"models.{model_id}.model: {exc}")
    return problems


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print_config_error(exc)
        return 2
    sys.stdout.write(_resolved_yaml(config))
    unloadable = _unloadable_models(config)
    if unloadable:
        print(f"{args.file}: valid, but these models cannot load here:", file=sys.stderr)
        for problem in unloadable:
            print(f"  - {problem}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- client commands
#
# status, load, unload, sleep and logs talk to a running `llmux serve` over HTTP. Every failure ends
# in one line on stderr and a distinct exit status, never a traceback:
#   1 an error answer (unknown model, failed load, ...), 2 bad usage (an invalid --url),
#   3 the server cannot be reached (or the connection broke), 4 a key is missing or not allowed,
#   130 interrupted (except `logs -f`, where Ctrl-C is the normal way out: 0).

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_INTERRUPTED = 130

ENV_URL = "LLMUX_URL"
ENV_KEY = "LLMUX_API_KEY"

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
"""Reads (status, logs) give up after this; load, unload and sleep wait as long as the server
takes."""

_STATE_STYLE = {
    "ready": "bold green",
    "loading": "yellow",
    "draining": "magenta",
    "unloading": "magenta",
    "unloaded": "dim",
    "sleeping": "blue",
    "waking": "cyan",
}
_ERROR_WIDTH = 60


def _fail(code: int, message: str) -> NoReturn:
    print(f"llmux: {message}", file=sys.stderr)
    raise SystemExit(code)


def _base_url(args: argparse.Namespace) -> str:
    url = str(args.url or os.environ.get(ENV_URL) or DEFAULT_URL).strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _key(args: argparse.Namespace) -> str | None:
    key = args.key or os.environ.get(ENV_KEY)
    return str(key) if key else None


def _model_path(model_id: str, action: str) -> str:
    return f"/models/{quote(model_id, safe='')}/{action}"


def _timeout(read: float | None) -> httpx.Timeout:
    import httpx

    return httpx.Timeout(read, connect=CONNECT_TIMEOUT_S)


def _transport_failure(url: str, exc: Exception) -> NoReturn:
    import httpx

    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        _fail(EXIT_USAGE, f"invalid --url {url!r}: {exc}")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        _fail(EXIT_UNREACHABLE, f"cannot reach {url} (is `llmux serve` running?)")
    if isinstance(exc, httpx.TimeoutException):
        _fail(EXIT_UNREACHABLE, f"{url} did not answer in time")
    _fail(EXIT_UNREACHABLE, f"lost the connection to {url}: {str(exc) or type(exc).__name__}")


def _error_of(resp: httpx.Response) -> tuple[str, str | None]:
    """The message and code of an error answer (OpenAI's envelope, or whatever came back)."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = error.get("code")
        return str(error.get("message") or resp.reason_phrase), (
            str(code) if code is not None else None
        )
    text = resp.text.strip()
    first = text.splitlines()[0][:200] if text else resp.reason_phrase
    return f"HTTP {resp.status_code} from {resp.url}: {first}", None


def _check(args: argparse.Namespace, resp: httpx.Response) -> None:
    """Exit with the right status and one line when ``resp`` is an error answer."""
    status = resp.status_code
    if status < 400:
        return
    message, code = _error_of(resp)
    message = " ".join(message.split())  # one line, whatever the server wrote
    if status == 401:
        hint = "check the key passed" if _key(args) else "pass one"
        _fail(EXIT_AUTH, f"{message}; {hint} with --key or ${ENV_KEY}")
    if status == 403:
        _fail(
            EXIT_AUTH, f"{message}; this needs an admin key (server.admin_keys), pass it with --key"
        )
    model_id = getattr(args, "id", None)
    if status == 404 and code == "model_not_found" and model_id is not None:
        _fail(EXIT_ERROR, f"no model named {model_id}")
    _fail(EXIT_ERROR, message)


def _send(
    args: argparse.Namespace, method: str, path: str, *, read_timeout: float | None
) -> httpx.Response:
    import httpx

    url = _base_url(args)
    key = _key(args)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        return httpx.request(method, url + path, headers=headers, timeout=_timeout(read_timeout))
    except (httpx.TransportError, httpx.InvalidURL) as exc:
        _transport_failure(url, exc)


def _client_call(
    args: argparse.Namespace, method: str, path: str, *, read_timeout: float | None = None
) -> dict[str, Any]:
    """One request to the server; its JSON body, or exit with one line on stderr."""
    resp = _send(args, method, path, read_timeout=read_timeout)
    _check(args, resp)
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        _fail(EXIT_ERROR, f"unexpected answer from {_base_url(args)}{path} (is it llmux?)")
    return body


def _client(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Ctrl-C and a closed stdout (``| head``) end a client command quietly."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except KeyboardInterrupt:
            print("llmux: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # Python would complain again when it flushes stdout at exit: point it at devnull.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0

    return run


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    s = max(0.0, now - when)
    if s < 1:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit} ago"
    return f"{int(s)}s ago"


def _truncate(text: str | None, width: int = _ERROR_WIDTH) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _bar(used: float, total: float, width: int, unicode: bool) -> tuple[str, str, str]:
    """(filled, empty, style) of a usage bar ``width`` cells wide."""
    fraction = min(1.0, max(0.0, used / total)) if total > 0 else 0.0
    filled = round(fraction * width)
    full, empty = ("█", "░") if unicode else ("#", "-")
    style = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    return full * filled, empty * (width - filled), style


def _vram_line(vram: VramStatus, unicode: bool) -> Text:
    from rich.text import Text

    budget, reserved = vram.budget_gb, vram.reserved_gb
    filled, empty, style = _bar(reserved, budget, 24, unicode)
    line = Text("VRAM ", style="bold")
    line.append(f"{reserved:.1f} / {budget:.1f} GB reserved  [")
    line.append(filled, style=style)
    line.append(empty, style="dim")
    line.append("]")
    if budget > 0:
        line.append(f" {100 * reserved / budget:.0f}%")
    if vram.measured_gb is not None:
        line.append(f"  measured {vram.measured_gb:.1f} GB", style="dim")
    return line


def _host_line(host: HostStatus, unicode: bool) -> Text:
    from rich.text import Text

    budget, reserved = host.budget_gb, host.reserved_gb
    filled, empty, style = _bar(reserved, budget, 24, unicode)
    line = Text("HOST ", style="bold")
    line.append(f"{reserved:.1f} / {budget:.1f} GB held by sleeping models  [")
    line.append(filled, style=style)
    line.append(empty, style="dim")
    line.append("]")
    if budget > 0:
        line.append(f" {100 * reserved / budget:.0f}%")
    return line


def _models_table(models: Sequence[ModelStatus], now: float, error_width: int) -> Table:
    """The table of models; no LAST ERROR column when ``error_width`` is 0."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    measured = any(m.measured_gb is not None for m in models)
    sleeps = any(m.sleep_level is not None for m in models)
    pinned = any(m.pinned for m in models)
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
        header_style="bold",
        caption="* pinned" if pinned else None,
        caption_justify="left",
        caption_style="dim",
    )
    longest = max((len(m.id) + 1 for m in models), default=5)
    table.add_column("MODEL", overflow="fold", min_width=min(longest, 16))
    for title in ("TYPE", "TIER", "STATE"):
        table.add_column(title, no_wrap=True)
    numbers = [
        "VRAM GB",
        *(["MEASURED"] if measured else []),
        *(["SLEEP"] if sleeps else []),
        "IN FLIGHT",
        "QUEUED",
        "PID",
    ]
    for title in [*numbers, "LAST USED"]:
        table.add_column(title, justify="right", no_wrap=True)
    if error_width:
        table.add_column("LAST ERROR", no_wrap=True, overflow="ellipsis")
    for m in models:
        state = m.state.value
        row = [
            Text(m.id + ("*" if m.pinned else "")),
            Text(m.type or ""),
            Text(m.tier),
            Text(state, style=_STATE_STYLE.get(state, "")),
            Text(_gb(m.vram_gb)),
            *([Text(_gb(m.measured_gb))] if measured else []),
            *([Text("-" if m.sleep_level is None else f"L{m.sleep_level}")] if sleeps else []),
            Text(str(m.in_flight)),
            Text(str(m.queued)),
            Text("-" if m.pid is None else str(m.pid)),
            Text(_ago(m.last_used, now)),
        ]
        if error_width:
            row.append(Text(_truncate(m.last_error, error_width), style="red"))
        table.add_row(*row)
    return table


def render_status(
    status: Status | Mapping[str, Any], console: Console, now: float | None = None
) -> None:
    """The `llmux status` view of a GET /status body (or the ``Status`` parsed from one): a VRAM
    line, a host line where a model can sleep, and a table of models.

    Last errors are cut to fit: in the table where there is room, else as lines under it."""
    from rich.measure import Measurement
    from rich.text import Text

    from llmux.api.wire import Status

    if not isinstance(status, Status):
        status = Status.model_validate(status)
    now = time.time() if now is None else now
    unicode = console.encoding.lower().startswith("utf")
    console.print(_vram_line(status.vram, unicode))
    models = status.models
    if status.host.reserved_gb > 0 or any(m.sleep_level is not None for m in models):
        console.print(_host_line(status.host, unicode))
    if not models:
        console.print("no models configured", style="dim")
        return
    errors = [m for m in models if m.last_error]
    rest = Measurement.get(console, console.options, _models_table(models, now, 0)).maximum
    room = min(_ERROR_WIDTH, console.width - rest - 3)
    if not errors or room >= 20:
        console.print(_models_table(models, now, max(room, 10) if errors else 0))
        return
    console.print(_models_table(models, now, 0))
    for m in errors:
        line = Text(f"{m.id}: ", style="bold")
        line.append(_truncate(m.last_error, max(20, console.width - len(line))), "red")
        console.print(line, no_wrap=True, overflow="ellipsis")


def _stdout_console() -> Console:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped or captured: no colour (rich's default), and room for every column.
        console = Console(highlight=False, width=max(console.width, 160))
    return console


@_client
def _status(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from llmux.api.wire import Status

    body = _client_call(args, "GET", "/status", read_timeout=READ_TIMEOUT_S)
    try:
        status = Status.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        _fail(
            EXIT_ERROR,
            f"unexpected answer from {_base_url(args)}/status (is it llmux?): "
            f"{where}: {first['msg']}",
        )
    if args.json:
        print(json.dumps(body, indent=2))  # as the server sent it, fields unknown here too
        return 0
    render_status(status, _stdout_console())
    return 0


def _change(args: argparse.Namespace, action: str, doing: str) -> int:
    from rich.console import Console

    path = _model_path(args.id, action)
    progress = Console(stderr=True)
    if progress.is_terminal:
        with progress.status(f"{doing} {args.id}…"):
            body = _client_call(args, "POST", path)
    else:
        body = _client_call(args, "POST", path)
    print(f"{body.get('id', args.id)}: {body.get('state', '?')}")
    return 0


@_client
def _load(args: argparse.Namespace) -> int:
    return _change(args, "load", "loading")


@_client
def _unload(args: argparse.Namespace) -> int:
    return _change(args, "unload", "unloading")


@_client
def _sleep(args: argparse.Namespace) -> int:
    return _change(args, "sleep", "sleeping")


def _follow(args: argparse.Namespace) -> int:
    import httpx

    url = _base_url(args)
    key = _key(args)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    path = _model_path(args.id, "logs")
    try:
        with httpx.stream(
            "GET",
            url + path,
            params={"follow": "true"},
            headers=headers,
            timeout=_timeout(None),
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                _check(args, resp)
            for chunk in resp.iter_text():
                sys.stdout.write(chunk)
                sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    except (httpx.TransportError, httpx.InvalidURL) as exc:
        _transport_failure(url, exc)
    return 0


@_client
def _logs(args: argparse.Namespace) -> int:
    if args.follow:
        return _follow(args)
    body = _client_call(args, "GET", _model_path(args.id, "logs"), read_timeout=READ_TIMEOUT_S)
    lines = [str(line) for line in body.get("lines", [])]
    if not lines:
        print(f"llmux: no output kept for {args.id} (is it loaded?)", file=sys.stderr)
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from llmux.sim.cli import main as simulate

    return simulate(args)


def _add_client_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    text: str,
    key_help: str,
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, description=text)
    p.add_argument("--url", help=f"the llmux server (default: ${ENV_URL}, else {DEFAULT_URL})")
    p.add_argument("--key", help=f"{key_help} (default: ${ENV_KEY})")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the server (built-in default config without --config)"
    )
    serve.add_argument("--config", help="YAML config file")
    serve.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default from config: 8080)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.add_argument("--log-format", default="text", choices=["text", "json"])
    serve.add_argument(
        "--watch", action="store_true", help="reload the config file when it changes (as SIGHUP)"
    )
    serve.add_argument(
        "--print-config", action="store_true", help="print the config that would be served"
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("file")
    check.set_defaults(func=_check_config)

    status = _add_client_parser(
        sub, "status", _status, "show models, state, memory, in flight", "an API key"
    )
    status.add_argument("--json", action="store_true", help="print GET /status as JSON")
    for name, func, text in [
        ("load", _load, "load a model and wait until it is ready"),
        ("unload", _unload, "unload a model (it drains first) and wait until it is gone"),
        (
            "sleep",
            _sleep,
            "put a model with `sleep:` to sleep (it drains first) and wait until it sleeps",
        ),
    ]:
        p = _add_client_parser(sub, name, func, text, "an admin key")
        p.add_argument("id", help="model id or alias")
    logs = _add_client_parser(
        sub, "logs", _logs, "print the last lines a model's process wrote", "an admin key"
    )
    logs.add_argument("id", help="model id or alias")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C"
    )
    sim = sub.add_parser("simulate", help="replay traces through the real scheduler and baselines")
    sim.add_argument("--scenario", help="scenario YAML (default: bench/scenarios/default.yaml)")
    sim.add_argument("--overlay", action="append", help="YAML merged over the scenario")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
    sim.add_argument("--policies", nargs="+", help="policies to run (default: the scenario's)")
    sim.add_argument("--sweep", action="append", help="also run a sweep: gpu, rate")
    sim.add_argument("--out", default="bench/results", help="output directory")
    sim.add_argument("--name", help="output name (default: the scenario's name)")
    sim.add_argument("--jobs", type=int, default=1, help="worker processes")
    sim.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    sim.set_defaults(func=_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
