"""`xgenmm bench --fidelity --quantization ...`: the quantized model against the unquantized one, teacher-forced, on a
fixed prompt set (text and images): greedy agreement and KL of the next-token distributions."""

from __future__ import annotations

import json

import torch

from xgenmm.cli.main import main as cli_main
from xgenmm.testing.quant_fidelity import compare, measure, prompt_samples, synthetic_image


def test_compare_is_zero_for_identical_logits_and_positive_otherwise():
    a = [torch.randn(5, 50, generator=torch.Generator().manual_seed(0))]
    same = compare(a, [a[0].clone()])
    assert same.positions == 5 and same.greedy_agreement == 1.0 and same.max_kl < 1e-6 and same.max_logit_error == 0
    flipped = [a[0].clone()]
    flipped[0][0] = -flipped[0][0]  # one position's distribution reversed
    other = compare(a, flipped)
    assert other.greedy_agreement == 0.8 and other.max_kl > 0.1
    assert abs(other.mean_kl - other.max_kl / 5) < 1e-6  # only that position differs


def test_int8_is_closer_than_int4_on_the_fixed_prompt_set(tiny_checkpoint):
    samples = prompt_samples(tiny_checkpoint, [synthetic_image(i, (96, 64)) for i in range(2)])  # small: fast
    assert sum(1 for s in samples if s.images) == 2 and sum(1 for s in samples if not s.images) == 3
    table = measure(tiny_checkpoint, samples, ["int8", "int4"], dtype="float32")
    positions = sum(len(s.continuation) for s in samples)
    assert table["int8"].positions == table["int4"].positions == positions
    assert table["int8"].greedy_agreement >= 0.9
    assert 0 < table["int8"].mean_kl < table["int4"].mean_kl
    assert table["int8"].max_kl < 0.05


def test_bench_fidelity_command_writes_the_table(tiny_checkpoint, tmp_path, capsys):
    out, image = tmp_path / "fidelity.json", tmp_path / "picture.png"
    synthetic_image(1, (96, 64)).save(image)
    code = cli_main(["bench", "--fidelity", "--quantization", "int8", "--model", str(tiny_checkpoint), "--dtype",
                     "float32", "--image", str(image), "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["image_samples"] == 1 and report["samples"] == 4 and set(report["fidelity"]) == {"int8"}
    assert "greedy agreement" in capsys.readouterr().out


def test_bench_fidelity_bad_method_is_a_one_line_error(tiny_checkpoint, capsys):
    code = cli_main(["bench", "--fidelity", "--quantization", "int3", "--model", str(tiny_checkpoint)])
    assert code != 0
    assert "'int8', 'int4', 'fp8'" in capsys.readouterr().err
