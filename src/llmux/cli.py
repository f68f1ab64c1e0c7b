"""``llmux``: serve, check-config, and the client commands (status, load, unload)."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from typing import Any

import yaml

from llmux.config import Config, load_config
from llmux.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8080"


def default_config_text() -> str:
    return resources.files("llmux").joinpath("default.yaml").read_text(encoding="utf-8")


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


def print_config_error(exc: ConfigError) -> None:
    print(f"{exc.source}: invalid config", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print_config_error(exc)
        return 2
    sys.stdout.write(_resolved_yaml(config))
    return 0


def _client_call(args: argparse.Namespace, method: str, path: str) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        resp = httpx.request(method, args.url.rstrip("/") + path, headers=headers, timeout=None)
    except httpx.HTTPError as exc:
        print(f"llmux: cannot reach {args.url}: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    try:
        body = resp.json()
    except ValueError:
        body = {"error": {"message": resp.text}}
    if resp.status_code >= 400:
        message = body.get("error", {}).get("message", resp.text)
        print(f"llmux: {resp.status_code}: {message}", file=sys.stderr)
        raise SystemExit(1)
    return body


def _status(args: argparse.Namespace) -> int:
    body = _client_call(args, "GET", "/status")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    vram = body["vram"]
    print(f"VRAM budget {vram['budget_gb']:.2f} GB, reserved {vram['reserved_gb']:.2f} GB")
    print(f"{'MODEL':<20} {'TIER':<8} {'STATE':<10} {'GB':>6} {'IN FLIGHT':>9} {'QUEUED':>6}")
    for m in body["models"]:
        print(
            f"{m['id']:<20} {m['tier']:<8} {m['state']:<10} {m['vram_gb']:>6.2f} "
            f"{m['in_flight']:>9} {m['queued']:>6}"
        )
    return 0


def _load(args: argparse.Namespace) -> int:
    body = _client_call(args, "POST", f"/models/{args.id}/load")
    print(f"{body['id']}: {body['state']}")
    return 0


def _unload(args: argparse.Namespace) -> int:
    body = _client_call(args, "POST", f"/models/{args.id}/unload")
    print(f"{body['id']}: {body['state']}")
    return 0


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

    for name, func, text in [
        ("status", _status, "show models, state, memory, in flight"),
        ("load", _load, "load a model and wait until it is ready"),
        ("unload", _unload, "unload a model (it drains first)"),
    ]:
        p = sub.add_parser(name, help=text)
        if name != "status":
            p.add_argument("id")
        else:
            p.add_argument("--json", action="store_true")
        p.add_argument("--url", default=DEFAULT_URL)
        p.add_argument("--key", help="API key (admin key for load/unload)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
