"""A LangChain agent (`langchain.agents.create_agent`) that looks at images through `XGenMMImageQATool`.

The agent model is xGen-MM itself (tool calls are grammar-constrained, so they are always well-formed). A small
middleware makes the agent look before it answers: the first model call must call a tool, and once a tool result is
in, the model answers in prose. That keeps the loop short and deterministic even for a weak model.

    python examples/langchain_agent.py --model Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5 \\
        --question "How many bananas were sold on Monday?"

Without --model it runs on a tiny random checkpoint (the CI smoke test): the plumbing is real, the words are not.
"""

from __future__ import annotations

import argparse

from langchain_example_utils import IMAGES, add_model_args, model_kwargs  # noqa: I001


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--question", default="What does the bar chart show?")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call
    from langchain_core.messages import AIMessage, ToolMessage

    from langchain_xgenmm import ChatXGenMM, XGenMMImageQATool

    llm = ChatXGenMM(**model_kwargs(args), max_tokens=args.max_tokens)
    # A catalogue of images: the tool's `image` argument is an enum of these names, so the (grammar-constrained)
    # tool call can only name a picture that exists.
    catalogue = {p.stem: str(p) for p in sorted(IMAGES.iterdir()) if p.suffix in (".png", ".jpg")}
    tool = XGenMMImageQATool(llm=llm, images=catalogue)

    @wrap_model_call
    def look_first(request, handler):
        """Force a tool call until a tool has answered; then answer without tools."""
        looked = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if looked else "any"))

    agent = create_agent(llm, tools=[tool], middleware=[look_first],
                         system_prompt="You answer questions about images. Call the image tool with the name of the "
                                       f"right image ({', '.join(catalogue)}) and a question, then answer.")
    result = agent.invoke({"messages": [{"role": "user", "content": args.question}]})
    for message in result["messages"]:
        if isinstance(message, AIMessage) and message.tool_calls:
            for call in message.tool_calls:
                print(f"tool call: {call['name']}({call['args']})")
        elif isinstance(message, ToolMessage):
            print(f"tool result: {str(message.content)[:120]!r}")
    final = result["messages"][-1]
    print("answer:", final.text.strip() or "(empty)")


if __name__ == "__main__":
    main()
