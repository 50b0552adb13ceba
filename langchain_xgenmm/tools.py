"""`XGenMMImageQATool`: a LangChain tool that answers a question about an image with xGen-MM (for agents)."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

from xgenmm.errors import ImageError

from .chat_models import ChatXGenMM

__all__ = ["XGenMMImageQATool", "ImageQuestion"]


class ImageQuestion(BaseModel):
    """Arguments of the image question-answering tool."""

    image: str = Field(description="the image: a file path, an http(s) URL, a data: URL or base64 data")
    question: str = Field(description="the question to answer about the image")


class XGenMMImageQATool(BaseTool):
    """Look at an image and answer a question about it.

    The image reference is loaded under the chat model's input policy: local files need `allow_local_files=True`
    (best with `local_file_roots` set to the folders the agent may read), URLs need `allow_remote_images=True`. A
    refused or unreadable image comes back to the agent as an error message (`handle_tool_error`), not a crash.
    """

    name: str = "image_question_answering"
    description: str = (
        "Answer a question about an image. Arguments: `image` (a file path, URL or data URL of the image) and "
        "`question` (what to find out about it)."
    )
    args_schema: type[BaseModel] = ImageQuestion
    llm: ChatXGenMM = Field(default_factory=ChatXGenMM)
    handle_tool_error: bool = True

    def _message(self, image: str, question: str) -> list[HumanMessage]:
        return [HumanMessage(content=[{"type": "image_url", "image_url": {"url": image}},
                                      {"type": "text", "text": question}])]

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
