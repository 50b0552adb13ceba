"""Slow and idle clients: how long a connection may take to send its headers, its body, or nothing at all, and how
many connections the server holds at once.

uvicorn's defaults leave a connection open for as long as a client trickles its headers or sits silent before its
first request (its keep-alive timer only starts after a response, and any byte cancels it). `guarded_h11(...)` is
uvicorn's h11 protocol with one more timer: from the moment a connection opens the client
has `header_timeout_s` to complete a request's headers, or the connection is closed; on a kept-alive connection the
clock starts with the first byte of the next request. Idle keep-alive connections are closed after
`keep_alive_timeout_s` (uvicorn's timer), and past `max_connections` new connections get a 503
(uvicorn's `limit_concurrency`). Body timeouts (per chunk and in total) are enforced where the body is read
(`app.read_body_limited`), as a 408 that closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["guarded_h11", "uvicorn_options"]

logger = logging.getLogger("xgenmm.server")


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections that do not complete a request's headers in time."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _timed_cycle: Any = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self._header_timer is not None and self.cycle is not self._timed_cycle:
                self._cancel_header_timer()  # a new request's headers are complete

        def data_received(self, data: bytes) -> None:
            # The first bytes of a new request on a kept-alive connection start its header clock (until then the
            # idle connection is uvicorn's keep-alive timer's business).
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()
            super().data_received(data)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._timed_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                logger.info("closing a connection that sent no complete request headers in %.1f s", header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_options(config) -> dict[str, Any]:
    """The uvicorn.Config / uvicorn.run options for a `ServerConfig`'s connection limits."""
    return {"http": guarded_h11(config.header_timeout_s), "timeout_keep_alive": config.keep_alive_timeout_s,
            "limit_concurrency": config.max_connections}
