"""Chat: the official prompt template (`template.py`), the one request builder every front end uses
(`request.py`), and reading replies back: usage, finish reasons, tool calls, streams (`reply.py`)."""

from .reply import ChatChoice, ChoiceStream, ReplyEvent, Usage, chat_choice, finish_reason_of, usage_of
from .request import CAPTION_MAX_TOKENS, DEFAULT_MAX_TOKENS, ChatRequest, ResponseFormat, build_chat_request, response_format_from_openai, sampling_params_from_openai
from .template import DEFAULT_SYSTEM_MESSAGE, ChatRenderer, RenderedPrompt, ToolRenderer

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "CAPTION_MAX_TOKENS",
    "DEFAULT_SYSTEM_MESSAGE",
    "ChatRenderer",
    "RenderedPrompt",
    "ToolRenderer",
    "ChatRequest",
    "ResponseFormat",
    "build_chat_request",
    "response_format_from_openai",
    "sampling_params_from_openai",
    "ChatChoice",
    "ChoiceStream",
    "ReplyEvent",
    "Usage",
    "chat_choice",
    "finish_reason_of",
    "usage_of",
]
