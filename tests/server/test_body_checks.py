"""The one walk over a request body: what JSON allows but no field can use is a 400 naming where it is."""

from __future__ import annotations

import pytest

from xgenmm.server.body_checks import MAX_JSON_DEPTH, decode_body
from xgenmm.server.errors import OpenAIError


@pytest.mark.parametrize("raw, param, words", [
    (b'{"max_tokens": ' + b"9" * 5000 + b"}", "max_tokens", "5000 digits"),
    (b'{"seed": -' + b"1" * 101 + b"}", "seed", "101 digits"),
    (b'{"temperature": NaN}', "temperature", "NaN"),
    (b'{"top_p": -Infinity}', "top_p", "-Infinity"),
    (b'{"x": [1, 2, 1e999]}', "x[2]", "overflows"),
    (b'{"messages": [{"content": "a\\ud800b"}]}', "messages[0].content", "lone UTF-16 surrogate"),
    (b'{"tools": [{"\\udfff": 1}]}', "tools[0].\\udfff", "not valid Unicode"),
    (b'{"a": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}", None, "nests deeper"),
])
def test_refused_values_name_their_field(raw, param, words):
    with pytest.raises(OpenAIError) as info:
        decode_body(raw)
    err = info.value
    assert err.status == 400 and words in err.message
    if param is not None:
        assert err.param == param
    err.to_dict()["error"]["message"].encode("utf-8")  # always encodable


def test_proper_values_pass_unchanged():
    body = decode_body('{"a": [1, 2.5, "é😀", {"b": null}], "seed": 18446744073709551615}'.encode())
    assert body == {"a": [1, 2.5, "é😀", {"b": None}], "seed": 2**64 - 1}
