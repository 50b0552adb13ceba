"""The peer row of the quantization fidelity table: transformers + torchao int8 weight-only, against transformers bf16.

What users would run instead of ours: a stock `transformers.Phi3ForCausalLM` holding the checkpoint's language-model
weights (`reference.build_hf_language_model`, SDPA attention), quantized with torchao's `Int8WeightOnlyConfig`
(int8 weights, one symmetric scale per output channel: the same scheme as our `int8`). The same teacher-forced
protocol as our rows (`quant_fidelity.compare`): the same samples, the same continuation positions, KL(unquantized ||
quantized). Images: transformers has no xGen-MM model class, so both sides of the peer take the fused embeddings
from the checkpoint's vision tower and perceiver (our modules with ATen linears, as upstream's remote code runs them,
in the reference dtype and never quantized); only the language model and the head differ. So the peer row measures the
language model's int8 alone; our `int8` also keeps the vision tower and perceiver int8 at rest (docs/quantization.md
gives our rows both ways).

torchao is optional (`pip install '.[peer]'` from the checkout): not in the dev extra, because once installed it is
imported with every transformers model class (seconds per start, torch warnings on stderr). Without it `measure_peer` raises a
`QuantizationError` saying so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata

import torch
from torch import nn

from ..errors import QuantizationError
from .fidelity import Sample, _fused_embeddings
from .next_token_fidelity import Fidelity, compare

PEER_CONFIG = "torchao.quantization.Int8WeightOnlyConfig(granularity=PerRow(), version=2, set_inductor_config=False)"


def torchao_version() -> str | None:
    """The installed torchao's version, or None without it (read from the metadata: importing torchao is slow)."""
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return None


def require_torchao() -> str:
    """torchao's version; a `QuantizationError` naming the remedy without it."""
    version = torchao_version()
    if version is None:
        raise QuantizationError("the transformers+torchao peer needs torchao: pip install 'torchao>=0.18' "
                                "(or pip install '.[peer]' from the checkout)")
    return version


def quantize_int8_weight_only(hf: nn.Module) -> nn.Module:
    """torchao's int8 weight-only config applied in place to every `nn.Linear` of `hf` (its default filter: all
    linears, the LM head included; the embedding stays). `set_inductor_config=False`: that flag only tunes
    torch.compile's global config, which an eager peer does not use and other code in the process should not see."""
    require_torchao()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(hf, Int8WeightOnlyConfig(set_inductor_config=False))
    return hf


def int8_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of the linears whose weight is stored as int8 codes with one scale per output row."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            qdata, scale = getattr(module.weight, "qdata", None), getattr(module.weight, "scale", None)
            if (qdata is not None and qdata.dtype == torch.int8 and scale is not None
                    and scale.numel() == qdata.shape[0]):
                out[name] = tuple(qdata.shape)
    return out


@torch.inference_mode()
def _continuation_logits(hf: nn.Module, embeds: torch.Tensor, n: int) -> torch.Tensor:
    """[n, vocab] float32 logits at the positions that predict the last n tokens (as `fidelity.ours_logits`)."""
    t = embeds.shape[0]
    return hf(inputs_embeds=embeds[None]).logits[0, t - n - 1 : t - 1].float()


@dataclass
class PeerFidelity:
    engine: str
    transformers: str
    torchao: str
    config: str
    reference: str
    images: str
    quantized_linears: int
    float_linears: int
    fidelity: Fidelity

    def to_dict(self) -> dict:
        return asdict(self)


def measure_peer(checkpoint, samples: list[Sample], dtype: str = "bfloat16", device: str = "cpu") -> PeerFidelity:
    """transformers + torchao int8 against transformers in `dtype`, on the same weights and samples as our rows."""
    import transformers

    from ..checkpoint import load_model
    from ..reference import build_hf_language_model

    version = require_torchao()
    upstream = load_model(checkpoint, device, dtype, linear_kernel="torch")
    hf = build_hf_language_model(upstream)
    with torch.inference_mode():
        embeds = [_fused_embeddings(upstream, s) for s in samples]  # computed once: the vision side is not quantized
    del upstream
    lengths = [len(s.continuation) for s in samples]
    reference = [_continuation_logits(hf, e, n) for e, n in zip(embeds, lengths)]
    quantize_int8_weight_only(hf)
    linears = sum(1 for m in hf.modules() if isinstance(m, nn.Linear))
    quantized = len(int8_linears(hf))
    fidelity = compare(reference, [_continuation_logits(hf, e, n) for e, n in zip(embeds, lengths)])
    return PeerFidelity(
        engine="transformers.Phi3ForCausalLM (sdpa) + torchao int8 weight-only", transformers=transformers.__version__,
        torchao=version, config=PEER_CONFIG, reference=f"transformers.Phi3ForCausalLM in {dtype}, same weights",
        images="the checkpoint's vision tower + perceiver (ATen linears, unquantized) feed both sides' inputs_embeds",
        quantized_linears=quantized, float_linears=linears - quantized, fidelity=fidelity)
