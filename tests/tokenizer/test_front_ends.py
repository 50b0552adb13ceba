"""Every front end sends upstream's exact prompt ids: `LLM.generate` with a prompt string, `LLM.chat`, `AsyncLLM`,
the server (`return_token_ids`), and the LangChain / LlamaIndex adapters (their token counts), on a checkpoint whose
tokenizer is the sentencepiece-trained Phi-3-layout one with recorded slow-tokenizer ids. Decoding through the engine
(text, streamed deltas, stop strings) stays what `tokenizer.decode` gives."""

from __future__ import annotations

import asyncio

import json

import httpx
import pytest
from PIL import Image

from tests.support import TOKENIZER_FIXTURES
from xgenmm import LLM, AsyncLLM, RequestOutputKind, SamplingParams
from xgenmm.client import open_engine
from xgenmm.server import BackgroundServer, ServerConfig

CASES = json.loads((TOKENIZER_FIXTURES / "cases.json").read_text(encoding="utf-8"))
RAW = [c for c in CASES if c["kind"] == "raw" and c["text"]]
CHAT = [c for c in CASES if c["kind"] == "chat"]
GREEDY_ONE = SamplingParams(temperature=0.0, max_tokens=1)


def _chat_kwargs(case: dict) -> dict:
    return {k: case[k] for k in ("tools", "add_generation_prompt", "continue_final_message") if k in case}


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 10 * i, 30), (30 * i, 90, 200)) for i in range(n)]


@pytest.fixture(scope="module")
def golden(golden_ids):
    return golden_ids


@pytest.fixture(scope="module")
def spm_checkpoint(tmp_path_factory, spm_tokenizer_dir):
    from xgenmm.testing import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("spm") / "ckpt", preset="tiny", seed=3,
                                  tokenizer_dir=spm_tokenizer_dir)


@pytest.fixture(scope="module")
def spm_engine(spm_checkpoint):
    handle = open_engine("native", str(spm_checkpoint), "cpu", "float32", kv_cache_memory_bytes=64 * 1024**2, shared=False)
    yield handle
    handle.shutdown()


@pytest.fixture(scope="module")
def spm_llm(spm_engine):
    return LLM.from_handle(spm_engine)


def test_generate_with_prompt_strings(spm_llm, golden):
    want = golden("spm")
    prompts = [{"prompt": c["text"], "multi_modal_data": {"image": _images(c["text"].count("<image>"))}} for c in RAW]
    outs = spm_llm.generate(prompts, GREEDY_ONE)
    bad = [c["id"] for c, out in zip(RAW, outs) if list(out.prompt_token_ids) != want[c["id"]]]
    assert not bad, bad


def test_chat_renders_and_tokenizes_as_upstream(spm_llm, golden):
    want = golden("spm")
    renderer = spm_llm.handle.chat_renderer
    for case in CHAT:
        text, images = renderer.render_text(case["messages"], **_chat_kwargs(case))
        assert text == case["text"] and len(images) == case["num_images"], case["id"]
        out = spm_llm.chat(case["messages"], GREEDY_ONE, **_chat_kwargs(case))[0]
        assert list(out.prompt_token_ids) == want[case["id"]], case["id"]


def test_async_llm_generate_and_chat(spm_engine, golden):
    want = golden("spm")
    allm = AsyncLLM.from_handle(spm_engine)
    raw = next(c for c in RAW if c["id"] == "interleave_lavis")
    chat = next(c for c in CHAT if c["id"] == "chat_two_images")

    async def run():
        prompt = {"prompt": raw["text"], "multi_modal_data": {"image": _images(2)}}
        outs = [o async for o in allm.generate(prompt, GREEDY_ONE)]
        chats = [o async for o in allm.chat(chat["messages"], GREEDY_ONE)]
        return outs[-1], chats[-1]

    out, chat_out = asyncio.run(run())
    assert list(out.prompt_token_ids) == want[raw["id"]]
    assert list(chat_out.prompt_token_ids) == want[chat["id"]]


def test_server_returns_the_upstream_prompt_ids(spm_checkpoint, spm_engine, golden):
    want = golden("spm")
    config = ServerConfig(model=str(spm_checkpoint), served_model_name="xgenmm", device="cpu", dtype="float32", port=0, api_key="")
    with BackgroundServer(config, llm=AsyncLLM.from_handle(spm_engine)) as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            for case in CHAT:
                body = {"model": "xgenmm", "messages": case["messages"], "max_tokens": 1, "temperature": 0,
                        "return_token_ids": True, **_chat_kwargs(case)}
                reply = client.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200, reply.text
                data = reply.json()
                assert data["prompt_token_ids"] == want[case["id"]], case["id"]
                assert len(data["choices"][0]["token_ids"]) == data["usage"]["completion_tokens"]
            # Streaming: the prompt ids come with the first chunk, as vLLM sends them.
            case = next(c for c in CHAT if c["id"] == "chat_unicode")
            body = {"model": "xgenmm", "messages": case["messages"], "max_tokens": 2, "stream": True,
                    "return_token_ids": True}
            with client.stream("POST", "/v1/chat/completions", json=body) as stream:
                lines = [line for line in stream.iter_lines() if line.startswith("data: {")]
            chunks = [json.loads(line[len("data: "):]) for line in lines]
            assert chunks[0]["prompt_token_ids"] == want[case["id"]]
            streamed = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])]
            assert 1 <= len(streamed) <= 2


def test_server_refuses_contradictory_render_options(spm_checkpoint, spm_engine):
    config = ServerConfig(model=str(spm_checkpoint), served_model_name="xgenmm", device="cpu", dtype="float32", port=0, api_key="")
    with BackgroundServer(config, llm=AsyncLLM.from_handle(spm_engine)) as server:
        body = {"model": "xgenmm", "messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True}
        reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "continue_final_message"


def test_langchain_counts_the_upstream_ids(spm_checkpoint, golden):
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_xgenmm import ChatXGenMM

    chat = ChatXGenMM(model=str(spm_checkpoint), device="cpu", dtype="float32", max_tokens=1, temperature=0.0)
    want = golden("spm")
    for case_id, messages in (
        ("chat_text", [HumanMessage("What is the capital of France?")]),
        ("chat_system", [SystemMessage("You are terse."), HumanMessage("Say hi.")]),
    ):
        assert chat.get_num_tokens_from_messages(messages) == len(want[case_id])
        assert chat.invoke(messages).usage_metadata["input_tokens"] == len(want[case_id])


def test_llamaindex_counts_the_upstream_ids(spm_checkpoint, golden):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.xgenmm import XGenMM

    llm = XGenMM(model=str(spm_checkpoint), device="cpu", dtype="float32", max_tokens=1, temperature=0.0)
    want = golden("spm")["chat_system"]
    reply = llm.chat([ChatMessage(role="system", content="You are terse."), ChatMessage(role="user", content="Say hi.")])
    assert reply.raw["usage"]["prompt_tokens"] == len(want)


def test_streamed_text_and_stop_strings_decode_as_the_tokenizer(spm_llm):
    tok = spm_llm.get_tokenizer()
    prompt = next(c for c in RAW if c["id"] == "user_13")["text"]  # accents: multi-byte pieces in the output too
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = spm_llm.generate(prompt, params)[0].outputs[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    deltas = [o.outputs[0].text for o in spm_llm.stream(prompt, params.replace(output_kind=RequestOutputKind.DELTA))]
    assert "".join(deltas) == full.text
    assert len(full.text) >= 6
    stop = full.text[len(full.text) // 2:][:3]  # a stop string from the middle: the text ends right before it
    cut = spm_llm.generate(prompt, params.replace(stop=[stop]))[0].outputs[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.stop_reason == stop
