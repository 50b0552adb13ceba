"""SamplingParams / StructuredOutputsParams: vLLM names and defaults, validation, unknown options, copies."""

import pytest

from xgenmm.errors import SamplingParamsError
from xgenmm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False and p.max_tokens == 16 and p.min_tokens == 0 and p.logprobs is None
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert p.output_kind is RequestOutputKind.CUMULATIVE and p.structured_outputs is None
    assert not p.is_greedy and not p.has_penalties


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_k", True),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", 2.0),
        ("seed", 1.5),
        ("seed", 2**64),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", "7"),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", 1),
        ("output_kind", "sometimes"),
        ("structured_outputs", "json"),
    ],
)
def test_invalid_values_name_field_and_value(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value)
    assert repr(value)[:20] in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field  # carried, so front ends never parse the message


def test_boundaries_accepted():
    p = SamplingParams(
        temperature=0, top_p=1, top_k=-1, min_p=1, presence_penalty=-2, frequency_penalty=2, logprobs=20,
        max_tokens=1, min_tokens=1, seed=-5, repetition_penalty=0.5, n=3,
    )
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.is_greedy  # n > 1 with temperature 0 is allowed (pointless but valid)
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(SamplingParamsError, match="min_tokens=20"):
        SamplingParams(max_tokens=10, min_tokens=20)


def test_unknown_option_raises_sampling_params_error():
    with pytest.raises(SamplingParamsError, match="'bogus'"):
        SamplingParams(bogus=1)
    with pytest.raises(SamplingParamsError, match="'best_of_n'"):
        SamplingParams.from_dict({"temperature": 0.5, "best_of_n": 2})
    with pytest.raises(SamplingParamsError, match="'bogus'"):
        SamplingParams.create(bogus=1)
    with pytest.raises(SamplingParamsError, match="keyword"):
        SamplingParams(0.5)
    with pytest.raises(SamplingParamsError, match="'jsn'"):
        StructuredOutputsParams(jsn={})


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(7, 9), output_kind="delta")
    assert p.stop == ["###"] and p.stop_token_ids == [7, 9]
    assert p.output_kind is RequestOutputKind.DELTA
    assert SamplingParams(output_kind="FINAL_ONLY").output_kind is RequestOutputKind.FINAL_ONLY


def test_is_greedy():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy  # below vLLM's epsilon
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy
    assert not SamplingParams(temperature=0.05).is_greedy


def test_from_dict_with_structured_outputs_and_round_trip():
    data = {"temperature": 0.3, "stop": ["x"], "output_kind": "delta", "structured_outputs": {"regex": "[a-z]+"}}
    p = SamplingParams.from_dict(data)
    assert isinstance(p.structured_outputs, StructuredOutputsParams)
    assert p.structured_outputs.kind == "regex"
    again = SamplingParams.from_dict(p.to_dict())
    assert again == p


def test_clone_and_replace_are_independent_and_validated():
    p = SamplingParams(stop=["a"], stop_token_ids=[1], structured_outputs=StructuredOutputsParams(choice=["x", "y"]))
    c = p.clone()
    assert c == p and c is not p
    c.stop.append("b")
    c.structured_outputs.choice.append("z")
    assert p.stop == ["a"] and p.structured_outputs.choice == ["x", "y"]
    r = p.replace(temperature=0.0, max_tokens=5)
    assert r.temperature == 0.0 and r.max_tokens == 5 and p.temperature == 1.0
    with pytest.raises(SamplingParamsError, match="top_p"):
        p.replace(top_p=2.0)
    with pytest.raises(SamplingParamsError, match="'nope'"):
        p.replace(nope=1)


def test_structured_outputs_exactly_one():
    with pytest.raises(SamplingParamsError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(SamplingParamsError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(SamplingParamsError, match="exactly one"):
        StructuredOutputsParams(json_object=True, grammar="start: 'a'")
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    assert StructuredOutputsParams(json='{"type": "string"}').kind == "json"
    assert StructuredOutputsParams(grammar='start: "a"').kind == "grammar"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"json": "{not json"}, "structured_outputs.json"),
        ({"json": 5}, "structured_outputs.json"),
        ({"json": "[1, 2]"}, "structured_outputs.json"),
        ({"regex": ""}, "structured_outputs.regex"),
        ({"choice": []}, "structured_outputs.choice"),
        ({"choice": "abc"}, "structured_outputs.choice"),
        ({"choice": ["a", 1]}, "structured_outputs.choice"),
        ({"grammar": "   "}, "structured_outputs.grammar"),
        ({"json_object": "yes"}, "structured_outputs.json_object"),
    ],
)
def test_structured_outputs_validation(kwargs, needle):
    with pytest.raises(SamplingParamsError, match=needle.replace(".", r"\.")):
        StructuredOutputsParams(**kwargs)
