"""Prometheus metrics for `/metrics`: engine state read at scrape time, plus per-request histograms and counters.

Each app gets its own `CollectorRegistry` (several servers, e.g. in tests, never clash). Engine gauges and token
counters come from `EngineStats`, so they count every caller of the shared engine, not only HTTP clients.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class _EngineCollector:
    """Reads the engine core's counters and gauges when Prometheus scrapes (no background polling)."""

    def __init__(self, core, model_name: str):
        self._core = core
        self._model = model_name

    def collect(self):
        s = self._core.stats()
        free = self._core.block_manager.num_free_blocks
        labels = ["model_name"]
        values = [self._model]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("xgenmm_num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("xgenmm_num_requests_waiting", "Sequences queued for admission (the queue length).", s.num_waiting)
        yield gauge("xgenmm_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).", s.kv_cache_usage)
        yield gauge("xgenmm_kv_cache_blocks", "KV cache blocks in the pool.", s.num_kv_blocks)
        yield gauge("xgenmm_kv_cache_free_blocks", "KV cache blocks free (including evictable cached ones).", free)
        yield gauge("xgenmm_prefix_cache_hit_rate", "Prefix-cache hit rate over all lookups (0..1).",
                    s.prefix_cache_hit_rate)
        yield gauge("xgenmm_vision_cache_hit_rate", "Vision-token cache hit rate (0..1).", s.vision_cache_hit_rate)
        yield counter("xgenmm_prompt_tokens", "Prompt tokens (text + vision) admitted.", s.num_prompt_tokens)
        yield counter("xgenmm_cached_prompt_tokens", "Prompt tokens served from the prefix cache.",
                      s.num_cached_prompt_tokens)
        yield counter("xgenmm_generation_tokens", "Tokens generated.", s.num_generated_tokens)
        yield counter("xgenmm_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.",
                      s.num_preemptions)
        yield counter("xgenmm_engine_finished_requests", "Requests the engine finished.", s.num_finished_requests)
        yield counter("xgenmm_engine_failed_requests", "Requests the engine failed.", s.num_failed_requests)


class ServerMetrics:
    """`core`: the served engine's core (`EngineHandle.core`), read at scrape time."""

    def __init__(self, core, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(core, model_name))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.request_latency = Histogram(
            "xgenmm_request_latency_seconds", "End-to-end latency of finished chat completions.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram(
            "xgenmm_time_to_first_token_seconds", "Time from arrival to the first generated token.",
            buckets=_TTFT_BUCKETS, registry=self.registry)
        self.requests = Counter(
            "xgenmm_http_requests", "Chat completion requests by outcome (ok, client_error, server_error, "
            "disconnected).", ["outcome"], registry=self.registry)
        self.request_prompt_tokens = Counter(
            "xgenmm_request_prompt_tokens", "Prompt tokens of HTTP requests.", registry=self.registry)
        self.request_completion_tokens = Counter(
            "xgenmm_request_completion_tokens", "Completion tokens returned to HTTP clients.", registry=self.registry)

    def observe_finished(self, metrics, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels("ok").inc()
        self.request_prompt_tokens.inc(prompt_tokens)
        self.request_completion_tokens.inc(completion_tokens)
        if metrics is None:
            return
        if metrics.latency is not None:
            self.request_latency.observe(metrics.latency)
        if metrics.time_to_first_token is not None:
            self.time_to_first_token.observe(metrics.time_to_first_token)

    def count_error(self, status: int) -> None:
        self.requests.labels("client_error" if status < 500 else "server_error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
