"""vLLM gets upstream's exact prompt ids too: the vLLM backend (it tokenizes with the core's tokenizer), and vLLM's
own renderer through the plugin's tokenizer (what `vllm serve` and `vllm.LLM` call), on the golden checkpoint with
the sentencepiece-trained Phi-3-layout tokenizer; and prompts given as *text* give native's greedy tokens.

Runs only where vLLM is installed (`.venv-vllm`, via `.ci/vllm.sh`).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from PIL import Image  # noqa: E402

from tests.support import TOKENIZER_FIXTURES  # noqa: E402
from xgenmm import SamplingParams  # noqa: E402
from xgenmm.lazy_engine import EngineClients  # noqa: E402

CASES = json.loads((TOKENIZER_FIXTURES / "cases.json").read_text(encoding="utf-8"))
RAW = [c for c in CASES if c["kind"] == "raw" and c["text"]]
CHAT = [c for c in CASES if c["kind"] == "chat"]
SMALL_ENGINE = dict(max_model_len=4096, max_num_seqs=8)


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 10 * i, 30), (30 * i, 90, 200)) for i in range(n)]


def _chat_kwargs(case: dict) -> dict:
    return {k: case[k] for k in ("tools", "add_generation_prompt", "continue_final_message") if k in case}


@pytest.fixture(scope="module")
def engines(spm_fixture_checkpoint):
    ckpt = str(spm_fixture_checkpoint)
    vllm_engine = EngineClients.open("vllm", model=ckpt, dtype="float32", **SMALL_ENGINE)
    native_engine = EngineClients.open("native", model=ckpt, device="cpu", dtype="float32")
    yield vllm_engine, native_engine
    vllm_engine.handle.shutdown()


def test_plugin_tokenizer_as_vllm_renderer_calls_it(spm_fixture_checkpoint, golden_ids):
    """The tokenizer vLLM's registry hands out (cached, thread-pooled) with the kwargs vLLM's renderer passes."""
    from vllm.tokenizers import get_tokenizer
    from vllm.tokenizers.hf import maybe_make_thread_pool

    from xgenmm.vllm_plugin import register

    register()
    tok = maybe_make_thread_pool(get_tokenizer(str(spm_fixture_checkpoint)), copies=2)
    want = golden_ids("spm")
    for case in RAW:
        ids = tok(case["text"], truncation=True, max_length=4097, add_special_tokens=True)["input_ids"]
        assert ids == want[case["id"]], case["id"]
    enc = tok(RAW[0]["text"], return_offsets_mapping=True)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])


def test_vllm_backend_prompt_ids_equal_upstream(engines, golden_ids):
    vllm_engine, _ = engines
    want = golden_ids("spm")
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    prompts = [{"prompt": c["text"], "multi_modal_data": {"image": _images(c["text"].count("<image>"))}} for c in RAW]
    outs = vllm_engine.sync.generate(prompts, greedy)
    bad = [c["id"] for c, out in zip(RAW, outs) if list(out.prompt_token_ids) != want[c["id"]]]
    assert not bad, bad
    for case in CHAT:
        out = vllm_engine.sync.chat(case["messages"], greedy, **_chat_kwargs(case))[0]
        assert list(out.prompt_token_ids) == want[case["id"]], case["id"]


@pytest.mark.parametrize("case_id", ["user_13", "chat_image_text"])
def test_text_prompts_give_native_greedy_tokens(engines, case_id):
    """A text-only and an image prompt, given as text (tokenized by each engine's own path)."""
    vllm_engine, native_engine = engines
    case = next(c for c in CASES if c["id"] == case_id)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    if case["kind"] == "chat":
        v = vllm_engine.sync.chat(case["messages"], params)[0]
        n = native_engine.sync.chat(case["messages"], params)[0]
    else:
        v = vllm_engine.sync.generate(case["text"], params)[0]
        n = native_engine.sync.generate(case["text"], params)[0]
    assert list(v.prompt_token_ids) == list(n.prompt_token_ids)
    assert v.outputs[0].token_ids == n.outputs[0].token_ids
