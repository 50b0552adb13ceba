"""The console entry point turns every user mistake into ONE line on stderr that says what to do, with exit status
1 and no traceback: run as a real subprocess (`python -m xgenmm.cli`), as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

NO_CUDA = not torch.cuda.is_available()


def _xgenmm(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "xgenmm.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=180, cwd=cwd)


def _one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"xgenmm {command}: error: ")
    assert proc.stdout == ""
    return lines[0]


@pytest.mark.parametrize(("argv", "remedy"), [
    pytest.param(("--device", "cuda"), 'has no CUDA (torch', marks=pytest.mark.skipif(not NO_CUDA, reason="has CUDA")),
    (("--device", "cuda:99"), 'use device="cpu"' if NO_CUDA else "pick one of those"),
    (("--device", "gpu"), 'unknown device \'gpu\'; use one of "cpu", "cuda", "cuda:N"'),
    (("--dtype", "fp8"), "unknown dtype 'fp8'; use one of auto, float32, bfloat16, float16"),
    (("--device", "cpu", "--max-num-seqs", "0"), "engine option max_num_seqs must be an int >= 1"),  # the core's check
])
def test_chat_device_and_dtype_mistakes(tiny_checkpoint, argv, remedy):
    line = _one_error_line(_xgenmm("chat", "--model", str(tiny_checkpoint), *argv, "hello"), "chat")
    assert remedy in line


def test_missing_local_model_says_so_without_a_download_hint(tmp_path):
    line = _one_error_line(_xgenmm("chat", "--model", "./missing/dir", "hello", cwd=tmp_path), "chat")
    assert f"no model directory at {tmp_path / 'missing' / 'dir'}" in line
    assert "download" not in line


def test_uncached_hub_id_says_what_to_run(tmp_path):
    proc = _xgenmm("caption", "--model", "Salesforce/not-a-downloaded-model", "--out", str(tmp_path / "c.jsonl"),
                   str(tmp_path))
    line = _one_error_line(proc, "caption")
    assert "xgenmm download Salesforce/not-a-downloaded-model" in line and "--model PATH" in line


@pytest.mark.parametrize("command", ["serve", "caption"])
def test_every_engine_command_checks_the_device_first(tmp_path, command):
    extra = ["--out", str(tmp_path / "c.jsonl"), str(tmp_path)] if command == "caption" else []
    line = _one_error_line(_xgenmm(command, "--model", "./missing/dir", "--device", "gpu", *extra, cwd=tmp_path),
                           command)
    assert "unknown device 'gpu'" in line  # before the model is looked up, before anything loads
