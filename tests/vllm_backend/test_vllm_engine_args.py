"""The vLLM backend's engine arguments: eager on CPU by default (our configuration), and vLLM's own compilation
config back when the caller asks (`enforce_eager=False`, by name or in `vllm_options`), as
`benchmarks/vllm_vs_native.py`'s `vllm-documented` engine does."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from xgenmm.backends.vllm_backend import build_engine_args  # noqa: E402


def _args(ckpt, options):
    return build_engine_args(str(ckpt), "cpu", "float32", options, "guidance", 4)


def test_cpu_runs_eager_unless_the_caller_turns_compilation_on(fixture_checkpoint_with_tokenizer):
    ckpt = fixture_checkpoint_with_tokenizer
    assert _args(ckpt, {})["enforce_eager"] is True
    assert _args(ckpt, {"enforce_eager": False})["enforce_eager"] is False
    assert _args(ckpt, {"vllm_options": {"enforce_eager": False}})["enforce_eager"] is False
