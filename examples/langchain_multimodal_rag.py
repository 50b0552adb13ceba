"""Multimodal RAG with LangChain and xGen-MM, fully local.

A folder of images -> `XGenMMImageLoader` captions them (one engine batch) -> sentence embeddings
(sentence-transformers' all-MiniLM-L6-v2, downloaded once; `pip install ".[langchain,rag]"`) ->
`InMemoryVectorStore` -> the question retrieves the best-matching captions -> xGen-MM answers while looking at the
retrieved images themselves.

    python examples/langchain_multimodal_rag.py --model Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5 \\
        --question "Which picture shows a traffic sign?"

Without --model it runs on a tiny random checkpoint with the TEST-ONLY hashing embedding (the CI smoke test,
offline): the plumbing is real, the words are not. --embedding picks the embedding model either way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from langchain_example_utils import IMAGES, add_model_args, image_block, model_kwargs


TEST_ONLY = "test-only-hashing"


def embeddings(name: str):
    """The embedding model: a sentence-transformers model by name, or the TEST-ONLY hashing embedding."""
    if name == TEST_ONLY:
        from langchain_xgenmm.embeddings import TestOnlyHashingEmbeddings

        print("[embedding: the TEST-ONLY hashing embedding (no model, no meaning); use --embedding for a real one]")
        return TestOnlyHashingEmbeddings()
    from langchain_xgenmm.embeddings import SentenceTransformerEmbeddings

    return SentenceTransformerEmbeddings(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--images", type=Path, default=IMAGES, help="folder of images to index")
    parser.add_argument("--question", default="Which picture shows a traffic sign?")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--caption-tokens", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--embedding", default=None, help="sentence-transformers model (default: all-MiniLM-L6-v2 "
                        f"with --model, else {TEST_ONLY!r})")
    args = parser.parse_args()
    if args.embedding is None:
        args.embedding = "sentence-transformers/all-MiniLM-L6-v2" if args.model else TEST_ONLY

    from langchain_core.messages import HumanMessage
    from langchain_core.vectorstores import InMemoryVectorStore

    from langchain_xgenmm import ChatXGenMM, XGenMMImageLoader

    llm = ChatXGenMM(**model_kwargs(args), max_tokens=args.max_tokens)

    # 1. Caption every image (batched through the shared engine, with a progress bar).
    captioner = llm.model_copy(update={"max_tokens": args.caption_tokens})
    documents = XGenMMImageLoader(args.images, llm=captioner).load()
    for doc in documents:
        meta = doc.metadata
        print(f"caption {meta['file_name']} ({meta['width']}x{meta['height']}, {meta['mime_type']}): "
              f"{doc.page_content[:100]!r}")

    # 2. Index the captions with the embedding model.
    store = InMemoryVectorStore.from_documents(documents, embeddings(args.embedding))

    # 3. Retrieve; each hit still names its image file.
    hits = store.similarity_search_with_score(args.question, k=args.top_k)
    for doc, score in hits:
        print(f"retrieved {doc.metadata['file_name']} score={score:.3f}")

    # 4. Answer with the retrieved images themselves in the prompt (not just their captions).
    content = [image_block(Path(doc.metadata["source"])) for doc, _ in hits]
    context = "\n".join(f"Image {i + 1} ({doc.metadata['file_name']}): {doc.page_content}" for i, (doc, _) in enumerate(hits))
    content.append({"type": "text", "text": f"Captions:\n{context}\n\nQuestion: {args.question}"})
    answer = llm.invoke([HumanMessage(content=content)])
    usage = answer.usage_metadata
    print(f"usage: prompt={usage['input_tokens']} completion={usage['output_tokens']} "
          f"cached={usage['input_token_details']['cache_read']}")
    print("answer:", answer.text.strip() or "(empty)")


if __name__ == "__main__":
    main()
