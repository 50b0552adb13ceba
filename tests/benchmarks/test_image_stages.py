"""benchmarks/image_stages.py's measuring parts: the stage timer charges each tracked module its EXCLUSIVE time (a
module's own time less the tracked modules inside it), so nested stages never count twice; and the perceiver's FLOPs
charge only `to_kv` against the media + latent rows."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from stage_timer import StageTimer  # noqa: E402


class Sleepy(nn.Module):
    def __init__(self, seconds: float, inner: nn.Module | None = None):
        super().__init__()
        self.seconds, self.inner = seconds, inner

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x) if self.inner is not None else x


class SleepyLinear(nn.Linear):
    def forward(self, x):
        time.sleep(0.05)
        return super().forward(x)


class SleepyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = SleepyLinear(4, 4)

    def forward(self, x):
        time.sleep(0.03)
        return self.proj(x)


def test_nested_stages_are_charged_exclusive_time_only():
    root = Sleepy(0.02, nn.Sequential(SleepyAttention(), nn.LayerNorm(4)))
    timer = StageTimer()
    timer.track(root, "lm.other", record_rows=True)
    timer.track_inside(root, "lm")
    root(torch.ones(3, 4))  # not enabled: nothing recorded
    assert not timer.exclusive
    timer.enabled = True
    root(torch.ones(3, 4))
    t = timer.exclusive
    assert 0.05 <= t["lm.linears"] < 0.08
    assert 0.03 <= t["lm.attention"] < 0.05  # its projection is not counted again
    assert 0.02 <= t["lm.other"] < 0.04
    assert "lm.norms" in t and timer.calls["lm.norms"] == 1
    assert timer.rows["lm.other"] == [3]


def test_wrapped_callables_keep_their_other_attributes():
    class Sampler:
        released = False

        def __call__(self, x):
            time.sleep(0.01)
            return x + 1

        def release(self):
            self.released = True

    class Core:
        sampler = Sampler()

    core, timer = Core(), StageTimer()
    timer.track_callable(core, "sampler", "sampling")
    timer.enabled = True
    assert core.sampler(1) == 2
    core.sampler.release()
    assert core.sampler.released and timer.calls["sampling"] == 1 and timer.exclusive["sampling"] >= 0.01


def test_perceiver_flops_charge_only_to_kv_with_the_media_rows():
    from full_cpu import perceiver_linear_flops

    from xgenmm.model.config import PerceiverConfig
    from xgenmm.model.perceiver import PerceiverResampler

    cfg = PerceiverConfig(dim=8, output_dim=6, num_latents=2, depth=1, heads=2, dim_head=4, ff_mult=2)
    flops = perceiver_linear_flops(PerceiverResampler(cfg), n_media=10, n_latents=2)
    inner = 8
    expected = 2 * ((10 + 2) * 8 * 2 * inner  # to_kv on media + latents
                    + 2 * (8 * inner + inner * 8 + 8 * 16 + 16 * 8 + 8 * 6))  # to_q, to_out, ff, projection on latents
    assert flops == expected


def test_rounds_summary_pairs_native_with_each_engine_per_round():
    from image_stages import _median_round, summarize

    def result(ttft, siglip):
        return {"ttft_s": ttft, "engine_start_s": 1.0, "stages": {"siglip": {"seconds": siglip}}}

    rounds = [{"native": result(10.0, 4.0), "vllm": result(8.0, 4.0)},
              {"vllm": result(12.0, 5.0), "native": result(9.0, 3.0)},
              {"native": result(30.0, 9.0), "vllm": {"error": "boom"}}]
    summary = summarize(rounds, ["native", "vllm"])
    assert summary["engines"]["native"]["ttft_s"] == {"median": 10.0, "min": 9.0, "max": 30.0,
                                                     "values": [10.0, 9.0, 30.0]}
    assert summary["engines"]["vllm"]["rounds_ok"] == 2
    pair = summary["native_over"]["vllm"]
    assert pair["ttft_paired"]["values"] == [1.25, 0.75]  # only rounds where both ran; same-round pairs
    assert pair["ttft_ratio_of_medians"] == round(10.0 / 10.0, 3)
    assert _median_round(rounds, "native")["ttft_s"] == 10.0
    assert _median_round(rounds, "vllm")["ttft_s"] == 8.0  # lower median of two
