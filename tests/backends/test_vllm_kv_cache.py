"""The vLLM backend's CPU KV default is sized from the model (no vLLM needed: pure arithmetic on config.json): at
full geometry it holds at least one full-context sequence, which the old fixed 1 GiB did not (vLLM refused to start:
"To serve at least one request with the model's max seq len (4096), 1.5 GiB KV cache is needed")."""

from __future__ import annotations

import pytest
import torch

from xgenmm.backends.vllm_kv_cache import VLLM_BLOCK_SIZE, vllm_cpu_kv_cache_bytes
from xgenmm.model.config import XGenMMConfig
from xgenmm.testing import make_random_checkpoint

OLD_FIXED_DEFAULT = 1024**3


@pytest.fixture(scope="module")
def full_config(tmp_path_factory) -> XGenMMConfig:
    path = make_random_checkpoint(tmp_path_factory.mktemp("full") / "ckpt", preset="full", config_only=True)
    return XGenMMConfig.from_pretrained(str(path))


def vllm_needed_bytes(config: XGenMMConfig, dtype: torch.dtype, max_model_len: int) -> int:
    """vLLM's own requirement, computed independently: K and V for every layer and token of one full sequence."""
    text = config.text
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * element * max_model_len


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_geometry_default_holds_one_full_context_sequence(full_config, dtype):
    context = full_config.text.max_position_embeddings
    assert context == 4096 and (full_config.text.num_hidden_layers, full_config.text.hidden_size) == (32, 3072)
    needed = vllm_needed_bytes(full_config, dtype, context)
    assert needed == (3 * 1024**3 if dtype == torch.float32 else 3 * 1024**3 // 2)  # 1.5 GiB in bf16, as vLLM said
    assert needed > OLD_FIXED_DEFAULT  # the bug: the fixed default could not start the full model
    budget = vllm_cpu_kv_cache_bytes(full_config, dtype)
    assert budget >= needed + VLLM_BLOCK_SIZE * needed // context  # one extra block of slack
    assert budget % 1024**2 == 0


def test_a_longer_max_model_len_grows_the_default(full_config):
    base = vllm_cpu_kv_cache_bytes(full_config, torch.bfloat16)
    longer = vllm_cpu_kv_cache_bytes(full_config, torch.bfloat16, max_model_len=32768)
    assert longer >= vllm_needed_bytes(full_config, torch.bfloat16, 32768) > base


def test_tiny_geometry_keeps_the_native_default(tiny_checkpoint):
    from xgenmm.attention.base import kv_cache_bytes_per_block
    from xgenmm.engine.model_runner import default_cpu_kv_cache_bytes

    config = XGenMMConfig.from_pretrained(str(tiny_checkpoint))
    text = config.text
    per_token = kv_cache_bytes_per_block(text.num_hidden_layers, 1, text.num_key_value_heads, text.head_dim,
                                         torch.float32)
    budget = vllm_cpu_kv_cache_bytes(config, torch.float32)
    assert budget >= default_cpu_kv_cache_bytes(per_token)  # as the native pool for the same model
    assert budget - default_cpu_kv_cache_bytes(per_token) < 1024**2  # only rounded up to a MiB
