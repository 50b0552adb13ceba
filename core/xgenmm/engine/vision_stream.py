"""Vision encoding on a side CUDA stream, so SigLIP + perceiver work overlaps the decoder steps queued after it.

The engine loop is one thread and the GPU runs kernels in stream order: an image encoded right before the step that
needs it sits between two decode steps of every other request. Submitted on a side stream instead, the encoder's
kernels run concurrently with the main stream's decode steps; the step that finally consumes the tokens makes the
main stream wait on an event (no host synchronisation) and marks the tensors as used there, so the caching
allocator does not hand their memory back to the side stream too early.

On CPU (or any non-CUDA device) `submit` simply encodes now.
"""

from __future__ import annotations

from typing import Callable

import torch


class PendingImageEmbeds:
    """Vision tokens being computed on the side stream; `result()` is safe to use on the caller's stream."""

    def __init__(self, tokens: list[torch.Tensor], event: torch.cuda.Event | None = None,
                 device: torch.device | None = None):  # fmt: skip
        self._tokens = tokens
        self._event = event
        self._device = device
        self._synced_streams: set[int] = set()

    def ready(self) -> bool:
        """Whether the encoding has finished on the device (never blocks)."""
        return self._event is None or self._event.query()

    def result(self) -> list[torch.Tensor]:
        """Tokens per image; on CUDA the current stream first waits for the side stream's event."""
        if self._event is not None:
            stream = torch.cuda.current_stream(self._device)
            if stream.stream_id not in self._synced_streams:
                stream.wait_event(self._event)
                for t in self._tokens:
                    t.record_stream(stream)
                self._synced_streams.add(stream.stream_id)
        return self._tokens


class VisionStream:
    """Runs an `encode(images) -> list[Tensor]` callable on a dedicated CUDA stream (lazily created)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._stream: torch.cuda.Stream | None = None

    def submit(self, encode: Callable[[list], list[torch.Tensor]], images: list) -> PendingImageEmbeds:
        if self.device.type != "cuda":
            return PendingImageEmbeds(encode(images))
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        # No wait on the main stream: the encoder reads only its weights (never written) and the images, which
        # are copied host->device inside `encode` on this stream.
        with torch.cuda.stream(self._stream):
            tokens = encode(images)
            event = torch.cuda.Event()
            event.record(self._stream)
        return PendingImageEmbeds(tokens, event, self.device)
