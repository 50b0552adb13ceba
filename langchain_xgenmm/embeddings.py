"""`TestOnlyHashingEmbeddings`: a TEST-ONLY LangChain `Embeddings` (a hashed bag of words from
`xgenmm.testing.text_embedding`: offline, no model, no meaning), for tests and the offline example runs on random
checkpoints. For real retrieval use a real model, e.g. sentence-transformers (the `rag` extra):
`SentenceTransformerEmbeddings` below wraps `SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")`."""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings

from xgenmm.testing.text_embedding import TEST_ONLY_EMBEDDING_DIM, hashing_text_embedding

__all__ = ["TestOnlyHashingEmbeddings", "SentenceTransformerEmbeddings"]


class TestOnlyHashingEmbeddings(Embeddings):
    """TEST ONLY: identical texts get identical vectors, texts sharing words a positive cosine; nothing more."""

    __test__ = False  # not a pytest test class

    def __init__(self, dim: int = TEST_ONLY_EMBEDDING_DIM) -> None:
        self.dim = dim

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [hashing_text_embedding(t, self.dim) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return hashing_text_embedding(text, self.dim)


class SentenceTransformerEmbeddings(Embeddings):
    """A sentence-transformers model as LangChain `Embeddings` (normalised, CPU by default). `langchain-huggingface`
    would be the ecosystem's class, but it caps huggingface-hub below 2 and sentence-transformers below 6, which
    conflicts with the versions transformers 5 installs; sentence-transformers itself installs cleanly."""

    def __init__(self, model_name: str = "sentence-transformers/all-MiniLM-L6-v2", device: str = "cpu",
                 **kwargs: Any) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_name, device=device, **kwargs)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(list(texts), normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]
