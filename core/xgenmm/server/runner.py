"""Running the app: `run_server` (blocking, what `xgenmm serve` calls) and `BackgroundServer` (a thread on
loopback, for tests and notebooks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..async_llm import AsyncLLM
from .app import build_app
from .config import ServerConfig
from .connections import uvicorn_options


def run_server(config: ServerConfig, llm: AsyncLLM | None = None) -> None:
    app = build_app(config, llm)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=5,
                **uvicorn_options(config))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """Serve `config` from a daemon thread: `with BackgroundServer(config) as srv: srv.base_url ...`."""

    def __init__(self, config: ServerConfig, llm: AsyncLLM | None = None, start_timeout_s: float = 60.0):
        if not config.port:
            config.port = free_port(config.host)
        self.config = config
        self.app = build_app(config, llm)
        # log_config=None: leave the host process's logging alone (uvicorn's records propagate to its handlers).
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=config.host, port=config.port, log_config=None,
                                                     log_level="warning", timeout_graceful_shutdown=2,
                                                     **uvicorn_options(config)))
        self._thread = threading.Thread(target=self._server.run, name="xgenmm-server", daemon=True)
        self._start_timeout_s = start_timeout_s

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.base_url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
