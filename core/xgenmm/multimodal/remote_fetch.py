"""Fetching a remote image URL under the SSRF policy (stdlib only).

The host is resolved here; non-public addresses (loopback, private, link-local, CGNAT, multicast, reserved,
unspecified; IPv4 and IPv6, including IPv4 embedded in IPv6) are refused unless ``allow_private_addresses``; the
connection goes to the vetted address (no second DNS lookup, so no DNS-rebinding window) and the peer is re-checked
after connecting; at most 3 redirects are followed, each re-vetted; proxy environment variables are ignored; one
overall deadline covers lookup, connect and body; the body is streamed under the byte limit.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xgenmm.errors import ImageError, ImageSourceNotAllowedError, ImageTooLargeError

if TYPE_CHECKING:  # pragma: no cover
    from xgenmm.multimodal.image_sources import ImageInputPolicy

__all__ = ["MAX_REDIRECTS", "check_byte_limit", "fetch_remote_image", "is_public_address"]

MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024
_USER_AGENT = "xgenmm-image-fetcher/1"
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def check_byte_limit(num_bytes: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and num_bytes > max_bytes:
        raise ImageTooLargeError(f"{what}: image data is {num_bytes} bytes, over the limit of {max_bytes} bytes")


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast IP. IPv4 carried inside IPv6 (mapped, 6to4, Teredo, NAT64, the
    deprecated IPv4-compatible form) is judged by the IPv4 address it carries."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            return is_public_address(str(ip.ipv4_mapped))
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        if ip in _NAT64_PREFIX or ip in _IPV4_COMPATIBLE:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(not is_public_address(str(v4)) for v4 in embedded):
            return False
        if ip.is_site_local:
            return False
    if (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    ):
        return False
    return ip.is_global


class _HostResolver:
    """DNS lookups that cannot starve each other: one daemon thread per (host, port) being resolved, shared by every
    request that needs that name, each caller waiting only up to its own deadline. A slow name delays only the
    requests that need it (a shared pool of a few threads let four slow names time out every other lookup)."""

    MAX_NAMES_IN_FLIGHT = 64  # distinct names resolving at once; beyond that a lookup is refused, not queued

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, int], concurrent.futures.Future] = {}

    def resolve(self, host: str, port: int, timeout_s: float) -> list[str]:
        key = (host, port)
        with self._lock:
            future = self._in_flight.get(key)
            if future is None:
                if len(self._in_flight) >= self.MAX_NAMES_IN_FLIGHT:
                    raise OSError(f"too many host names are being resolved at once ({self.MAX_NAMES_IN_FLIGHT})")
                future = self._in_flight[key] = concurrent.futures.Future()
                threading.Thread(target=self._lookup, args=(key, future), name="xgenmm-dns", daemon=True).start()
        return future.result(timeout=timeout_s)

    def _lookup(self, key: tuple[str, int], future: concurrent.futures.Future) -> None:
        try:
            infos = socket.getaddrinfo(key[0], key[1], 0, socket.SOCK_STREAM)
            addresses: list[str] = []
            for _family, _type, _proto, _canon, sockaddr in infos:
                if str(sockaddr[0]) not in addresses:
                    addresses.append(str(sockaddr[0]))
            future.set_result(addresses)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            future.set_exception(exc)
        finally:
            with self._lock:
                self._in_flight.pop(key, None)


_RESOLVER = _HostResolver()


def _resolve_host(host: str, port: int, timeout_s: float) -> list[str]:
    """All addresses ``host`` resolves to (IP literals returned as is), with a deadline on the lookup."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return [host]
    except ValueError:
        pass
    return _RESOLVER.resolve(host, port, timeout_s)


@dataclass(frozen=True)
class _VettedTarget:
    url: str
    scheme: str
    host: str
    port: int
    request_path: str
    addresses: tuple[str, ...]


def _vet_url(url: str, policy: ImageInputPolicy, what: str, deadline: float) -> _VettedTarget:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageError(f"{what}: invalid URL {url!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or scheme not in policy.allowed_schemes:
        raise ImageSourceNotAllowedError(
            f"{what}: URL scheme {scheme!r} is not allowed for remote images "
            f"(allowed_schemes={list(policy.allowed_schemes)})"
        )
    host = parts.hostname
    if not host:
        raise ImageError(f"{what}: URL {url!r} has no host")
    port = port if port is not None else (443 if scheme == "https" else 80)
    try:
        addresses = _resolve_host(host, port, max(deadline - time.monotonic(), 0.001))
    except concurrent.futures.TimeoutError as exc:
        raise ImageError(f"{what}: resolving {host!r} timed out after {policy.fetch_timeout_s}s") from exc
    except (OSError, UnicodeError) as exc:
        raise ImageError(f"{what}: cannot resolve host {host!r}: {exc}") from exc
    if not addresses:
        raise ImageError(f"{what}: host {host!r} resolved to no address")
    if not policy.allow_private_addresses:
        for address in addresses:
            if not is_public_address(address):
                raise ImageSourceNotAllowedError(
                    f"{what}: host {host!r} resolves to the non-public address {address}; private, loopback and "
                    f"link-local addresses are not allowed; {policy.how_to_enable('allow_private_addresses')}"
                )
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return _VettedTarget(url, scheme, host, port, path, tuple(addresses))


def _same_address(a: str, b: str) -> bool:
    try:
        ip_a = ipaddress.ip_address(a.split("%", 1)[0])
        ip_b = ipaddress.ip_address(b.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip_a, ipaddress.IPv6Address) and ip_a.ipv4_mapped is not None:
        ip_a = ip_a.ipv4_mapped
    if isinstance(ip_b, ipaddress.IPv6Address) and ip_b.ipv4_mapped is not None:
        ip_b = ip_b.ipv4_mapped
    return ip_a == ip_b


_TLS_CONTEXT: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    """One verifying client context (loading the CA store per request is slow)."""
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        _TLS_CONTEXT = ssl.create_default_context()
    return _TLS_CONTEXT


def _open_connection(target: _VettedTarget, timeout_s: float, what: str) -> http.client.HTTPConnection:
    """Connect to one of the vetted addresses (never re-resolving the name); TLS still verifies ``target.host``."""
    last_error: OSError | None = None
    for address in target.addresses:
        if target.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                target.host, target.port, timeout=timeout_s, context=_tls_context()
            )
        else:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)

        def pinned(_address: Any, timeout: Any = None, source: Any = None, _ip: str = address) -> socket.socket:
            return socket.create_connection((_ip, target.port), timeout, source)

        conn._create_connection = pinned  # type: ignore[attr-defined]
        try:
            conn.connect()
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            last_error = exc
            if isinstance(exc, (TimeoutError, ssl.SSLCertVerificationError)):
                break
            continue
        peer = conn.sock.getpeername()[0] if conn.sock is not None else ""
        if not any(_same_address(peer, vetted) for vetted in target.addresses):
            conn.close()
            raise ImageSourceNotAllowedError(f"{what}: connected to unexpected address {peer} for {target.host!r}")
        return conn
    if isinstance(last_error, TimeoutError):
        raise last_error
    raise ImageError(f"{what}: cannot connect to {target.host}:{target.port}: {last_error}")


class _Watchdog:
    """Shuts the socket down at the deadline, so a server dribbling bytes cannot outlive the overall timeout."""

    def __init__(self, conn: http.client.HTTPConnection, delay_s: float) -> None:
        self.fired = False
        self._conn = conn
        self._timer = threading.Timer(max(delay_s, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def fetch_remote_image(url: str, policy: ImageInputPolicy, what: str) -> tuple[bytes, str | None]:
    """GET ``url`` under the policy, following up to MAX_REDIRECTS re-vetted redirects: (body, Content-Type)."""
    if not policy.allow_remote_images:
        raise ImageSourceNotAllowedError(
            f"{what}: remote image URLs are not allowed; {policy.how_to_enable('allow_remote_images')}"
        )
    deadline = time.monotonic() + policy.fetch_timeout_s
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        target = _vet_url(current, policy, what, deadline)
        try:
            status, location, body, content_type = _http_get(target, policy, what, deadline)
        except TimeoutError as exc:
            raise ImageError(f"{what}: fetching {_short(current)} timed out after {policy.fetch_timeout_s}s") from exc
        if status in _REDIRECT_STATUSES:
            if not location:
                raise ImageError(f"{what}: HTTP {status} redirect without a Location header from {_short(current)}")
            current = urllib.parse.urljoin(current, location)
            continue
        return body, content_type
    raise ImageError(f"{what}: too many redirects (more than {MAX_REDIRECTS}) fetching {_short(url)}")


def _http_get(
    target: _VettedTarget, policy: ImageInputPolicy, what: str, deadline: float
) -> tuple[int, str | None, bytes, str | None]:
    """One GET: (status, Location, body, Content-Type); only 200 and redirects return. TimeoutError past the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    conn = _open_connection(target, remaining, what)
    watchdog = _Watchdog(conn, deadline - time.monotonic())
    try:
        conn.request(
            "GET",
            target.request_path,
            headers={
                "User-Agent": _USER_AGENT,
                "Accept": "image/*",
                "Accept-Encoding": "identity",
                "Connection": "close",
            },
        )
        response = conn.getresponse()
        if response.status in _REDIRECT_STATUSES:
            return response.status, response.getheader("Location"), b"", None
        if response.status != 200:
            raise ImageError(f"{what}: HTTP {response.status} {response.reason} fetching {_short(target.url)}")
        content_length = response.getheader("Content-Length")
        if content_length is not None and content_length.strip().isdigit():
            check_byte_limit(int(content_length), policy.max_image_bytes, what)
        chunks: list[bytes] = []
        received = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            chunk = response.read1(_READ_CHUNK)
            if not chunk:
                break
            received += len(chunk)
            check_byte_limit(received, policy.max_image_bytes, what)
            chunks.append(chunk)
        if watchdog.fired:
            raise TimeoutError
        # Content-Type is advisory only (the decoder decides); it is kept for the error message.
        return 200, None, b"".join(chunks), response.getheader("Content-Type")
    except (TimeoutError, socket.timeout):
        raise TimeoutError from None
    except (http.client.HTTPException, OSError) as exc:
        if watchdog.fired or time.monotonic() >= deadline:
            raise TimeoutError from exc
        raise ImageError(f"{what}: fetching {_short(target.url)} failed: {exc}") from exc
    finally:
        watchdog.cancel()
        conn.close()


def _short(url: str, limit: int = 200) -> str:
    return url if len(url) <= limit else url[:limit] + "..."
