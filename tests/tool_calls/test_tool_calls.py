"""xgenmm.tool_calls (prompt format, parser, streaming parser, forcing grammar) and xgenmm.structured.schema_budget."""

from __future__ import annotations

import json

import pytest

from xgenmm import StructuredOutputsParams
from xgenmm.errors import PromptError
from xgenmm.structured.schema_budget import bound_json_schema
from xgenmm.tool_calls import (
    HermesToolRenderer,
    ToolCallStreamParser,
    coerce_arguments,
    normalize_tools,
    parse_tool_calls,
    render_tool_call,
    resolve_tool_choice,
    tool_call_structured_outputs,
)

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
GREET = {"name": "greet", "parameters": {"type": "object", "properties": {"who": {"$ref": "#/$defs/Name"}},
                                         "required": ["who"], "$defs": {"Name": {"type": "string"}}}}
TOOLS = [ADD, GREET]


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from xgenmm.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def compiler(tok):
    from xgenmm.structured import GrammarCompiler

    return GrammarCompiler(tok)


def accepts(compiler, params: StructuredOutputsParams, text: str) -> bool:
    matcher = compiler.compile(params)
    return matcher.accept_tokens(compiler.ll_tokenizer.tokenize_str(text)) and matcher.is_accepting()


# ---- schemas and tool_choice -------------------------------------------------------------------------------------


def test_normalize_tools_accepts_bare_functions_and_rejects_bad_ones():
    tools = normalize_tools(TOOLS)
    assert [t["function"]["name"] for t in tools] == ["add", "greet"]
    assert normalize_tools([{"name": "noargs"}])[0]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert normalize_tools([ADD, ADD["function"]]) == normalize_tools([ADD])  # the same tool twice
    assert normalize_tools([ADD, {"name": "add"}]) == normalize_tools([ADD])  # first definition wins
    with pytest.raises(PromptError, match="tool 0: only function tools"):
        normalize_tools([{"type": "retrieval"}])


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, ("auto", None)),
        ("auto", ("auto", None)),
        ("none", ("none", None)),
        ("any", ("required", None)),
        ("required", ("required", None)),
        ("add", ("required", "add")),
        ({"type": "function", "function": {"name": "greet"}}, ("required", "greet")),
        ({"type": "tool", "name": "add"}, ("required", "add")),
    ],
)
def test_resolve_tool_choice(choice, expected):
    assert resolve_tool_choice(choice, TOOLS) == expected


def test_resolve_tool_choice_unknown_name():
    with pytest.raises(PromptError, match="not among the tools"):
        resolve_tool_choice("multiply", TOOLS)


# ---- rendering ------------------------------------------------------------------------------------------------------


def test_tools_history_renders_in_the_documented_format(tok):
    from xgenmm.chat.template import ChatRenderer

    renderer = ChatRenderer(tok, system_message=None, tool_renderer=HermesToolRenderer())
    messages = [
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "3"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "c2", "function": {"name": "greet", "arguments": {"who": "Ann"}}}]},
    ]
    text = renderer.render(messages, tools=TOOLS, add_generation_prompt=True).text
    assert text.startswith("<|system|>\n\n\n# Tools\n")
    assert '{"type": "function", "function": {"name": "add", "description": "Add two integers."' in text
    assert (
        '<|assistant|>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|end|>\n'
        '<|user|>\n<tool_response name="add">\n3\n</tool_response><|end|>\n'
        '<|assistant|>\nChecking.\n<tool_call>\n{"name": "greet", "arguments": {"who": "Ann"}}\n</tool_call><|end|>\n'
        "<|assistant|>\n"
    ) in text


def test_tool_result_may_carry_images(tok):
    from PIL import Image

    from xgenmm.chat.template import ChatRenderer

    renderer = ChatRenderer(tok, tool_renderer=HermesToolRenderer())
    image = Image.new("RGB", (8, 8), "red")
    messages = [
        {"role": "user", "content": "shoot"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "here"}, {"type": "image", "image": image}]},
    ]
    rendered = renderer.render(messages, tools=TOOLS)
    assert "<tool_response>\nhere\n<image>\n</tool_response>" in rendered.text
    assert rendered.images == [image]


def test_client_renderer_has_the_tool_renderer(tiny_checkpoint):
    """LLM.chat(..., tools=...) works for every front end: the client's renderer carries HermesToolRenderer."""
    from xgenmm.chat.template import engine_chat_renderer
    from xgenmm.client import open_engine
    from xgenmm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    renderer = engine_chat_renderer(tokenizer)
    assert isinstance(renderer.tool_renderer, HermesToolRenderer)
    assert "<tools>" in renderer.render([{"role": "user", "content": "x"}], tools=TOOLS).text
    # The engine handle (the client side of the shared engine) renders with exactly that kind of renderer.
    handle = open_engine("native", str(tiny_checkpoint), "cpu", "float32")
    from_handle = handle.chat_renderer
    assert isinstance(from_handle.tool_renderer, HermesToolRenderer) and from_handle.content_tokens == "text"
    assert "<tools>" in from_handle.render([{"role": "user", "content": "x"}], tools=TOOLS).text


# ---- parsing --------------------------------------------------------------------------------------------------------


def test_parse_tagged_calls_with_text_and_coercion():
    text = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": "3", "b": 4.0}}\n</tool_call>\n' \
           '<tool_call>{"name": "greet", "arguments": "{\\"who\\": \\"Bo\\"}"}</tool_call>'
    reply = parse_tool_calls(text, TOOLS)
    assert reply.content == "Sure."
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("add", {"a": 3, "b": 4}), ("greet", {"who": "Bo"})]
    assert all(c.id.startswith("call_") for c in reply.tool_calls)
    assert len({c.id for c in reply.tool_calls}) == 2
    assert reply.invalid == []


def test_parse_malformed_unknown_and_unterminated_calls_are_invalid():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>'
            '<tool_call>{"name": "mul", "arguments": {}}</tool_call>'
            '<tool_call>{"arguments": {}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1')
    reply = parse_tool_calls(text, TOOLS)
    assert reply.tool_calls == []
    errors = [(i.name, i.error.split(":")[0]) for i in reply.invalid]
    assert errors == [("add", "invalid JSON"), ("mul", "unknown tool 'mul'; known tools"),
                      (None, "the tool call has no string 'name'"), ("add", "unterminated <tool_call> block (invalid JSON")]
    assert reply.invalid[0].arguments == '{"name": "add", "arguments": {"a": 1,'


def test_parse_bare_json_call_only_for_known_tools():
    assert parse_tool_calls('{"name": "add", "arguments": {"a": 1, "b": 2}}', TOOLS).tool_calls[0].arguments == {"a": 1, "b": 2}
    assert parse_tool_calls('```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```', TOOLS).tool_calls
    plain = parse_tool_calls('{"name": "Bob", "age": 3}', TOOLS)
    assert plain.tool_calls == [] and plain.content == '{"name": "Bob", "age": 3}'
    assert parse_tool_calls('{"name": "add", "arguments": {}}').tool_calls == []  # no tools: no bare-call guessing


def test_parse_plain_text():
    reply = parse_tool_calls("  hello <b>world</b> ", TOOLS)
    assert reply.content == "hello <b>world</b>" and not reply.tool_calls and not reply.invalid


def test_coerce_arguments_follows_schema():
    schema = {"properties": {"n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"},
                             "s": {"type": "string"}, "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                             "items": {"type": "array", "items": {"type": "integer"}}}}
    out = coerce_arguments({"n": "7", "x": "2.5", "ok": "true", "s": 5, "maybe": "3", "items": ["1", 2], "extra": "1"}, schema)
    assert out == {"n": 7, "x": 2.5, "ok": True, "s": 5, "maybe": 3, "items": [1, 2], "extra": "1"}
    assert coerce_arguments({"n": "seven"}, schema) == {"n": "seven"}


# ---- streaming parser -----------------------------------------------------------------------------------------------


def _run_stream(deltas, tools=TOOLS):
    parser = ToolCallStreamParser(tools)
    events = []
    for d in deltas:
        events.extend(parser.feed(d))
    events.extend(parser.finish())
    return events


def test_stream_parser_splits_text_and_calls_at_any_boundary():
    full = 'Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> done <'
    for step in (1, 2, 5, len(full)):
        deltas = [full[i:i + step] for i in range(0, len(full), step)]
        events = _run_stream(deltas)
        text = "".join(e.text for e in events if e.text)
        calls = [e.tool_call for e in events if e.tool_call]
        assert text == "Let me add.  done <", step
        assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
        # the call is reported before the trailing text
        kinds = ["call" if e.tool_call else "text" for e in events]
        assert kinds.index("call") < len(kinds) - 1


def test_stream_parser_text_streams_early():
    parser = ToolCallStreamParser(TOOLS)
    assert [e.text for e in parser.feed("Hello wor")] == ["Hello wor"]
    assert [e.text for e in parser.feed("ld <tool")] == ["ld "]


def test_stream_parser_holds_partial_tag():
    parser = ToolCallStreamParser(TOOLS)
    out = parser.feed("Hi <tool_c")
    assert [e.text for e in out] == ["Hi "]
    out = parser.feed("all>{\"name\": \"add\", \"arguments\": {}}</tool_call>")
    assert out[0].tool_call.name == "add"


def test_stream_parser_bare_json_and_invalid():
    events = _run_stream(['{"name": "add", ', '"arguments": {"a": 1, "b": 2}}'])
    assert len(events) == 1 and events[0].tool_call.arguments == {"a": 1, "b": 2}
    events = _run_stream(['<tool_call>{"name": "add", "arguments": {"a": '])
    assert events[0].invalid is not None and "unterminated" in events[0].invalid.error
    events = _run_stream(['{"a": 1}'])
    assert [e.text for e in events] == ['{"a": 1}']


# ---- forcing grammar ------------------------------------------------------------------------------------------------


def test_required_grammar_accepts_exactly_valid_calls(compiler):
    params = tool_call_structured_outputs(TOOLS, "any")
    assert accepts(compiler, params, render_tool_call("add", {"a": 1, "b": 2}))
    assert accepts(compiler, params, render_tool_call("greet", {"who": "x"}))
    assert not accepts(compiler, params, render_tool_call("add", {"a": "1", "b": 2}))  # wrong type
    assert not accepts(compiler, params, render_tool_call("add", {"a": 1}))  # missing required
    assert not accepts(compiler, params, render_tool_call("add", {"a": 1, "b": 2, "c": 3}))  # strict: no extra keys
    assert not accepts(compiler, params, "Hello")
    two = render_tool_call("add", {"a": 1, "b": 2}) + "\n" + render_tool_call("greet", {"who": "x"})
    assert not accepts(compiler, params, two)
    assert accepts(compiler, tool_call_structured_outputs(TOOLS, "any", parallel_tool_calls=True), two)


def test_named_choice_forces_that_tool(compiler):
    params = tool_call_structured_outputs(TOOLS, "greet")
    assert accepts(compiler, params, render_tool_call("greet", {"who": "x"}))
    assert not accepts(compiler, params, render_tool_call("add", {"a": 1, "b": 2}))


def test_auto_grammar_allows_text_or_valid_calls(compiler):
    params = tool_call_structured_outputs(TOOLS, "auto")
    assert accepts(compiler, params, " Hello <b>there</b>")
    assert accepts(compiler, params, "\n" + render_tool_call("add", {"a": 1, "b": 2}))
    assert not accepts(compiler, params, "<tool_call>\nnot json")
    assert tool_call_structured_outputs(TOOLS, "none") is None
    assert tool_call_structured_outputs(TOOLS, "auto", constrain_auto=False) is None


def test_budgeted_grammar_bounds_arguments(compiler):
    params = tool_call_structured_outputs([GREET], "required", max_tokens=100)
    grammar_json = json.loads(params.grammar.split("call_json: %json ", 1)[1])
    max_len = grammar_json["properties"]["arguments"]["$defs"]["Name"]["maxLength"] if "$defs" in grammar_json["properties"]["arguments"] \
        else grammar_json["$defs"]["Name"]["maxLength"]
    longest = render_tool_call("greet", {"who": "x" * max_len})
    assert accepts(compiler, params, longest)
    assert not accepts(compiler, params, render_tool_call("greet", {"who": "x" * (max_len + 1)}))
    assert max_len > 0 and len(longest.encode()) + 1 <= 100


# ---- schema budget --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [100, 512, 2048])
def test_bound_schema_longest_value_fits(compiler, max_tokens):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1}, "n": {"type": "integer"},
                                               "x": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}},
                                               "e": {"enum": ["red", "green"]}, "b": {"type": "boolean"}},
              "required": ["s"]}
    bounded = bound_json_schema(schema, max_tokens)
    props = bounded.schema["properties"]
    emoji = "\U0001F600"  # 4 UTF-8 bytes: the worst case of the cost model
    worst = {
        "s": emoji * props["s"]["maxLength"],
        "n": -props["n"]["maximum"],
        "x": -props["x"]["maximum"],
        "tags": [emoji * props["tags"]["items"]["maxLength"]] * props["tags"]["maxItems"],
        "e": "green",
        "b": False,
    }
    text = json.dumps(worst, ensure_ascii=False)
    assert len(text.encode()) + 1 <= max_tokens  # every token is at least one byte, plus the end token
    assert accepts(compiler, StructuredOutputsParams(json=bounded.schema), text)
    assert bounded.unbounded == []
    # only limits were added: every original key is still there
    assert set(props) == set(schema["properties"]) and props["s"]["minLength"] == 1


def test_bound_schema_keeps_tighter_existing_limits_and_reports_unbounded():
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 2}, "n": {"type": "integer", "minimum": 0, "maximum": 5},
                                               "p": {"type": "string", "pattern": "^a+$"}, "free": {"type": "object"}}}
    bounded = bound_json_schema(schema, 1000)
    props = bounded.schema["properties"]
    assert props["s"]["maxLength"] == 2 and (props["n"]["minimum"], props["n"]["maximum"]) == (0, 5)
    assert bounded.unbounded == ["#/properties/free", "#/properties/p"]
