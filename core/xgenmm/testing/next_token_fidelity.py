"""How far one model's next-token distributions are from a reference's, position by position: the measure every row of
the quantization fidelity table uses, ours (`quant_fidelity`) and the peer's (`peer_fidelity`) alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Fidelity:
    positions: int
    greedy_agreement: float
    mean_kl: float
    max_kl: float
    max_logit_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> Fidelity:
    """Next-token distributions of the quantized model against the reference's, position by position."""
    a, b = torch.cat(reference).float(), torch.cat(quantized).float()
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)
    return Fidelity(positions=a.shape[0], greedy_agreement=round(float(a.argmax(-1).eq(b.argmax(-1)).float().mean()), 4),
                    mean_kl=float(kl.mean()), max_kl=float(kl.max()), max_logit_error=float((a - b).abs().max()))
