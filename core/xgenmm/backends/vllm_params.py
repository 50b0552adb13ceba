"""Our `SamplingParams` -> vLLM's, with the same meaning, or a `SamplingParamsError` naming what vLLM cannot do.

Structured outputs go to vLLM's "guidance" backend, which runs the same llguidance library as the native engine,
and are expressed so that it compiles the very grammar the native engine compiles:

* `json` / `json_object` with the default `whitespace_flexible=True` -> vLLM `json` / `json_object`;
* the same with `whitespace_flexible=False` -> a Lark grammar `start: %json {schema + x-guidance}` (vLLM 0.32 has no
  per-request whitespace switch, only an engine-wide one);
* `regex`, `choice`, `grammar` (Lark, incl. `%llguidance` / `%json`, e.g. the tool-call grammars) -> the same fields.

Any other vLLM structured-outputs backend (xgrammar, outlines) reads Lark grammars and whitespace rules differently,
so with one of those only `json` (flexible), `json_object` (flexible), `regex` and `choice` are accepted.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import SamplingParamsError
from ..sampling_params import SamplingParams, StructuredOutputsParams
from ..special_tokens import END_TOKEN_ID, ENDOFTEXT_TOKEN_ID

# Tokens that end a turn in the native engine (unless ignore_eos): a finish on them has stop_reason None there.
EOS_TOKEN_IDS = (END_TOKEN_ID, ENDOFTEXT_TOKEN_ID)


def _strict_json_lark(schema: dict | str | bool) -> str:
    """`start: %json {...}` with the native engine's `whitespace_flexible=False` default (the schema's own
    `x-guidance` settings win, as llguidance's `defaults` do)."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    if isinstance(schema, bool):  # true = any JSON value; false = nothing (llguidance rejects it like native)
        schema = {} if schema else {"not": {}}
    schema = dict(schema)
    schema["x-guidance"] = {"whitespace_flexible": False, **dict(schema.get("x-guidance") or {})}
    return "start: %json " + json.dumps(schema, ensure_ascii=False) + "\n"


def to_vllm_structured_outputs(so: StructuredOutputsParams, backend: str = "guidance"):
    from vllm.sampling_params import StructuredOutputsParams as VllmStructuredOutputsParams

    kind = so.kind
    guidance = backend == "guidance"
    if not guidance:
        if kind == "grammar":
            raise SamplingParamsError(
                f"structured_outputs.grammar (a Lark grammar) needs vLLM's 'guidance' structured-outputs backend; "
                f"this engine uses {backend!r}", field="structured_outputs.grammar"
            )
        if not so.whitespace_flexible and kind in ("json", "json_object"):
            raise SamplingParamsError(
                "structured_outputs.whitespace_flexible=False needs vLLM's 'guidance' structured-outputs backend; "
                f"this engine uses {backend!r}", field="structured_outputs.whitespace_flexible"
            )
    if kind == "json":
        if not so.whitespace_flexible:
            return VllmStructuredOutputsParams(grammar=_strict_json_lark(so.json))
        return VllmStructuredOutputsParams(json=so.json)
    if kind == "json_object":
        if not so.whitespace_flexible:
            return VllmStructuredOutputsParams(grammar=_strict_json_lark({"type": "object"}))
        return VllmStructuredOutputsParams(json_object=True)
    if kind == "regex":
        return VllmStructuredOutputsParams(regex=so.regex)
    if kind == "choice":
        return VllmStructuredOutputsParams(choice=list(so.choice))
    return VllmStructuredOutputsParams(grammar=so.grammar)


def greedy_replicas(params: SamplingParams) -> int:
    """How many identical samples the backend must report for one vLLM sample (n for greedy n > 1, else 1)."""
    return params.n if params.n > 1 and params.temperature == 0.0 else 1


def to_vllm_sampling_params(params: SamplingParams, structured_backend: str = "guidance", **overrides: Any):
    """A vLLM `SamplingParams` with the same meaning. Outputs are always requested cumulative: the backend produces
    DELTA / FINAL_ONLY itself, exactly as the native engine does (including the final output of an abort)."""
    from vllm.sampling_params import RequestOutputKind as VllmOutputKind
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    if not isinstance(params, SamplingParams):
        raise SamplingParamsError(f"sampling_params must be a SamplingParams, got {type(params).__name__}",
                                  field="sampling_params")
    structured = None
    if params.structured_outputs is not None:
        structured = to_vllm_structured_outputs(params.structured_outputs, structured_backend)
    stop_token_ids = list(params.stop_token_ids or [])
    if not params.ignore_eos:  # the native engine ends on <|end|> and <|endoftext|>, whatever generation_config says
        stop_token_ids += [t for t in EOS_TOKEN_IDS if t not in stop_token_ids]
    fields = dict(
        # vLLM refuses n > 1 with greedy sampling; every greedy sample is the same, so one is asked for and the
        # backend's RequestTracker reports it n times (as the native engine would produce it).
        n=1 if greedy_replicas(params) > 1 else params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=params.seed,
        stop=list(params.stop or []),
        stop_token_ids=stop_token_ids,
        ignore_eos=params.ignore_eos,
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
        output_kind=VllmOutputKind.CUMULATIVE,
        structured_outputs=structured,
    )
    fields.update(overrides)
    try:
        return VllmSamplingParams(**fields)
    except (ValueError, TypeError) as exc:
        raise SamplingParamsError(f"vLLM cannot honour these sampling params: {exc}", field=None) from None


def native_stop_reason(stop_reason: int | str | None, params: SamplingParams) -> int | str | None:
    """vLLM reports the turn-end tokens it was told to stop on as a stop_reason; the native engine reports None for
    them (an end of sequence), and the token id only for the caller's own `stop_token_ids`."""
    if isinstance(stop_reason, int) and stop_reason in EOS_TOKEN_IDS and stop_reason not in (params.stop_token_ids or ()):
        return None
    return stop_reason
