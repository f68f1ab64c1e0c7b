"""``llmux serve``: build the app from config and run it on uvicorn."""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass

from llmux.config import print_config_error, read_config
from llmux.errors import ConfigError
from llmux.logs import setup_logging


@dataclass(frozen=True)
class ServeOptions:
    config_path: str | None
    host: str | None = None
    port: int | None = None
    log_level: str = "info"
    log_format: str = "text"
    watch: bool = False


def serve(options: ServeOptions) -> int:
    try:
        config = read_config(options.config_path)
    except ConfigError as exc:
        print_config_error(exc)
        return 2
    import uvicorn

    from llmux.api.app import LlmuxApp
    from llmux.api.server import ConnectionLimits, connection_cap, protocol_class, raise_file_limit
    from llmux.backends.process import ProcessLauncher
    from llmux.gpu import open_probe

    setup_logging(options.log_level, options.log_format)
    host = options.host or config.server.host
    port = options.port if options.port is not None else config.server.port
    gpu = open_probe()  # None without NVML: nothing is measured (DESIGN rule 10)
    total = gpu.total_gb() if gpu is not None else None
    path = options.config_path
    app = LlmuxApp(
        config,
        ProcessLauncher(),
        budget_gb=config.budget_gb(total),
        nvml_total_gb=total,
        config_source=lambda: read_config(path),
        watch_path=path if options.watch else None,
        gpu=gpu,
    )
    # Connections: the cap fits the open-file limit (raised to its hard value first), so that
    # a flood of connections can never take the files that children and upstreams need.
    file_limit = raise_file_limit()
    cap = connection_cap(config.server.max_connections, file_limit, len(config.models))
    logging.getLogger("llmux").info(
        "connections: at most %d open (max_connections %d, open-file limit %d)",
        cap,
        config.server.max_connections,
        file_limit,
    )

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Before uvicorn waits for the connections: streams that never end by themselves
            # (an open status page) end, and requests waiting for a model are answered, so the
            # graceful shutdown waits for requests in flight only.
            app.begin_shutdown()
            await super().shutdown(sockets)

    uvicorn_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        # uvicorn's httptools protocol with the header limit, timeouts and connection cap.
        http=protocol_class(ConnectionLimits.of(config.server, cap)),
        ws="none",  # llmux serves no WebSocket; an upgrade is an ordinary request
        lifespan="on",
        interface="asgi3",  # LlmuxApp.__call__ returns a coroutine; it is not one itself
        access_log=False,
        proxy_headers=False,  # llmux reads no client address; skip uvicorn's per-request wrapper
        server_header=False,
        log_level=options.log_level,
        log_config=None,
        timeout_graceful_shutdown=int(config.server.shutdown_grace) or None,
    )
    server = Server(uvicorn_config)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: a second Ctrl-C
        server.run()
    if not server.started:
        return 3  # uvicorn.run's exit status when start-up fails
    if gpu is not None:
        gpu.close()
    logging.getLogger("llmux").info("llmux stopped")
    return 0
