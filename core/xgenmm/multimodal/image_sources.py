"""User image references -> decoded PIL images, under an explicit security policy.

Shared by the core chat API, the LangChain / LlamaIndex adapters and the OpenAI-compatible server, so every front
end refuses the same things the same way. Accepted sources: a ``PIL.Image.Image``, ``bytes`` / ``bytearray`` /
``memoryview``, a binary file object, a base64 string, a ``data:`` URL, an ``http(s)://`` URL, a ``file://`` URL, a
local path (``str`` / ``os.PathLike``) and the OpenAI ``{"url": ...}`` object.

Defaults are closed: no remote fetches, no local files. Remote fetching and its SSRF guard live in
``remote_fetch.py``. Every image is decoded in
full here (``img.load()``) so corrupt or truncated data fails in this call, and only common raster formats are
opened (never EPS and friends, which can run external programs). Whatever a decoder raises on a user's bytes (not only
OSError: plugins raise TypeError, RuntimeError, ZeroDivisionError... on hostile files) is an ``ImageError``; the
header's mode and size are checked against the decode-memory budget (decode_cost.py) before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import os
import re
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from xgenmm.errors import ConfigError, ImageError, ImageSourceNotAllowedError, ImageTooLargeError, XGenMMError
from xgenmm.multimodal.decode_cost import check_decoded_bytes
from xgenmm.multimodal.remote_fetch import MAX_REDIRECTS, check_byte_limit, fetch_remote_image, is_public_address
from xgenmm.multimodal.image_processing import (
    DEFAULT_MAX_IMAGE_PIXELS,
    check_image_pixels,
    ensure_pil_pixel_limit_at_least,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "MAX_REDIRECTS",
    "SAFE_IMAGE_FORMATS",
    "ImageInputPolicy",
    "adapter_enable_hints",
    "decode_data_url",
    "image_to_data_url",
    "is_public_address",
    "load_image",
    "decode_image",
    "user_image_errors",
    "MAX_IMAGE_REF_DEPTH",
]

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Pillow plugins we let identify untrusted bytes: the usual raster formats (HEIF/AVIF when a plugin provides them).
SAFE_IMAGE_FORMATS: tuple[str, ...] = (
    "PNG", "JPEG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA", "QOI", "AVIF", "HEIF",
)

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/\-_]+={0,2}$")
# Magic numbers of SAFE_IMAGE_FORMATS, used only to tell a base64 string from a path.
_IMAGE_SIGNATURES: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00",
    b"qoif",
)


@dataclass(frozen=True)
class ImageInputPolicy:
    """What ``load_image`` may do. Closed by default; each refusal names the option that would allow it.

    ``local_file_roots``: when non-empty, local files must resolve (symlinks followed) inside one of these folders.
    ``max_image_bytes`` / ``max_image_pixels``: per image, None = unlimited; ``max_request_image_pixels``: all the
    images of one request together (checked from the headers, before any pixel is decoded). ``allowed_schemes``
    governs remote URLs only (``data:`` is always accepted; ``file://`` follows ``allow_local_files``).
    ``enable_hints``: (option, sentence) pairs a front end sets so that a refusal tells its user how *they* turn the
    option on (their class's field, their server flag, or that they cannot at all); see ``how_to_enable``.
    """

    allow_remote_images: bool = False
    allow_local_files: bool = False
    allow_private_addresses: bool = False
    local_file_roots: tuple[str, ...] = ()
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    fetch_timeout_s: float = 10.0
    allowed_schemes: tuple[str, ...] = ("http", "https")
    max_request_image_pixels: int | None = None
    # How to turn an option on, in the words of the front end in use; not part of what the policy allows.
    enable_hints: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)

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
            raise ConfigError(f"max_image_bytes must be positive or None, got {self.max_image_bytes}")
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ConfigError(f"max_image_pixels must be positive or None, got {self.max_image_pixels}")
        if self.max_request_image_pixels is not None and self.max_request_image_pixels <= 0:
            raise ConfigError(f"max_request_image_pixels must be positive or None, got {self.max_request_image_pixels}")
        if not self.fetch_timeout_s > 0:
            raise ConfigError(f"fetch_timeout_s must be positive, got {self.fetch_timeout_s}")


    def how_to_enable(self, option: str) -> str:
        """The sentence a refusal ends with: the front end's own hint for `option`, else the core's option."""
        for name, hint in self.enable_hints:
            if name == option:
                return hint
        return f"enable them with ImageInputPolicy({option}=True)"

    def with_hints(self, hints: dict[str, str]) -> "ImageInputPolicy":
        """A copy whose refusals say `hints[option]` (set by a front end: see `adapter_enable_hints`)."""
        return dataclasses.replace(self, enable_hints=tuple(hints.items()))

    # The option names every front end exposes (the LangChain and LlamaIndex adapters' fields, the CLI's flags).
    SETTINGS = ("allow_remote_images", "allow_local_files", "allow_private_addresses", "local_file_roots",
                "max_image_bytes", "max_image_pixels", "fetch_timeout_s", "max_request_image_pixels")

    @classmethod
    def from_settings(cls, settings: Any) -> "ImageInputPolicy":
        """The policy from an object with those option names as attributes (an adapter's fields); missing ones keep
        the defaults."""
        return cls(**{name: getattr(settings, name) for name in cls.SETTINGS if hasattr(settings, name)})


_DEFAULT_POLICY = ImageInputPolicy()

_SWITCHES = ("allow_local_files", "allow_remote_images", "allow_private_addresses")


def adapter_enable_hints(class_name: str) -> dict[str, str]:
    """Hints for a class whose fields carry the policy's option names (`ChatXGenMM`, `XGenMM`)."""
    return {option: f"enable them with {class_name}({option}=True)" for option in _SWITCHES}


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


MAX_IMAGE_REF_DEPTH = 4  # {"image_url": {"url": ...}} nests 2 deep; deeper is refused, never recursed into


def load_image(source: Any, policy: ImageInputPolicy = _DEFAULT_POLICY, *, what: str = "image",
               decode: bool = True) -> Image.Image:
    """Turn one image reference into a ``PIL.Image.Image`` (mode unchanged; see ``to_rgb``), fully decoded unless
    ``decode=False``: then only the header is read (size, format, pixel limit checked) and the pixels are decoded
    later by ``decode_image`` (or on first use), so a caller can check its budgets before paying for the pixels.

    ``what`` names the input in error messages (e.g. "message 2, block 1"). Raises ``ImageSourceNotAllowedError``
    (policy refusal), ``ImageTooLargeError`` (byte / pixel limit) or ``ImageError`` (unreadable, undecodable,
    unsupported reference such as an OpenAI ``file_id``, or nested too deeply).
    """
    for _ in range(MAX_IMAGE_REF_DEPTH):
        if not isinstance(source, dict):
            break
        source = _unwrap_mapping(source, what)
    else:
        if isinstance(source, dict):
            raise ImageError(f"{what}: image reference objects are nested more than {MAX_IMAGE_REF_DEPTH} deep")
    image = _open_image(source, policy, what)
    if decode:
        decode_image(image, what)
    return image


def decode_image(image: Image.Image, what: str = "image") -> Image.Image:
    """Decode a header-only image's pixels now; corrupt or truncated data raises ``ImageError``."""
    _load_pixels(image, what)
    return image


def _open_image(source: Any, policy: ImageInputPolicy, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        check_image_pixels(source.size, policy.max_image_pixels, what=what)
        check_decoded_bytes(source, policy.max_image_pixels, what)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_image_bytes(bytes(source), policy, what)
    if isinstance(source, os.PathLike):
        return _load_local_file(os.fspath(source), policy, what)
    if isinstance(source, str):
        return _load_from_string(source, policy, what)
    if hasattr(source, "read"):
        return _decode_image_bytes(_read_limited(source, policy.max_image_bytes, what), policy, what)
    raise ImageError(f"{what}: unsupported image source of type {type(source).__name__}")


def _unwrap_mapping(source: dict[str, Any], what: str) -> Any:
    if "url" in source:  # OpenAI {"url": ..., "detail": ...}
        return source["url"]
    if "image_url" in source:
        return source["image_url"]
    if "file_id" in source:
        raise ImageError(
            f"{what}: file_id image references are not supported; send the image inline as a data URL or base64"
        )
    raise ImageError(f"{what}: unsupported image object with keys {sorted(map(str, source))[:8]}; expected 'url'")


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
            body, content_type = fetch_remote_image(text, policy, what)
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
    check_byte_limit(len(data), policy.max_image_bytes, what)
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
    except Exception as exc:  # a user's bytes: whatever a decoder raises on them is that request's ImageError
        raise ImageError(f"{what}: cannot read image header: {_reason(exc)}") from exc
    check_image_pixels(image.size, policy.max_image_pixels, what=what)
    check_decoded_bytes(image, policy.max_image_pixels, what)
    return image


@contextlib.contextmanager
def user_image_errors(what: str = "image") -> Iterator[None]:
    """Work on one user's image (decoding, converting, tiling): anything it raises that is not already one of our
    typed errors becomes that request's ``ImageError`` (the image is at fault, not the server)."""
    try:
        yield
    except XGenMMError:
        raise
    except Exception as exc:
        raise ImageError(f"{what}: the image cannot be processed: {type(exc).__name__}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """A decoder's complaint, short (some echo the bytes they choked on)."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _load_pixels(image: Image.Image, what: str) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what}: {exc}") from exc
    except Exception as exc:  # TypeError / RuntimeError / ZeroDivisionError... from a plugin on hostile bytes
        raise ImageError(f"{what}: image data is corrupt or truncated: {_reason(exc)}") from exc


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
    check_byte_limit(len(data), max_bytes, what)
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
    check_byte_limit(len(data), max_bytes, what)
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
            f"{what}: local image files are not allowed; {policy.how_to_enable('allow_local_files')}{extra}"
        )
    if "\x00" in path:
        raise ImageError(f"{what}: an image path may not contain a NUL character")
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
        check_byte_limit(info.st_size, policy.max_image_bytes, what)
        data = _read_limited(handle, policy.max_image_bytes, what)
    return _decode_image_bytes(data, policy, what)
