"""The stop-string automaton: same answers as checking every stop string, at a cost that does not grow with their
number; the per-request caps on stop strings."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xgenmm.engine.detokenizer import StopStringBuffer
from xgenmm.errors import SamplingParamsError
from xgenmm.sampling_params import MAX_STOP_BYTES, MAX_STOP_STRINGS, SamplingParams


def reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The first-completed stop string wins (earliest end, then the longest): the cut text and the winner."""
    hits = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    end, neg_len, stop = min(hits)
    return (text[:end] if include else text[: end + neg_len]), stop


alphabet = st.sampled_from("abé ")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet, max_size=40), stops=st.lists(st.text(alphabet, min_size=1, max_size=5), min_size=1,
       max_size=12), cuts=st.lists(st.integers(1, 6), max_size=40), include=st.booleans())
def test_automaton_matches_the_reference_whatever_the_chunking(text, stops, cuts, include):
    buf = StopStringBuffer(stops, include)
    out, pos = [], 0
    for cut in cuts:
        if pos >= len(text) or buf.stop_reason is not None:
            break
        out.append(buf.push(text[pos:pos + cut]))
        pos += cut
    if buf.stop_reason is None:
        out.append(buf.push(text[pos:], final=True))
    assert ("".join(out), buf.stop_reason) == reference(text, stops, include)


def test_held_text_is_only_a_possible_beginning():
    buf = StopStringBuffer(["abc", "bcx"])
    assert buf.push("zab") == "z"  # "ab" may still become "abc"
    assert buf.push("c") == "" and buf.stop_reason == "abc"


def _push_time(stops: list[str], text: str) -> float:
    best = float("inf")
    for _ in range(3):
        buf = StopStringBuffer(stops)
        start = time.perf_counter()
        for ch in text:
            buf.push(ch)
        best = min(best, time.perf_counter() - start)
    return best


def test_cost_per_token_does_not_grow_with_the_number_of_stop_strings():
    text = "the quick brown fox jumps over the lazy dog " * 60
    few = _push_time(["zzzz"], text)
    many = _push_time([f"zq{i:04d}xx" for i in range(MAX_STOP_STRINGS)] + ["the quick brown fox sleeps"], text)
    # 65x the stop strings; a per-string loop costs tens of times more, the automaton about the same
    assert many < 4 * few + 0.01, (few, many)


def test_stop_string_caps_are_refused_naming_stop():
    SamplingParams(stop=["x"] * MAX_STOP_STRINGS)
    with pytest.raises(SamplingParamsError, match=r"option stop=.*at most 64"):
        SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))
    with pytest.raises(SamplingParamsError, match=r"option stop=.*bytes") as info:
        SamplingParams(stop=["y" * (MAX_STOP_BYTES // 2 + 1)] * 2)
    assert len(str(info.value)) < 400  # the message does not echo the strings back


def test_huge_values_are_not_echoed_whole():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(max_tokens=10**6000)
    assert len(str(info.value)) < 300
