"""`load_model`: build the model from a checkpoint's config.json on the meta device, check the shards against it,
allocate it once in the target dtype on the target device (`placement` resolves and validates both), and read the
weights into it (`layout.load_checkpoint_into`)."""

from __future__ import annotations

import logging
import os

import torch

from ..errors import ConfigError
from ..model.config import XGenMMConfig
from ..model.cpu_linear import onednn_linear_available
from ..model.quant import check_quantization, load_quantized_into
from ..model.xgenmm import XGenMMForConditionalGeneration
from ..placement import resolve_device, resolve_dtype
from .hub import resolve_model_dir
from .layout import CheckpointLayout, check_checkpoint_layout, load_checkpoint_into

logger = logging.getLogger("xgenmm.checkpoint")


def load_model(
    model: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    vision_attn_implementation: str = "sdpa",
    linear_kernel: str = "auto",
    quantization: str | None = None,
    quantized_cache_dir: str | os.PathLike | None = None,
):
    """Build `XGenMMForConditionalGeneration` from a checkpoint directory (or HF id) alone and load its weights.

    The model is built on the meta device, cast there, then allocated once in the target dtype; weights are read
    into it tensor by tensor (`load_checkpoint_into`), so a float32 checkpoint loaded in bf16 never holds a float32
    copy. `linear_kernel`: "auto" runs linear layers on oneDNN on CPU (float32 and bf16, plus our bf16 kernel for
    decode-sized batches; `model/cpu_linear.py`) and ATen elsewhere; "torch" always uses ATen's `F.linear` (what
    upstream's transformers code runs). `quantization` (None, "int8", "int4", "fp8"): the language model's linears
    and LM head quantized while loading, kept in `quantized_cache_dir` when given (`model/quant/`)."""
    if linear_kernel not in ("auto", "torch"):
        raise ConfigError(f"linear_kernel must be 'auto' or 'torch', got {linear_kernel!r}")

    checkpoint_dir = resolve_model_dir(model)
    config = XGenMMConfig.from_pretrained(checkpoint_dir)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, device)
    check_quantization(quantization, device)  # a typed error before anything is allocated
    if dtype in (None, "auto"):
        logger.info("dtype auto on %s: %s%s", device.type, str(torch_dtype).removeprefix("torch."),
                    " (the CPU computes bf16 natively)" if device.type == "cpu" and torch_dtype == torch.bfloat16 else "")
    with torch.device("meta"):
        net = XGenMMForConditionalGeneration(config, vision_attn_implementation)
    layout = check_checkpoint_layout(net, checkpoint_dir)  # before any allocation: config sizes vs shard headers
    net = net.to(torch_dtype).to_empty(device=device)  # the cast is free on meta: parameters exist once, in the target dtype
    net.reset_buffers()
    if quantization is None:
        load_checkpoint_into(net, checkpoint_dir, device, torch_dtype, layout)
    else:
        def load_tensors(keys: set[str]) -> None:
            subset = CheckpointLayout(layout.files, {k: layout.expected[k] for k in keys}, layout.index)
            load_checkpoint_into(net, checkpoint_dir, device, torch_dtype, subset)

        load_quantized_into(net, quantization, load_tensors, layout.expected, source_files=set(layout.files.values()),
                            cache_dir=quantized_cache_dir)
    net.eval().requires_grad_(False)
    if linear_kernel == "auto" and onednn_linear_available(device, torch_dtype):
        net.use_onednn_linears()
    if torch.device(device).type == "cpu":
        from ..host_memory import keep_large_allocations

        keep_large_allocations()  # after the weights: activations reuse their pages (see host_memory.py)
    net.checkpoint_dir = checkpoint_dir
    return net
