"""XGenMM chat / stream / async over every image source, the legacy completion form, usage, and bad inputs."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from llama_index.core.base.llms.types import AudioBlock, ChatMessage, ImageBlock, TextBlock
from llama_index.core.llms import LLM as LlamaIndexLLM
from llama_index.core.schema import ImageDocument, ImageNode, TextNode

from xgenmm.errors import ImageError, ImageSourceNotAllowedError, PromptError

QUESTION = "What color is this?"


def _image_llm(model_path, **policy):
    from llama_index.llms.xgenmm import XGenMM

    return XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=4, **policy)


@pytest.fixture(scope="module")
def sources(model_path, image_dir, png, image_server):
    """(llm allowed to read it, ImageBlock) for every way an image can be given; all are the same red PNG."""
    plain = _image_llm(model_path)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {
        "bytes": (plain, lambda: ImageBlock(image=png)),
        "base64": (plain, lambda: ImageBlock(image=base64.b64encode(png))),
        "file_object": (plain, lambda: ImageBlock(image=io.BytesIO(png))),
        "data_url": (plain, lambda: ImageBlock(url=data_url)),
        "path": (_image_llm(model_path, allow_local_files=True), lambda: ImageBlock(path=image_dir / "red.png")),
        "url": (_image_llm(model_path, allow_remote_images=True, allow_private_addresses=True),
                lambda: ImageBlock(url=f"{image_server}/red.png")),
    }


@pytest.fixture(scope="module")
def baseline(llm, png):
    """Prompt tokens of the question alone, and with the red image given as bytes."""
    text_only = llm.chat([ChatMessage(role="user", content=QUESTION)]).additional_kwargs["prompt_tokens"]
    with_image = llm.chat([_user(ImageBlock(image=png))]).additional_kwargs["prompt_tokens"]
    return text_only, with_image


def _user(block) -> ChatMessage:
    return ChatMessage(role="user", blocks=[block, TextBlock(text=QUESTION)])


def _check_usage(usage: dict, baseline) -> None:
    text_only, with_image = baseline
    # The image reached the model: its vision tokens are in the prompt, exactly as many as for the bytes form.
    assert usage["prompt_tokens"] == with_image > text_only + 100
    assert usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Same pixels -> same content hash -> the prefix cache serves the image tokens of the earlier requests.
    assert usage["cached_tokens"] > text_only


def test_is_a_llamaindex_function_calling_llm(llm):
    from llama_index.core.llms.function_calling import FunctionCallingLLM

    assert isinstance(llm, LlamaIndexLLM) and isinstance(llm, FunctionCallingLLM)
    meta = llm.metadata
    assert (meta.context_window, meta.num_output, meta.is_chat_model, meta.is_function_calling_model) == (
        4096, 4, True, True)
    assert meta.model_name == llm.model


SOURCE_NAMES = ["bytes", "base64", "file_object", "data_url", "path", "url"]


@pytest.mark.parametrize("source", SOURCE_NAMES)
def test_chat_with_every_image_source(sources, baseline, source):
    llm, block = sources[source]
    response = llm.chat([_user(block())])
    assert response.message.role == "assistant" and response.message.content
    _check_usage(response.additional_kwargs, baseline)
    usage = response.raw["usage"]
    assert usage["prompt_tokens"] == response.additional_kwargs["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == response.additional_kwargs["cached_tokens"]
    assert response.raw["finish_reason"] in ("length", "stop")
    assert response.message.additional_kwargs["tool_calls"] == []


@pytest.mark.parametrize("source", SOURCE_NAMES)
def test_stream_chat_with_every_image_source(sources, baseline, source):
    llm, block = sources[source]
    chunks = list(llm.stream_chat([_user(block())]))
    assert len(chunks) >= 2
    text = "".join(c.delta for c in chunks)
    assert chunks[-1].message.content == text  # cumulative content, as Ollama streams it
    assert all(c.message.content == "".join(x.delta for x in chunks[: i + 1]) for i, c in enumerate(chunks[:-1]))
    _check_usage(chunks[-1].additional_kwargs, baseline)


@pytest.mark.parametrize("source", SOURCE_NAMES)
def test_async_chat_and_stream_with_every_image_source(sources, baseline, source):
    llm, block = sources[source]

    async def run():
        response = await llm.achat([_user(block())])
        chunks = [c async for c in await llm.astream_chat([_user(block())])]
        return response, chunks

    response, chunks = asyncio.run(run())
    _check_usage(response.additional_kwargs, baseline)
    assert chunks[-1].message.content == "".join(c.delta for c in chunks)
    _check_usage(chunks[-1].additional_kwargs, baseline)


def test_concurrent_achat_calls_all_complete(llm, png):
    async def run():
        messages = [[_user(ImageBlock(image=png))] for _ in range(3)] + [[ChatMessage(role="user", content="hi")]]
        return await asyncio.gather(*(llm.achat(m) for m in messages))

    responses = asyncio.run(run())
    assert all(r.additional_kwargs["completion_tokens"] >= 1 for r in responses)
    assert responses[0].additional_kwargs["prompt_tokens"] > responses[3].additional_kwargs["prompt_tokens"] + 100


def test_complete_variants_derive_from_chat(llm):
    response = llm.complete("Say hi")
    assert response.text and response.additional_kwargs["completion_tokens"] >= 1
    assert response.raw["usage"]["total_tokens"] == response.additional_kwargs["total_tokens"]
    streamed = list(llm.stream_complete("Say hi"))
    assert streamed[-1].text == "".join(c.delta for c in streamed)

    async def run():
        done = await llm.acomplete("Say hi")
        parts = [c async for c in await llm.astream_complete("Say hi")]
        return done, parts

    done, parts = asyncio.run(run())
    assert done.text and parts[-1].text == "".join(c.delta for c in parts)


def test_legacy_complete_with_image_documents(model_path, image_dir, png, baseline):
    llm = _image_llm(model_path, allow_local_files=True)
    text_only, with_image = baseline
    items = [
        ImageDocument(image_path=str(image_dir / "red.png")),
        ImageNode(image=base64.b64encode(png).decode(), text="a red square"),
        ImageBlock(image=png),
    ]
    for item in items:
        response = llm.complete(QUESTION, image_documents=[item])
        assert response.text
        assert response.additional_kwargs["prompt_tokens"] == with_image
    two = llm.complete(QUESTION, image_documents=items[:2])
    assert two.additional_kwargs["prompt_tokens"] > with_image + 100  # both images reach the model
    streamed = list(llm.stream_complete(QUESTION, image_documents=[items[0]]))
    assert streamed[-1].additional_kwargs["prompt_tokens"] == with_image

    async def run():
        done = await llm.acomplete(QUESTION, image_documents=[items[1]])
        parts = [c async for c in await llm.astream_complete(QUESTION, image_documents=[items[2]])]
        return done, parts

    done, parts = asyncio.run(run())
    assert done.additional_kwargs["prompt_tokens"] == with_image
    assert parts[-1].additional_kwargs["prompt_tokens"] == with_image


def test_sampling_options_per_call(llm):
    longer = llm.chat([ChatMessage(role="user", content="Count")], max_tokens=7, temperature=0.0)
    assert longer.additional_kwargs["completion_tokens"] == 7 and longer.raw["finish_reason"] == "length"
    from xgenmm import SamplingParams

    exact = llm.chat([ChatMessage(role="user", content="Count")], sampling_params=SamplingParams(max_tokens=2))
    assert exact.additional_kwargs["completion_tokens"] == 2


# ---- bad inputs --------------------------------------------------------------------------------------------------


def test_unreadable_image_is_a_clear_error(llm):
    with pytest.raises(ImageError, match="not a supported image"):
        llm.chat([_user(ImageBlock(image=b"this is not an image at all"))])


def test_remote_url_refused_by_default(llm, image_server):
    with pytest.raises(ImageSourceNotAllowedError, match="allow_remote_images"):
        llm.chat([_user(ImageBlock(url=f"{image_server}/red.png"))])


def test_loopback_url_refused_without_private_addresses(model_path, image_server):
    llm = _image_llm(model_path, allow_remote_images=True)
    with pytest.raises(ImageSourceNotAllowedError, match="allow_private_addresses"):
        llm.chat([_user(ImageBlock(url=f"{image_server}/red.png"))])
    with pytest.raises(ImageSourceNotAllowedError, match="allow_private_addresses"):
        list(llm.stream_chat([_user(ImageBlock(url=f"{image_server}/red.png"))]))


def test_local_path_refused_by_default(llm, image_dir):
    with pytest.raises(ImageSourceNotAllowedError, match="allow_local_files"):
        llm.chat([_user(ImageBlock(path=image_dir / "red.png"))])

    async def run():
        return await llm.achat([_user(ImageBlock(path=image_dir / "red.png"))])

    with pytest.raises(ImageSourceNotAllowedError, match="allow_local_files"):
        asyncio.run(run())


def test_local_file_roots_confine_local_paths(model_path, image_dir, tmp_path):
    inside = _image_llm(model_path, allow_local_files=True, local_file_roots=[str(image_dir)])
    assert inside.chat([_user(ImageBlock(path=image_dir / "red.png"))]).message.content
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((image_dir / "red.png").read_bytes())
    with pytest.raises(ImageSourceNotAllowedError, match="outside the allowed local_file_roots"):
        inside.chat([_user(ImageBlock(path=outside))])


def test_audio_block_is_refused_not_dropped(llm):
    audio = AudioBlock(audio=b"RIFF....WAVEfmt ", format="wav")
    with pytest.raises(PromptError, match="message 0, block 0: AudioBlock is not supported"):
        llm.chat([ChatMessage(role="user", blocks=[audio, TextBlock(text="transcribe")])])
    with pytest.raises(PromptError, match="AudioBlock"):
        llm.stream_chat([ChatMessage(role="user", blocks=[audio])])


def test_image_documents_without_an_image_are_refused(llm):
    with pytest.raises(ImageError, match="has no image"):
        llm.complete(QUESTION, image_documents=[ImageNode(text="caption only")])
    with pytest.raises(ImageError, match="image file not found"):
        llm.complete(QUESTION, image_documents=[ImageNode(image_path="/nonexistent/gone.png")])
    with pytest.raises(ImageError, match="cannot use TextNode as an image"):
        llm.complete(QUESTION, image_documents=[TextNode(text="just text")])
