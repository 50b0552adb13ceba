"""Multimodal RAG with LlamaIndex and xGen-MM, fully local.

A folder of images -> `XGenMMImageReader` captions each one (one engine batch) -> sentence embeddings
(`HuggingFaceEmbedding` from llama-index-embeddings-huggingface, all-MiniLM-L6-v2, downloaded once) -> a plain
`VectorStoreIndex` -> the question retrieves `ImageNode`s -> xGen-MM answers looking at the retrieved images.

    python examples/llamaindex_multimodal_rag.py --model Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5 \\
        --question "Which picture shows a traffic sign?"

Without --model it runs on a tiny random checkpoint with the TEST-ONLY hashing embedding (the CI smoke test,
offline): the plumbing is real, the words are not. Needs: pip install ".[llamaindex,rag]" (README "Install").
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMAGES = Path(__file__).parent / "images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
TEST_ONLY = "test-only-hashing"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF id or local checkpoint (default: a tiny random checkpoint)")
    parser.add_argument("--images", type=Path, default=IMAGES, help="folder of images to index")
    parser.add_argument("--question", default="Which picture shows a traffic sign?")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--caption-tokens", type=int, default=96, help="max tokens per caption")
    parser.add_argument("--max-tokens", type=int, default=256, help="max tokens of the answer")
    parser.add_argument("--embedding", default=None, help="Hugging Face embedding model (default: "
                        f"sentence-transformers/all-MiniLM-L6-v2 with --model, else {TEST_ONLY!r})")
    args = parser.parse_args()
    if args.embedding is None:
        args.embedding = "sentence-transformers/all-MiniLM-L6-v2" if args.model else TEST_ONLY
    return args


def embed_model(name: str):
    """LlamaIndex's own HuggingFaceEmbedding by name, or the TEST-ONLY hashing embedding."""
    if name == TEST_ONLY:
        from llamaindex_xgenmm.embeddings import TestOnlyHashingEmbedding

        print("[embedding: the TEST-ONLY hashing embedding (no model, no meaning); use --embedding for a real one]")
        return TestOnlyHashingEmbedding()
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=name)


def random_checkpoint() -> str:
    from xgenmm.testing import make_random_checkpoint

    root = Path(tempfile.mkdtemp(prefix="xgenmm-random-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = root / "tiny"
    print(f"[no --model: using a tiny RANDOM checkpoint in {folder}; expect gibberish text]")
    return str(make_random_checkpoint(folder, preset="tiny", seed=0))


def main() -> None:
    args = parse_args()
    from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.xgenmm import XGenMM
    from llama_index.readers.xgenmm import XGenMMImageReader

    model = args.model or random_checkpoint()
    device = args.device or (None if args.model else "cpu")
    dtype = args.dtype or (None if args.model else "float32")
    folder = args.images.resolve()

    # 1. Caption every image. aload_data() runs the files concurrently, so the captions share one continuous batch.
    captioner = XGenMM(model=model, device=device, dtype=dtype, max_tokens=args.caption_tokens)
    reader = XGenMMImageReader(llm=captioner, task="caption")
    directory = SimpleDirectoryReader(str(folder), file_extractor={s: reader for s in IMAGE_SUFFIXES})
    documents = asyncio.run(directory.aload_data())
    for doc in documents:
        print(f"caption {doc.metadata['file_name']} ({doc.metadata['image_width']}x{doc.metadata['image_height']}):"
              f" {doc.text[:100]!r}")

    # 2. Index the captions with the embedding model.
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model(args.embedding))

    # 3. Retrieve images for the question; the nodes still point at the image files.
    hits = index.as_retriever(similarity_top_k=args.top_k).retrieve(args.question)
    for hit in hits:
        print(f"retrieved {Path(hit.node.image_path).name} score={hit.score:.3f}")

    # 4. Answer with the retrieved images themselves in the prompt (captions only helped to find them). This LLM
    #    may read local files, but only inside the image folder. Same weights -> same shared engine as the captioner.
    llm = XGenMM(model=model, device=device, dtype=dtype, max_tokens=args.max_tokens,
                 allow_local_files=True, local_file_roots=[str(folder)])
    blocks = [ImageBlock(path=hit.node.image_path) for hit in hits]
    blocks.append(TextBlock(text=args.question))
    response = llm.chat([ChatMessage(role="user", blocks=blocks)])
    usage = response.additional_kwargs
    print(f"question: {args.question}")
    print(f"answer: {response.message.content}")
    print(f"usage: prompt={usage['prompt_tokens']} completion={usage['completion_tokens']} "
          f"cached={usage['cached_tokens']}")


if __name__ == "__main__":
    main()
