"""The TEST-ONLY hashing embedding (offline default for tests and example runs): unit vectors, identical texts
identical, shared words closer than disjoint ones; and both adapters' wrappers give the same vectors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xgenmm.testing.text_embedding import hashing_text_embedding


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b))


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=200))
def test_unit_norm_and_deterministic(text):
    vector = hashing_text_embedding(text)
    assert len(vector) == 256 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-9)
    assert hashing_text_embedding(text) == vector


def test_shared_words_are_closer_than_disjoint_ones():
    query = hashing_text_embedding("a red stop sign on a street")
    near = hashing_text_embedding("The stop sign is red")
    far = hashing_text_embedding("bar chart of quarterly sales")
    assert cosine(query, near) > cosine(query, far) and cosine(query, near) > 0.3
    assert math.isclose(cosine(query, hashing_text_embedding("A RED STOP SIGN ON A STREET")), 1.0)
    with pytest.raises(ValueError):
        hashing_text_embedding("x", dim=1)


def test_adapters_wrap_the_same_function():
    from langchain_xgenmm.embeddings import TestOnlyHashingEmbeddings
    from llamaindex_xgenmm.embeddings import TestOnlyHashingEmbedding

    text = "a green square"
    assert TestOnlyHashingEmbeddings().embed_query(text) == hashing_text_embedding(text)
    assert TestOnlyHashingEmbedding().get_text_embedding(text) == hashing_text_embedding(text)
