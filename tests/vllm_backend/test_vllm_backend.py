"""The vLLM backend against the native engine and the upstream golden fixtures (tiny random checkpoint, float32).

Runs only where vLLM is installed (`.venv-vllm`, via `.ci/vllm.sh`): the main suite has no vLLM by design, hence the
module-level importorskip (see conftest.py). One vLLM engine and one native engine serve the whole module.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest

pytest.importorskip("vllm")

from PIL import Image  # noqa: E402

from xgenmm import SamplingParams  # noqa: E402
from xgenmm.lazy_engine import EngineClients  # noqa: E402
from xgenmm.errors import ImageCountMismatchError, PromptError, SamplingParamsError  # noqa: E402
from xgenmm.multimodal.image_processing import ImageProcessor  # noqa: E402
from xgenmm.sampling_params import RequestOutputKind, StructuredOutputsParams  # noqa: E402
from xgenmm.special_tokens import END_TOKEN_ID, IMAGE_TOKEN_ID  # noqa: E402

GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(fixture_checkpoint_with_tokenizer):
    ckpt = str(fixture_checkpoint_with_tokenizer)
    vllm_engine = EngineClients.open("vllm", model=ckpt, dtype="float32")
    native_engine = EngineClients.open("native", model=ckpt, device="cpu", dtype="float32")
    yield vllm_engine, native_engine
    vllm_engine.handle.shutdown()


@pytest.fixture(scope="module")
def vllm_engine(engines) -> EngineClients:
    return engines[0]


@pytest.fixture(scope="module")
def native_engine(engines) -> EngineClients:
    return engines[1]


def _fixture_requests(fixture_dir, fixture_cases):
    requests, expected, names = [], [], []
    for case in fixture_cases["cases"]:
        for i, sample in enumerate(case["samples"]):
            images = [Image.open(fixture_dir / p) for p in sample["images"]]
            request = {"prompt_token_ids": sample["input_ids"]}
            if images:
                request["multi_modal_data"] = {"image": images}
            requests.append(request)
            expected.append(sample["generated_ids"])
            names.append(f"{case['name']}[{i}]")
    return requests, expected, names


def test_front_door_returns_vllm_front_ends(vllm_engine):
    from xgenmm import AsyncLLM, LLM

    assert vllm_engine.backend == "vllm" and vllm_engine.handle.backend == "vllm"
    assert type(vllm_engine.sync) is LLM and type(vllm_engine.aio) is AsyncLLM  # the same clients as native
    tok = vllm_engine.get_tokenizer()
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID and len(tok) == 32015


def test_vllm_runs_on_the_native_core_loop(vllm_engine, native_engine):
    """One generic loop drives both engine cores; the vLLM core offers every method of the `EngineCore` protocol
    and tells the client what inputs it takes (decoded images, not tiles)."""
    from xgenmm.backends.vllm_backend import VllmEngineCore
    from xgenmm.engine.core_loop import CoreLoop, EngineCore

    loop = vllm_engine.handle.loop
    assert type(loop) is CoreLoop and type(native_engine.handle.loop) is CoreLoop
    assert isinstance(loop.core, VllmEngineCore)
    protocol = {n for n in vars(EngineCore) if not n.startswith("_")}
    assert protocol <= set(dir(VllmEngineCore)), sorted(protocol - set(dir(VllmEngineCore)))
    for name in ("tokenizer", "config", "model_name", "max_model_len", "input_spec"):
        assert getattr(loop.core, name) is not None and getattr(native_engine.handle.core, name) is not None
    assert loop.core.input_spec.tiles_images is False and native_engine.handle.core.input_spec.tiles_images is True
    assert vllm_engine.handle.chat_renderer is not None and vllm_engine.handle.inputs is not None
    loop.check_alive()  # running: no error


def test_greedy_tokens_equal_fixtures_and_native(vllm_engine, native_engine, fixture_dir, fixture_cases):
    """Single image (every grid shape), interleaved two images, text only, no template, a batch: all 11 samples."""
    requests, expected, names = _fixture_requests(fixture_dir, fixture_cases)
    assert {"interleave_two[0]", "text_only[0]", "single_2x2[0]"} <= set(names)
    params = SamplingParams(**GREEDY)
    vllm_out = vllm_engine.sync.generate(requests, params)
    native_out = native_engine.sync.generate(requests, params)
    for name, v, n, want in zip(names, vllm_out, native_out, expected):
        assert v.outputs[0].token_ids == want, name
        assert v.outputs[0].token_ids == n.outputs[0].token_ids, name
        assert v.outputs[0].text == n.outputs[0].text, name
        assert v.metrics.num_prompt_tokens == n.metrics.num_prompt_tokens, name
        assert v.prompt_token_ids == n.prompt_token_ids, name


def test_logprobs_match_native(vllm_engine, native_engine, fixture_dir, fixture_cases):
    case = next(c for c in fixture_cases["cases"] if c["name"] == "single_3x1")["samples"][0]
    request = {"prompt_token_ids": case["input_ids"],
               "multi_modal_data": {"image": [Image.open(fixture_dir / p) for p in case["images"]]}}
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    v = vllm_engine.sync.generate(request, params)[0].outputs[0]
    n = native_engine.sync.generate(request, params)[0].outputs[0]
    assert v.token_ids == n.token_ids and len(v.logprobs) == 4
    for vpos, npos in zip(v.logprobs, n.logprobs):
        assert set(vpos) == set(npos)
        for tid in vpos:
            assert math.isclose(vpos[tid].logprob, npos[tid].logprob, abs_tol=1e-3)
            assert vpos[tid].rank == npos[tid].rank
    assert math.isclose(v.cumulative_logprob, n.cumulative_logprob, abs_tol=1e-3)


def _chat_messages(fixture_dir):
    image = Image.open(fixture_dir / "images/a_640x480.png")
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def test_chat_equals_native(vllm_engine, native_engine, fixture_dir):
    messages = _chat_messages(fixture_dir)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    v = vllm_engine.sync.chat(messages, params)[0]
    n = native_engine.sync.chat(messages, params)[0]
    assert v.prompt == n.prompt and v.prompt.startswith("<|system|>")
    assert v.outputs[0].token_ids == n.outputs[0].token_ids
    assert (v.outputs[0].finish_reason, v.outputs[0].stop_reason) == (n.outputs[0].finish_reason, n.outputs[0].stop_reason)


def test_async_delta_stream_and_abort(vllm_engine, fixture_dir):
    messages = _chat_messages(fixture_dir)

    async def run():
        final = None
        async for out in vllm_engine.aio.chat(messages, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)):
            final = out
        deltas = [out async for out in vllm_engine.aio.chat(
            messages, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA))]
        aborted = []
        async for out in vllm_engine.aio.generate("<|user|>\nhello<|end|>\n<|assistant|>\n",
                                                  SamplingParams(max_tokens=500, ignore_eos=True), request_id="to-abort"):
            aborted.append(out)
            if len(aborted) == 2:
                await vllm_engine.aio.abort("to-abort")
        return final, deltas, aborted

    final, deltas, aborted = asyncio.run(run())
    assert len(deltas) == 6 and all(len(d.outputs[0].token_ids) == 1 for d in deltas)
    assert sum((d.outputs[0].token_ids for d in deltas), []) == final.outputs[0].token_ids
    assert "".join(d.outputs[0].text for d in deltas) == final.outputs[0].text
    assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
    assert 2 <= len(aborted[-1].outputs[0].token_ids) < 500


def test_stops_on_end_token_like_native(vllm_engine, native_engine):
    """Without ignore_eos, <|end|> ends the reply with stop_reason None (an end of turn), as in the native engine."""
    prompt = {"prompt_token_ids": [32010, 1000, 32007, 32001]}
    params = SamplingParams(temperature=0.0, max_tokens=3, stop_token_ids=[END_TOKEN_ID])
    v = vllm_engine.sync.generate(prompt, params)[0].outputs[0]
    n = native_engine.sync.generate(prompt, params)[0].outputs[0]
    assert v.token_ids == n.token_ids and v.finish_reason == n.finish_reason
    forced = SamplingParams(temperature=0.0, max_tokens=4, structured_outputs={"choice": ["yes"]})
    out = vllm_engine.sync.generate(prompt, forced)[0].outputs[0]
    assert out.text == "yes" and out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] == END_TOKEN_ID  # the grammar ends the reply with the turn end, as natively


@pytest.mark.parametrize("structured", [
    {"choice": ["red", "green", "blue"]},
    {"regex": "[a-z]{3}-[0-9]{2}"},
    {"json": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, "whitespace_flexible": False},
    {"grammar": 'start: "A" ("B" | "C")+ "."'},
])
def test_structured_outputs_equal_native(vllm_engine, native_engine, structured):
    """Same llguidance grammar on both engines: the constrained greedy tokens are identical."""
    prompt = "<|user|>\nAnswer.<|end|>\n<|assistant|>\n"
    params = SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=structured)
    v = vllm_engine.sync.generate(prompt, params)[0].outputs[0]
    n = native_engine.sync.generate(prompt, params)[0].outputs[0]
    assert v.token_ids == n.token_ids and v.text == n.text
    if "choice" in structured:
        assert v.text in structured["choice"]
    if "json" in structured and v.finish_reason == "stop":
        assert isinstance(json.loads(v.text)["n"], int) and " " not in v.text


def test_request_errors_are_typed(vllm_engine, fixture_dir):
    image = Image.open(fixture_dir / "images/a_97x61.png")
    with pytest.raises(ImageCountMismatchError):
        vllm_engine.sync.generate({"prompt": "<image> and <image>", "multi_modal_data": {"image": image}})
    with pytest.raises(PromptError, match="ProcessedImage"):
        processed = ImageProcessor()(image)
        vllm_engine.sync.generate({"prompt": "<image>", "multi_modal_data": {"image": processed}})
    with pytest.raises(SamplingParamsError, match="regex"):
        vllm_engine.sync.generate("hi", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed")))
    with pytest.raises(PromptError, match="vocabulary"):
        vllm_engine.sync.generate({"prompt_token_ids": [1, 40000]})
    ok = vllm_engine.sync.generate("still serving", SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert len(ok.outputs[0].token_ids) == 2


def test_max_tokens_clamped_to_context_like_native(vllm_engine):
    out = vllm_engine.sync.generate({"prompt_token_ids": [1000] * 4090}, SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
