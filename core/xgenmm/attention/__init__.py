"""Attention backends behind one interface (see base.py)."""

from ..errors import ConfigError
from .base import AttentionBackend, AttentionMetadata, KVCache, allocate_kv_caches, store_kv
from .torch_ref import TorchReferenceBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "KVCache", "allocate_kv_caches", "store_kv", "TorchReferenceBackend", "get_attention_backend"]


def get_attention_backend(name: str | None, device) -> AttentionBackend:
    """Pick a backend by name; None = the best one for the device: Triton on CUDA when importable; on CPU the
    in-place paged kernel (`cpu_paged`) where one of our CPU kernel libraries builds (AVX-512 BF16 or AVX2 + FMA),
    else the torch reference."""
    import torch

    device = torch.device(device)
    if name is None:
        if device.type == "cuda":
            try:
                from .triton_backend import TritonBackend

                return TritonBackend()
            except ImportError:
                pass
        if device.type == "cpu":
            from .cpu_paged import CpuPagedAttentionBackend, kernel_namespace

            if kernel_namespace() is not None:
                return CpuPagedAttentionBackend()
        return TorchReferenceBackend()
    if name == "torch":
        return TorchReferenceBackend()
    if name == "cpu_paged":
        from .cpu_paged import CpuPagedAttentionBackend

        return CpuPagedAttentionBackend()
    if name == "flex":
        from .flex import FlexAttentionBackend

        return FlexAttentionBackend()
    if name == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend()
    raise ConfigError(f"unknown attention backend {name!r}; choose 'torch', 'cpu_paged', 'flex', 'triton' or None (auto)")
