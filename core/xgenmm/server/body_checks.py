"""One walk over a decoded request body, at the boundary: what JSON allows but no field of a chat request can use.

Python's `json` accepts things that later code cannot handle, so they are refused here, once, with the field named:
`NaN` / `Infinity` (and numbers that overflow to infinity), integers too long to convert (Python refuses more than
4300 digits; we allow far fewer), lone UTF-16 surrogates (`"\\ud800"`: not Unicode, they cannot be encoded, so
the tokenizer and every error message would fail on them) in any string or object key, and nesting deeper than
`MAX_JSON_DEPTH`. The walk is iterative (no recursion on what a client sent) and costs one pass over the body.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import OpenAIError

__all__ = ["MAX_JSON_DEPTH", "MAX_INTEGER_DIGITS", "decode_body", "field_path", "safe_text"]

MAX_JSON_DEPTH = 32  # a chat request nests ~6 deep (messages / content / image_url / ...); schemas a little more
MAX_INTEGER_DIGITS = 100  # no field takes more (seed < 2**64 has 20 digits); Python itself stops at 4300


class _BadNumber:
    """Stands in for a number the body may not carry until `_walk` finds it and names its field."""

    __slots__ = ("what",)

    def __init__(self, what: str):
        self.what = what


def _parse_int(text: str) -> int | _BadNumber:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        return _BadNumber(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INTEGER_DIGITS} are accepted)")
    return int(text)


def _parse_float(text: str) -> float | _BadNumber:
    value = float(text)
    if not math.isfinite(value):
        return _BadNumber(f"the number {text[:40]}{'...' if len(text) > 40 else ''}, which overflows a float")
    return value


def _parse_constant(name: str) -> _BadNumber:
    return _BadNumber(f"{name}, which is not a JSON number")


def safe_text(text: str, limit: int | None = None) -> str:
    """`text` made always encodable (lone surrogates become `\\udXXX` escapes), optionally cut to `limit` chars."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def field_path(parts: tuple) -> str:
    """("messages", 0, "content") -> "messages[0].content" (keys shown safely)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = safe_text(str(part), 64)
            out += f".{name}" if out else name
    return out


def _bad(message: str, param: str | None) -> OpenAIError:
    return OpenAIError(message, 400, param=param, code="invalid_json")


def decode_body(raw: bytes) -> dict:
    """The body as a JSON object of proper values (see the module docstring), else a 400 naming where."""
    try:
        body = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise _bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None) from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise _bad(f"the request body is not valid JSON: {safe_text(str(exc), 200)}", None) from None
    if isinstance(body, _BadNumber):
        raise _bad(f"the request body is {body.what}", None)
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None)
    _walk(body)
    return body


def _walk(body: dict) -> None:
    """Depth, numbers and proper Unicode everywhere (keys included); the path of the first fault is the `param`.
    Paths are built only for containers and faults, so a list of 50k strings costs one cheap check per string."""
    stack: list[tuple[Any, int, tuple]] = [(body, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", field_path(path) or None)
        if isinstance(item, dict):
            for key in item:
                if not (key.isascii() or _is_unicode(key)):
                    where = field_path(path + (key,))
                    raise _bad(f"the field name {where!r} is not valid Unicode (a lone surrogate)", where)
            named = item.items()
        else:
            named = enumerate(item)
        for name, value in named:
            kind = type(value)
            if kind is str:
                if not (value.isascii() or _is_unicode(value)):
                    _bad_string(path + (name,))
            elif kind is dict or kind is list:
                stack.append((value, depth + 1, path + (name,)))
            elif kind is _BadNumber:
                where = field_path(path + (name,))
                raise _bad(f"{where} is {value.what}", where)


def _bad_string(path: tuple) -> None:
    where = field_path(path)
    raise _bad(f"{where} is not valid Unicode: it contains a lone UTF-16 surrogate (\\ud800-\\udfff); send "
               "UTF-8 text or paired surrogate escapes", where)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
