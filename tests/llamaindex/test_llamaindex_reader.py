"""XGenMMImageReader: captions into ImageDocuments, batching, SimpleDirectoryReader, VectorStoreIndex round trip."""

from __future__ import annotations

import asyncio
import base64

import pytest
from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.schema import ImageDocument, ImageNode

from xgenmm.lazy_engine import EngineClients
from xgenmm.errors import ImageError

NAMES = ["blue.png", "green.png", "red.png"]


class _CountingSync:
    """Wraps the engine's sync front end and records how many conversations each `chat` call carried."""

    def __init__(self, inner):
        self.inner = inner
        self.chat_sizes: list[int] = []

    def chat(self, messages, *args, **kwargs):
        batched = isinstance(messages, list) and messages and not isinstance(messages[0], dict)
        self.chat_sizes.append(len(messages) if batched else 1)
        return self.inner.chat(messages, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def reader_llm(model_path):
    from llama_index.llms.xgenmm import XGenMM

    llm = XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=6)
    real = llm.engine_clients
    llm._lazy_engine.set(EngineClients(real.handle, _CountingSync(real.sync), real.aio))
    return llm


@pytest.fixture(scope="module")
def reader(reader_llm):
    from llama_index.readers.xgenmm import XGenMMImageReader

    return XGenMMImageReader(llm=reader_llm)


def _check_document(doc, path, reader):
    assert isinstance(doc, ImageDocument)
    assert doc.text and doc.text == doc.text.strip()
    assert doc.image_path == str(path) and doc.image_mimetype == "image/png"
    meta = doc.metadata
    assert (meta["image_width"], meta["image_height"], meta["image_mimetype"]) == (48, 32, "image/png")
    assert meta["caption_model"] == reader.llm.model and meta["caption_prompt"] == reader.prompt
    # Technical metadata stays out of the embedded text: the caption is what retrieval matches.
    assert "caption_prompt" not in doc.get_content(metadata_mode="embed")


def test_load_data_one_file(reader, image_dir):
    docs = reader.load_data(image_dir / "red.png", extra_info={"source": "test"})
    assert len(docs) == 1 and docs[0].metadata["source"] == "test"
    _check_document(docs[0], image_dir / "red.png", reader)


def test_load_data_many_files_is_one_engine_batch(reader, image_dir):
    paths = [image_dir / n for n in NAMES]
    sizes = reader.llm.engine_clients.sync.chat_sizes
    before = len(sizes)
    docs = reader.load_data(paths)
    assert sizes[before:] == [3]  # one batched call for the three images
    assert [d.image_path for d in docs] == [str(p) for p in paths]
    for doc, path in zip(docs, paths):
        _check_document(doc, path, reader)
    # Batched and single captions agree (greedy): the batch does not mix images up.
    single = reader.load_data(paths[1])[0]
    assert single.text == docs[1].text


def test_prompts_and_keep_image(reader_llm, image_dir, png):
    from llama_index.readers.xgenmm import READER_PROMPTS, XGenMMImageReader

    ocr = XGenMMImageReader(llm=reader_llm, task="ocr")
    assert ocr.load_data(image_dir / "red.png")[0].metadata["caption_prompt"] == READER_PROMPTS["ocr"]
    custom = XGenMMImageReader(llm=reader_llm, prompt="Is there a cat?", keep_image=True)
    doc = custom.load_data(image_dir / "red.png")[0]
    assert doc.metadata["caption_prompt"] == "Is there a cat?"
    assert base64.b64decode(doc.image) == png and doc.metadata["image_path"] == str(image_dir / "red.png")
    with pytest.raises(ValueError, match="unknown task"):
        XGenMMImageReader(llm=reader_llm, task="poetry")


def test_non_local_filesystem_keeps_the_bytes(reader, png):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/li-test/red.png", png)
    doc = reader.load_data("/li-test/red.png", fs=fs)[0]
    assert doc.image_path is None and base64.b64decode(doc.image) == png


def test_unreadable_file_is_a_clear_error(reader, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is truncated")
    with pytest.raises(ImageError, match="broken.png"):
        reader.load_data(bad)
    with pytest.raises(ImageError, match="cannot read it"):
        reader.load_data(tmp_path / "missing.png")
    with pytest.raises(Exception, match="Error loading file") as info:
        SimpleDirectoryReader(input_files=[bad], file_extractor={".png": reader}, raise_on_error=True).load_data()
    assert isinstance(info.value.__cause__, ImageError) and "broken.png" in str(info.value.__cause__)


def test_simple_directory_reader_sync_and_async(reader, image_dir):
    sdr = SimpleDirectoryReader(str(image_dir), file_extractor={".png": reader})
    docs = sdr.load_data()
    assert sorted(d.metadata["file_name"] for d in docs) == NAMES
    for doc in docs:
        _check_document(doc, image_dir / doc.metadata["file_name"], reader)
        assert doc.metadata["file_path"] == str(image_dir / doc.metadata["file_name"])
    async_docs = asyncio.run(sdr.aload_data())  # concurrent captions on the async engine
    assert {d.metadata["file_name"]: d.text for d in async_docs} == {d.metadata["file_name"]: d.text for d in docs}


def test_vector_store_index_retrieves_images_and_feeds_them_back(reader, model_path, image_dir):
    from llama_index.llms.xgenmm import XGenMM

    from llamaindex_xgenmm.embeddings import TestOnlyHashingEmbedding

    docs = SimpleDirectoryReader(str(image_dir), file_extractor={".png": reader}).load_data()
    embed = TestOnlyHashingEmbedding()
    index = VectorStoreIndex.from_documents(docs, embed_model=embed)
    target = next(d for d in docs if d.metadata["file_name"] == "green.png")
    hits = index.as_retriever(similarity_top_k=2).retrieve(target.text)
    assert len(hits) == 2 and all(isinstance(h.node, ImageNode) for h in hits)
    assert hits[0].node.image_path == str(image_dir / "green.png")  # its own caption ranks it first
    assert hits[0].node.metadata["image_width"] == 48

    llm = XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=4, allow_local_files=True)
    alone = llm.complete("Which one is green?")
    answer = llm.complete("Which one is green?", image_documents=hits)
    assert answer.text
    # Both retrieved images are in the prompt (hundreds of vision tokens each), not just their captions.
    assert answer.additional_kwargs["prompt_tokens"] > alone.additional_kwargs["prompt_tokens"] + 2 * 128
