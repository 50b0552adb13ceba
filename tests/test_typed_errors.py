"""Plain ValueError / TypeError no longer leak from public paths: bad options are typed errors (`ConfigError`,
`SamplingParamsError`) that name the option, and `SamplingParamsError.field` is what front ends read (the server
maps it to the OpenAI field) instead of parsing the message."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xgenmm import ConfigError, ImageInputPolicy, SamplingParams, SamplingParamsError, StructuredOutputsParams
from xgenmm.attention import get_attention_backend
from xgenmm.engine.config import EngineConfig

EXAMPLES = int(os.environ.get("XGENMM_HYPOTHESIS_EXAMPLES", "60"))
SAMPLING_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
STRUCTURED_FIELDS = [f.name for f in dataclasses.fields(StructuredOutputsParams)]
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8),
                 st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.dictionaries(st.sampled_from(SAMPLING_FIELDS + ["bogus", "best_of"]), JUNK, min_size=1, max_size=3))
def test_any_sampling_error_names_a_real_field(options):
    """Whatever garbage a caller passes, the error is typed, and its field is one it passed (or a structured sub-field)."""
    try:
        SamplingParams(**options)
    except SamplingParamsError as exc:
        assert exc.field is not None
        head = exc.field.split(".")[0]
        assert head in options, (exc.field, options)
        assert exc.field.split(".")[0] in str(exc) or exc.field in str(exc)


@pytest.mark.parametrize(("options", "field"), [
    ({"regex": ""}, "structured_outputs.regex"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({}, "structured_outputs"),  # exactly one constraint must be set
    ({"regex": "a", "grammar": "start: 'a'"}, "structured_outputs"),
    ({"regx": "a"}, "structured_outputs.regx"),
])
def test_structured_output_errors_name_their_field(options, field):
    with pytest.raises(SamplingParamsError) as info:
        StructuredOutputsParams(**options)
    assert info.value.field == field


def test_unknown_and_positional_options():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(temprature=0.5)
    assert info.value.field == "temprature" and "valid options" in str(info.value)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(0.5)
    assert info.value.field is None


def test_the_server_maps_the_carried_field_not_the_message():
    from xgenmm.server.protocol import _sampling_param_name

    assert _sampling_param_name(SamplingParamsError("any wording at all", field="structured_outputs.json")) == \
        "response_format"
    assert _sampling_param_name(SamplingParamsError("option temperature=5 reads like a field", field=None)) is None
    assert _sampling_param_name(SamplingParamsError("x", field="logprobs")) == "top_logprobs"
    assert _sampling_param_name(SamplingParamsError("x", field="top_p")) == "top_p"


@pytest.mark.parametrize(("options", "name"), [
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"max_num_seqs": "8"}, "max_num_seqs"),
    ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"), ({"block_size": 0}, "block_size"),
    ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes"), ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": 0}, "gpu_memory_utilization"), ({"attention_backend": "cudnn"}, "attention_backend"),
    ({"linear_kernel": "mkl"}, "linear_kernel"), ({"enforce_eager": "yes"}, "enforce_eager"),
    ({"max_model_len": True}, "max_model_len"), ({"prefetch_images": 1}, "prefetch_images"),
    ({"vision_cache_bytes": -1}, "vision_cache_bytes"), ({"seed": 1.5}, "seed"),
])
def test_engine_options_are_checked_once_with_their_name(options, name):
    with pytest.raises(ConfigError, match=f"engine option {name}"):
        EngineConfig.from_options(**options)


def test_unknown_engine_option_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown engine option.*max_num_seq\\b"):
        EngineConfig.from_options(max_num_seq=4)
    ok = EngineConfig.from_options(max_num_seqs=4, attention_backend="torch", kv_cache_memory_bytes=None)
    assert ok.max_num_seqs == 4


def test_unknown_attention_backend_and_bad_image_policy_are_config_errors():
    with pytest.raises(ConfigError, match="unknown attention backend 'cudnn'"):
        get_attention_backend("cudnn", "cpu")
    with pytest.raises(ConfigError, match="max_image_pixels must be positive"):
        ImageInputPolicy(max_image_pixels=0)


def test_every_sampling_params_error_in_the_package_names_its_field():
    """`raise SamplingParamsError(...)` anywhere in xgenmm passes `field=` (None when the error is not about one
    field), so no front end ever has to guess it from the message."""
    import ast

    from tests.support import REPO

    calls = []
    for path in sorted((REPO / "core" / "xgenmm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "SamplingParamsError":
                calls.append((path.relative_to(REPO), node.lineno, any(k.arg == "field" for k in node.keywords)))
    assert len(calls) >= 20  # the walk found the package's raises
    assert [c for c in calls if not c[2]] == []
