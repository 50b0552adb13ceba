"""load_image: every source form, the policy refusals (SSRF guard included), limits, corrupt data and timeouts.

Remote fetching is exercised only against a loopback ``http.server`` started here; no test touches the network.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from xgenmm.errors import ConfigError, ImageError, ImageSourceNotAllowedError, ImageTooLargeError
from xgenmm.multimodal import image_sources, remote_fetch
from xgenmm.multimodal.image_sources import (
    DEFAULT_MAX_IMAGE_BYTES,
    ImageInputPolicy,
    decode_data_url,
    image_to_data_url,
    is_public_address,
    load_image,
)


def _image(width: int = 7, height: int = 5) -> Image.Image:
    pixels = bytes(
        channel
        for y in range(height)
        for x in range(width)
        for channel in (x * 30 % 256, y * 50 % 256, (x + y) * 20 % 256)
    )
    return Image.frombytes("RGB", (width, height), pixels)


def _png(image: Image.Image | None = None) -> bytes:
    buffer = io.BytesIO()
    (image or _image()).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()
REFERENCE = _image()


def _same_pixels(a: Image.Image, b: Image.Image = REFERENCE) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def _png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IDAT", b"\x00" * 16
    )


# ---- loopback HTTP server ----------------------------------------------------------------------------------------


class _Server:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.requests: list[tuple[str, str | None]] = []  # (path, Host header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes = b"", content_type: str = "image/png", length: bool = True):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                parsed = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parsed.query)
                server.requests.append((parsed.path, self.headers.get("Host")))
                path = parsed.path
                if path == "/img.png":
                    self._send(200, PNG)
                elif path == "/img-as-text":
                    self._send(200, PNG, content_type="text/plain")
                elif path == "/html":
                    self._send(200, b"<html>not an image</html>", content_type="text/html")
                elif path == "/redirect":
                    self._redirect(query["to"][0])
                elif path.startswith("/chain/"):
                    remaining = int(path.rsplit("/", 1)[1])
                    self._redirect("/img.png" if remaining == 0 else f"/chain/{remaining - 1}")
                elif path == "/big-declared":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(50 * 1024 * 1024))
                    self.end_headers()
                    self.wfile.write(PNG)
                elif path == "/big-stream":  # no Content-Length: the body ends when the connection closes
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    try:
                        for _ in range(64):
                            self.wfile.write(b"\x00" * 16384)
                    except OSError:
                        pass
                elif path == "/stall":
                    server.release.wait(5.0)
                elif path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    try:
                        for byte in PNG:
                            if server.release.wait(0.05):
                                break
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                    except OSError:
                        pass
                else:
                    self._send(404, b"missing", content_type="text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    yield srv
    srv.close()


REMOTE_LOOPBACK = ImageInputPolicy(allow_remote_images=True, allow_private_addresses=True, fetch_timeout_s=5.0)


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch):
    """Pretend 127.0.0.1 (only) is a public address, to test what happens *after* a first, allowed hop."""
    real = image_sources.is_public_address
    monkeypatch.setattr(remote_fetch, "is_public_address", lambda a: a == "127.0.0.1" or real(a))


# ---- in-memory sources -----------------------------------------------------------------------------------------


def test_pil_image_is_returned_loaded():
    lazy = Image.open(io.BytesIO(PNG))
    out = load_image(lazy)
    assert out is lazy
    assert _same_pixels(out)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, io.BytesIO])
def test_binary_sources(wrap):
    assert _same_pixels(load_image(wrap(PNG)))


def test_base64_forms():
    b64 = base64.b64encode(PNG).decode()
    assert _same_pixels(load_image(b64))
    assert _same_pixels(load_image("\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))))  # MIME line breaks
    urlsafe_unpadded = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    assert _same_pixels(load_image(urlsafe_unpadded))
    jpeg = io.BytesIO()
    REFERENCE.save(jpeg, "JPEG")
    assert load_image(base64.b64encode(jpeg.getvalue()).decode()).format == "JPEG"  # "/9j/..." is not a path


def test_data_urls():
    b64 = base64.b64encode(PNG).decode()
    assert _same_pixels(load_image(f"data:image/png;base64,{b64}"))
    assert _same_pixels(load_image(f"DATA:IMAGE/PNG;BASE64,{b64}"))
    assert _same_pixels(load_image(f"data:;base64,{b64}"))  # mime is advisory; the decoder decides
    assert _same_pixels(load_image("data:image/png," + urllib.parse.quote_from_bytes(PNG)))  # percent-encoded
    assert _same_pixels(load_image({"url": f"data:image/png;base64,{b64}", "detail": "auto"}))


def test_decode_data_url_and_image_to_data_url_round_trip():
    url = image_to_data_url(REFERENCE)
    assert url.startswith("data:image/png;base64,")
    mime, data = decode_data_url(url)
    assert mime == "image/png" and _same_pixels(Image.open(io.BytesIO(data)))
    jpeg_url = image_to_data_url(REFERENCE.convert("RGBA"), format="jpg")
    assert jpeg_url.startswith("data:image/jpeg;base64,")
    assert load_image(jpeg_url).size == REFERENCE.size
    assert decode_data_url("data:text/plain,hello%20world") == ("text/plain", b"hello world")
    with pytest.raises(ImageError, match="no ','"):
        decode_data_url("data:image/png;base64")
    with pytest.raises(ImageError, match="base64"):
        decode_data_url("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="not a data URL"):
        decode_data_url("http://example.com/x.png")


# ---- corrupt / unsupported ---------------------------------------------------------------------------------------


def test_corrupt_bytes_raise_image_error():
    with pytest.raises(ImageError) as info:
        load_image(b"this is not an image at all")
    assert type(info.value) is ImageError
    assert "not a supported image" in str(info.value)


def test_truncated_png_fails_inside_load_image():
    big = _png(_image(300, 200))
    with pytest.raises(ImageError, match="corrupt or truncated") as info:
        load_image(big[: len(big) // 2], what="message 2, block 1")
    assert str(info.value).startswith("message 2, block 1:")


def test_unsafe_formats_are_not_opened():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(eps)


def test_unsupported_references():
    with pytest.raises(ImageError, match="file_id"):
        load_image({"file_id": "file-abc123"})
    with pytest.raises(ImageError, match="unsupported image source"):
        load_image(12345)
    with pytest.raises(ImageError, match="empty"):
        load_image("   ")
    with pytest.raises(ImageSourceNotAllowedError, match="'ftp'"):
        load_image("ftp://example.com/a.png", ImageInputPolicy(allow_remote_images=True))


# ---- limits -------------------------------------------------------------------------------------------------------


def test_byte_limit_on_inline_sources():
    policy = ImageInputPolicy(max_image_bytes=len(PNG) - 1)
    b64 = base64.b64encode(PNG).decode()
    for source in (PNG, b64, f"data:image/png;base64,{b64}", io.BytesIO(PNG)):
        with pytest.raises(ImageTooLargeError, match="bytes"):
            load_image(source, policy)
    assert _same_pixels(load_image(PNG, ImageInputPolicy(max_image_bytes=len(PNG))))
    assert ImageInputPolicy().max_image_bytes == DEFAULT_MAX_IMAGE_BYTES == 20 * 1024 * 1024


def test_pixel_limit():
    with pytest.raises(ImageTooLargeError, match=r"7x5 = 35 pixels"):
        load_image(PNG, ImageInputPolicy(max_image_pixels=34))
    with pytest.raises(ImageTooLargeError, match=r"7x5"):
        load_image(REFERENCE, ImageInputPolicy(max_image_pixels=34))
    assert _same_pixels(load_image(PNG, ImageInputPolicy(max_image_pixels=35)))


@pytest.mark.parametrize("side", [9000, 100_000])  # under and far over Pillow's own bomb threshold
def test_pixel_limit_checked_before_decoding(side: int):
    with pytest.raises(ImageTooLargeError, match=rf"{side}x{side}"):
        load_image(_png_header_claiming(side, side))


# ---- local files --------------------------------------------------------------------------------------------------


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "allowed" / "picture.png"
    path.parent.mkdir()
    path.write_bytes(PNG)
    return path


def test_local_files_refused_by_default(image_file: Path):
    for source in (str(image_file), image_file, image_file.as_uri()):
        with pytest.raises(ImageSourceNotAllowedError, match="allow_local_files=True"):
            load_image(source)


def test_local_file_forms(image_file: Path):
    policy = ImageInputPolicy(allow_local_files=True)
    for source in (str(image_file), image_file, image_file.as_uri(), "file://localhost" + str(image_file)):
        assert _same_pixels(load_image(source, policy))


def test_local_file_roots(image_file: Path, tmp_path: Path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(PNG)
    policy = ImageInputPolicy(allow_local_files=True, local_file_roots=(str(image_file.parent),))
    assert _same_pixels(load_image(image_file, policy))
    with pytest.raises(ImageSourceNotAllowedError, match="local_file_roots"):
        load_image(outside, policy)
    escape = image_file.parent / "escape.png"  # a symlink inside the root pointing outside it
    escape.symlink_to(outside)
    with pytest.raises(ImageSourceNotAllowedError, match="local_file_roots"):
        load_image(escape, policy)
    with pytest.raises(ImageSourceNotAllowedError, match="local_file_roots"):
        load_image(str(image_file.parent / ".." / "outside.png"), policy)


def test_local_file_errors(image_file: Path, tmp_path: Path):
    policy = ImageInputPolicy(allow_local_files=True)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png", policy)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path, policy)
    with pytest.raises(ImageTooLargeError):
        load_image(image_file, ImageInputPolicy(allow_local_files=True, max_image_bytes=len(PNG) - 1))
    with pytest.raises(ImageError, match="file:// URLs with a host"):
        load_image("file://otherhost/etc/passwd", policy)


# ---- remote: policy -----------------------------------------------------------------------------------------------


def test_remote_refused_by_default(server: _Server):
    before = len(server.requests)
    with pytest.raises(ImageSourceNotAllowedError, match="allow_remote_images=True"):
        load_image(server.url("/img.png"))
    assert len(server.requests) == before


def test_loopback_refused_even_with_remote_enabled(server: _Server):
    before = len(server.requests)
    policy = ImageInputPolicy(allow_remote_images=True)
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(ImageSourceNotAllowedError, match="allow_private_addresses=True"):
            load_image(server.url("/img.png", host=host), policy)
    assert len(server.requests) == before  # refused before connecting


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1", "224.0.0.1",
        "[::1]", "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]", "[fe80::1]", "[fc00::1]", "[::]",
        "[2002:7f00:1::]", "[64:ff9b::7f00:1]", "2130706433",
    ],
)
def test_private_addresses_refused(host: str):
    policy = ImageInputPolicy(allow_remote_images=True, fetch_timeout_s=1.0)
    with pytest.raises(ImageSourceNotAllowedError, match="non-public address"):
        load_image(f"http://{host}/x.png", policy)


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True), ("1.1.1.1", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("169.254.1.1", False),
        ("100.64.0.1", False), ("0.0.0.0", False), ("255.255.255.255", False), ("240.0.0.1", False),
        ("::1", False), ("::", False), ("fe80::1%eth0", False), ("fd12::1", False), ("ff02::1", False),
        ("::ffff:192.168.0.1", False), ("2002:c0a8:0001::", False), ("64:ff9b::a00:1", False),
        ("::127.0.0.1", False), ("2001:db8::1", False), ("not-an-ip", False),
    ],
)
def test_is_public_address(address: str, public: bool):
    assert is_public_address(address) is public


def test_allowed_schemes(server: _Server):
    policy = ImageInputPolicy(allow_remote_images=True, allow_private_addresses=True, allowed_schemes=("https",))
    with pytest.raises(ImageSourceNotAllowedError, match="'http' is not allowed"):
        load_image(server.url("/img.png"), policy)


# ---- remote: fetching -------------------------------------------------------------------------------------------


def test_remote_fetch_on_loopback_when_allowed(server: _Server):
    image = load_image(server.url("/img.png"), REMOTE_LOOPBACK)
    assert _same_pixels(image)
    assert _same_pixels(load_image({"url": server.url("/img.png")}, REMOTE_LOOPBACK))


def test_content_type_is_advisory(server: _Server):
    assert _same_pixels(load_image(server.url("/img-as-text"), REMOTE_LOOPBACK))
    with pytest.raises(ImageError, match="text/html"):
        load_image(server.url("/html"), REMOTE_LOOPBACK)


def test_https_never_falls_back_to_plaintext(server: _Server):
    # The loopback server speaks plain HTTP: the TLS handshake must fail and nothing be decoded.
    with pytest.raises(ImageError, match="cannot connect"):
        load_image(f"https://127.0.0.1:{server.port}/img.png", REMOTE_LOOPBACK)


def test_http_error_status(server: _Server):
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(server.url("/nothing-here"), REMOTE_LOOPBACK)


def test_connects_to_the_vetted_address_without_resolving_again(server: _Server, monkeypatch: pytest.MonkeyPatch):
    lookups: list[str] = []

    def fake_resolve(host: str, port: int, timeout_s: float) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"] if host == "images.test" else []

    monkeypatch.setattr(remote_fetch, "_resolve_host", fake_resolve)
    image = load_image(server.url("/img.png", host="images.test"), REMOTE_LOOPBACK)
    assert _same_pixels(image)
    assert lookups == ["images.test"]
    assert server.requests[-1] == ("/img.png", f"images.test:{server.port}")


def test_redirects_are_followed_up_to_three(server: _Server):
    assert _same_pixels(load_image(server.url("/redirect?to=/img.png"), REMOTE_LOOPBACK))
    assert _same_pixels(load_image(server.url("/chain/2"), REMOTE_LOOPBACK))  # 3 redirects
    with pytest.raises(ImageError, match="too many redirects"):
        load_image(server.url("/chain/3"), REMOTE_LOOPBACK)  # 4 redirects


def test_redirect_to_loopback_is_refused(server: _Server, loopback_is_public):
    policy = ImageInputPolicy(allow_remote_images=True, fetch_timeout_s=5.0)
    assert _same_pixels(load_image(server.url("/img.png"), policy))  # the first hop itself is allowed
    for target in (
        f"http://127.0.0.2:{server.port}/img.png",
        "http://10.1.2.3/img.png",
        "http://[::1]/img.png",
    ):
        before = len(server.requests)
        with pytest.raises(ImageSourceNotAllowedError, match="non-public address"):
            load_image(server.url("/redirect?to=" + urllib.parse.quote(target, safe="")), policy)
        assert len(server.requests) == before + 1  # only the redirecting request reached a server


def test_redirect_to_other_schemes_is_refused(server: _Server):
    for target in ("file:///etc/passwd", "ftp://example.com/x.png", "data:image/png;base64,AAAA"):
        with pytest.raises(ImageSourceNotAllowedError, match="scheme"):
            load_image(server.url("/redirect?to=" + urllib.parse.quote(target, safe="")), REMOTE_LOOPBACK)


def test_remote_byte_limit(server: _Server):
    policy = ImageInputPolicy(
        allow_remote_images=True, allow_private_addresses=True, max_image_bytes=100_000, fetch_timeout_s=5.0
    )
    with pytest.raises(ImageTooLargeError, match=str(50 * 1024 * 1024)):
        load_image(server.url("/big-declared"), policy)  # refused from the Content-Length header
    with pytest.raises(ImageTooLargeError, match="100000 bytes"):
        load_image(server.url("/big-stream"), policy)  # aborted while streaming


def test_stalled_server_times_out(server: _Server):
    policy = ImageInputPolicy(allow_remote_images=True, allow_private_addresses=True, fetch_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        load_image(server.url("/stall"), policy)
    assert time.monotonic() - started < 2.0


def test_dripping_server_hits_the_overall_deadline(server: _Server):
    # Each byte arrives well within the socket timeout; only the overall deadline stops the transfer.
    policy = ImageInputPolicy(allow_remote_images=True, allow_private_addresses=True, fetch_timeout_s=0.4)
    started = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        load_image(server.url("/drip"), policy)
    assert time.monotonic() - started < 2.0


def test_policy_validation():
    with pytest.raises(ConfigError, match="max_image_bytes must be positive"):
        ImageInputPolicy(max_image_bytes=0)
    with pytest.raises(ConfigError, match="fetch_timeout_s must be positive"):
        ImageInputPolicy(fetch_timeout_s=0)
    with pytest.raises(ConfigError, match="max_request_image_pixels"):
        ImageInputPolicy(max_request_image_pixels=-1)
    policy = ImageInputPolicy(local_file_roots=[Path("/tmp")], allowed_schemes=["HTTPS"])  # type: ignore[arg-type]
    assert policy.local_file_roots == ("/tmp",) and policy.allowed_schemes == ("https",)
    assert os.fspath(Path("/tmp")) in policy.local_file_roots
