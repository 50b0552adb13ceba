"""A LlamaIndex agent on xGen-MM that uses a tool on an image.

The user shows an image and asks about it; the agent calls `image_stats` (size and average color, measured with
PIL) on that image, reads the result and answers. xGen-MM sees the image itself too.

    python examples/llamaindex_agent.py --model Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5
    python examples/llamaindex_agent.py --agent react --image examples/images/house.png

--agent function (default) uses `FunctionAgent`; its first turn is a grammar-forced call of the tool
(`initial_tool_choice`; --no-force-tool lets the model decide, which xGen-MM, not trained on tools, rarely does).
--agent react uses `ReActAgent` with `ReActConstraint`: every reply is valid ReAct text that fits --max-tokens, with one
tool call before the answer. Without --model it runs on a tiny random checkpoint (the CI smoke test): the loop is real, the words are not.
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF id or local checkpoint (default: a tiny random checkpoint)")
    parser.add_argument("--image", type=Path, default=IMAGES / "stop_sign.jpg")
    parser.add_argument("--question", default="How large is this image and what is its average color?")
    parser.add_argument("--agent", choices=("function", "react"), default="function")
    parser.add_argument("--no-force-tool", action="store_true", help="FunctionAgent: do not force the first call")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-tokens", type=int, default=256)
    return parser.parse_args()


def random_checkpoint() -> str:
    from xgenmm.testing import make_random_checkpoint

    root = Path(tempfile.mkdtemp(prefix="xgenmm-random-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    print(f"[no --model: using a tiny RANDOM checkpoint in {root}; expect gibberish text]")
    return str(make_random_checkpoint(root / "tiny", preset="tiny", seed=0))


def make_image_tool(image: Path):
    """`image_stats()`: measures the image the user showed (the only file the tool may open). It takes no arguments,
    so a tool call costs only its name: the ReAct step fits even a small `--max-tokens`."""
    from llama_index.core.tools import FunctionTool
    from PIL import Image

    def image_stats() -> str:
        """Measure the image the user showed: its width, height and average RGB color."""
        with Image.open(image) as img:
            rgb = img.convert("RGB")
        mean = rgb.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))  # box filter over everything = the mean
        return f"{image.name}: {rgb.width}x{rgb.height} pixels, average color RGB{tuple(mean)}"

    return FunctionTool.from_defaults(fn=image_stats)


async def run(args: argparse.Namespace) -> None:
    from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.xgenmm import XGenMM

    from llamaindex_xgenmm.react import ReActConstraint

    model = args.model or random_checkpoint()
    device = args.device or (None if args.model else "cpu")
    dtype = args.dtype or (None if args.model else "float32")
    image = args.image.resolve()
    tool = make_image_tool(image)

    if args.agent == "function":
        llm = XGenMM(model=model, device=device, dtype=dtype, max_tokens=args.max_tokens)
        forced = None if args.no_force_tool else tool.metadata.name
        agent = FunctionAgent(tools=[tool], llm=llm, initial_tool_choice=forced,
                              system_prompt="You answer questions about images. Use the tools to measure them.")
    else:
        # Thought, argument and answer limits come from max_tokens: every reply fits, so every reply parses.
        constraint = ReActConstraint([tool], min_tool_calls=1, max_tool_calls=1)
        llm = XGenMM(model=model, device=device, dtype=dtype, max_tokens=args.max_tokens, structured_outputs=constraint)
        agent = ReActAgent(tools=[tool], llm=llm)

    # The image goes in as bytes: no local-file permission is needed for the model to see it.
    question = ChatMessage(role="user", blocks=[
        ImageBlock(image=image.read_bytes()),
        TextBlock(text=f"This is {image.name}. {args.question}"),
    ])
    handler = agent.run(user_msg=question, max_iterations=6)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            print(f"tool call: {event.tool_name}({event.tool_kwargs}) -> {event.tool_output.content}")
    result = await handler
    print(f"answer: {result.response.content}")


def main() -> None:
    asyncio.run(run(parse_args()))


if __name__ == "__main__":
    main()
