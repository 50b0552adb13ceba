"""Slow and vanished clients (loopback, short timeouts): trickled headers, a stalled or trickled body and idle
connections are closed within the configured timeouts; a client that leaves mid-upload is counted as a client
event, not a server error; the server keeps serving throughout."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.server.support import MODEL_NAME, make_config
from xgenmm.server import BackgroundServer

HEADER_S, CHUNK_S, BODY_S, KEEP_ALIVE_S = 0.6, 0.6, 1.5, 0.6
SLACK_S = 1.5  # scheduling on a busy 2-core machine


@pytest.fixture(scope="module")
def slow_server(tiny_checkpoint, server_llm):
    config = make_config(tiny_checkpoint, header_timeout_s=HEADER_S, body_chunk_timeout_s=CHUNK_S,
                         body_timeout_s=BODY_S, keep_alive_timeout_s=KEEP_ALIVE_S, max_connections=64)
    with BackgroundServer(config, llm=server_llm) as srv:
        yield srv


def _connect(srv) -> socket.socket:
    sock = socket.create_connection((srv.config.host, srv.config.port), timeout=10)
    sock.settimeout(0.05)
    return sock


def _closed_after(sock: socket.socket, limit_s: float, trickle: bytes = b"", every_s: float = 0.1) -> tuple[float, bytes]:
    """Seconds until the server closes `sock` (sending `trickle` one byte every `every_s` meanwhile), and what it
    sent; fails if it stays open past `limit_s`."""
    start, received, sent = time.monotonic(), b"", 0
    next_send = start
    while time.monotonic() - start < limit_s:
        now = time.monotonic()
        if trickle and now >= next_send:
            try:
                sock.sendall(trickle[sent % len(trickle):sent % len(trickle) + 1])
            except OSError:
                return now - start, received
            sent += 1
            next_send = now + every_s
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - start, received
        if not data:
            return time.monotonic() - start, received
        received += data
    pytest.fail(f"the connection was still open after {limit_s:.1f} s (received {received[:200]!r})")


def _still_serving(srv) -> None:
    assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def _headers(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_trickled_headers_are_cut_off(slow_server):
    sock = _connect(slow_server)
    took, _ = _closed_after(sock, HEADER_S + SLACK_S, trickle=b"X-Slow: " + b"a" * 400, every_s=0.1)
    assert took >= HEADER_S * 0.8
    sock.close()
    _still_serving(slow_server)


def test_trickle_after_a_kept_alive_response_is_cut_off(slow_server):
    sock = _connect(slow_server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    took, received = _closed_after(sock, HEADER_S + SLACK_S, trickle=b"GET /health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaa",
                                   every_s=0.1)  # each byte restarts uvicorn's keep-alive timer, not ours
    assert received.startswith(b"HTTP/1.1 200") and took >= HEADER_S * 0.8
    sock.close()


def test_silent_connection_is_closed(slow_server):
    sock = _connect(slow_server)
    took, received = _closed_after(sock, HEADER_S + SLACK_S)
    assert received == b"" and took >= HEADER_S * 0.8
    sock.close()


def test_idle_keep_alive_connection_is_closed(slow_server):
    sock = _connect(slow_server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    took, received = _closed_after(sock, max(KEEP_ALIVE_S, HEADER_S) + SLACK_S)
    assert received.startswith(b"HTTP/1.1 200")  # answered, then closed once idle
    sock.close()


@pytest.mark.parametrize("trickle_every_s", [None, 0.2], ids=["stalled", "trickled"])
def test_slow_body_gets_408_and_is_closed(slow_server, trickle_every_s):
    sock = _connect(slow_server)
    sock.sendall(_headers(10_000) + b'{"model": ')
    limit = (CHUNK_S if trickle_every_s is None else BODY_S) + SLACK_S
    took, received = _closed_after(sock, limit, trickle=b" " if trickle_every_s else b"", every_s=trickle_every_s or 1)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"request_timeout" in received
    sock.close()
    _still_serving(slow_server)


def _counter(srv, outcome: str) -> float:
    text = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'xgenmm_http_requests_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_upload_abandoned_mid_body_is_a_client_event(slow_server):
    errors, left = _counter(slow_server, "server_error"), _counter(slow_server, "disconnected")
    for _ in range(3):
        sock = _connect(slow_server)
        sock.sendall(_headers(10_000) + b'{"model": "x", "messages": [')
        time.sleep(0.1)
        sock.close()
    deadline = time.monotonic() + 5
    while _counter(slow_server, "disconnected") < left + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counter(slow_server, "disconnected") == left + 3
    assert _counter(slow_server, "server_error") == errors
    _still_serving(slow_server)


def test_connections_past_the_limit_get_503_until_others_close(tiny_checkpoint, server_llm):
    with BackgroundServer(make_config(tiny_checkpoint, max_connections=3, header_timeout_s=30), llm=server_llm) as srv:
        held = [_connect(srv) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 503
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while httpx.get(f"{srv.base_url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
