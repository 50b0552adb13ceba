"""The paged engine end to end: fixture parity through the public API, batching / preemption / prefix-cache
invariance of greedy output, n samples sharing prompt blocks, stop handling, streaming, and per-request errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.support import XGENMM_TINY
from xgenmm import LLM, RequestOutputKind, SamplingParams
from xgenmm.client import open_engine
from xgenmm.errors import ImageCountMismatchError, PromptError, PromptTooLongError, SamplingParamsError

FIXTURES = XGENMM_TINY
GREEDY8 = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)


def _fixture_prompts():
    cases = json.loads((FIXTURES / "cases.json").read_text())
    out = []
    for case in cases["cases"]:
        expected = load_file(FIXTURES / case["expected"])
        for b, s in enumerate(case["samples"]):
            images = [Image.open(FIXTURES / p) for p in s["images"]]
            out.append((case["name"], b, s, expected, {"prompt_token_ids": s["input_ids"], "multi_modal_data": {"image": images}}))
    return out


@pytest.fixture(scope="module")
def fixture_llm(fixture_checkpoint_with_tokenizer):
    handle = open_engine("native", str(fixture_checkpoint_with_tokenizer), "cpu", "float32", shared=False)
    yield LLM.from_handle(handle)
    handle.shutdown()


def test_public_api_reproduces_every_fixture_case_batched(fixture_llm):
    items = _fixture_prompts()
    outs = fixture_llm.generate([p for *_, p in items], GREEDY8)
    for (name, b, sample, expected, _), out in zip(items, outs):
        completion = out.outputs[0]
        assert completion.token_ids == sample["generated_ids"], name
        assert completion.finish_reason == "length"
        # logprob of each greedy token = its logit - logsumexp over the full 32015 vocabulary
        for step, lp in enumerate(completion.logprobs):
            token = sample["generated_ids"][step]
            ref = float(expected["step_topk_logits"][b, step, 0] - expected["step_logsumexp"][b, step])
            assert lp[token].rank == 1
            assert abs(lp[token].logprob - ref) < 1e-3, (name, step)
            assert len(lp) == 3
        assert out.metrics.num_prompt_tokens == sample["fused_length"]


def _mixed_requests(n=16):
    """Requests with a shared system prefix, images of several aspect ratios, some text-only."""
    images = sorted((FIXTURES / "images").glob("*.png"))
    system = "<|system|>\nYou look at pictures and answer briefly.<|end|>\n"
    prompts = []
    for i in range(n):
        if i % 4 == 3:
            prompts.append(f"{system}<|user|>\nTell me a story number {i}.<|end|>\n<|assistant|>\n")
        else:
            img = Image.open(images[i % len(images)])
            prompts.append({"prompt": f"{system}<|user|>\n<image>\nWhat is in picture {i}?<|end|>\n<|assistant|>\n",
                            "multi_modal_data": {"image": img}})
    return prompts


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint):
    handle = open_engine("native", str(tiny_checkpoint), "cpu", "float32", shared=False)
    yield LLM.from_handle(handle)
    handle.shutdown()


def test_greedy_identical_alone_batched_preempted_and_prefix_cached(tiny_checkpoint, tiny_llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = _mixed_requests(16)
    alone = [tiny_llm.generate(p, params)[0].outputs[0].token_ids for p in prompts[:6]]
    batched = tiny_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in batched[:6]] == alone
    cached = tiny_llm.generate(prompts, params)  # same prompts again: prefix-cache hits
    assert [o.outputs[0].token_ids for o in cached] == [o.outputs[0].token_ids for o in batched]
    assert all(o.num_cached_tokens > 0 for o in cached)

    # A KV pool far smaller than 16 x ~500 tokens forces preemption by recompute; a small token budget forces
    # chunked prefill mixed with decodes.
    small = open_engine("native", str(tiny_checkpoint), "cpu", "float32", kv_cache_memory_bytes=70 * 16 * 1024,
                               max_num_batched_tokens=256, enable_prefix_caching=False, shared=False)
    try:
        llm = LLM.from_handle(small)
        preempted = llm.generate(prompts, params)
        assert small.stats().num_preemptions > 0
        assert [o.outputs[0].token_ids for o in preempted] == [o.outputs[0].token_ids for o in batched]
        assert small.core.block_manager.num_free_blocks == small.core.block_manager.num_total_blocks
    finally:
        small.shutdown()


def test_n_samples_share_prompt_blocks_and_seed_is_batch_independent(tiny_llm):
    prompt = _mixed_requests(1)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=10, ignore_eos=True)
    out = tiny_llm.generate(prompt, params)[0]
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples
    before = tiny_llm.stats().num_cached_prompt_tokens
    out_again = tiny_llm.generate([_mixed_requests(3)[2], prompt, _mixed_requests(2)[1]], [GREEDY8, params, GREEDY8])[1]
    assert [c.token_ids for c in out_again.outputs] == [c.token_ids for c in out.outputs]
    assert tiny_llm.stats().num_cached_prompt_tokens > before


def test_stop_strings_stop_tokens_and_delta_streaming(tiny_llm):
    prompt = _mixed_requests(1)[0]
    full = tiny_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = tiny_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    tok = full.token_ids[5]
    by_id = tiny_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[tok]))[0]
    first = full.token_ids.index(tok)
    assert by_id.outputs[0].token_ids == full.token_ids[: first + 1] and by_id.outputs[0].stop_reason == tok

    deltas = list(tiny_llm.stream(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                         output_kind=RequestOutputKind.DELTA)))
    assert len(deltas) > 3 and deltas[-1].finished
    assert "".join(d.outputs[0].text for d in deltas) == full.text
    assert sum((d.outputs[0].token_ids for d in deltas), []) == full.token_ids


def test_closing_a_stream_aborts_and_frees_blocks(tiny_llm):
    bm = tiny_llm.handle.core.block_manager
    stream = tiny_llm.stream(_mixed_requests(1)[0], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()
    tiny_llm.generate("<|user|>\nhi<|end|>\n<|assistant|>\n", SamplingParams(max_tokens=2))  # handle has processed the abort
    assert tiny_llm.stats().num_running == 0
    assert bm.num_free_blocks == bm.num_total_blocks


def test_bad_requests_fail_alone_with_clear_errors(tiny_checkpoint, tiny_llm):
    img = Image.open(next((FIXTURES / "images").glob("*.png")))
    with pytest.raises(ImageCountMismatchError, match="2 <image> tag.*1 image"):
        tiny_llm.generate({"prompt": "<image> and <image>", "multi_modal_data": {"image": img}})
    with pytest.raises(ImageCountMismatchError):
        tiny_llm.generate({"prompt": "no tags", "multi_modal_data": {"image": [img]}})
    with pytest.raises(SamplingParamsError, match="bogus"):
        SamplingParams(bogus=1)
    with pytest.raises(SamplingParamsError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(PromptError, match="unsupported modality"):
        tiny_llm.generate({"prompt": "x", "multi_modal_data": {"audio": b"..."}})
    with pytest.raises(PromptError, match="prompts must be a str, a prompt dict or a list"):
        tiny_llm.generate(123)
    with pytest.raises(PromptError, match="prompt_token_ids must be a list of int token ids"):
        tiny_llm.generate({"prompt_token_ids": [1, "a"]})
    with pytest.raises(PromptTooLongError):
        tiny_llm.generate("word " * 5000)
    small = open_engine("native", str(tiny_checkpoint), "cpu", "float32", kv_cache_memory_bytes=8 * 16 * 1024, shared=False)
    try:
        llm = LLM.from_handle(small)
        # the image prompt needs ~25 blocks: it can never fit this 8-block cache, while a short prompt still runs
        stream_ok = llm.stream("<|user|>\nhi<|end|>\n<|assistant|>\n", SamplingParams(temperature=0, max_tokens=4))
        with pytest.raises(PromptTooLongError, match="blocks"):
            llm.generate({"prompt": "<image>", "multi_modal_data": {"image": img}}, SamplingParams(max_tokens=2))
        assert list(stream_ok)[-1].outputs[0].finish_reason in ("length", "stop")
    finally:
        small.shutdown()


def test_base_model_fuses_image_placeholders(tmp_path):
    from xgenmm.testing import make_random_checkpoint

    ckpt = make_random_checkpoint(tmp_path / "base", preset="tiny", variant="base")
    handle = open_engine("native", str(ckpt), "cpu", "float32", shared=False)
    try:
        llm = LLM.from_handle(handle)
        img = Image.open(next((FIXTURES / "images").glob("*.png")))
        short = llm.generate({"prompt": "<image> a photo of", "multi_modal_data": {"image": img}}, GREEDY8)[0]
        long = llm.generate({"prompt": "<image>" + "<image placeholder>" * 127 + " a photo of",
                             "multi_modal_data": {"image": img}}, GREEDY8)[0]
        text_ids = llm.get_tokenizer()("<image> a photo of", add_special_tokens=False).input_ids
        assert text_ids[0] == 32012  # the whole prompt is tokenized at once: the text after the tag has no prefix
        assert short.metrics.num_prompt_tokens == long.metrics.num_prompt_tokens == 128 + len(text_ids) - 1
        assert short.outputs[0].token_ids == long.outputs[0].token_ids
    finally:
        handle.shutdown()
