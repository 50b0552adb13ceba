"""`SamplingParams`: vLLM-shaped per-request generation options, validated once at request time.

Field names, defaults and ranges follow vLLM so that code written for vLLM works unchanged. Every problem raises
`SamplingParamsError` (a `ValueError`) naming the field and the offending value, including unknown option names,
so a bad request fails alone instead of inside the engine loop.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import inspect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import SamplingParamsError

__all__ = ["RequestOutputKind", "SamplingParams", "StructuredOutputsParams", "SAMPLING_EPS", "MAX_LOGPROBS",
           "MAX_STOP_STRINGS", "MAX_STOP_BYTES"]

# Temperatures below this are greedy (as vLLM's _SAMPLING_EPS): dividing by them would only overflow.
SAMPLING_EPS = 1e-5
# Largest `logprobs` a request may ask for (top-N alternatives per generated token).
MAX_LOGPROBS = 20
MAX_N = 128  # samples per request (OpenAI's limit); a server may set a lower one
MAX_TOKENS_LIMIT = 2**31 - 1  # a sanity bound: the engine clamps max_tokens to the context anyway
# Stop strings are matched on the engine thread: bounded at admission so one request cannot buy everyone's time.
MAX_STOP_STRINGS = 64
MAX_STOP_BYTES = 16 * 1024  # all stop strings of a request together, UTF-8
_SHOWN_CHARS = 200  # how much of an offending value an error message echoes


class RequestOutputKind(enum.Enum):
    """What each streamed `RequestOutput` holds: everything so far, only the new part, or only the final output."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """`repr(value)`, cut short: an error message never echoes a megabyte (or a 5000-digit int) back."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"<a list of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _fail(name: str, value: Any, requirement: str) -> SamplingParamsError:
    return SamplingParamsError(f"invalid sampling option {name}={_shown(value)}: {requirement}", field=name)


def _reject_unknown(cls: type, names) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(names) - known)
    if unknown:
        nested = cls.__name__ == "StructuredOutputsParams"
        prefix = "structured_outputs." if nested else ""
        where = "structured_outputs (StructuredOutputsParams)" if nested else cls.__name__  # an empty key names no field
        raise SamplingParamsError(
            f"unknown {where} option(s): {', '.join(map(repr, unknown))}; valid options: {', '.join(sorted(known))}",
            field=prefix + unknown[0],
        )


def _robust_init(cls: type) -> type:
    """Wrap the dataclass __init__ so that unknown / positional arguments raise SamplingParamsError, not TypeError."""
    dataclass_init = cls.__init__

    def __init__(self, *args, **kwargs):
        if args:
            raise SamplingParamsError(f"{cls.__name__} takes keyword arguments only, got {len(args)} positional",
                                      field=None)
        _reject_unknown(cls, kwargs)
        dataclass_init(self, **kwargs)

    __init__.__doc__ = dataclass_init.__doc__
    __init__.__signature__ = inspect.signature(dataclass_init)  # keep IDE / help() signatures
    cls.__init__ = __init__
    return cls


@_robust_init
@dataclass(kw_only=True)
class StructuredOutputsParams:
    """Constrain the output to a JSON schema, any JSON object, a regex, one of several strings or a Lark grammar.

    Exactly one of `json`, `json_object`, `regex`, `choice`, `grammar` must be set (vLLM's names). `json` is a
    schema (dict or JSON text). `whitespace_flexible` lets JSON outputs contain any whitespace between tokens (vLLM's
    default; False forces compact JSON). Grammar compilation (and schema validity) is checked by
    `xgenmm.structured.GrammarCompiler.compile`, which raises `SamplingParamsError` for the request.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    whitespace_flexible: bool = True

    def __post_init__(self) -> None:
        chosen = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if not isinstance(self.json_object, bool):
            raise _fail("structured_outputs.json_object", self.json_object, "must be a bool")
        if self.json_object:
            chosen.append("json_object")
        if len(chosen) != 1:
            raise SamplingParamsError(
                "structured_outputs: exactly one of json, json_object, regex, choice, grammar must be set, "
                f"got {chosen or 'none'}",
                field="structured_outputs",
            )
        if not isinstance(self.whitespace_flexible, bool):
            raise _fail("structured_outputs.whitespace_flexible", self.whitespace_flexible, "must be a bool")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    parsed = json.loads(self.json)
                except ValueError as exc:
                    raise _fail("structured_outputs.json", self.json, f"is not valid JSON ({exc})") from None
                if not isinstance(parsed, (dict, bool)):
                    raise _fail("structured_outputs.json", self.json, "a JSON schema must be an object")
            elif not isinstance(self.json, dict):
                raise _fail("structured_outputs.json", self.json, "must be a dict or a JSON string")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise _fail("structured_outputs.regex", self.regex, "must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise _fail("structured_outputs.grammar", self.grammar, "must be a non-empty Lark grammar string")
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise _fail("structured_outputs.choice", self.choice, "must be a non-empty list of strings")
            if not all(isinstance(c, str) for c in self.choice):
                raise _fail("structured_outputs.choice", self.choice, "every choice must be a string")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "json_object", "regex", "choice" or "grammar"."""
        if self.json_object:
            return "json_object"
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        raise AssertionError("unreachable: validated in __post_init__")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StructuredOutputsParams":
        if not isinstance(data, Mapping):
            raise _fail("structured_outputs", data, "must be a StructuredOutputsParams or a dict")
        return cls(**dict(data))


@_robust_init
@dataclass(kw_only=True)
class SamplingParams:
    """Per-request sampling options (vLLM names and defaults). Validated on construction.

    Normalisations: `stop` becomes a list of strings (None -> []), `stop_token_ids` a list of ints (None -> []),
    `temperature` etc. floats, `output_kind` may be given as a name ("delta"), `structured_outputs` as a dict.
    `max_tokens=None` means "until the context is full" (vLLM); `top_k` 0 or -1 disables top-k.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = field(default=None)

    def __post_init__(self) -> None:
        self._check_int("n", minimum=1)
        if self.n > MAX_N:
            raise _fail("n", self.n, f"must be <= {MAX_N}")
        self._check_float("temperature", lambda v: v >= 0.0, "must be >= 0")
        self._check_float("top_p", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
        self._check_int("top_k", minimum=-1, requirement="must be an int >= -1 (0 or -1 disable top-k)")
        self._check_float("min_p", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
        self._check_float("repetition_penalty", lambda v: v > 0.0, "must be > 0")
        self._check_float("presence_penalty", lambda v: -2.0 <= v <= 2.0, "must be in [-2, 2]")
        self._check_float("frequency_penalty", lambda v: -2.0 <= v <= 2.0, "must be in [-2, 2]")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise _fail("seed", self.seed, "must be None or an int in [-2**63, 2**64)")
        self._normalise_stop()
        self._normalise_stop_token_ids()
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, getattr(self, name), "must be a bool")
        if self.max_tokens is not None:
            self._check_int("max_tokens", minimum=1, requirement="must be None or an int >= 1")
            if self.max_tokens > MAX_TOKENS_LIMIT:
                raise _fail("max_tokens", self.max_tokens, f"must be <= {MAX_TOKENS_LIMIT}")
        self._check_int("min_tokens", minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise _fail("logprobs", self.logprobs, f"must be None or an int in [0, {MAX_LOGPROBS}]")
        self._normalise_output_kind()
        if isinstance(self.structured_outputs, Mapping):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _fail("structured_outputs", self.structured_outputs, "must be None, a StructuredOutputsParams or a dict")

    # -- validation helpers -------------------------------------------------------------------------------------

    def _check_int(self, name: str, minimum: int, requirement: str | None = None) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < minimum:
            raise _fail(name, value, requirement or f"must be an int >= {minimum}")

    def _check_float(self, name: str, ok, requirement: str) -> None:
        value = getattr(self, name)
        if not _is_number(value) or not math.isfinite(value) or not ok(float(value)):  # NaN and infinities fail
            raise _fail(name, value, requirement + " (a finite number)")
        setattr(self, name, float(value))

    def _normalise_stop(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)
        else:
            raise _fail("stop", self.stop, "must be None, a string or a list of strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise _fail("stop", stop, f"at most {MAX_STOP_STRINGS} stop strings per request")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise _fail("stop", self.stop, "every stop string must be a non-empty string")
        total = sum(len(s.encode("utf-8", "surrogatepass")) for s in stop)
        if total > MAX_STOP_BYTES:
            raise _fail("stop", stop, f"the stop strings total {total} bytes; at most {MAX_STOP_BYTES} per request")
        self.stop = stop

    def _normalise_stop_token_ids(self) -> None:
        ids = self.stop_token_ids
        if ids is None:
            ids = []
        elif isinstance(ids, (list, tuple)):
            ids = list(ids)
        else:
            raise _fail("stop_token_ids", self.stop_token_ids, "must be None or a list of token ids")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise _fail("stop_token_ids", self.stop_token_ids, "every stop token id must be an int >= 0")
        self.stop_token_ids = ids

    def _normalise_output_kind(self) -> None:
        kind = self.output_kind
        if isinstance(kind, str):
            try:
                kind = RequestOutputKind[kind.strip().upper()]
            except KeyError:
                raise _fail("output_kind", self.output_kind, "must be cumulative, delta or final_only") from None
        if not isinstance(kind, RequestOutputKind):
            raise _fail("output_kind", self.output_kind, "must be a RequestOutputKind")
        self.output_kind = kind

    # -- convenience --------------------------------------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax: temperature ~0 (< SAMPLING_EPS, as vLLM) or top_k == 1."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def create(cls, **kwargs: Any) -> "SamplingParams":
        """Same as `SamplingParams(**kwargs)`; unknown names raise `SamplingParamsError`."""
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingParams":
        """Build from a plain dict (e.g. a JSON request body); `structured_outputs` may be a nested dict."""
        if not isinstance(data, Mapping):
            raise SamplingParamsError(f"sampling params must be a mapping, got {type(data).__name__}", field=None)
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (output_kind as its name), the inverse of `from_dict`."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["output_kind"] = self.output_kind.name.lower()
        if self.structured_outputs is not None:
            out["structured_outputs"] = dataclasses.asdict(self.structured_outputs)
        return out

    def clone(self) -> "SamplingParams":
        """A deep copy (lists and the structured-outputs spec are not shared)."""
        return copy.deepcopy(self)

    def replace(self, **changes: Any) -> "SamplingParams":
        """A validated copy with some fields changed; unknown names raise `SamplingParamsError`."""
        _reject_unknown(type(self), changes)
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        values.update(changes)
        return type(self)(**values)
