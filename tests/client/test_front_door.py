"""The front door: every front end opens its engine through `xgenmm.client.open_engine` and nowhere else; the key
rule gives a caller the options it asked for; each image of a request is opened and decoded exactly once."""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

import xgenmm.client.front_door as front_door
import xgenmm.multimodal.image_sources as image_sources
from xgenmm import LLM, AsyncLLM, SamplingParams
from xgenmm.chat import build_chat_request
from xgenmm.client import open_engine
from xgenmm.errors import ConfigError, ImageCountMismatchError

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "core" / "xgenmm", ROOT / "langchain_xgenmm", ROOT / "llamaindex_xgenmm"]
ENGINE_BUILDERS = {"NativeEngineCore", "VllmEngineCore", "CoreLoop", "EngineHandle"}
OLD_ENTRY_POINTS = {"get_engine_loop", "create_engine_loop", "get_vllm_engine_loop", "get_engine", "EngineClient",
                    "EngineLoop", "LLMEngine"}
GREEDY_ONE = SamplingParams(temperature=0.0, max_tokens=1)


def _calls_and_names(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text(), str(path))
    called, named = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
        elif isinstance(node, ast.Name):
            named.add(node.id)
        elif isinstance(node, ast.Attribute):
            named.add(node.attr)
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            named.update(alias.name.rsplit(".", 1)[-1] for alias in node.names)
    return called, named


def test_only_the_front_door_builds_engines_and_the_old_entry_points_are_gone():
    """Source check (function-level code included): engine cores, core loops and handles are constructed in
    client/front_door.py only, and no module still names an old entry point."""
    builders, old = [], []
    for root in SOURCES:
        for path in root.rglob("*.py"):
            called, named = _calls_and_names(path)
            rel = path.relative_to(ROOT).as_posix()
            if called & ENGINE_BUILDERS and rel != "core/xgenmm/client/front_door.py":
                builders.append((rel, sorted(called & ENGINE_BUILDERS)))
            if named & OLD_ENTRY_POINTS:
                old.append((rel, sorted(named & OLD_ENTRY_POINTS)))
    assert builders == []
    assert old == []


@pytest.fixture
def builds(monkeypatch):
    """Every engine the front door builds, as (backend, model dir, device, dtype, options key)."""
    built: list[tuple] = []
    real = front_door._build

    def recording(backend, model, model_dir, placement, options, key):
        built.append((backend, str(model_dir), str(placement.device), str(placement.dtype), dict(options)))
        return real(backend, model, model_dir, placement, options, key)

    monkeypatch.setattr(front_door, "_build", recording)
    return built


def test_key_rule_shares_equal_requests_and_honours_options(tiny_checkpoint, builds):
    a = open_engine("native", str(tiny_checkpoint), "cpu", "float32", max_num_seqs=3)
    b = open_engine("native", tiny_checkpoint, "cpu", "fp32", max_num_seqs=3)  # same after resolution
    c = open_engine("native", str(tiny_checkpoint), "cpu", "float32", max_num_seqs=4)  # other options: other engine
    private = open_engine("native", str(tiny_checkpoint), "cpu", "float32", max_num_seqs=3, shared=False)
    try:
        assert a is b and c is not a and private is not a
        assert a.core.max_num_seqs == 3 and c.core.max_num_seqs == 4  # each caller got what it asked for
        assert a.key in front_door.open_engine_keys() and private.key is None
        assert len(builds) == 3
    finally:
        private.shutdown()
        c.shutdown()


def test_every_front_end_opens_its_engine_through_the_front_door(tiny_checkpoint, builds, tmp_path, monkeypatch):
    """Each front end asks for an engine nobody opened yet (its own `max_num_seqs`), so the front door must build
    it: the recorded builds show every front end arrived there."""
    from langchain_xgenmm import ChatXGenMM
    from llama_index.llms.xgenmm import XGenMM

    from xgenmm.cli.main import main
    from xgenmm.server import BackgroundServer, ServerConfig

    ckpt = str(tiny_checkpoint)

    def opened_by(name: str, seqs: int, run) -> None:
        before = len(builds)
        run()
        assert [b[4].get("max_num_seqs") for b in builds[before:]] == [seqs], name

    opened_by("LLM", 11, lambda: LLM(ckpt, device="cpu", dtype="float32", max_num_seqs=11).chat(
        [{"role": "user", "content": "hi"}], GREEDY_ONE))
    opened_by("AsyncLLM", 12, lambda: AsyncLLM(ckpt, device="cpu", dtype="float32", max_num_seqs=12))

    def serve() -> None:
        config = ServerConfig(model=ckpt, device="cpu", dtype="float32", port=0, api_key="",
                              engine_options={"max_num_seqs": 13})
        with BackgroundServer(config) as server:
            assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200

    opened_by("server", 13, serve)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    opened_by("cli", 14, lambda: main(["chat", "--model", ckpt, "--device", "cpu", "--dtype", "float32",
                                       "--max-num-seqs", "14", "--max-tokens", "1", "hi"]))
    opened_by("langchain", 15, lambda: ChatXGenMM(model=ckpt, device="cpu", dtype="float32", max_tokens=1,
                                                  engine_options={"max_num_seqs": 15}).invoke("hi"))
    opened_by("llamaindex", 16, lambda: XGenMM(model=ckpt, device="cpu", dtype="float32", max_tokens=1,
                                               engine_options={"max_num_seqs": 16}).complete("hi"))
    assert {b[1:4] for b in builds} == {(str(Path(ckpt).resolve()), "cpu", "torch.float32")}
    # The vLLM backend's client code goes through the same door: without vLLM it fails there, typed, for both
    # the front door and the clients.
    vllm_installed = True
    try:
        import vllm  # noqa: F401
    except ImportError:
        vllm_installed = False
    if not vllm_installed:
        with pytest.raises(ConfigError, match="needs vLLM"):
            open_engine("vllm", ckpt)
        with pytest.raises(ConfigError, match="needs vLLM"):
            LLM(ckpt, backend="vllm")
        with pytest.raises(ConfigError, match="needs vLLM"):
            ChatXGenMM(model=ckpt, backend="vllm").invoke("hi")
    assert len(builds) == 6
    with pytest.raises(ConfigError, match="unknown engine backend"):
        open_engine("tensorrt", ckpt)


# ---- each image opened once -------------------------------------------------------------------------------------


def _png(color: str, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_counts(monkeypatch):
    """How many times each image's bytes are opened (`PIL.Image.open`) and its pixels decoded."""
    counts = {"open": 0, "decode": 0}
    real_open, real_load = Image.open, image_sources._load_pixels

    def counting_open(*args, **kwargs):
        counts["open"] += 1
        return real_open(*args, **kwargs)

    def counting_load(image, what):
        counts["decode"] += 1
        return real_load(image, what)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(image_sources, "_load_pixels", counting_load)
    return counts


def _two_image_messages() -> list[dict]:
    urls = ["data:image/png;base64," + base64.b64encode(_png(c)).decode() for c in ("red", "blue")]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[0]}},
                                         {"type": "image_url", "image_url": {"url": urls[1]}},
                                         {"type": "text", "text": "Compare them."}]}]


def test_each_image_of_a_request_is_opened_and_decoded_once(tiny_checkpoint, image_counts):
    ckpt = str(tiny_checkpoint)
    llm = LLM(ckpt, device="cpu", dtype="float32")

    def check(run, images: int = 2) -> None:
        image_counts.update(open=0, decode=0)
        run()
        assert image_counts == {"open": images, "decode": images}

    check(lambda: llm.chat(_two_image_messages(), GREEDY_ONE))
    check(lambda: llm.chat(build_chat_request(_two_image_messages(), sampling=GREEDY_ONE)))
    check(lambda: list(llm.chat_stream(_two_image_messages(), GREEDY_ONE)))
    check(lambda: llm.generate({"prompt": "<image> and <image>", "multi_modal_data": {"image": [_png("red"),
                                                                                               _png("blue")]}},
                               GREEDY_ONE))

    async def async_chat():
        return [o async for o in AsyncLLM(ckpt, device="cpu", dtype="float32").chat(_two_image_messages(), GREEDY_ONE)]

    check(lambda: asyncio.run(async_chat()))
    # A count mismatch is found once, before any pixel is decoded.
    image_counts.update(open=0, decode=0)
    with pytest.raises(ImageCountMismatchError):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [_png("red"), _png("blue")]}}, GREEDY_ONE)
    assert image_counts["decode"] == 0


def test_each_image_is_opened_once_through_the_server_and_both_adapters(tiny_checkpoint, image_counts):
    from langchain_core.messages import HumanMessage
    from langchain_xgenmm import ChatXGenMM
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.xgenmm import XGenMM

    from xgenmm.server import BackgroundServer, ServerConfig

    ckpt = str(tiny_checkpoint)
    messages = _two_image_messages()
    config = ServerConfig(model=ckpt, served_model_name="tiny", device="cpu", dtype="float32", port=0, api_key="")
    with BackgroundServer(config) as server:
        image_counts.update(open=0, decode=0)
        reply = httpx.post(f"{server.base_url}/v1/chat/completions",
                           json={"model": "tiny", "messages": messages, "max_tokens": 1}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert image_counts == {"open": 2, "decode": 2}

    image_counts.update(open=0, decode=0)
    lc = ChatXGenMM(model=ckpt, device="cpu", dtype="float32", max_tokens=1)
    lc.invoke([HumanMessage(content=messages[0]["content"])])
    assert image_counts == {"open": 2, "decode": 2}

    image_counts.update(open=0, decode=0)
    li = XGenMM(model=ckpt, device="cpu", dtype="float32", max_tokens=1)
    li.chat([ChatMessage(role="user", blocks=[ImageBlock(image=_png("red")), ImageBlock(image=_png("blue")),
                                              TextBlock(text="Compare them.")])])
    assert image_counts == {"open": 2, "decode": 2}


def test_both_engine_cores_implement_the_one_protocol(tiny_checkpoint):
    """add / step / abort / stats (+ has_unfinished, fail, input_spec): the native core and the vLLM core (importable
    without vLLM) offer the same protocol, and the native one tells its client it wants tiles."""
    from xgenmm.backends.vllm_backend import VllmEngineCore
    from xgenmm.engine.core_loop import EngineCore
    from xgenmm.engine.native_core import NativeEngineCore

    protocol = {n for n in vars(EngineCore) if not n.startswith("_")}
    assert {"add", "step", "abort", "stats", "has_unfinished", "fail", "input_spec"} <= protocol
    for core in (NativeEngineCore, VllmEngineCore):
        assert protocol <= set(dir(core)), (core.__name__, sorted(protocol - set(dir(core))))
    handle = open_engine("native", str(tiny_checkpoint), "cpu", "float32")
    spec = handle.core.input_spec
    assert spec.tiles_images and spec.max_model_len == handle.max_model_len == 4096


def test_tools_are_validated_once_per_request(tiny_checkpoint, monkeypatch):
    """build_chat_request validates the tools; the tool-choice resolver, the grammar builder, the prompt renderer and
    the reply parser reuse the validated list instead of checking it again."""
    from xgenmm.chat import chat_choice
    from xgenmm.tool_calls import choice

    validations = []

    class CountingTools(choice.NormalizedTools):
        def __init__(self, *args):
            validations.append(1)
            super().__init__(*args)

    monkeypatch.setattr(choice, "NormalizedTools", CountingTools)
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {
                                                   "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    request = build_chat_request([{"role": "user", "content": "1 + 2?"}], tools=tools, tool_choice="required",
                                 sampling={"temperature": 0, "max_tokens": 64})
    out = LLM(str(tiny_checkpoint), device="cpu", dtype="float32").chat(request)[0]
    reply = chat_choice(out.outputs[0], request.tools)
    assert [c.name for c in reply.tool_calls] == ["add"]  # the forced call, parsed against the validated tools
    assert len(validations) == 1


def test_a_grammar_is_compiled_once_per_request(tiny_checkpoint, monkeypatch):
    """The client compiles the request's grammar once; each of the n samples gets its own matcher from it."""
    from xgenmm.sampling_params import StructuredOutputsParams
    from xgenmm.structured import CompiledGrammar, GrammarCompiler

    compiled, matchers = [], []
    real_compile, real_matcher = GrammarCompiler.compile_grammar, CompiledGrammar.matcher
    monkeypatch.setattr(GrammarCompiler, "compile_grammar",
                        lambda self, params: compiled.append(params) or real_compile(self, params))
    monkeypatch.setattr(CompiledGrammar, "matcher", lambda self: matchers.append(self) or real_matcher(self))
    params = SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]))
    out = LLM(str(tiny_checkpoint), device="cpu", dtype="float32").generate("Answer:", params)[0]
    assert {o.text for o in out.outputs} <= {"yes", "no", "maybe"} and len(out.outputs) == 3
    assert len(compiled) == 1 and len(matchers) == 3 and len({id(m) for m in matchers}) == 1
