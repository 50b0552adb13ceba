"""OpenAI-style chat messages -> the official xGen-MM (Phi-3) prompt string, its token ids and its images in order.

Template (official demos, VLMEvalKit, LAVIS `inference.ipynb`, and the repo's `chat_template`):

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{reply}<|end|>\\n ... <|assistant|>\\n

Rules, each chosen to match the official format or the HF chat template:

* System: the text of every `system` (or `developer`) message, wherever it is, joined with "\\n", forms the one
  system turn at the top; without any, the default system message of the SFT data is used (`system_message=None`
  on the renderer drops the system turn instead). Tools add `tool_renderer.render_system_suffix(tools)` to it.
* Every other message is its own turn, in order; consecutive messages of the same role are *not* merged (as the HF
  chat template does): `<|user|>\\n{a}<|end|>\\n<|user|>\\n{b}<|end|>\\n`.
* `add_generation_prompt=True` ends with `<|assistant|>\\n`; False ends with the tokenizer's eos `<|endoftext|>`, as
  the official chat template does; `continue_final_message=True` leaves the last (assistant) turn open, without
  `<|end|>\\n`, so generation continues it.
* Content is a string or a list of parts. Each image part becomes the literal `<image>` (id 32012) where the part
  sits, and its image is loaded (in order) with `xgenmm.multimodal.image_sources.load_image` under the given
  `ImageInputPolicy`. Parts are joined with `part_separator` ("\\n" by default) between each pair of adjacent parts,
  except where the text on that side of the boundary already ends / starts with whitespace. So
  `[image, text q]` -> `<image>\\nq` (the SFT format), `[image, image, text q]` -> `<image>\\n<image>\\nq`,
  `[text "Look at this ", image, text " and this."]` -> `Look at this <image> and this.`; `part_separator=""`
  concatenates parts verbatim.
* Content is text: control tokens written inside message content, tool-call arguments or tool descriptions
  (`<|system|>`, `<|end|>`, `<image>`, ...) are tokenized as the plain text they are, so no user can forge a turn or
  an image slot; only the tags the template writes itself are control tokens (`RenderedPrompt.tag_spans`). Prompts
  whose content holds no such strings get exactly upstream's ids. This departs from upstream on purpose (upstream
  tokenizes the whole string, control tokens in content included); `content_tokens="special"` restores that, and
  then refuses the VLM tokens in text (an `<image>` without its image would misalign every later image). Images go
  in image parts.

The special tokens `<|system|>`, `<|user|>`, `<|end|>`, `<|assistant|>` are rstrip in the Phi-3 tokenizer, so the
"\\n" after each of them does not become a token; the one after `<image>` does (id 13).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from ..errors import PromptError
from ..multimodal.image_sources import ImageInputPolicy, load_image
from ..special_tokens import (
    ASSISTANT_TOKEN,
    END_TOKEN,
    ENDOFTEXT_TOKEN,
    IMAGE_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    VLM_SPECIAL_TOKENS,
)

__all__ = [
    "DEFAULT_SYSTEM_MESSAGE",
    "ChatRenderer",
    "RenderedPrompt",
    "ToolRenderer",
]

DEFAULT_SYSTEM_MESSAGE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

SYSTEM_ROLES = ("system", "developer")
IMAGE_PART_TYPES = ("image_url", "image", "image_pil")


@runtime_checkable
class ToolRenderer(Protocol):
    """How tools enter the prompt (implemented by `xgenmm.tool_calls`, shared by every front end).

    * `render_system_suffix(tools)`: text appended to the system message (include any leading separator).
    * `render_assistant_tool_calls(tool_calls)`: text appended to the assistant turn's content for its OpenAI
      `tool_calls` (a "\\n" is put between non-blank content and it).
    * `render_tool_result(message)`: the complete text of the turn for a `role: "tool"` message, role tags included
      (e.g. `<|user|>\\n...<|end|>\\n`), since Phi-3 has no tool role of its own.
    * optional `tool_result_envelope(message) -> (opening, closing)`: when present, the renderer renders the tool
      message's content itself (text and image parts) between the two, so tool results can carry images.
    """

    def render_system_suffix(self, tools: Sequence[Mapping[str, Any]]) -> str: ...

    def render_assistant_tool_calls(self, tool_calls: Sequence[Mapping[str, Any]]) -> str: ...

    def render_tool_result(self, message: Mapping[str, Any]) -> str: ...


@dataclass(frozen=True)
class RenderedPrompt:
    """The prompt as text, as token ids (no BOS) and the images its `<image>` tokens take, in order.

    `tag_spans`: where the template itself wrote control tokens (role tags, `<|end|>`, `<image>`); the same strings
    anywhere else (inside message content, tool arguments, tool descriptions) were tokenized as plain text. None when
    every occurrence was parsed as a control token (`content_tokens="special"`)."""

    text: str
    prompt_token_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)
    tag_spans: tuple[tuple[int, int], ...] | None = None


class _Out:
    """The prompt being rendered: text, plus the spans of the control tokens the template wrote itself."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.tag_spans: list[tuple[int, int]] = []

    def tag(self, token: str) -> "_Out":
        self.tag_spans.append((self.size, self.size + len(token)))
        return self.text(token)

    def text(self, text: str) -> "_Out":
        self.parts.append(text)
        self.size += len(text)
        return self

    def template(self, text: str) -> "_Out":
        """Text from our own renderers (tool envelopes): every control token in it is the template's."""
        for start, end in _tag_spans(text):
            self.tag_spans.append((self.size + start, self.size + end))
        return self.text(text)

    def extend(self, other: "_Out") -> "_Out":
        self.tag_spans.extend((self.size + a, self.size + b) for a, b in other.tag_spans)
        self.parts.extend(other.parts)
        self.size += other.size
        return self

    def value(self) -> str:
        return "".join(self.parts)


def _tag_spans(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _CONTROL_TOKEN_RE.finditer(text)]


_CONTROL_TOKEN_RE = re.compile("|".join(re.escape(t) for t in sorted(
    (ASSISTANT_TOKEN, END_TOKEN, ENDOFTEXT_TOKEN, SYSTEM_TOKEN, USER_TOKEN, *VLM_SPECIAL_TOKENS), key=len, reverse=True)))


@dataclass
class _Piece:
    """One rendered content part: text, or an image placeholder."""

    text: str
    is_image: bool


def engine_chat_renderer(tokenizer, content_tokens: str = "text") -> "ChatRenderer":
    """The chat renderer every engine (native and vLLM) hands its front ends: the official template with the Hermes
    tool format."""
    from ..tool_calls import HermesToolRenderer

    return ChatRenderer(tokenizer, tool_renderer=HermesToolRenderer(), content_tokens=content_tokens)


class ChatRenderer:
    """Renders chat messages in the official xGen-MM prompt format and tokenizes them (see the module docstring).

    `content_tokens="text"` (the default) tokenizes control-token strings inside message content, tool arguments and
    tool descriptions as plain text: a user cannot forge a `<|system|>` turn. Prompts whose content has no such
    strings get exactly upstream's ids either way. `"special"` parses them as control tokens, as upstream's
    tokenization of the whole string does (and then refuses the VLM tokens in text, which would misalign images).
    """

    def __init__(
        self,
        tokenizer,
        system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
        *,
        tool_renderer: ToolRenderer | None = None,
        part_separator: str = "\n",
        content_tokens: str = "text",
    ) -> None:
        if content_tokens not in ("text", "special"):
            raise ValueError(f"content_tokens must be 'text' or 'special', got {content_tokens!r}")
        self.tokenizer = tokenizer
        self.system_message = system_message
        self.tool_renderer = tool_renderer
        self.part_separator = part_separator
        self.content_tokens = content_tokens

    # ---- public --------------------------------------------------------------------------------------------------
    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               image_policy: ImageInputPolicy | None = None, **options: Any) -> RenderedPrompt:
        """Render and tokenize `messages` (options as `render_text`); raises `PromptError` (bad message / part, naming
        its index) or an `ImageError` subclass from `load_image` (e.g. `ImageSourceNotAllowedError`)."""
        out, images = self._render(messages, add_generation_prompt, image_policy, **options)
        text = out.value()
        if self.content_tokens == "special":
            ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
            return RenderedPrompt(text=text, prompt_token_ids=ids, images=images)
        spans = tuple(out.tag_spans)
        encoder = getattr(self.tokenizer, "prompt_encoder", None)
        if encoder is None:
            raise PromptError("content_tokens='text' needs the engine's XGenMMTokenizer (xgenmm.tokenizer)")
        ids = list(encoder.encode(text, tag_spans=spans).ids)
        return RenderedPrompt(text=text, prompt_token_ids=ids, images=images, tag_spans=spans)

    def render_text(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        image_policy: ImageInputPolicy | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_renderer: ToolRenderer | None = None,
        continue_final_message: bool = False,
    ) -> tuple[str, list[Image.Image]]:
        """Like `render` without tokenizing: (prompt text, images in `<image>` order; opened, not yet decoded)."""
        out, images = self._render(messages, add_generation_prompt, image_policy, tools=tools,
                                   tool_renderer=tool_renderer, continue_final_message=continue_final_message)
        return out.value(), images

    def _render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        image_policy: ImageInputPolicy | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_renderer: ToolRenderer | None = None,
        continue_final_message: bool = False,
    ) -> tuple[_Out, list[Image.Image]]:
        policy = image_policy if image_policy is not None else ImageInputPolicy()
        renderer = tool_renderer if tool_renderer is not None else self.tool_renderer
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise PromptError(f"messages must be a list of message dicts, got {type(messages).__name__}")
        if add_generation_prompt and continue_final_message:
            raise PromptError("add_generation_prompt and continue_final_message cannot both be true")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise PromptError(f"message {i}: must be a dict with 'role' and 'content', got {type(message).__name__}")
            if "role" not in message:
                raise PromptError(f"message {i}: has no 'role'")
        if tools and renderer is None:
            raise PromptError("tools were given but this renderer has no tool_renderer (see xgenmm.tool_calls)")

        images: list[Image.Image] = []
        turns: list[_Out] = []
        system_texts: list[str] = []
        has_system = False
        last_index = len(messages) - 1
        for i, message in enumerate(messages):
            role = message["role"]
            if role in SYSTEM_ROLES:
                has_system = True
                system_texts.append(self._system_text(message, i))
            elif role == "user":
                turn = _Out().tag(USER_TOKEN).text("\n").extend(self._content(message, i, policy, images))
                turns.append(turn.tag(END_TOKEN).text("\n"))
            elif role == "assistant":
                open_turn = continue_final_message and i == last_index
                turns.append(self._assistant_turn(message, i, policy, images, renderer, open_turn))
            elif role == "tool":
                if renderer is None:
                    raise PromptError(f"message {i}: role 'tool' needs a tool_renderer (see xgenmm.tool_calls)")
                turns.append(self._tool_turn(message, i, policy, images, renderer))
            else:
                raise PromptError(
                    f"message {i}: unknown role {role!r}; expected 'system', 'developer', 'user', 'assistant' or 'tool'"
                )
        if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
            raise PromptError("continue_final_message needs the last message to be an assistant message")

        system = "\n".join(system_texts) if has_system else self.system_message
        if tools:
            suffix = self._checked_text(renderer.render_system_suffix(tools), "tools system suffix")
            system = (system or "") + suffix  # tool names and descriptions come from the client: text
        out = _Out()
        if system is not None:
            out.tag(SYSTEM_TOKEN).text("\n").text(system).tag(END_TOKEN).text("\n")
        for turn in turns:
            out.extend(turn)
        if add_generation_prompt:
            out.tag(ASSISTANT_TOKEN).text("\n")
        elif not continue_final_message:
            out.tag(ENDOFTEXT_TOKEN)
        return out, images

    # ---- turns ---------------------------------------------------------------------------------------------------
    def _system_text(self, message: Mapping[str, Any], index: int) -> str:
        content = message.get("content")
        if isinstance(content, str):
            return self._checked_text(content, f"message {index}")
        if isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
            texts = []
            for j, part in enumerate(content):
                where = f"message {index}, part {j}"
                kind = self._part_type(part, where)
                if kind != "text":
                    raise PromptError(f"{where}: a system message can only hold text parts, got {kind!r}")
                texts.append(self._part_text(part, where))
            return self._join([_Piece(t, False) for t in texts]).value()
        raise PromptError(f"message {index}: system content must be a string or a list of text parts")

    def _assistant_turn(
        self,
        message: Mapping[str, Any],
        index: int,
        policy: ImageInputPolicy,
        images: list[Image.Image],
        renderer: ToolRenderer | None,
        open_turn: bool,
    ) -> _Out:
        content = message.get("content")
        body = _Out() if content is None else self._content(message, index, policy, images)
        tool_calls = message.get("tool_calls")
        if tool_calls:
            if renderer is None:
                raise PromptError(f"message {index}: assistant tool_calls need a tool_renderer (see xgenmm.tool_calls)")
            calls = self._checked_text(renderer.render_assistant_tool_calls(list(tool_calls)), f"message {index} (tool calls)")
            # Text before the calls gets a line break unless it ends with one; calls alone start the turn.
            text = body.value()
            if text and not text[-1].isspace() and calls and not calls[0].isspace():
                body.text("\n")
            body.text(calls)  # the calls' names and arguments come from the client: text
        elif content is None:
            raise PromptError(f"message {index}: assistant message has neither content nor tool_calls")
        turn = _Out().tag(ASSISTANT_TOKEN).text("\n").extend(body)
        return turn if open_turn else turn.tag(END_TOKEN).text("\n")

    def _tool_turn(
        self,
        message: Mapping[str, Any],
        index: int,
        policy: ImageInputPolicy,
        images: list[Image.Image],
        renderer: ToolRenderer,
    ) -> _Out:
        envelope = getattr(renderer, "tool_result_envelope", None)
        where = f"message {index} (tool result)"
        if envelope is None:  # a renderer that writes the whole turn: its tags are the template's
            return _Out().template(self._checked_text(renderer.render_tool_result(message), where))
        # The renderer wraps (its role tags are the template's), we render the content: tool results may hold images.
        head, tail = envelope(message)
        body = _Out() if message.get("content") is None else self._content(message, index, policy, images)
        return _Out().template(self._checked_text(head, where)).extend(body).template(self._checked_text(tail, where))

    # ---- content -------------------------------------------------------------------------------------------------
    def _content(
        self, message: Mapping[str, Any], index: int, policy: ImageInputPolicy, images: list[Image.Image]
    ) -> _Out:
        if "content" not in message or message["content"] is None:
            raise PromptError(f"message {index}: has no 'content'")
        content = message["content"]
        if isinstance(content, str):
            return _Out().text(self._checked_text(content, f"message {index}"))
        if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
            raise PromptError(
                f"message {index}: content must be a string or a list of parts, got {type(content).__name__}"
            )
        pieces: list[_Piece] = []
        for j, part in enumerate(content):
            where = f"message {index}, part {j}"
            kind = self._part_type(part, where)
            if kind == "text":
                pieces.append(_Piece(self._part_text(part, where), False))
            elif kind in IMAGE_PART_TYPES:
                if kind not in part or part[kind] is None:
                    raise PromptError(f"{where}: {kind!r} part has no {kind!r} field")
                images.append(load_image(part[kind], policy, what=where, decode=False))  # decoded after the budgets
                pieces.append(_Piece(IMAGE_TOKEN, True))
            else:
                raise PromptError(
                    f"{where}: unknown content part type {kind!r}; expected 'text', 'image_url', 'image' or 'image_pil'"
                )
        return self._join(pieces)

    def _join(self, pieces: list[_Piece]) -> _Out:
        out = _Out()
        sep = self.part_separator
        for k, piece in enumerate(pieces):
            if k > 0 and sep:
                prev = pieces[k - 1]
                prev_ws = not prev.is_image and (prev.text == "" or prev.text[-1].isspace())
                next_ws = not piece.is_image and (piece.text == "" or piece.text[0].isspace())
                if not (prev_ws or next_ws):
                    out.text(sep)
            if piece.is_image:
                out.tag(piece.text)
            else:
                out.text(piece.text)
        return out

    @staticmethod
    def _part_type(part: Any, where: str) -> str:
        if isinstance(part, str):
            raise PromptError(f"{where}: content parts must be dicts like {{'type': 'text', 'text': ...}}, got a string")
        if not isinstance(part, Mapping) or "type" not in part:
            raise PromptError(f"{where}: content part must be a dict with a 'type'")
        return str(part["type"])

    def _part_text(self, part: Mapping[str, Any], where: str) -> str:
        text = part.get("text")
        if not isinstance(text, str):
            raise PromptError(f"{where}: 'text' part needs a string 'text' field")
        return self._checked_text(text, where)

    def _checked_text(self, text: Any, where: str) -> str:
        if not isinstance(text, str):
            raise PromptError(f"{where}: expected text, got {type(text).__name__}")
        if self.content_tokens == "special":  # parsed as control tokens: a stray <image> would misalign images
            for token in VLM_SPECIAL_TOKENS:
                if token in text:
                    raise PromptError(
                        f"{where}: text contains the reserved token {token!r}; pass images as image parts instead"
                    )
        return text
