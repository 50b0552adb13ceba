"""`RequestGuard`: what every request must pass before any route sees it (an ASGI middleware, so streaming and
disconnects are untouched).

* Host: a loopback server only answers its own names (127.0.0.1, localhost, [::1], the bound address and
  `--allowed-hosts`). A web page that rebinds a DNS name to 127.0.0.1 sends that name, so it is refused (the
  DNS-rebinding defence of Jupyter and the Docker API).
* Origin: a browser sends one on every cross-origin request; it must be in `--allowed-origins` (empty by default), so
  no web page can drive the server, with or without a key.
* Content-Type: a POST must say `application/json`: a browser's "simple" cross-origin request (text/plain, no
  preflight) is refused before its body is read.

Refusals are OpenAI-shaped errors (403 / 415) counted in the metrics. `/health` answers any client on an accepted
Host (probes do not send an Origin).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from .errors import OpenAIError

__all__ = ["RequestGuard"]


class RequestGuard:
    def __init__(self, app, *, accepted_hosts: frozenset[str] | None, allowed_origins: tuple[str, ...],
                 on_refusal: Callable[[int], None]) -> None:
        self.app = app
        self.accepted_hosts = accepted_hosts
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        self.any_origin = "*" in self.allowed_origins
        self.on_refusal = on_refusal

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err = self._check(scope, headers)
        if err is None:
            await self.app(scope, receive, send)
            return
        self.on_refusal(err.status)
        body = json.dumps(err.to_dict()).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _check(self, scope: dict[str, Any], headers: dict[str, str]) -> OpenAIError | None:
        if self.accepted_hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.accepted_hosts:
                return OpenAIError(f"the Host header {headers.get('host', '')!r} is not one this server answers to "
                                   "(xgenmm serve --allowed-hosts)", 403, "permission_error", None, "invalid_host")
        origin = headers.get("origin")
        if origin is not None and not self.any_origin and origin.rstrip("/").lower() not in self.allowed_origins:
            return OpenAIError(f"requests from the web origin {origin!r} are not allowed "
                               "(xgenmm serve --allowed-origins)", 403, "permission_error", None, "invalid_origin")
        if scope.get("method") == "POST":
            media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                return OpenAIError(f"the request body must be sent as application/json, not {media_type or 'untyped'}",
                                   415, "invalid_request_error", None, "unsupported_media_type")
        return None


def _host_name(host: str) -> str:
    """The name of a Host header, without its port (`[::1]:8000` -> `::1`, `localhost:8000` -> `localhost`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
