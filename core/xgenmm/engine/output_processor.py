"""Tokens out, as callers see them: per-sample detokenized text, stop tokens / stop strings / grammar end / length,
and `RequestOutput` emission in the request's output kind (DELTA, CUMULATIVE, FINAL_ONLY).

`emit_request_output` is the one emission rule, shared by the native engine (`OutputProcessor`) and the vLLM backend
(`backends/vllm_outputs.py`): both keep per-sample `SampleOutput`s and hand them here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import RequestOutputKind, SamplingParams
from .detokenizer import IncrementalDetokenizer
from .request import PreparedRequest
from .sampler import SamplingState
from .sequence import Sequence

logger = logging.getLogger("xgenmm.engine")

__all__ = ["SampleOutput", "SampleState", "RequestState", "OutputProcessor", "emit_request_output", "deliver"]

Sink = Callable[[RequestOutput | BaseException], None]


class SampleOutput(Protocol):
    """What emission reads of one sample (`n` > 1 requests have several)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None
    sent_tokens: int  # tokens and characters already emitted (DELTA)
    sent_text: int


def emit_request_output(request_id: str, prompt: str | None, prompt_token_ids: list[int],
                        samples: Iterable[SampleOutput], kind: RequestOutputKind, finished: bool,
                        metrics: RequestMetrics, num_cached_tokens: int, force: bool = False) -> RequestOutput | None:
    """The output to deliver now, or None (FINAL_ONLY before the end; DELTA with nothing new and not `force`d)."""
    if finished and metrics.finished_time is None:
        metrics.finished_time = time.monotonic()
    if kind is RequestOutputKind.FINAL_ONLY and not finished:
        return None
    outputs = []
    changed = force or finished or kind is not RequestOutputKind.DELTA
    for sample in sorted(samples, key=lambda s: s.index):
        tokens, text, logprobs = sample.token_ids, sample.text, sample.logprobs
        if kind is RequestOutputKind.DELTA:
            new_tokens, new_text = tokens[sample.sent_tokens:], text[sample.sent_text:]
            new_logprobs = logprobs[sample.sent_tokens:] if logprobs is not None else None
            changed = changed or bool(new_tokens or new_text or sample.finish_reason is not None)
            outputs.append(CompletionOutput(sample.index, new_text, list(new_tokens), sample.cumulative_logprob,
                                            new_logprobs, sample.finish_reason, sample.stop_reason))
        else:
            outputs.append(CompletionOutput(sample.index, text, list(tokens), sample.cumulative_logprob,
                                            list(logprobs) if logprobs is not None else None,
                                            sample.finish_reason, sample.stop_reason))
        sample.sent_tokens, sample.sent_text = len(tokens), len(text)
    if not changed:
        return None
    return RequestOutput(request_id, prompt, list(prompt_token_ids), outputs, finished, metrics, num_cached_tokens)


def deliver(sink: Sink, item: RequestOutput | BaseException) -> None:
    """Hand an output to its caller. A caller that went away (closed event loop, ...) must not break the engine."""
    try:
        sink(item)
    except Exception:  # noqa: BLE001 - the consumer is gone; every other request goes on
        logger.debug("dropping an output for a consumer that went away", exc_info=True)


@dataclass
class SampleState:
    """One sample of a native request: its sequence, detokenizer and sampling state, and what was emitted."""

    seq: Sequence
    detok: IncrementalDetokenizer
    sampling: SamplingState
    logprobs: list[dict[int, Logprob]] | None
    cumulative: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0
    sent_text: int = 0

    @property
    def index(self) -> int:
        return self.seq.sample_index

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def token_ids(self) -> list[int]:
        return self.seq.output_token_ids

    @property
    def cumulative_logprob(self) -> float | None:
        return self.cumulative if self.logprobs is not None else None


@dataclass
class RequestState:
    """A native request in flight: its samples (and, for n > 1, the siblings admitted once sample 0's prompt is
    cached), its caller's sink, its metrics and its encoded images."""

    prepared: PreparedRequest
    sink: Sink
    samples: list[SampleState] = field(default_factory=list)
    pending: list[SampleState] = field(default_factory=list)
    image_embeds: list | None = None
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.prepared.arrival_time,
                                      num_prompt_tokens=len(self.prepared.fused.token_ids))

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    @property
    def finished(self) -> bool:
        return not self.pending and all(s.finish_reason is not None for s in self.samples)

    def sample_of(self, seq: Sequence) -> SampleState:
        return next(s for s in self.samples if s.seq is seq)


class OutputProcessor:
    """Per-token decisions and emission for the native engine (the model and scheduler stay in `NativeEngineCore`)."""

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def new_detokenizer(self, prepared: PreparedRequest, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, prepared.prompt_token_ids,
                                      skip_special_tokens=params.skip_special_tokens, stop=params.stop or (),
                                      include_stop_str_in_output=params.include_stop_str_in_output)

    def on_token(self, req: RequestState, sample: SampleState, token: int,
                 logprobs: list[tuple[int, float, int]] | None, grammar_error: str | None = None) -> str | None:
        """Record a sampled token (already appended to the sequence); return the finish reason if it ends the sample
        ("stop": stop token / eos / stop string / grammar end, "length": max_tokens or the context)."""
        params = req.prepared.params
        seq = sample.seq
        req.metrics.num_generated_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.monotonic()
        if logprobs is not None:
            sample.cumulative += logprobs[0][1]
            if sample.logprobs is not None:
                sample.logprobs.append({tid: Logprob(lp, rank, self.tokenizer.decode([tid])) for tid, lp, rank in logprobs})
        stop_tokens = params.stop_token_ids or ()
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        # a stop token's own text is left out (vLLM) and the detokenizer flushes what it held back
        sample.detok.update([token], stop_terminated=token in stop_tokens or is_eos)
        reason = stop = None
        if token in stop_tokens:
            reason, stop = "stop", token
        elif is_eos:
            reason = "stop"
        elif sample.detok.finished:
            reason, stop = "stop", sample.detok.stop_reason
        elif sample.sampling.grammar is not None and (sample.sampling.grammar.is_terminated() or grammar_error):
            if grammar_error:
                logger.warning("request %s: %s", seq.request_id, grammar_error)
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            sample.detok.flush()  # length / grammar end: release held-back text (no-op after a stop string)
            sample.stop_reason = stop
        return reason

    @staticmethod
    def make_output(req: RequestState, force: bool = False) -> RequestOutput | None:
        p = req.prepared
        return emit_request_output(p.request_id, p.prompt, p.prompt_token_ids, req.samples, p.params.output_kind,
                                   req.finished, req.metrics, req.metrics.num_cached_tokens, force)
