"""`image_qa_tool`: a LlamaIndex `FunctionTool` that answers a question about an image with xGen-MM (for agents).

The LlamaIndex counterpart of `langchain_xgenmm.XGenMMImageQATool`, with the same two ways to name the image:

* free form (default): `image` is a file path, an http(s) URL or a data: URL, loaded under the `XGenMM`'s input
  policy (local files need `XGenMM(allow_local_files=True)`, best with `local_file_roots`; URLs need
  `allow_remote_images=True`);
* a catalogue: `images={"chart": "/data/chart.png", ...}` makes `image` one of those names (an enum in the tool's
  schema, so a grammar-constrained tool call can only pick an existing one). Configuring a local file here is the
  permission to read it: the tool sends its bytes inline.

A refused or unreadable image raises its typed `ImageError` (naming the image and the option to change); LlamaIndex
agents turn a tool's exception into an error observation, so the agent sees why and can recover.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal, Optional

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.bridge.pydantic import BaseModel, Field, create_model
from llama_index.core.tools import FunctionTool

from xgenmm.errors import ImageError

from .base import XGenMM

__all__ = ["image_qa_tool", "ImageQuestion", "DEFAULT_TOOL_NAME"]

DEFAULT_TOOL_NAME = "image_question_answering"
_DESCRIPTION = ("Answer a question about an image. Arguments: `image` (which image to look at) and `question` "
                "(what to find out about it).")


class ImageQuestion(BaseModel):
    """Arguments of the image question-answering tool."""

    image: str = Field(description="the image: a file path, an http(s) URL or a data: URL")
    question: str = Field(description="the question to answer about the image")


def image_qa_tool(llm: Optional[XGenMM] = None, *, images: Optional[Mapping[str, str]] = None,
                  name: str = DEFAULT_TOOL_NAME, description: str = _DESCRIPTION) -> FunctionTool:
    """A `FunctionTool` (sync and async) asking `llm` (default: `XGenMM()`) a question about one image."""
    model = llm if llm is not None else XGenMM()
    catalogue = dict(images) if images is not None else None
    schema: type[BaseModel] = ImageQuestion
    if catalogue:
        schema = create_model(
            "ImageQuestion",
            __doc__=ImageQuestion.__doc__,
            image=(Literal[tuple(catalogue)], Field(description="the name of the image to look at")),  # type: ignore[valid-type]
            question=(str, Field(description="the question to answer about the image")),
        )

    def block(image: str) -> ImageBlock:
        reference = image
        if catalogue is not None:
            if image not in catalogue:
                raise ImageError(f"unknown image {image!r}; choose one of {sorted(catalogue)}")
            reference = catalogue[image]
            if os.path.isfile(reference):  # configured by the user: read it here, send it inline
                with open(reference, "rb") as handle:
                    return ImageBlock(image=handle.read())
        if reference.startswith(("http://", "https://", "data:")):
            return ImageBlock(url=reference)
        return ImageBlock(path=reference)

    def messages(image: str, question: str) -> list[ChatMessage]:
        return [ChatMessage(role=MessageRole.USER, blocks=[block(image), TextBlock(text=question)])]

    def answer(image: str, question: str) -> str:
        return (model.chat(messages(image, question)).message.content or "").strip()

    async def aanswer(image: str, question: str) -> str:
        return ((await model.achat(messages(image, question))).message.content or "").strip()

    return FunctionTool.from_defaults(fn=answer, async_fn=aanswer, name=name, description=description,
                                      fn_schema=schema)


