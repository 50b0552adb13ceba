"""vLLM `RequestOutput`s -> ours, per request, with the native engine's output kinds and metrics.

vLLM is always asked for cumulative outputs; `RequestTracker` keeps each sample's latest state and emits it with the
native engine's own emission rule (`engine.output_processor.emit_request_output`): everything so far (CUMULATIVE),
only what is new since the last emission (DELTA), or one final output (FINAL_ONLY). An abort ends every unfinished
sample with finish_reason "abort", like the native engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..engine.output_processor import emit_request_output
from ..outputs import Logprob, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from .vllm_params import greedy_replicas, native_stop_reason


@dataclass
class _Sample:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0
    sent_text: int = 0


def _convert_logprobs(vllm_logprobs) -> list[dict[int, Logprob]] | None:
    if vllm_logprobs is None:
        return None
    return [
        {int(tid): Logprob(float(lp.logprob), lp.rank, lp.decoded_token) for tid, lp in position.items()}
        for position in vllm_logprobs
    ]


def leading_spaces_stripped_by_decode(tokenizer) -> int:
    """How many leading spaces `tokenizer.decode(output_ids)` drops (1 for Phi-3 / Llama's Metaspace decoder).

    The native engine's text is HF's decode of the output alone (what the official demos print); vLLM decodes the
    output in the context of the prompt, which keeps the space of a first "▁word". Probing one "▁word" piece tells
    how many spaces to drop from the start of vLLM's text to get the native text."""
    for piece, tid in tokenizer.get_vocab().items():
        if len(piece) > 2 and piece[0] == "\u2581" and piece[1:].isalpha():
            decoded = tokenizer.decode([tid])
            return max(0, len(piece) - len(decoded)) if decoded.endswith(piece[1:]) else 0
    return 0


def _strip_leading_spaces(text: str, count: int) -> str:
    cut = 0
    while cut < count and cut < len(text) and text[cut] == " ":
        cut += 1
    return text[cut:]


class RequestTracker:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 fused_length: int, arrival_time: float | None = None, strip_leading_spaces: int = 0):
        self.request_id = request_id
        self.strip_leading_spaces = strip_leading_spaces
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.samples = {i: _Sample(i) for i in range(params.n)}
        self.replicas = greedy_replicas(params)  # greedy n > 1: vLLM makes one sample, reported n times
        self.metrics = RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
                                      num_prompt_tokens=fused_length)
        self.num_cached_tokens = 0
        self.finished = False

    def update(self, vout) -> RequestOutput | None:
        """Fold one vLLM output in; return what to deliver now (None: nothing, e.g. FINAL_ONLY not yet done)."""
        now = time.monotonic()
        if self.metrics.first_scheduled_time is None:
            self.metrics.first_scheduled_time = now
        for comp in vout.outputs:
            for index in range(self.replicas) if self.replicas > 1 else (comp.index,):
                self._fold(self.samples.setdefault(index, _Sample(index)), comp)
        generated = sum(len(s.token_ids) for s in self.samples.values())
        if generated and self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.num_generated_tokens = generated
        self.num_cached_tokens = int(getattr(vout, "num_cached_tokens", 0) or 0)
        self.metrics.num_cached_tokens = self.num_cached_tokens
        if vout.prompt_token_ids is not None:
            self.metrics.num_prompt_tokens = len(vout.prompt_token_ids)
        self.finished = bool(vout.finished)
        return self._emit()

    def _fold(self, sample: _Sample, comp) -> None:
        """One vLLM sample's cumulative state into ours."""
        sample.text = _strip_leading_spaces(comp.text, self.strip_leading_spaces)
        sample.token_ids = list(comp.token_ids)
        sample.cumulative_logprob = comp.cumulative_logprob
        if comp.logprobs is not None:  # convert only the positions not seen yet
            known = sample.logprobs or []
            sample.logprobs = known + _convert_logprobs(comp.logprobs[len(known) :])
        sample.finish_reason = comp.finish_reason
        sample.stop_reason = native_stop_reason(comp.stop_reason, self.params) if comp.finish_reason else None

    def abort(self) -> RequestOutput | None:
        """The final output of an aborted request (every unfinished sample ends with "abort")."""
        if self.finished:
            return None
        for sample in self.samples.values():
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
        self.finished = True
        return self._emit(force=True)

    def _emit(self, force: bool = False) -> RequestOutput | None:
        return emit_request_output(self.request_id, self.prompt, self.prompt_token_ids, self.samples.values(),
                                   self.params.output_kind, self.finished, self.metrics, self.num_cached_tokens, force)
