"""User image references -> decoded PIL images, under an explicit security policy.

Shared by the core chat API, the LangChain / LlamaIndex adapters and the OpenAI-compatible server, so every front
end refuses the same things the same way. Accepted sources: a ``PIL.Image.Image``, ``bytes`` / ``bytearray`` /
``memoryview``, a binary file object, a base64 string, a ``data:`` URL, an ``http(s)://`` URL, a ``file://`` URL, a
local path (``str`` / ``os.PathLike``) and the OpenAI ``{"url": ...}`` object.

Defaults are closed: no remote fetches, no local files. Remote fetching (stdlib only) resolves the host itself, refuses
non-public addresses (loopback, private, link-local, CGNAT, multicast, reserved, unspecified; IPv4 and IPv6, including
IPv4 embedded in IPv6) unless ``allow_private_addresses``, connects to the vetted address (no second DNS lookup, so no
DNS-rebinding window), re-checks the peer after connecting, follows at most 3 redirects re-vetting each, ignores proxy
environment variables, enforces one overall deadline and streams the body with a byte limit. Every image is decoded in
full here (``img.load()``) so corrupt or truncated data fails in this call, and only common raster formats are
opened (never EPS and friends, which can run external programs).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import struct
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from xgenmm.errors import ImageError, ImageSourceNotAllowedError, ImageTooLargeError
from xgenmm.image_processing import (
    DEFAULT_MAX_IMAGE_PIXELS,
    check_image_pixels,
    ensure_pil_pixel_limit_at_least,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "MAX_REDIRECTS",
    "SAFE_IMAGE_FORMATS",
    "ImageInputPolicy",
    "decode_data_url",
    "image_to_data_url",
    "is_public_address",
    "load_image",
]

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_REDIRECTS = 3
# Pillow plugins we let identify untrusted bytes: the usual raster formats (HEIF/AVIF when a plugin provides them).
SAFE_IMAGE_FORMATS: tuple[str, ...] = (
    "PNG", "JPEG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA", "QOI", "AVIF", "HEIF",
)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024
_USER_AGENT = "xgenmm-image-fetcher/1"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/\-_]+={0,2}$")
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Magic numbers of SAFE_IMAGE_FORMATS, used only to tell a base64 string from a path.
_IMAGE_SIGNATURES: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00",
    b"qoif",
)


@dataclass(frozen=True)
class ImageInputPolicy:
    """What ``load_image`` may do. Closed by default; each refusal names the option that would allow it.

    ``local_file_roots``: when non-empty, local files must resolve (symlinks followed) inside one of these folders.
    ``max_image_bytes`` / ``max_image_pixels``: None = unlimited. ``allowed_schemes`` governs remote URLs only
    (``data:`` is always accepted; ``file://`` follows ``allow_local_files``).
    """

    allow_remote_images: bool = False
    allow_local_files: bool = False
    allow_private_addresses: bool = False
    local_file_roots: tuple[str, ...] = ()
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    fetch_timeout_s: float = 10.0
    allowed_schemes: tuple[str, ...] = ("http", "https")

    def __post_init__(self) -> None:
        roots = self.local_file_roots
        if isinstance(roots, (str, os.PathLike)):
            roots = (roots,)
        object.__setattr__(self, "local_file_roots", tuple(os.fspath(r) for r in roots))
        schemes = self.allowed_schemes
        if isinstance(schemes, str):
            schemes = (schemes,)
        object.__setattr__(self, "allowed_schemes", tuple(s.lower() for s in schemes))
        if self.max_image_bytes is not None and self.max_image_bytes <= 0:
            raise ValueError(f"max_image_bytes must be positive or None, got {self.max_image_bytes}")
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive or None, got {self.max_image_pixels}")
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"fetch_timeout_s must be positive, got {self.fetch_timeout_s}")


_DEFAULT_POLICY = ImageInputPolicy()


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def load_image(source: Any, policy: ImageInputPolicy = _DEFAULT_POLICY, *, what: str = "image") -> Image.Image:
    """Turn one image reference into a fully decoded ``PIL.Image.Image`` (mode unchanged; see ``to_rgb``).

    ``what`` names the input in error messages (e.g. "message 2, block 1"). Raises ``ImageSourceNotAllowedError``
    (policy refusal), ``ImageTooLargeError`` (byte / pixel limit) or ``ImageError`` (unreadable, undecodable,
    unsupported reference such as an OpenAI ``file_id``).
    """
    if isinstance(source, Image.Image):
        check_image_pixels(source.size, policy.max_image_pixels, what=what)
        _load_pixels(source, what)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_image_bytes(bytes(source), policy, what)
    if isinstance(source, os.PathLike):
        return _load_local_file(os.fspath(source), policy, what)
    if isinstance(source, dict):
        return _load_from_mapping(source, policy, what)
    if isinstance(source, str):
        return _load_from_string(source, policy, what)
    if hasattr(source, "read"):
        return _decode_image_bytes(_read_limited(source, policy.max_image_bytes, what), policy, what)
    raise ImageError(f"{what}: unsupported image source of type {type(source).__name__}")


def _load_from_mapping(source: dict[str, Any], policy: ImageInputPolicy, what: str) -> Image.Image:
    if "url" in source:  # OpenAI {"url": ..., "detail": ...}
        return load_image(source["url"], policy, what=what)
    if "image_url" in source:
        inner = source["image_url"]
        return load_image(inner, policy, what=what)
    if "file_id" in source:
        raise ImageError(
            f"{what}: file_id image references are not supported; send the image inline as a data URL or base64"
        )
    raise ImageError(f"{what}: unsupported image object with keys {sorted(source)}; expected 'url'")


def _load_from_string(source: str, policy: ImageInputPolicy, what: str) -> Image.Image:
    text = source.strip()
    if not text:
        raise ImageError(f"{what}: empty image reference")
    if text[:5].lower() == "data:":
        _, data = decode_data_url(text, max_bytes=policy.max_image_bytes, what=what)
        return _decode_image_bytes(data, policy, what)
    scheme_match = _SCHEME_RE.match(text)
    if scheme_match:
        scheme = scheme_match.group(1).lower()
        if scheme == "file":
            return _load_local_file(_file_url_to_path(text, what), policy, what)
        if scheme in ("http", "https"):
            body, content_type = _fetch_remote(text, policy, what)
            return _decode_image_bytes(body, policy, what, content_type=content_type)
        raise ImageSourceNotAllowedError(
            f"{what}: URL scheme {scheme!r} is not supported (use http(s), data: or file:// URLs)"
        )
    decoded = _maybe_base64_image(text, policy.max_image_bytes, what)
    if decoded is not None:
        return _decode_image_bytes(decoded, policy, what)
    return _load_local_file(text, policy, what, maybe_base64=True)


# --------------------------------------------------------------------------------------------------------------
# Bytes -> image
# --------------------------------------------------------------------------------------------------------------


def _decode_image_bytes(
    data: bytes, policy: ImageInputPolicy, what: str, *, content_type: str | None = None
) -> Image.Image:
    _check_bytes(len(data), policy.max_image_bytes, what)
    if not data:
        raise ImageError(f"{what}: image data is empty")
    ensure_pil_pixel_limit_at_least(policy.max_image_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=_available_safe_formats())
    except Image.DecompressionBombError as exc:
        size = _peek_size(data)
        shown = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else str(exc)
        raise ImageTooLargeError(f"{what}: {shown} is over the limit of {policy.max_image_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        hint = f" (server sent content-type {content_type!r})" if content_type else ""
        raise ImageError(
            f"{what}: data is not a supported image{hint}; supported formats: {', '.join(_available_safe_formats())}"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise ImageError(f"{what}: cannot read image header: {exc}") from exc
    check_image_pixels(image.size, policy.max_image_pixels, what=what)
    _load_pixels(image, what)
    return image


def _load_pixels(image: Image.Image, what: str) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what}: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError) as exc:
        raise ImageError(f"{what}: image data is corrupt or truncated: {exc}") from exc


def _available_safe_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(fmt for fmt in SAFE_IMAGE_FORMATS if fmt in Image.OPEN)


def _peek_size(data: bytes) -> tuple[int, int] | None:
    """Size from the header without Pillow's bomb check (only to word the error message)."""
    for fmt in _available_safe_formats():
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(data[:16]):
                continue
            return tuple(factory(io.BytesIO(data), "").size)  # type: ignore[return-value]
        except Exception:
            continue
    return None


def _check_bytes(num_bytes: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and num_bytes > max_bytes:
        raise ImageTooLargeError(f"{what}: image data is {num_bytes} bytes, over the limit of {max_bytes} bytes")


def _read_limited(stream: Any, max_bytes: int | None, what: str) -> bytes:
    try:
        data = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"{what}: cannot read image stream: {exc}") from exc
    if not isinstance(data, (bytes, bytearray)):
        raise ImageError(f"{what}: image stream must be binary, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(f"{what}: image data is over the limit of {max_bytes} bytes")
    return bytes(data)


# --------------------------------------------------------------------------------------------------------------
# base64 and data URLs
# --------------------------------------------------------------------------------------------------------------


def _b64decode(payload: str, max_bytes: int | None, what: str) -> bytes:
    compact = "".join(payload.split())
    if max_bytes is not None and len(compact) // 4 * 3 > max_bytes + 3:
        raise ImageTooLargeError(
            f"{what}: base64 image is about {len(compact) // 4 * 3} bytes, over the limit of {max_bytes} bytes"
        )
    if "-" in compact or "_" in compact:  # URL-safe alphabet
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{what}: invalid base64 image data: {exc}") from exc
    _check_bytes(len(data), max_bytes, what)
    return data


def _maybe_base64_image(text: str, max_bytes: int | None, what: str) -> bytes | None:
    """Bytes when ``text`` is base64 of an image (known signature, or too long to be a path); else None."""
    compact = "".join(text.split())
    if not _BASE64_RE.match(compact):
        return None
    if len(compact) > 4096:
        return _b64decode(compact, max_bytes, what)
    prefix = compact[:64].replace("-", "+").replace("_", "/").rstrip("=")
    try:
        head = base64.b64decode(prefix + "=" * (-len(prefix) % 4))
    except (binascii.Error, ValueError):
        return None
    if head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return _b64decode(compact, max_bytes, what)
    return None


def decode_data_url(url: str, *, max_bytes: int | None = None, what: str = "image") -> tuple[str, bytes]:
    """``data:[<mime>][;params][;base64],<payload>`` -> (lower-cased mime, bytes). Mime defaults to text/plain."""
    if not isinstance(url, str) or url[:5].lower() != "data:":
        raise ImageError(f"{what}: not a data URL")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ImageError(f"{what}: malformed data URL (no ',' before the payload)")
    params = [p.strip() for p in header.split(";")]
    mime = params[0].lower() or "text/plain"
    if any(p.lower() == "base64" for p in params[1:]):
        if "%" in payload:
            payload = urllib.parse.unquote(payload)
        return mime, _b64decode(payload, max_bytes, what)
    if max_bytes is not None and len(payload) > 3 * max_bytes + 3:
        raise ImageTooLargeError(f"{what}: data URL payload is over the limit of {max_bytes} bytes")
    data = urllib.parse.unquote_to_bytes(payload)
    _check_bytes(len(data), max_bytes, what)
    return mime, data


def image_to_data_url(image: Image.Image, format: str = "PNG", **save_kwargs: Any) -> str:
    """Encode a PIL image as a ``data:image/...;base64,`` URL (JPEG gets an RGB copy when needed)."""
    fmt = format.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    to_save = image
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        to_save = image.convert("RGB")
    buffer = io.BytesIO()
    to_save.save(buffer, format=fmt, **save_kwargs)
    Image.init()
    mime = Image.MIME.get(fmt, f"image/{fmt.lower()}")
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


# --------------------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------------------


def _file_url_to_path(url: str, what: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(f"{what}: file:// URLs with a host ({parts.netloc!r}) are not supported")
    return urllib.request.url2pathname(parts.path)


def _is_within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows) or mixed absolute / relative
        return False


def _load_local_file(path: str, policy: ImageInputPolicy, what: str, *, maybe_base64: bool = False) -> Image.Image:
    if not policy.allow_local_files:
        extra = " (if this was meant as base64 image data, it does not decode to a known image format)" if maybe_base64 else ""
        raise ImageSourceNotAllowedError(
            f"{what}: local image files are not allowed; enable them with ImageInputPolicy(allow_local_files=True)"
            f"{extra}"
        )
    real = os.path.realpath(os.path.expanduser(path))
    if policy.local_file_roots:
        roots = [os.path.realpath(os.path.expanduser(r)) for r in policy.local_file_roots]
        if not any(_is_within(real, root) for root in roots):
            raise ImageSourceNotAllowedError(
                f"{what}: local file {path!r} is outside the allowed local_file_roots {list(policy.local_file_roots)}"
            )
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise ImageError(f"{what}: {path!r} is not a regular file")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(real, flags)
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: image file not found: {path!r}") from exc
    except OSError as exc:
        raise ImageError(f"{what}: cannot open image file {path!r}: {exc}") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{what}: {path!r} is not a regular file")
        _check_bytes(info.st_size, policy.max_image_bytes, what)
        data = _read_limited(handle, policy.max_image_bytes, what)
    return _decode_image_bytes(data, policy, what)


# --------------------------------------------------------------------------------------------------------------
# Remote URLs
# --------------------------------------------------------------------------------------------------------------


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


_DNS_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="xgenmm-dns")


def _resolve_host(host: str, port: int, timeout_s: float) -> list[str]:
    """All addresses ``host`` resolves to (IP literals returned as is), with a deadline on the lookup."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return [host]
    except ValueError:
        pass
    future = _DNS_POOL.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    infos = future.result(timeout=timeout_s)
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


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
                    f"{what}: host {host!r} resolves to the non-public address {address}; fetching from private, "
                    "loopback or link-local addresses needs ImageInputPolicy(allow_private_addresses=True)"
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


def _fetch_remote(url: str, policy: ImageInputPolicy, what: str) -> tuple[bytes, str | None]:
    """GET ``url`` under the policy, following up to MAX_REDIRECTS re-vetted redirects: (body, Content-Type)."""
    if not policy.allow_remote_images:
        raise ImageSourceNotAllowedError(
            f"{what}: remote image URLs are not allowed; enable them with ImageInputPolicy(allow_remote_images=True)"
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
            _check_bytes(int(content_length), policy.max_image_bytes, what)
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
            _check_bytes(received, policy.max_image_bytes, what)
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
