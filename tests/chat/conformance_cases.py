"""The requests every front end must turn into the same engine request (shared by
tests/chat/test_front_end_conformance.py and tests/vllm_backend/test_vllm_conformance.py)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ANSWER = {"title": "Answer", "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
          "required": ["city", "days"]}


def _png_url(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE_URL = _png_url((200, 40, 40))
TEXT_MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]
IMAGE_MESSAGES = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}},
                                               {"type": "text", "text": "What is in this image?"}]}]


@dataclass(frozen=True)
class Case:
    """One request in OpenAI terms; each front end translates it into its own API."""

    name: str
    messages: list[dict] = field(default_factory=lambda: TEXT_MESSAGES)
    tools: list[dict] | None = None
    tool_choice: Any = None
    response_format: dict | None = None
    stop: list[str] | None = None
    n: int = 1
    top_logprobs: int | None = None


CASES = [
    Case("text"),
    Case("image", messages=IMAGE_MESSAGES),
    Case("tools_auto", tools=[WEATHER, TIME], tool_choice="auto"),
    Case("tools_none", tools=[WEATHER, TIME], tool_choice="none"),
    Case("tools_required", tools=[WEATHER, TIME], tool_choice="required", stop=["\n"]),
    Case("tools_named", tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}),
    Case("json_schema", response_format={"type": "json_schema", "json_schema": {"name": "Answer", "schema": ANSWER}},
         stop=["}"]),
    Case("json_object", response_format={"type": "json_object"}),
    Case("stop_strings", stop=["e", "the"]),
    Case("n2", n=2),
    Case("logprobs", top_logprobs=2),
]
MAX_TOKENS = 24
