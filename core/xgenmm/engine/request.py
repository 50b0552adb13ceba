"""What the client hands an engine core: a request whose every input check is already done.

The client (`xgenmm.client`) tokenizes, opens and decodes each image once, checks the image count and the context,
compiles the grammar once; an engine core only schedules and runs what it is given. `CoreInputSpec` is what a core
tells its client about the inputs it wants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..multimodal.fusion import FusedPrompt
from ..sampling_params import SamplingParams

__all__ = ["CoreInputSpec", "PreparedRequest"]


@dataclass(frozen=True)
class CoreInputSpec:
    """The inputs one engine core takes. `tiles_images`: True = `ProcessedImage`s and a `FusedPrompt` (the native
    core encodes tiles itself); False = decoded PIL images and plain token ids (vLLM runs its own processor).
    `compiles_grammar`: the core constrains decoding with the client's compiled llguidance grammar."""

    max_model_len: int
    vocab_size: int
    tiles_images: bool
    max_images_per_prompt: int


@dataclass
class PreparedRequest:
    """One request ready for an engine core: its text (None for ids only), its token ids (one `<image>` per image),
    its images in `<image>` order (tiled `ProcessedImage`s, or decoded PIL images when the core does not tile), the
    fused prompt (tiling cores), its sampling parameters (`max_tokens` fitted to the context) and its grammar,
    compiled once (`xgenmm.structured.CompiledGrammar`, or None)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    images: list[Any]
    fused: FusedPrompt | None
    params: SamplingParams
    fused_length: int
    grammar: Any = None
    arrival_time: float = field(default_factory=time.monotonic)
