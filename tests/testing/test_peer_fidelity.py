"""The fidelity table's peer row: transformers + torchao int8 weight-only against transformers bf16, measured with
the same samples, positions and KL as our rows (`xgenmm bench --fidelity --peer`)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from xgenmm.cli.main import main as cli_main
from xgenmm.model.quant.linears import Int8WeightOnlyLinear
from xgenmm.testing import peer_fidelity
from xgenmm.testing.peer_fidelity import int8_linears, quantize_int8_weight_only, torchao_version
from xgenmm.testing.quant_fidelity import synthetic_image

needs_torchao = pytest.mark.skipif(torchao_version() is None, reason="torchao is not installed (pip install -e "
                                   "'.[peer]': kept out of dev, see pyproject.toml): the transformers+torchao peer "
                                   "cannot run")


@needs_torchao
def test_torchao_stores_every_peer_linear_as_int8_per_row_codes_like_ours(tiny_checkpoint):
    from xgenmm.checkpoint import load_model
    from xgenmm.reference import build_hf_language_model

    model = load_model(tiny_checkpoint, "cpu", "bfloat16", linear_kernel="torch")
    hf = build_hf_language_model(model)
    weights = {n: m.weight.detach().float().clone() for n, m in hf.named_modules() if isinstance(m, nn.Linear)}
    head_bias = hf.lm_head.bias.detach().clone()
    quantize_int8_weight_only(hf)
    quantized = int8_linears(hf)
    layers = model.config.text.num_hidden_layers
    assert len(weights) == 4 * layers + 1 and "lm_head" in weights  # qkv, o, gate_up, down per layer + the head
    assert quantized == {n: tuple(w.shape) for n, w in weights.items()}
    assert torch.equal(hf.lm_head.bias, head_bias) and hf.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, w in weights.items():
        q = hf.get_submodule(name).weight
        scale = q.scale.float().reshape(-1, 1)
        assert (q.qdata.float() * scale - w).abs().le(scale / 2 + 1e-6).all(), name  # round to nearest
        ours = Int8WeightOnlyLinear.from_weight(w, None).weight_int8
        assert (q.qdata.int() - ours.int()).abs().max() <= 1, name  # the same scheme up to the scale's denominator


@needs_torchao
def test_bench_fidelity_peer_row_covers_the_same_positions_as_ours(tiny_checkpoint, tmp_path, capsys):
    # float32 here: this CPU emulates bf16, which took this test 2x as long; the recorded table's rows are bf16
    out, image = tmp_path / "fidelity.json", tmp_path / "picture.png"
    synthetic_image(2, (96, 64)).save(image)
    code = cli_main(["bench", "--fidelity", "--quantization", "int8", "--peer", "--model", str(tiny_checkpoint),
                     "--dtype", "float32", "--image", str(image), "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    ours, peer = report["fidelity"]["int8"], report["peer"]
    assert report["samples"] == 4 and report["image_samples"] == 1
    assert peer["fidelity"]["positions"] == ours["positions"] > 0
    assert peer["torchao"] == torchao_version() and peer["quantized_linears"] == 9 and peer["float_linears"] == 0
    for row in (ours, peer["fidelity"]):
        assert 0 < row["mean_kl"] <= row["max_kl"] < 0.05  # quantized, so not identical; int8, so close
        assert row["greedy_agreement"] >= 0.9
    assert "transformers" in capsys.readouterr().out.splitlines()[-1]


def test_bench_fidelity_peer_without_torchao_is_a_one_line_error(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(peer_fidelity, "torchao_version", lambda: None)
    code = cli_main(["bench", "--fidelity", "--quantization", "int8", "--peer", "--model", str(tiny_checkpoint)])
    assert code != 0
    err = capsys.readouterr().err
    assert "pip install 'torchao>=0.18'" in err and "Traceback" not in err
