"""`XGenMMImageLoader`: image files -> `Document`s whose text is an xGen-MM caption, for text-embedding RAG.

The captions are generated in batches through the shared engine (all images of a batch are in flight together and
continuously batched), with a tqdm progress bar. Each Document keeps the image's path in `metadata["source"]`, so
a retriever hit can be sent back to the model with the question (see `examples/langchain_multimodal_rag.py`).
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document
from langchain_core.messages import HumanMessage
from PIL import Image

from xgenmm import ImageInputPolicy
from xgenmm.errors import ImageError
from xgenmm.multimodal.image_sources import load_image

from .chat_models import ChatXGenMM

__all__ = ["XGenMMImageLoader", "SkippedImage", "DEFAULT_CAPTION_PROMPT", "OCR_PROMPT", "IMAGE_EXTENSIONS"]

DEFAULT_CAPTION_PROMPT = "Describe this image in detail: the objects, the scene, any text and the colours."
OCR_PROMPT = "Read all the text in this image and write it out exactly, line by line."
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class SkippedImage:
    """A file `on_error="skip"` left out, and why (the typed error's message)."""

    source: str
    reason: str


class XGenMMImageLoader(BaseLoader):
    """Caption image files (or every image in folders) with xGen-MM.

    ```python
    loader = XGenMMImageLoader("photos/", llm=ChatXGenMM(max_tokens=128), prompt=OCR_PROMPT)
    docs = loader.load()   # Document(page_content=<caption>, metadata={"source", "width", "height", "mime_type", ...})
    ```

    The files are the user's explicit choice, so they are read here (the model's `allow_local_files` stays off) and
    checked against the model's byte / pixel limits; their bytes go to the model inline.

    A file that cannot be read or decoded (corrupt, too large) raises its `ImageError` by default; with
    `on_error="skip"` it is left out, reported on the progress bar and listed in `loader.skipped` (as `xgenmm caption`
    and LlamaIndex's `SimpleDirectoryReader` do), so one bad file does not stop a folder.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        llm: ChatXGenMM | None = None,
        prompt: str = DEFAULT_CAPTION_PROMPT,
        recursive: bool = True,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        batch_size: int = 16,
        show_progress: bool = True,
        on_error: Literal["raise", "skip"] = "raise",
        **llm_kwargs: Any,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.llm = llm if llm is not None else ChatXGenMM(**llm_kwargs)
        self.prompt = prompt
        self.recursive = recursive
        self.extensions = tuple(e.lower() for e in extensions)
        self.batch_size = max(1, int(batch_size))
        self.show_progress = show_progress
        self.on_error = on_error
        self.skipped: list[SkippedImage] = []  # filled by the last load (on_error="skip")

    # ---- files ----------------------------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """The image files to load, in a stable order (folders expanded, sorted)."""
        found: list[Path] = []
        for raw in self.paths:
            path = Path(raw).expanduser()
            if path.is_dir():
                pattern = "**/*" if self.recursive else "*"
                found.extend(sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in self.extensions))
            elif path.is_file():
                found.append(path)
            else:
                raise FileNotFoundError(f"no such image file or folder: {path}")
        return found

    def _policy(self) -> ImageInputPolicy:
        return ImageInputPolicy(allow_local_files=True, max_image_bytes=self.llm.max_image_bytes,
                                max_image_pixels=self.llm.max_image_pixels)

    def _read(self, path: Path) -> tuple[HumanMessage, dict[str, Any]]:
        image = load_image(str(path), self._policy(), what=str(path))
        data = path.read_bytes()
        Image.init()
        mime = Image.MIME.get(image.format or "", "application/octet-stream")
        message = HumanMessage(content=[
            {"type": "image", "base64": base64.b64encode(data).decode("ascii"), "mime_type": mime},
            {"type": "text", "text": self.prompt},
        ])
        width, height = _oriented_size(image)
        meta = {"source": str(path), "file_name": path.name, "width": width, "height": height, "mime_type": mime,
                "model": self.llm.model, "caption_prompt": self.prompt}
        return message, meta

    def _read_batch(self, batch: list[Path], bar: Any) -> list[tuple[HumanMessage, dict[str, Any]]]:
        prepared = []
        for path in batch:
            try:
                prepared.append(self._read(path))
            except ImageError as exc:
                if self.on_error == "raise":
                    raise
                self.skipped.append(SkippedImage(str(path), str(exc)))
                bar.write(f"unreadable, skipped: {path}: {exc}", file=sys.stderr)
                bar.update(1)
        return prepared

    def _batches(self) -> Iterator[list[Path]]:
        files = self.files()
        for start in range(0, len(files), self.batch_size):
            yield files[start:start + self.batch_size]

    def _progress(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="xgenmm captions", unit="img", disable=not self.show_progress)

    # ---- loading --------------------------------------------------------------------------------------------------
    def lazy_load(self) -> Iterator[Document]:
        batches = list(self._batches())
        self.skipped = []
        with self._progress(sum(len(b) for b in batches)) as bar:
            for batch in batches:
                prepared = self._read_batch(batch, bar)
                if not prepared:
                    continue
                captions: list[str | None] = [None] * len(prepared)
                inputs = [[message] for message, _ in prepared]
                config = {"max_concurrency": len(inputs)}
                for index, reply in self.llm.batch_as_completed(inputs, config=config):
                    captions[index] = _text(reply)
                    bar.update(1)
                for (_, meta), caption in zip(prepared, captions):
                    yield Document(page_content=caption or "", metadata=meta)

    async def alazy_load(self) -> AsyncIterator[Document]:
        batches = list(self._batches())
        self.skipped = []
        with self._progress(sum(len(b) for b in batches)) as bar:
            for batch in batches:
                prepared = self._read_batch(batch, bar)
                if not prepared:
                    continue
                replies = await self.llm.abatch([[message] for message, _ in prepared])
                bar.update(len(prepared))
                for (_, meta), reply in zip(prepared, replies):
                    yield Document(page_content=_text(reply), metadata=meta)


def _text(reply: Any) -> str:
    text = reply.text if hasattr(reply, "text") else str(reply)
    return text.strip()


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 swap the axes."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # pragma: no cover - unreadable EXIF
        orientation = 1
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
