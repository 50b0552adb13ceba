"""`XGenMMImageQATool`: a LangChain tool that answers a question about an image with xGen-MM (for agents)."""

from __future__ import annotations

import base64
import mimetypes
import os
from typing import Any, Literal

from langchain_core.messages import HumanMessage
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field, create_model, model_validator

from xgenmm.errors import ImageError

from .chat_models import ChatXGenMM

__all__ = ["XGenMMImageQATool", "ImageQuestion"]


class ImageQuestion(BaseModel):
    """Arguments of the image question-answering tool."""

    image: str = Field(description="the image: a file path, an http(s) URL, a data: URL or base64 data")
    question: str = Field(description="the question to answer about the image")


class XGenMMImageQATool(BaseTool):
    """Look at an image and answer a question about it.

    Two ways to name the image:

    * free form (default): `image` is a path, URL, data URL or base64, loaded under the chat model's input policy
      (local files need `allow_local_files=True`, best with `local_file_roots`; URLs need `allow_remote_images=True`);
    * a catalogue: `images={"chart": "/data/chart.png", ...}` makes `image` one of those names (an enum in the tool's
      schema, so a grammar-constrained tool call can only pick an existing one). Configuring a local file here is the
      permission to read it: the tool sends its bytes inline.

    A refused or unreadable image comes back to the agent as an error message (`handle_tool_error`), not a crash.
    """

    name: str = "image_question_answering"
    description: str = (
        "Answer a question about an image. Arguments: `image` (which image to look at) and "
        "`question` (what to find out about it)."
    )
    args_schema: type[BaseModel] = ImageQuestion
    llm: ChatXGenMM = Field(default_factory=ChatXGenMM)
    images: dict[str, str] | None = None
    handle_tool_error: bool = True

    @model_validator(mode="after")
    def _catalogue_schema(self) -> "XGenMMImageQATool":
        if self.images:
            names = tuple(self.images)
            self.args_schema = create_model(
                "ImageQuestion",
                __doc__=ImageQuestion.__doc__,
                image=(Literal[names], Field(description="the name of the image to look at")),  # type: ignore[valid-type]
                question=(str, Field(description="the question to answer about the image")),
            )
        return self

    def _image_part(self, image: str) -> dict[str, Any]:
        reference = image
        if self.images is not None:
            if image not in self.images:
                raise ToolException(f"unknown image {image!r}; choose one of {sorted(self.images)}")
            reference = self.images[image]
            if os.path.isfile(reference):  # configured by the user: read it here, send it inline
                with open(reference, "rb") as handle:
                    data = base64.b64encode(handle.read()).decode("ascii")
                mime = mimetypes.guess_type(reference)[0] or "image/png"
                return {"type": "image", "base64": data, "mime_type": mime}
        return {"type": "image_url", "image_url": {"url": reference}}

    def _message(self, image: str, question: str) -> list[HumanMessage]:
        return [HumanMessage(content=[self._image_part(image), {"type": "text", "text": question}])]

    def _run(self, image: str, question: str, run_manager: Any = None) -> str:
        try:
            return self.llm.invoke(self._message(image, question)).text.strip()
        except ImageError as exc:
            raise ToolException(str(exc)) from exc

    async def _arun(self, image: str, question: str, run_manager: Any = None) -> str:
        try:
            return (await self.llm.ainvoke(self._message(image, question))).text.strip()
        except ImageError as exc:
            raise ToolException(str(exc)) from exc
