"""Bounding a schema costs what its size costs: `$ref` DAGs are costed once per target, node counts and `$ref`
chains are capped (SchemaTooComplexError, naming the request field at the front ends), absurd array sizes saturate."""

from __future__ import annotations

import json
import time

import pytest

from tests.server.hostile_values import dag_schema, huge_items_schema, recursive_schema, ref_chain_schema
from xgenmm.chat.request import build_chat_request
from xgenmm.errors import SchemaTooComplexError
from xgenmm.structured.schema_budget import MAX_SCHEMA_NODES, bound_json_schema


def test_ref_dag_is_linear_not_exponential():
    start = time.perf_counter()
    bounded = bound_json_schema(dag_schema(40), 512)  # 2**40 nodes if expanded
    assert time.perf_counter() - start < 2.0
    leaf = bounded.schema["$defs"]["d40"]
    assert leaf["type"] == "string" and leaf["maxLength"] >= 0  # the shared target was bounded (once)


def test_recursive_schema_is_left_unbounded_where_it_recurses():
    bounded = bound_json_schema(recursive_schema(), 256)
    assert bounded.unbounded  # reported, not expanded forever


@pytest.mark.parametrize("schema", [ref_chain_schema(3000), {"type": "object", "properties": {
    f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_NODES + 1)}}], ids=["ref_chain", "wide"])
def test_schemas_over_the_caps_are_refused(schema):
    with pytest.raises(SchemaTooComplexError):
        bound_json_schema(schema, 512)


def test_huge_array_sizes_do_not_overflow():
    schema = json.loads(json.dumps(huge_items_schema()).replace('"__HUGE_INT__"', "9" * 400)
                        .replace('"__BIG_INT__"', "1" + "0" * 120))
    bounded = bound_json_schema(schema, 100)
    assert bounded.schema["properties"]["xs"]["maxItems"] <= 2**31 - 1


def test_front_ends_learn_which_field_was_too_complex():
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": ref_chain_schema(3000)}}
    with pytest.raises(SchemaTooComplexError) as info:
        build_chat_request([{"role": "user", "content": "hi"}], sampling={"max_tokens": 64}, response_format=fmt)
    assert info.value.field == "response_format"
    tools = [{"type": "function", "function": {"name": "t", "parameters": ref_chain_schema(3000)}}]
    with pytest.raises(SchemaTooComplexError) as info:
        build_chat_request([{"role": "user", "content": "hi"}], sampling={"max_tokens": 64}, tools=tools,
                           tool_choice="required")
    assert info.value.field == "tools"
