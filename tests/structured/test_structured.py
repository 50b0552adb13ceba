"""Structured outputs: decoding with RANDOM logits (a weak model) under a grammar always yields valid output.

The outputs are checked independently of llguidance: `json.loads` plus a small JSON-schema checker, `re.fullmatch`
for regexes and grammars, membership for choices.
"""

import json
import re

import pytest
import torch

from xgenmm.engine.sampler import Sampler, SamplingState
from xgenmm.errors import SamplingParamsError
from xgenmm.sampling_params import SamplingParams, StructuredOutputsParams
from xgenmm.special_tokens import END_TOKEN_ID, IMAGE_TOKEN_ID, ENDOFCHUNK_TOKEN_ID, IMAGE_PLACEHOLDER_TOKEN_ID
from xgenmm.structured import (
    GrammarCompiler,
    allocate_token_bitmask,
    apply_token_bitmask,
    bitmask_to_allowed,
    fill_bitmasks,
)
from xgenmm.testing import save_random_tokenizer
from xgenmm.tokenizer import load_tokenizer

V = 32015
VLM_IDS = (IMAGE_TOKEN_ID, IMAGE_PLACEHOLDER_TOKEN_ID, ENDOFCHUNK_TOKEN_ID)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_random_tokenizer(path)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer)


@pytest.fixture(scope="module")
def closing_bias(tokenizer):
    """A weak model's habit: it likes tokens that close JSON values (so that unbounded strings end)."""
    bias = torch.zeros(V)
    for text in ['"', "}", "]", "0", "1", "7", '"}', '",']:
        for tid in tokenizer.encode(text, add_special_tokens=False)[-1:]:
            bias[tid] = 9.0
    bias[tokenizer.convert_tokens_to_ids('"')] = 9.0
    return bias


def generate(tokenizer, compiler, structured: StructuredOutputsParams, seed: int, bias=None, max_steps: int = 300):
    """Decode with random logits under the grammar until EOS; return (text, token ids)."""
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=max_steps, structured_outputs=structured)
    state = SamplingState.create(params, [1, 2, 3], [], grammar=compiler.compile(structured))
    sampler = Sampler()
    noise = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(max_steps):
        logits = torch.randn(1, V, generator=noise) * 2.0
        if bias is not None:
            logits += bias
        out = sampler(logits, [state])
        assert out.grammar_errors == [None]
        token = out.token_ids[0]
        assert token not in VLM_IDS
        if token == END_TOKEN_ID:
            assert state.grammar.is_terminated()
            ids = list(state.output_token_ids)
            return tokenizer.decode(ids, skip_special_tokens=True), ids
        state.output_token_ids.append(token)
    raise AssertionError(f"no EOS after {max_steps} steps: {tokenizer.decode(state.output_token_ids)!r}")


# -- a tiny JSON-schema checker (the subset used below) -------------------------------------------------------


def check_schema(value, schema, path="$"):
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in enum"
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: not an object"
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing {key}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for key, sub in props.items():
            if key in value:
                check_schema(value[key], sub, f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), f"{path}: not an array"
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9), f"{path}: bad length"
        for i, item in enumerate(value):
            check_schema(item, schema.get("items", {}), f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), f"{path}: not a string"
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9), f"{path}: bad length"
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{path}: {value!r} !~ {schema['pattern']}"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: not an integer"
        assert schema.get("minimum", -(10**18)) <= value <= schema.get("maximum", 10**18), f"{path}: out of range"
    elif kind == "boolean":
        assert isinstance(value, bool)


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "verified": {"type": "boolean"},
            },
            "required": ["city", "zip", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}


def test_checker_rejects_invalid_documents():
    good = {"name": "a", "age": 3, "color": "red", "tags": [], "address": {"city": "x", "zip": "12345", "verified": True}}
    check_schema(good, PERSON_SCHEMA)
    for bad in (
        {**good, "age": 151},
        {**good, "color": "pink"},
        {**good, "extra": 1},
        {**good, "address": {**good["address"], "zip": "1234"}},
        {k: v for k, v in good.items() if k != "name"},
    ):
        with pytest.raises(AssertionError):
            check_schema(bad, PERSON_SCHEMA)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("flexible", [True, False])
def test_json_schema_random_model_output_validates(tokenizer, compiler, seed, flexible):
    structured = StructuredOutputsParams(json=PERSON_SCHEMA, whitespace_flexible=flexible)
    text, _ = generate(tokenizer, compiler, structured, seed)
    value = json.loads(text)
    check_schema(value, PERSON_SCHEMA)
    if not flexible:
        assert text == json.dumps(value, ensure_ascii=False, separators=(",", ":")) or "\\" in text


def test_json_schema_given_as_text(tokenizer, compiler):
    schema = {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4}
    text, _ = generate(tokenizer, compiler, StructuredOutputsParams(json=json.dumps(schema)), seed=3)
    check_schema(json.loads(text), schema)


@pytest.mark.parametrize("seed", [0, 1])
def test_json_object_random_model(tokenizer, compiler, closing_bias, seed):
    text, _ = generate(tokenizer, compiler, StructuredOutputsParams(json_object=True), seed, bias=closing_bias)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("seed", range(3))
def test_regex(tokenizer, compiler, seed):
    pattern = r"[0-9]{3}-[a-z]{2,5}( ok)?"
    text, _ = generate(tokenizer, compiler, StructuredOutputsParams(regex=pattern), seed)
    assert re.fullmatch(pattern, text), text


def test_choice_covers_and_respects_options(tokenizer, compiler):
    choices = ["yes", "no", "maybe so", "café ☕"]
    seen = set()
    for seed in range(8):
        text, _ = generate(tokenizer, compiler, StructuredOutputsParams(choice=choices), seed)
        assert text in choices
        seen.add(text)
    assert len(seen) >= 2


def test_lark_grammar(tokenizer, compiler):
    grammar = 'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,6}/'
    for seed in range(3):
        text, _ = generate(tokenizer, compiler, StructuredOutputsParams(grammar=grammar), seed)
        assert re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,6}!", text), text


@pytest.mark.parametrize(
    "structured, needle",
    [
        (StructuredOutputsParams(json={"type": "objectx"}), "structured_outputs.json"),
        (StructuredOutputsParams(json={"type": "string", "minLength": 5, "maxLength": 2}), "structured_outputs.json"),
        (StructuredOutputsParams(regex="a(b"), "structured_outputs.regex"),
        (StructuredOutputsParams(grammar="start: undefined_rule"), "structured_outputs.grammar"),
    ],
)
def test_invalid_specs_raise_at_compile_time_and_fail_alone(compiler, structured, needle):
    with pytest.raises(SamplingParamsError, match=re.escape(needle)):
        compiler.compile(structured)
    assert compiler.compile(StructuredOutputsParams(regex="[ab]")).is_accepting() is False  # compiler still works


def test_eos_is_the_chat_end_token_and_only_token_at_the_end(tokenizer, compiler):
    assert tokenizer.eos_token_id != END_TOKEN_ID  # the HF tokenizer's EOS is <|endoftext|>
    assert compiler.ll_tokenizer.eos_token == END_TOKEN_ID
    matcher = compiler.compile(StructuredOutputsParams(choice=["no"]))
    assert matcher.accept_tokens(compiler.ll_tokenizer.tokenize_str("no"))
    assert matcher.is_stopped() and matcher.is_accepting() and not matcher.is_terminated()
    bitmask = allocate_token_bitmask(1, V)
    matcher.fill_bitmask(bitmask, 0)
    assert bitmask_to_allowed(bitmask, V)[0].nonzero().flatten().tolist() == [END_TOKEN_ID]
    assert matcher.accept_token(END_TOKEN_ID) and matcher.is_terminated()


def test_vlm_tokens_never_allowed_even_if_the_grammar_names_them(compiler):
    matcher = compiler.compile(StructuredOutputsParams(grammar='start: <[32012]> | <[32014]> | "a"'))
    bitmask = allocate_token_bitmask(1, V)
    matcher.fill_bitmask(bitmask, 0)
    allowed = bitmask_to_allowed(bitmask, V)[0]
    assert allowed.any() and not any(bool(allowed[t]) for t in VLM_IDS)
    assert matcher.accept_token(IMAGE_TOKEN_ID) is False and matcher.error
    matcher.fill_bitmask(bitmask, 0)  # a failed matcher only lets the sequence end
    assert bitmask_to_allowed(bitmask, V)[0].nonzero().flatten().tolist() == [END_TOKEN_ID]
    json_matcher = compiler.compile(StructuredOutputsParams(json_object=True))
    json_matcher.fill_bitmask(bitmask, 0)
    assert not bitmask_to_allowed(bitmask, V)[0][list(VLM_IDS)].any()


def test_disallowed_token_puts_matcher_in_error_state(tokenizer, compiler):
    matcher = compiler.compile(StructuredOutputsParams(regex="[0-9]+"))
    assert matcher.accept_token(tokenizer.convert_tokens_to_ids("a")) is False
    assert matcher.is_terminated() and matcher.error


def test_rollback_restores_the_mask(tokenizer, compiler):
    matcher = compiler.compile(StructuredOutputsParams(json=PERSON_SCHEMA, whitespace_flexible=False))
    first = allocate_token_bitmask(1, V)
    matcher.fill_bitmask(first, 0)
    token = int(bitmask_to_allowed(first, V)[0].nonzero()[0])
    assert matcher.accept_token(token) and matcher.num_accepted_tokens == 1
    after = allocate_token_bitmask(1, V)
    matcher.fill_bitmask(after, 0)
    assert not torch.equal(first, after)
    matcher.rollback(1)
    again = allocate_token_bitmask(1, V)
    matcher.fill_bitmask(again, 0)
    assert torch.equal(first, again)
    with pytest.raises(ValueError):
        matcher.rollback(1)


def test_batched_fill_equals_single_fill(compiler):
    specs = [
        StructuredOutputsParams(json=PERSON_SCHEMA),
        StructuredOutputsParams(regex="[a-z]+"),
        StructuredOutputsParams(choice=["x", "yy"]),
    ]
    matchers = [compiler.compile(s) for s in specs]
    done = compiler.compile(StructuredOutputsParams(choice=["x"]))
    done.accept_token(compiler.ll_tokenizer.tokenize_str("x")[0])
    done.accept_token(END_TOKEN_ID)
    matchers.append(done)
    batched = allocate_token_bitmask(len(matchers), V)
    fill_bitmasks([(m, i) for i, m in enumerate(matchers)], batched)
    for i, m in enumerate(matchers):
        single = allocate_token_bitmask(1, V)
        m.fill_bitmask(single, 0)
        assert torch.equal(batched[i], single[0])


def test_apply_bitmask_to_selected_rows():
    logits = torch.zeros(3, 70)
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # tokens 0 and 2
    bitmask[0, 2] = 1 << 1  # token 65
    apply_token_bitmask(logits, bitmask, [1])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [0, 2, 65]
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()


def test_min_tokens_yields_to_a_finished_grammar(tokenizer, compiler):
    structured = StructuredOutputsParams(choice=["no"])
    params = SamplingParams(temperature=0.0, min_tokens=5, structured_outputs=structured)
    state = SamplingState.create(params, [], [], grammar=compiler.compile(structured))
    sampler = Sampler()
    logits = torch.zeros(1, V)
    while not state.grammar.is_stopped():
        state.output_token_ids.append(sampler(logits, [state]).token_ids[0])
    assert tokenizer.decode(state.output_token_ids) == "no" and len(state.output_token_ids) < 5
    assert sampler(logits, [state]).token_ids == [END_TOKEN_ID]  # only EOS is allowed: the grammar wins


def test_ll_tokenizer_is_built_once_per_tokenizer(tokenizer, compiler):
    other = GrammarCompiler(tokenizer)
    assert other.ll_tokenizer is compiler.ll_tokenizer
    a = compiler.compile(StructuredOutputsParams(regex="[ab]{2}"))
    b = compiler.compile(StructuredOutputsParams(regex="[ab]{2}"))
    assert a.ll_matcher is not b.ll_matcher  # independent states from the cached prototype
    assert a.accept_token(compiler.ll_tokenizer.tokenize_str("a")[0])
    assert b.num_accepted_tokens == 0
