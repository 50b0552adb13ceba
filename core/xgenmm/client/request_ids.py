"""Request ids for requests whose caller gave none (process-wide counter, one prefix per entry point)."""

from __future__ import annotations

import itertools

__all__ = ["new_request_id"]

_counter = itertools.count()


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_counter)}"
