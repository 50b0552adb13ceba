"""Wall time per stage of a model's forward, from forward hooks: each tracked module's EXCLUSIVE time (its own time
less that of the tracked modules it calls), summed per category, so nested stages never count twice.

CPU work is synchronous, so a hook's clock brackets the module's work. The hooks cost a few microseconds per call;
they are installed only for the measured request (`enabled`), and inside torch.compile'd code they are left out (a
compiled graph is timed as one piece around it).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from torch import nn


class StageTimer:
    def __init__(self):
        self.enabled = False
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.rows: dict[str, list[int]] = defaultdict(list)
        self._local = threading.local()  # one stack per thread: image tiling runs on the caller's, the model on the engine's
        self._handles = []

    @property
    def _stack(self) -> list[list]:  # [category, start, child time] per open call
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def track(self, module: nn.Module, category: str, record_rows: bool = False) -> None:
        """Time `module`'s forward calls under `category` (exclusive of tracked modules inside it)."""

        def pre(mod, args, kwargs):
            if self.enabled:
                self._open(category)
                first = args[0] if args else next(iter(kwargs.values()), None)
                if record_rows and hasattr(first, "shape"):
                    self.rows[category].append(int(first.shape[0]))

        def post(mod, args, out):
            if self.enabled and self._stack and self._stack[-1][0] == category:
                self._close()

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post))

    def track_method(self, owner, name: str, category: str) -> None:
        """Time a plain method (`owner.name`, e.g. a model's `compute_logits`) the same way, by wrapping it."""
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            return self._timed_call(category, method, args, kwargs)

        setattr(owner, name, timed)

    def track_callable(self, owner, name: str, category: str) -> None:
        """Time calls of a callable attribute (`owner.name(...)`, e.g. the native sampler object) through a proxy that
        passes every other attribute through."""
        timer, inner = self, getattr(owner, name)

        class Timed:
            def __call__(self, *args, **kwargs):
                return timer._timed_call(category, inner, args, kwargs)

            def __getattr__(self, attr):
                return getattr(inner, attr)

        setattr(owner, name, Timed())

    def _timed_call(self, category, fn, args, kwargs):
        if not self.enabled:
            return fn(*args, **kwargs)
        self._open(category)
        try:
            return fn(*args, **kwargs)
        finally:
            self._close()

    def _open(self, category: str) -> None:
        self._stack.append([category, time.perf_counter(), 0.0])

    def _close(self) -> None:
        """End the innermost open call: its exclusive time to its category, its total to its parent's children."""
        cat, start, children = self._stack.pop()
        total = time.perf_counter() - start
        self.exclusive[cat] += total - children
        self.calls[cat] += 1
        if self._stack:
            self._stack[-1][2] += total

    def track_inside(self, root: nn.Module, prefix: str) -> None:
        """Split `root` by kind: linears, attention (the attention modules less their projections: rotary + the
        attention kernel), norms; what is left of `root` is `prefix.other`."""
        for _, mod in root.named_modules():
            if mod is root:
                continue
            kind = type(mod).__name__
            if isinstance(mod, nn.Linear) or (kind.endswith("Linear") and not list(mod.children())):
                self.track(mod, f"{prefix}.linears")
            elif kind.endswith("Attention"):
                self.track(mod, f"{prefix}.attention")
            elif "Norm" in kind:
                self.track(mod, f"{prefix}.norms")

    def reset(self) -> None:
        self.exclusive.clear()
        self.calls.clear()
        self.rows.clear()
        self._local = threading.local()
