"""Embeddings for multimodal RAG over captions.

For real retrieval use LlamaIndex's own integration, `llama-index-embeddings-huggingface` (the `rag` extra):
`HuggingFaceEmbedding(model_name="sentence-transformers/all-MiniLM-L6-v2")`. This module adds two things:

* `TestOnlyHashingEmbedding`: a TEST-ONLY hashed bag of words (`xgenmm.testing.text_embedding`), offline and
  model-free, used by the tests and by the examples when they run on a random checkpoint. Not a semantic model.
* `LocalSentenceEmbedding`: a local sentence-transformers folder loaded with `transformers` only (mean pooling,
  `1_Pooling/config.json`), for machines without sentence-transformers.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Optional

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

__all__ = ["LocalSentenceEmbedding", "TestOnlyHashingEmbedding"]


class LocalSentenceEmbedding(BaseEmbedding):
    """Mean-pooled (and, if the folder says so, L2-normalised) transformer embeddings, on CPU by default."""

    model_dir: str = Field(description="A local sentence-transformers model folder.")
    device: str = Field(default="cpu")
    max_length: int = Field(default=256, gt=0, description="Tokens kept per text.")

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _normalize: bool = PrivateAttr(default=True)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "LocalSentenceEmbedding"

    def _load(self) -> None:
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            from transformers import AutoModel, AutoTokenizer

            folder = Path(self.model_dir)
            pooling = folder / "1_Pooling" / "config.json"
            if pooling.exists():
                config = json.loads(pooling.read_text())
                if not config.get("pooling_mode_mean_tokens", False):
                    raise ValueError(f"{folder}: only mean pooling is supported, got {config}")
            modules = folder / "modules.json"
            if modules.exists():
                kinds = [m.get("type", "") for m in json.loads(modules.read_text())]
                self._normalize = any(k.endswith("Normalize") for k in kinds)
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
            self._model = AutoModel.from_pretrained(folder).to(self.device).eval()

    def _embed(self, texts: list[str]) -> list[list[float]]:
        import torch

        self._load()
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self._normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(list(texts)) if texts else []

    def warm_up(self, text: Optional[str] = None) -> None:
        """Load the weights now (they load on first use otherwise)."""
        self._load()


class TestOnlyHashingEmbedding(BaseEmbedding):
    """TEST ONLY: a hashed bag of words (no model, no download, no meaning). For tests and offline example runs on
    random checkpoints; use `HuggingFaceEmbedding` (llama-index-embeddings-huggingface) for real retrieval."""

    __test__ = False  # not a pytest test class
    dim: int = Field(default=256, ge=2, description="Vector size.")

    @classmethod
    def class_name(cls) -> str:
        return "TestOnlyHashingEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        from xgenmm.testing.text_embedding import hashing_text_embedding

        return hashing_text_embedding(query, self.dim)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_query_embedding(text)
