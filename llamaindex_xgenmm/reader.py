"""`XGenMMImageReader`: image files -> `ImageDocument`s whose text is what xGen-MM says about them.

Caption-based multimodal RAG with a plain `VectorStoreIndex`: the caption (or OCR text, or the answer to your own
question) is embedded like any text, and retrieval returns `ImageNode`s that still point at the image
(`image_path`), ready to hand back to `XGenMM` as images. Several files go through the engine as one batch
(`load_data([...])`), and `aload_data` calls run concurrently on the async engine, so
`SimpleDirectoryReader(..., file_extractor={".png": reader}).aload_data()` captions a folder in one continuous batch.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import Document, ImageDocument
from PIL import Image

from xgenmm.errors import ImageError
from xgenmm.multimodal.image_sources import ImageInputPolicy, load_image

from .base import XGenMM

__all__ = ["XGenMMImageReader", "READER_PROMPTS"]

READER_PROMPTS: dict[str, str] = {
    "caption": "Describe this image in detail.",
    "ocr": "Read all the text in this image. Reply with the text only.",
}
# Metadata the reader adds; kept out of the embedded and LLM-facing text (the caption is what should be embedded).
_OWN_METADATA = ("image_path", "image_mimetype", "image_width", "image_height", "caption_model", "caption_prompt")

FileInput = Union[str, os.PathLike]


@dataclass(frozen=True)
class _LoadedImage:
    file: str
    data: bytes
    mimetype: str | None
    width: int
    height: int
    local: bool


class XGenMMImageReader(BaseReader):
    """Read image files into `ImageDocument`s captioned by xGen-MM.

    Args:
        llm: the `XGenMM` to use; by default one is built from `llm_kwargs` (model, device, dtype, max_tokens...).
        task: "caption" (default) or "ocr": picks a built-in prompt.
        prompt: your own instruction or question about each image (overrides `task`).
        keep_image: also store the image bytes (base64) in the document, not only its path. Files read through a
            non-local fsspec filesystem always keep their bytes, since their path cannot be opened locally.
        batch_size: how many images go to the engine at once in `load_data([...])`.
    """

    def __init__(self, llm: Optional[XGenMM] = None, *, task: str = "caption", prompt: Optional[str] = None,
                 keep_image: bool = False, batch_size: int = 32, **llm_kwargs: Any) -> None:
        if prompt is None:
            if task not in READER_PROMPTS:
                raise ValueError(f"unknown task {task!r}; expected one of {sorted(READER_PROMPTS)} or a prompt=")
            prompt = READER_PROMPTS[task]
        if llm is not None and llm_kwargs:
            raise ValueError(f"pass either llm= or XGenMM options, not both (got {sorted(llm_kwargs)})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.llm = llm if llm is not None else XGenMM(**llm_kwargs)
        self.prompt = prompt
        self.keep_image = keep_image
        self.batch_size = batch_size

    # ---- sync ------------------------------------------------------------------------------------------------------
    def lazy_load_data(self, file: Union[FileInput, Sequence[FileInput]], extra_info: Optional[Any] = None,
                       fs: Optional[Any] = None) -> Iterator[Document]:
        """One `ImageDocument` per file; a list of files is captioned `batch_size` at a time in one engine batch.
        `extra_info` is a metadata dict (or one dict per file) as `SimpleDirectoryReader` passes it."""
        files, infos = _files_and_infos(file, extra_info)
        for start in range(0, len(files), self.batch_size):
            chunk = files[start:start + self.batch_size]
            images = [self._read(f, fs) for f in chunk]
            responses = self.llm.chat_batch([self._messages(img) for img in images])
            for img, info, response in zip(images, infos[start:start + self.batch_size], responses):
                yield self._document(img, response.message.content or "", info)

    def load_data(self, file: Union[FileInput, Sequence[FileInput]], extra_info: Optional[Any] = None,
                  fs: Optional[Any] = None) -> list[Document]:
        return list(self.lazy_load_data(file, extra_info=extra_info, fs=fs))

    # ---- async -----------------------------------------------------------------------------------------------------
    async def aload_data(self, file: Union[FileInput, Sequence[FileInput]], extra_info: Optional[Any] = None,
                         fs: Optional[Any] = None) -> list[Document]:
        """Concurrent captions on the async engine (they batch with every other request in flight)."""
        files, infos = _files_and_infos(file, extra_info)
        return list(await asyncio.gather(*(self._aload_one(f, i, fs) for f, i in zip(files, infos))))

    async def alazy_load_data(self, file: Union[FileInput, Sequence[FileInput]], extra_info: Optional[Any] = None,
                              fs: Optional[Any] = None) -> list[Document]:
        return await self.aload_data(file, extra_info=extra_info, fs=fs)

    async def _aload_one(self, file: FileInput, info: dict[str, Any], fs: Optional[Any]) -> Document:
        image = await asyncio.to_thread(self._read, file, fs)
        response = await self.llm.achat(self._messages(image))
        return self._document(image, response.message.content or "", info)

    # ---- pieces ----------------------------------------------------------------------------------------------------
    def _read(self, file: FileInput, fs: Optional[Any]) -> _LoadedImage:
        """Read and fully decode one file (so a corrupt image fails here, naming the file)."""
        name = os.fspath(file)
        local = fs is None or _is_local_fs(fs)
        try:
            if fs is None:
                with open(name, "rb") as handle:
                    data = handle.read()
            else:
                with fs.open(name, "rb") as handle:
                    data = handle.read()
        except OSError as exc:
            raise ImageError(f"image file {name}: cannot read it: {exc}") from exc
        policy = ImageInputPolicy(max_image_bytes=self.llm.max_image_bytes)
        image = load_image(data, policy, what=f"image file {name}")
        Image.init()
        mimetype = Image.MIME.get(image.format or "")
        return _LoadedImage(name, data, mimetype, image.width, image.height, local)

    def _messages(self, image: _LoadedImage) -> list[ChatMessage]:
        block = ImageBlock(image=image.data, image_mimetype=image.mimetype)
        return [ChatMessage(role=MessageRole.USER, blocks=[block, TextBlock(text=self.prompt)])]

    def _document(self, image: _LoadedImage, caption: str, info: dict[str, Any]) -> ImageDocument:
        metadata = {
            **info,
            "image_path": image.file,
            "image_mimetype": image.mimetype,
            "image_width": image.width,
            "image_height": image.height,
            "caption_model": self.llm.model,
            "caption_prompt": self.prompt,
        }
        keep_bytes = self.keep_image or not image.local
        return ImageDocument(
            text=caption.strip(),
            image=base64.b64encode(image.data).decode("ascii") if keep_bytes else None,
            image_path=None if keep_bytes else image.file,
            image_mimetype=image.mimetype,
            metadata=metadata,
            excluded_embed_metadata_keys=list(_OWN_METADATA),
            excluded_llm_metadata_keys=list(_OWN_METADATA),
        )


def _files_and_infos(file: Any, extra_info: Any) -> tuple[list[FileInput], list[dict[str, Any]]]:
    files: list[FileInput] = [file] if isinstance(file, (str, os.PathLike)) else list(file)
    if extra_info is None:
        infos: list[dict[str, Any]] = [{} for _ in files]
    elif isinstance(extra_info, dict):
        infos = [dict(extra_info) for _ in files]
    else:
        infos = [dict(i or {}) for i in extra_info]
        if len(infos) != len(files):
            raise ValueError(f"got {len(infos)} extra_info dicts for {len(files)} files")
    return files, infos


def _is_local_fs(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", None)
    protocols: Iterable[str] = (protocol,) if isinstance(protocol, str) else (protocol or ())
    return any(p in ("file", "local") for p in protocols)
