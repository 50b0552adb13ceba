"""Bounded work per request: while the worst request of each class is being served (stop strings at the cap and far
over it, a `$ref` DAG schema, a schema over the node cap, eight 3000x3000 images at once, a 16-bit 6000x6000 image,
a tool call nested 200k deep), an unrelated text request stays within 2x its idle latency.

This is the review's measurement: one hostile request (eight for the images) sent at the same moment as a normal
one. Before the fixes the normal request took 1.3-4.6 s (25 s beside a deeper DAG) instead of a few hundredths of a
second. Robust on a shared 2-core machine: idle and loaded samples alternate (so load from other processes hits
both), and medians are compared; the normal request generates 48 tokens, so that the hostile request's own
legitimate work (its prompt's prefill) is small beside it.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest

from tests.server.hostile_values import big_png, dag_schema, data_url, deep_arguments, many_stop_strings
from tests.server.support import MODEL_NAME, make_config
from xgenmm.sampling_params import MAX_STOP_BYTES, MAX_STOP_STRINGS
from xgenmm.structured.schema_budget import MAX_SCHEMA_NODES
from xgenmm.server import BackgroundServer

URL = "/v1/chat/completions"
TRIES = 5  # rounds (one idle and one loaded sample each); image bursts: samples during one burst
IMAGE_SAMPLES = 3
SLACK_S = 0.05  # timer granularity and a context switch or two
NEW_TOKENS = 48
NORMAL = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": NEW_TOKENS,
          "temperature": 0, "ignore_eos": True}
MEASURED: dict[str, float] = {}


def _text(content: str = "Say something.") -> list[dict]:
    return [{"role": "user", "content": content}]


def _worst_requests() -> dict[str, tuple[int, dict]]:
    """class -> (requests sent at once, body)."""
    stop_len = MAX_STOP_BYTES // MAX_STOP_STRINGS
    big = data_url(big_png(3000, 3000))
    deep16 = data_url(big_png(6000, 6000, bit_depth=16, color_type=0))
    return {
        "stop_strings_at_cap": (1, {"model": MODEL_NAME, "messages": _text(), "max_tokens": 2, "ignore_eos": True,
                                    "stop": [f"{i:04d}" + "q" * (stop_len - 4) for i in range(MAX_STOP_STRINGS)]}),
        "stop_strings_50k": (1, {"model": MODEL_NAME, "messages": _text(), "max_tokens": 32,
                                 "stop": many_stop_strings(50_000)}),
        "schema_ref_dag": (1, {"model": MODEL_NAME, "messages": _text(), "max_tokens": 2, "response_format": {
            "type": "json_schema", "json_schema": {"name": "dag", "schema": dag_schema(22)}}}),
        "schema_over_node_cap": (1, {"model": MODEL_NAME, "messages": _text(), "max_tokens": 16, "response_format": {
            "type": "json_schema", "json_schema": {"name": "wide", "schema": {"type": "object", "properties": {
                f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_NODES + 1)}}}}}),
        "images_3000px_x8": (8, {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": big}}, {"type": "text", "text": "What is it?"}]}]}),
        "image_16bit_6000px": (1, {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": deep16}}, {"type": "text", "text": "What is it?"}]}]}),
        "tool_arguments_nested": (1, {"model": MODEL_NAME, "max_tokens": 2, "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "f", "arguments": deep_arguments(200_000)}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}]}),
    }


@pytest.fixture(scope="module")
def amp_server(tiny_checkpoint, server_llm):
    config = make_config(tiny_checkpoint, max_images_per_request=8, max_request_bytes=8 * 1024**2)
    with BackgroundServer(config, llm=server_llm) as srv:
        yield srv
    print("amplification latencies (s):", {k: round(v, 3) for k, v in MEASURED.items()})


def _latency(http: httpx.Client) -> float:
    start = time.perf_counter()
    reply = http.post(URL, json=NORMAL)
    took = time.perf_counter() - start
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == NEW_TOKENS, reply.text[:300]
    return took


def _median_latency(http: httpx.Client) -> float:
    return statistics.median(_latency(http) for _ in range(TRIES))


def _send_at_once(base_url: str, content: bytes, count: int) -> tuple[list[threading.Thread], list[int]]:
    statuses: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=base_url, timeout=120) as http:
            statuses.append(http.post(URL, content=content, headers={"Content-Type": "application/json"}).status_code)

    threads = [threading.Thread(target=send, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads, statuses


ATTEMPTS = 2  # a class passes if one of two independent measurements is within the bound (before: seconds, twice)


@pytest.mark.parametrize("name", list(_worst_requests()))
def test_normal_request_keeps_its_latency_beside_the_worst_request(amp_server, name):
    count, body = _worst_requests()[name]
    content = json.dumps(body).encode()  # encoded once: the senders share this process (and its GIL) with the server
    for _ in range(ATTEMPTS):
        idle_s, loaded_s, limit = _measure(amp_server, content, count)
        MEASURED[f"{name} (idle)"], MEASURED[name] = idle_s, loaded_s
        if loaded_s <= limit:
            break
    assert loaded_s <= limit, f"{name}: {loaded_s:.3f} s beside it vs {idle_s:.3f} s idle (limit {limit:.3f} s)"


def _measure(amp_server, content: bytes, count: int) -> tuple[float, float, float]:
    """(median idle latency, median latency beside the hostile request(s), the bound)."""
    idle, loaded, statuses = [], [], []
    with httpx.Client(base_url=amp_server.base_url, timeout=120) as http:
        _latency(http)  # warm
        # Images: one burst of eight keeps the image pool busy for seconds; sample while it lasts.
        rounds, samples = (1, IMAGE_SAMPLES) if count > 1 else (TRIES, 1)
        for _ in range(rounds):
            idle.extend(_latency(http) for _ in range(samples))
            threads, sent = _send_at_once(amp_server.base_url, content, count)
            time.sleep(0.01)  # the hostile request(s) are in flight
            loaded.extend(_latency(http) for _ in range(samples))
            for t in threads:
                t.join(timeout=120)
            statuses += sent
    idle_s, loaded_s = statistics.median(idle), statistics.median(loaded)
    assert len(statuses) == rounds * count and all(s < 500 for s in statuses), statuses
    return idle_s, loaded_s, 2 * idle_s + SLACK_S
