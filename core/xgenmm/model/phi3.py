"""Phi-3 decoder over a flat batch of tokens, with explicit attention metadata and a paged KV cache.

The math of `transformers`' Phi3 (fused qkv_proj / gate_up_proj, rotate-half RoPE, RMSNorm in float32), but the
input is the concatenated new tokens of every scheduled sequence: `[T, hidden]` embeddings, `[T]` absolute positions,
and an `AttentionMetadata` telling the attention backend where each sequence's context lives in the cache.
Parameter names mirror the official checkpoint (`layers.{i}.self_attn.qkv_proj`, ...), under `vlm.lang_model.model.`.

The decoder runs a fused variant (residual add folded into the next RMSNorm, in-place RoPE, SiLU*mul) with the
same roundings where a provider of those ops exists: `fused_ops.py` (Triton) on CUDA, `cpu_fused_ops.py` (our C++
kernels) on CPU for bf16, and for float32 on AVX2 CPUs; other CPU tensors take the plain torch path
(`Phi3Decoder.fused_ops_for`; `output_hidden_states` always does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.base import AttentionBackend, AttentionMetadata, KVCache
from ..errors import ConfigError
from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed float32 cos/sin table indexed by absolute position."""

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.rotary_dim, self.max_positions, self.theta = head_dim, rotary_dim, max_positions, theta
        self.register_buffer("cos_sin", self._table(torch.device("cpu")), persistent=False)

    def _table(self, device: torch.device) -> torch.Tensor:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=device).float() / self.rotary_dim))
        freqs = torch.arange(self.max_positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return torch.stack((emb.cos(), emb.sin()))  # [2, max_pos, rotary_dim]

    def reset_buffers(self) -> None:
        self.cos_sin = self._table(self.cos_sin.device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D]; positions [T]."""
        cos = self.cos_sin[0].index_select(0, positions)[:, None, :].to(q.dtype)
        sin = self.cos_sin[1].index_select(0, positions)[:, None, :].to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat((out, rest), dim=-1) if rest.numel() else out


class Phi3Attention(nn.Module):
    def __init__(self, cfg: TextConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary = rotary  # shared, not a parameter owner

    def forward(self, hidden, positions, kv_cache: KVCache, meta: AttentionMetadata, backend: AttentionBackend,
                ops=None):
        """`ops`: a fused-ops module (`fused_ops` / `cpu_fused_ops`) or None for the plain torch ops."""
        t = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if ops is not None:  # in place on the qkv projection's output (q, k are strided views of it)
            q, k = ops.rotary_embedding_(positions, q, k, self.rotary.cos_sin, self.rotary.rotary_dim)
        else:
            q, k = self.rotary(positions, q, k)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(t, self.q_size))


class Phi3MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ConfigError(f"config.json: unsupported hidden_act {cfg.hidden_act!r} (xGen-MM's Phi-3 uses 'silu')")
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops=None) -> torch.Tensor:
        if ops is not None:
            return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Phi3Attention(cfg, rotary)
        self.mlp = Phi3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden, positions, kv_cache, meta, backend):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), positions, kv_cache, meta, backend)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def forward_fused(self, hidden, residual, positions, kv_cache, meta, backend, ops):
        """Fused-kernel variant on `ops` (a fused-ops module): returns (this layer's MLP output, residual stream before
        adding it); the caller folds the pending add into the next norm. `residual=None` for the first layer."""
        if residual is None:
            residual = hidden
            hidden = ops.rms_norm(hidden, self.input_layernorm.weight, self.input_layernorm.eps)
        else:
            hidden, residual = ops.add_rms_norm(hidden, residual, self.input_layernorm.weight, self.input_layernorm.eps)
        hidden = self.self_attn(hidden, positions, kv_cache, meta, backend, ops=ops)
        norm = self.post_attention_layernorm
        hidden, residual = ops.add_rms_norm(hidden, residual, norm.weight, norm.eps)
        return self.mlp(hidden, ops=ops), residual


class Phi3Decoder(nn.Module):
    """The decoder stack + final norm. Embedding and LM head live in the VLM (they are decoupled there)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        rotary = RotaryEmbedding(cfg.head_dim, rotary_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.rotary = rotary
        self.layers = nn.ModuleList(Phi3DecoderLayer(cfg, rotary) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # "auto": fused Triton kernels for CUDA tensors, our C++ kernels for the CPU tensors `cpu_fused_ops.supported`
        # takes, plain torch ops otherwise; "on" (Triton; tests run it under TRITON_INTERPRET=1 on CPU) / "off" force one path.
        self.fused_ops = "auto"

    def fused_ops_for(self, x: torch.Tensor):
        """The fused-ops module for `x`, or None for the plain torch ops."""
        if self.fused_ops == "off":
            return None
        if self.fused_ops == "on":
            return _fused()
        if x.is_cuda:
            return _fused() if _fused_available() else None
        from . import cpu_fused_ops

        return cpu_fused_ops if cpu_fused_ops.supported(x) else None

    def uses_fused_ops(self, x: torch.Tensor) -> bool:
        return self.fused_ops_for(x) is not None

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
        backend: AttentionBackend,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        ops = None if output_hidden_states else self.fused_ops_for(inputs_embeds)
        if ops is not None:
            hidden, residual = inputs_embeds, None
            for layer, cache in zip(self.layers, kv_caches):
                hidden, residual = layer.forward_fused(hidden, residual, positions, cache, meta, backend, ops)
            if residual is None:  # no layers
                return ops.rms_norm(hidden, self.norm.weight, self.norm.eps)
            return ops.add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps)[0]
        hidden = inputs_embeds
        states = [hidden] if output_hidden_states else None
        for layer, cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, positions, cache, meta, backend)
            if states is not None:
                states.append(hidden)
        hidden = self.norm(hidden)
        if states is not None:
            states[-1] = hidden
            return hidden, states
        return hidden


def _fused():
    from . import fused_ops

    return fused_ops


_FUSED_AVAILABLE: bool | None = None


def _fused_available() -> bool:
    """Triton importable (the CUDA image ships it; a CPU-only install may not)."""
    global _FUSED_AVAILABLE
    if _FUSED_AVAILABLE is None:
        try:
            _fused()
            _FUSED_AVAILABLE = True
        except ImportError:
            _FUSED_AVAILABLE = False
    return _FUSED_AVAILABLE
