"""XGenMMImageLoader and XGenMMImageQATool on the tiny random checkpoint."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from PIL import Image
from tests.langchain.helpers import model_params, png_bytes

from langchain_xgenmm import ChatXGenMM, XGenMMImageLoader, XGenMMImageQATool
from langchain_xgenmm.document_loaders import OCR_PROMPT


@pytest.fixture(scope="module")
def llm() -> ChatXGenMM:
    return ChatXGenMM(**model_params(max_tokens=6))


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes((255, 0, 0), (40, 30)))
    Image.new("RGB", (30, 50), "blue").save(tmp_path / "b.jpg")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.webp").write_bytes(png_bytes((0, 255, 0), (20, 20)))  # PNG bytes, .webp name
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_loader_captions_a_folder_in_order_with_metadata(llm, image_folder, capsys):
    loader = XGenMMImageLoader(image_folder, llm=llm, prompt=OCR_PROMPT, batch_size=2)
    docs = loader.load()
    assert [d.metadata["file_name"] for d in docs] == ["a.png", "b.jpg", "c.webp"]
    assert all(isinstance(d, Document) and d.page_content for d in docs)
    first = docs[0].metadata
    assert first["source"] == str(image_folder / "a.png")
    assert (first["width"], first["height"], first["mime_type"]) == (40, 30, "image/png")
    assert docs[1].metadata["mime_type"] == "image/jpeg" and (docs[1].metadata["width"], docs[1].metadata["height"]) == (30, 50)
    assert docs[2].metadata["mime_type"] == "image/png"  # sniffed from the bytes, not the name
    assert first["model"] == llm.model and first["caption_prompt"] == OCR_PROMPT
    assert "xgenmm captions" in capsys.readouterr().err  # the progress bar


def test_loader_non_recursive_and_single_files(llm, image_folder):
    assert len(XGenMMImageLoader(image_folder, llm=llm, recursive=False, show_progress=False).load()) == 2
    docs = XGenMMImageLoader([image_folder / "b.jpg"], llm=llm, show_progress=False).load()
    assert len(docs) == 1 and docs[0].metadata["file_name"] == "b.jpg"
    with pytest.raises(FileNotFoundError):
        XGenMMImageLoader(image_folder / "missing.png", llm=llm).load()


async def test_loader_async(llm, image_folder):
    docs = [d async for d in XGenMMImageLoader(image_folder, llm=llm, show_progress=False).alazy_load()]
    assert [d.metadata["file_name"] for d in docs] == ["a.png", "b.jpg", "c.webp"]


def test_loader_respects_the_image_byte_limit(llm, image_folder):
    from xgenmm.errors import ImageTooLargeError

    strict = llm.model_copy(update={"max_image_bytes": 10})
    with pytest.raises(ImageTooLargeError):
        XGenMMImageLoader(image_folder / "a.png", llm=strict, show_progress=False).load()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_loader_skips_and_reports_corrupt_files_with_on_error_skip(llm, image_folder, capsys, asynchronous):
    import asyncio

    from xgenmm.errors import ImageError

    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageError, match="broken.png"):  # the default stops at the bad file, naming it
        XGenMMImageLoader(image_folder, llm=llm, show_progress=False).load()
    loader = XGenMMImageLoader(image_folder, llm=llm, on_error="skip", batch_size=1)
    if asynchronous:
        async def collect():
            return [d async for d in loader.alazy_load()]

        docs = asyncio.run(collect())
    else:
        docs = loader.load()
    assert [d.metadata["file_name"] for d in docs] == ["a.png", "b.jpg", "c.webp"]
    assert [s.source for s in loader.skipped] == [str(image_folder / "broken.png")] and loader.skipped[0].reason
    assert "unreadable, skipped: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="on_error"):
        XGenMMImageLoader(image_folder, llm=llm, on_error="ignore")


def test_image_qa_tool_answers_under_policy(llm, image_folder):
    allowed = llm.model_copy(update={"allow_local_files": True, "local_file_roots": [str(image_folder)]})
    tool = XGenMMImageQATool(llm=allowed)
    answer = tool.invoke({"image": str(image_folder / "a.png"), "question": "What colour is it?"})
    assert isinstance(answer, str) and answer
    # refused files come back to the agent as an error message, not an exception
    refused = XGenMMImageQATool(llm=llm).invoke({"image": str(image_folder / "a.png"), "question": "?"})
    assert "local image files are not allowed" in refused
    assert tool.args_schema.model_json_schema()["required"] == ["image", "question"]


async def test_image_qa_tool_async_and_as_a_tool_call(llm, image_folder):
    allowed = llm.model_copy(update={"allow_local_files": True})
    tool = XGenMMImageQATool(llm=allowed)
    message = await tool.ainvoke({"type": "tool_call", "id": "c1", "name": tool.name,
                                  "args": {"image": str(image_folder / "b.jpg"), "question": "shape?"}})
    assert message.tool_call_id == "c1" and message.content


def test_image_qa_tool_catalogue_is_an_enum_and_reads_configured_files(llm, image_folder):
    tool = XGenMMImageQATool(llm=llm, images={"red": str(image_folder / "a.png"), "blue": str(image_folder / "b.jpg")})
    schema = tool.args_schema.model_json_schema()
    assert schema["properties"]["image"]["enum"] == ["red", "blue"]
    # configured files are read by the tool (the model's allow_local_files stays off)
    assert tool.invoke({"image": "blue", "question": "shape?"})
    bound = llm.model_copy(update={"max_tokens": 60}).bind_tools([tool], tool_choice="any")
    call = bound.invoke("Look at one of the pictures.").tool_calls[0]
    assert call["args"]["image"] in ("red", "blue")


def test_a_refused_local_image_names_chatxgenmms_own_option(llm, image_folder):
    from langchain_core.messages import HumanMessage

    from xgenmm.errors import ImageSourceNotAllowedError

    message = HumanMessage(content=[{"type": "image_url", "image_url": {"url": str(image_folder / "a.png")}},
                                    {"type": "text", "text": "What is this?"}])
    with pytest.raises(ImageSourceNotAllowedError) as info:
        llm.invoke([message])
    assert "ChatXGenMM(allow_local_files=True)" in str(info.value) and "ImageInputPolicy" not in str(info.value)
