"""Both adapters report device / dtype / model-path mistakes as the typed errors the core raises, with the remedy in
the message (at construction or, since the adapters open their engine lazily, at the first call), never torch's
`AssertionError: Torch not compiled with CUDA enabled` or a download hint for a local path."""

from __future__ import annotations

import pytest
import torch

from xgenmm import DeviceError, DtypeError, ModelNotFoundError

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

NO_CUDA = not torch.cuda.is_available()


def _langchain(**fields):
    from langchain_xgenmm import ChatXGenMM

    return ChatXGenMM(max_tokens=2, **fields).invoke("hello")


def _llamaindex(**fields):
    from llama_index.llms.xgenmm import XGenMM

    return XGenMM(max_tokens=2, **fields).complete("hello")


ADAPTERS = [pytest.param(_langchain, id="langchain"), pytest.param(_llamaindex, id="llamaindex")]
CASES = [
    pytest.param({"device": "cuda"}, DeviceError, 'has no CUDA (torch',
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"), id="cuda-without-cuda"),
    pytest.param({"device": "gpu"}, DeviceError, 'use one of "cpu", "cuda", "cuda:N"', id="unknown-device"),
    pytest.param({"device": "cpu", "dtype": "fp8"}, DtypeError, "use one of auto, float32, bfloat16, float16",
                 id="unknown-dtype"),
]


@pytest.mark.parametrize("call", ADAPTERS)
@pytest.mark.parametrize(("fields", "error", "remedy"), CASES)
def test_placement_mistakes_are_typed_with_the_remedy(tiny_checkpoint, call, fields, error, remedy):
    with pytest.raises(error) as info:
        call(model=str(tiny_checkpoint), **fields)
    assert remedy in str(info.value)


@pytest.mark.parametrize("call", ADAPTERS)
def test_a_missing_local_model_says_so(tmp_path, call):
    missing = tmp_path / "missing" / "dir"
    with pytest.raises(ModelNotFoundError) as info:
        call(model=str(missing), device="cpu")
    assert f"no model directory at {missing}" in str(info.value)
    assert "download" not in str(info.value)
