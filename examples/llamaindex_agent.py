"""A LlamaIndex agent on xGen-MM that uses a tool on an image.

The user shows an image and asks about it; the agent calls `image_stats` (size and average color, measured with
PIL) on that image, reads the result and answers. xGen-MM sees the image itself too.

    python examples/llamaindex_agent.py --model Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5
    python examples/llamaindex_agent.py --agent react --image examples/images/house.png

--agent function (default) uses `FunctionAgent`; its first turn is a grammar-forced call of the tool
(`initial_tool_choice`; --no-force-tool lets the model decide, which xGen-MM, not trained on tools, rarely does).
--agent react uses `ReActAgent` with `ReActConstraint`: every reply is valid ReAct text, with one tool call before the
answer. Without --model it runs on a tiny random checkpoint (the CI smoke test): the loop is real, the words are not.
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


def make_image_tool(folder: Path):
    """`image_stats(name)`: the tool may only open files of `folder`; the schema lists them (an enum)."""
    from llama_index.core.bridge.pydantic import BaseModel, Field
    from llama_index.core.tools import FunctionTool
    from PIL import Image

    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))

    class ImageStatsArgs(BaseModel):
        name: str = Field(description="file name of the image", json_schema_extra={"enum": names})

    def image_stats(name: str) -> str:
        """Measure an image: its width, height and average RGB color."""
        if name not in names:
            return f"unknown image {name!r}; known images: {names}"
        with Image.open(folder / name) as img:
            rgb = img.convert("RGB")
        mean = rgb.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))  # box filter over everything = the mean
        return f"{name}: {rgb.width}x{rgb.height} pixels, average color RGB{tuple(mean)}"

    return FunctionTool.from_defaults(fn=image_stats, fn_schema=ImageStatsArgs)


async def run(args: argparse.Namespace) -> None:
    from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.xgenmm import XGenMM

    from llamaindex_xgenmm.react import ReActConstraint

    model = args.model or random_checkpoint()
    device = args.device or (None if args.model else "cpu")
    dtype = args.dtype or (None if args.model else "float32")
    image = args.image.resolve()
    tool = make_image_tool(image.parent)

    if args.agent == "function":
        llm = XGenMM(model=model, device=device, dtype=dtype, max_tokens=args.max_tokens)
        forced = None if args.no_force_tool else tool.metadata.name
        agent = FunctionAgent(tools=[tool], llm=llm, initial_tool_choice=forced,
                              system_prompt="You answer questions about images. Use the tools to measure them.")
    else:
        constraint = ReActConstraint([tool], min_tool_calls=1, max_tool_calls=1, max_thought_chars=120,
                                     max_answer_chars=400, max_argument_tokens=32)
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
