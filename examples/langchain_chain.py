"""Drop-in LangChain chain with xGen-MM: `prompt | llm | StrOutputParser()`, text and image prompts, streaming.

    python examples/langchain_chain.py --model Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5

Without --model it runs on a tiny random checkpoint (the CI smoke test): the plumbing is real, the words are not.
"""

from __future__ import annotations

import argparse
import base64

from langchain_example_utils import IMAGES, add_model_args, model_kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--image", default=str(IMAGES / "house.png"))
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    from langchain_xgenmm import ChatXGenMM

    llm = ChatXGenMM(**model_kwargs(args), max_tokens=args.max_tokens)

    # 1. The classic text chain, unchanged from any other chat model.
    text_chain = ChatPromptTemplate.from_messages([
        ("system", "You are a concise assistant."),
        ("human", "Explain {topic} in one sentence."),
    ]) | llm | StrOutputParser()
    print("text:", repr(text_chain.invoke({"topic": "continuous batching"})))

    # 2. The same with an image: an OpenAI-style image_url part with a data URL, filled in by the template.
    with open(args.image, "rb") as handle:
        image_data = base64.b64encode(handle.read()).decode("ascii")
    vision_chain = ChatPromptTemplate.from_messages([
        ("human", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,{image_data}"}},
                   {"type": "text", "text": "{question}"}]),
    ]) | llm | StrOutputParser()
    inputs = {"image_data": image_data, "question": "What is in this picture?"}
    print("image:", repr(vision_chain.invoke(inputs)))

    # 3. Streaming through the chain: tokens arrive as the engine produces them.
    pieces = list(vision_chain.stream(inputs))
    print(f"streamed {len(pieces)} pieces:", repr("".join(pieces)))

    # 4. batch(): all questions reach the shared engine together and are decoded in one continuous batch.
    topics = ["paged attention", "prefix caching", "vision tokens"]
    for topic, answer in zip(topics, text_chain.batch([{"topic": t} for t in topics])):
        print(f"batch[{topic}]:", repr(answer))


if __name__ == "__main__":
    main()
