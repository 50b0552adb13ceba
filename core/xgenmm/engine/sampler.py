"""Logits -> next tokens for a batch of sequences, each with its own `SamplingParams`.

Per step, in this order (vLLM's, with HF's warper order for the random part):

(a) logprobs: log-softmax of the RAW logits over the full vocabulary (vLLM's default "raw_logprobs"), for the
    sampled token and the top-`logprobs` tokens; rank = 1 + number of raw logits strictly greater;
(b) grammar (structured outputs) bitmask;
(c) min_tokens: stop tokens (EOS unless ignore_eos, plus stop_token_ids) are masked until min_tokens outputs exist
    (if that would leave no allowed token, e.g. a finished grammar, the grammar wins);
(d) repetition penalty over prompt + output tokens, presence / frequency penalties over output tokens;
(e) greedy rows (temperature < 1e-5 or top_k == 1): exactly `argmax` of the penalised logits (lowest id on ties);
(f) other rows: temperature, top-k, top-p, min-p, then an exponential race `argmax(p / Exp(1))`, whose noise comes
    from the row's own `torch.Generator` when the request is seeded (so a seeded row's result does not depend on the
    rest of the batch), else from the sampler's process generator (one vectorised draw for all unseeded rows).

The sampler then advances each row's grammar with the sampled token (the engine must not do it again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..sampling_params import SamplingParams
from ..special_tokens import END_TOKEN_ID
from ..structured.bitmask import allocate_token_bitmask, apply_token_bitmask
from ..structured.matcher import GrammarMatcher, fill_bitmasks
from .penalties import PenaltySlot, TokenCountPool, apply_penalties

__all__ = ["SamplingState", "Sampler", "SamplerOutput", "make_generator", "Logprobs"]

# One generated token's logprobs: [(sampled_id, logprob, rank), (top1_id, logprob, 1), (top2_id, logprob, 2), ...]
Logprobs = list[tuple[int, float, int]]

_U64 = (1 << 64) - 1


def make_generator(seed: int | None, sample_index: int = 0, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator of sample `sample_index` of a request: seeded with `seed + sample_index` (mod 2**64, as vLLM
    derives the seeds of an n > 1 request), or None for an unseeded request."""
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed((int(seed) + int(sample_index)) & _U64)
    return generator


@dataclass(eq=False)
class SamplingState:
    """Everything the sampler needs about one sequence. `output_token_ids` may be the engine's live list: the
    sampler reads it each step (only the new tail is counted for penalties) and never modifies it."""

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    grammar: GrammarMatcher | None = None
    eos_token_ids: tuple[int, ...] = (END_TOKEN_ID,)
    # vLLM / HF-with-input_ids: the repetition penalty also covers prompt tokens. HF `generate(inputs_embeds=...)`
    # (the official xGen-MM path) has no prompt ids, so it penalises generated tokens only: set False to match it.
    repetition_penalty_over_prompt: bool = True
    # this sequence's row in the sampler's penalty pool (assigned and released by the pool)
    penalty_slot: PenaltySlot | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] = (),
        output_token_ids: Sequence[int] | None = None,
        *,
        sample_index: int = 0,
        device: torch.device | str = "cpu",
        grammar: GrammarMatcher | None = None,
        eos_token_ids: Sequence[int] = (END_TOKEN_ID,),
        repetition_penalty_over_prompt: bool = True,
    ) -> "SamplingState":
        """A state with its generator built from `params.seed` and `sample_index` on `device` (the logits' device)."""
        return cls(
            params=params,
            prompt_token_ids=prompt_token_ids,
            output_token_ids=[] if output_token_ids is None else output_token_ids,
            generator=make_generator(params.seed, sample_index, device),
            grammar=grammar,
            eos_token_ids=tuple(eos_token_ids),
            repetition_penalty_over_prompt=repetition_penalty_over_prompt,
        )

    def min_tokens_stop_ids(self) -> list[int]:
        """Tokens masked while fewer than min_tokens outputs exist (vLLM: EOS unless ignore_eos, + stop_token_ids)."""
        ids = list(self.params.stop_token_ids or ())
        if not self.params.ignore_eos:
            ids.extend(self.eos_token_ids)
        return ids


@dataclass
class SamplerOutput:
    """One step's result, row-aligned with the input states.

    `logprobs[i]` is None unless row i asked for logprobs; else the sampled token first, then the top-`logprobs`
    tokens (which may repeat the sampled one), each `(token_id, logprob, rank)`.
    `grammar_errors[i]` is set when row i's grammar could not accept the sampled token (the request should end).
    """

    token_ids: list[int]
    logprobs: list[Logprobs | None]
    grammar_errors: list[str | None]


def _col(values: list, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class Sampler:
    """Stateless per step apart from the penalty token-count pool (one per device). Thread-compatible, not
    thread-safe: call it from the engine loop only."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Noise source of unseeded rows: None = torch's default generator of the logits' device.
        self.generator = generator
        self._pools: dict[tuple[torch.device, int], TokenCountPool] = {}

    def release(self, state: SamplingState) -> None:
        """Free the state's penalty slot now (it is also freed when the state is garbage-collected)."""
        if state.penalty_slot is not None:
            state.penalty_slot.pool.release(state)

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [B, V] with B = len(states) = {len(states)}, got {tuple(logits.shape)}")
        batch, vocab = logits.shape
        device = logits.device
        raw = logits.float()
        if batch == 0:
            return SamplerOutput([], [], [])

        # (a) raw logprobs: computed before anything changes the logits
        lp_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(raw.index_select(0, _col(lp_rows, device, torch.long)), dim=-1) if lp_rows else None

        work = raw.clone()
        # (b) grammar bitmasks
        grammar_rows = [(s.grammar, i) for i, s in enumerate(states) if s.grammar is not None]
        if grammar_rows:
            bitmask = allocate_token_bitmask(len(grammar_rows), vocab)
            fill_bitmasks([(g, j) for j, (g, _) in enumerate(grammar_rows)], bitmask)
            apply_token_bitmask(work, bitmask, [i for _, i in grammar_rows])

        # (c) min_tokens
        self._mask_min_tokens(work, states)

        # (d) penalties
        pen_rows = [i for i, s in enumerate(states) if s.params.has_penalties]
        if pen_rows:
            self._apply_penalties(work, states, pen_rows)

        tokens = torch.empty(batch, dtype=torch.long, device=device)
        # (e) greedy rows
        greedy = [i for i, s in enumerate(states) if s.params.is_greedy]
        if greedy:
            if len(greedy) == batch:
                tokens = work.argmax(dim=-1)
            else:
                index = _col(greedy, device, torch.long)
                tokens.index_copy_(0, index, work.index_select(0, index).argmax(dim=-1))
        # (f) random rows
        rand = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if rand:
            self._sample_random(work, states, rand, tokens)

        token_list = tokens.tolist()
        if grammar_rows:
            # a row with nothing allowed (cannot happen with a working grammar) ends with its EOS, not garbage
            dead = torch.isneginf(work.max(dim=-1).values)
            if bool(dead.any()):
                for i in dead.nonzero().flatten().tolist():
                    token_list[i] = states[i].eos_token_ids[0] if states[i].eos_token_ids else 0

        logprobs: list[Logprobs | None] = [None] * batch
        if lp_rows:
            self._gather_logprobs(raw, raw_logprobs, lp_rows, states, token_list, logprobs)

        grammar_errors: list[str | None] = [None] * batch
        for grammar, i in grammar_rows:
            if not grammar.accept_token(token_list[i]):
                grammar_errors[i] = grammar.error or f"token {token_list[i]} rejected by the grammar"
        return SamplerOutput(token_list, logprobs, grammar_errors)

    # -- steps -----------------------------------------------------------------------------------------------

    @staticmethod
    def _mask_min_tokens(work: torch.Tensor, states: Sequence[SamplingState]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        vocab = work.shape[1]
        for i, s in enumerate(states):
            if s.params.min_tokens and len(s.output_token_ids) < s.params.min_tokens:
                for t in s.min_tokens_stop_ids():
                    if 0 <= t < vocab:
                        rows.append(i)
                        cols.append(t)
        if not rows:
            return
        index = torch.tensor([rows, cols], dtype=torch.long).to(work.device, non_blocking=True)
        row_ids = torch.unique(index[0])
        before = work.index_select(0, row_ids)
        work.index_put_((index[0], index[1]), torch.tensor(float("-inf"), device=work.device))
        # if masking the stop tokens left a row with nothing allowed (a complete grammar), undo it for that row
        empty = torch.isneginf(work.index_select(0, row_ids).max(dim=-1).values)
        if bool(empty.any()):
            work.index_copy_(0, row_ids[empty], before[empty])

    def _pool(self, device: torch.device, vocab: int) -> TokenCountPool:
        key = (device, vocab)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = TokenCountPool(vocab, device)
        return pool

    def _apply_penalties(self, work: torch.Tensor, states: Sequence[SamplingState], rows: list[int]) -> None:
        device = work.device
        pool = self._pool(device, work.shape[1])
        pen_states = [states[i] for i in rows]
        slots = pool.slots_for(pen_states)
        index = _col(rows, device, torch.long)
        params = [s.params for s in pen_states]
        penalised = apply_penalties(
            work.index_select(0, index),
            pool.prompt_mask.index_select(0, slots),
            pool.counts.index_select(0, slots),
            _col([p.repetition_penalty for p in params], device),
            _col([p.presence_penalty for p in params], device),
            _col([p.frequency_penalty for p in params], device),
        )
        work.index_copy_(0, index, penalised)

    def _sample_random(self, work: torch.Tensor, states: Sequence[SamplingState], rows: list[int], tokens: torch.Tensor) -> None:
        device = work.device
        vocab = work.shape[1]
        params = [states[i].params for i in rows]
        index = _col(rows, device, torch.long)
        logits = work.index_select(0, index) / _col([p.temperature for p in params], device).unsqueeze(1)

        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        if any(top_k):
            logits = _apply_top_k(logits, top_k)
        # top-p sorts the vocabulary: do it only for the rows that ask for it
        nucleus = [j for j, p in enumerate(params) if p.top_p < 1.0]
        if nucleus:
            top_p = _col([params[j].top_p for j in nucleus], device)
            if len(nucleus) == len(params):
                logits = _apply_top_p(logits, top_p)
            else:
                sub = _col(nucleus, device, torch.long)
                logits.index_copy_(0, sub, _apply_top_p(logits.index_select(0, sub), top_p))
        if any(p.min_p > 0.0 for p in params):
            logits = _apply_min_p(logits, _col([p.min_p for p in params], device))
        probs = torch.softmax(logits, dim=-1)

        noise = torch.empty_like(probs)
        seeded = [j for j, i in enumerate(rows) if states[i].generator is not None]
        unseeded = [j for j, i in enumerate(rows) if states[i].generator is None]
        if unseeded:
            if len(unseeded) == len(rows):
                noise.exponential_(generator=self.generator)
            else:
                fresh = torch.empty((len(unseeded), vocab), dtype=probs.dtype, device=device)
                fresh.exponential_(generator=self.generator)
                noise.index_copy_(0, _col(unseeded, device, torch.long), fresh)
        for j in seeded:
            generator = states[rows[j]].generator
            if generator.device.type != device.type:
                raise ValueError(
                    f"request seed generator is on {generator.device} but the logits are on {device}; "
                    "build the SamplingState with device=<logits device>"
                )
            noise[j].exponential_(generator=generator)  # always a full-vocab draw: independent of the batch
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        tokens.index_copy_(0, index, (probs / noise).argmax(dim=-1))

    @staticmethod
    def _gather_logprobs(
        raw: torch.Tensor,
        raw_logprobs: torch.Tensor,
        rows: list[int],
        states: Sequence[SamplingState],
        token_list: list[int],
        out: list[Logprobs | None],
    ) -> None:
        device = raw.device
        index = _col(rows, device, torch.long)
        sampled = _col([token_list[i] for i in rows], device, torch.long).unsqueeze(1)
        sampled_lp = raw_logprobs.gather(1, sampled).squeeze(1)
        row_logits = raw.index_select(0, index)
        ranks = (row_logits > row_logits.gather(1, sampled)).sum(dim=-1) + 1
        k_max = max(states[i].params.logprobs for i in rows)
        if k_max > 0:
            top_lp, top_ids = raw_logprobs.topk(k_max, dim=-1)
            top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
        sampled_lp_l, ranks_l = sampled_lp.tolist(), ranks.tolist()
        for j, i in enumerate(rows):
            entry = [(token_list[i], sampled_lp_l[j], ranks_l[j])]
            k = states[i].params.logprobs
            if k:
                entry.extend((top_ids_l[j][r], top_lp_l[j][r], r + 1) for r in range(k))
            out[i] = entry


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep each row's `top_k[j]` largest logits (ties at the threshold kept, as HF); 0 = row unchanged."""
    k = torch.tensor(top_k, dtype=torch.long, device=logits.device)
    k_max = int(max(top_k))
    values = logits.topk(k_max, dim=-1).values
    threshold = values.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
    threshold = torch.where(k.unsqueeze(1) > 0, threshold, torch.full_like(threshold, float("-inf")))
    return logits.masked_fill(logits < threshold, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering (HF / vLLM): drop the smallest tokens whose cumulative probability is <= 1 - top_p,
    always keeping the most likely one."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1.0 - top_p).unsqueeze(1)
    remove[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))
