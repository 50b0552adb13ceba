"""`StopMatcher`: one Aho-Corasick automaton over a request's stop strings, fed text as it streams.

Why: checking every stop string on every token costs O(number of stop strings) per token on the engine thread, so
one request with thousands of stop strings slowed every other request down. The automaton reads each character once
(amortised O(1) per character, whatever the number or length of the stop strings); building it costs O(total length
of the stop strings), paid once per request and bounded by the caps in `sampling_params` (MAX_STOP_STRINGS,
MAX_STOP_BYTES).

After each character the matcher knows (a) whether some stop string ends here (the longest one on a tie, since the
earliest-ending match wins) and (b) `depth`: the length of the longest suffix of the text so far that is a prefix of
some stop string, i.e. how much text must be held back because a later character may complete a stop string.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Streaming multi-string matcher (Aho-Corasick). `feed(text)` -> (index just past the first match in `text`,
    the matched stop string) or None; the automaton's state carries across calls."""

    __slots__ = ("_goto", "_fail", "_depth", "_out", "_state")

    def __init__(self, stops: Sequence[str]) -> None:
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        out: list[str | None] = [None]  # the longest stop string that ends at this node (through fail links)
        for s in stops:
            node = 0
            for ch in s:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][ch] = nxt
                    goto.append({})
                    depth.append(depth[node] + 1)
                    out.append(None)
                node = nxt
            out[node] = s  # a node's own string is the longest that ends here
        fail = [0] * len(goto)
        queue = deque(goto[0].values())
        while queue:  # breadth first: a node's fail target is shallower, so already final
            node = queue.popleft()
            for ch, child in goto[node].items():
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                target = goto[f].get(ch, 0)
                fail[child] = target if target != child else 0
                if out[child] is None:
                    out[child] = out[fail[child]]
                queue.append(child)
        self._goto, self._fail, self._depth, self._out = goto, fail, depth, out
        self._state = 0

    @property
    def depth(self) -> int:
        """Length of the longest suffix of the text fed so far that is a (proper) prefix of a stop string."""
        return self._depth[self._state]

    def feed(self, text: str) -> tuple[int, str] | None:
        """Advance over `text`; stop at the first character that completes a stop string and return (its index + 1,
        the longest stop string ending there). None when no stop string completes in `text`."""
        goto, fail, out = self._goto, self._fail, self._out
        state = self._state
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if out[state] is not None:
                self._state = state
                return i + 1, out[state]
        self._state = state
        return None
