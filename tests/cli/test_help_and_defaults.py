"""What `--help` and the front ends' defaults tell a newcomer is true: example paths exist, and the reply budget
(max_tokens) is the one documented default (`xgenmm.chat.DEFAULT_MAX_TOKENS`) wherever a default is chosen."""

from __future__ import annotations

import re
from pathlib import Path

from xgenmm.chat import CAPTION_MAX_TOKENS, DEFAULT_MAX_TOKENS
from xgenmm.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]


def _subparser(name):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_help_examples_name_files_that_exist():
    text = build_parser().format_help()
    paths = re.findall(r"examples/\S+\.(?:png|jpg|jpeg)", text)
    assert paths, text
    for path in paths:
        assert (REPO / path).is_file(), path


def test_one_documented_max_tokens_default_across_front_ends():
    from langchain_xgenmm import ChatXGenMM
    from llama_index.llms.xgenmm import XGenMM

    from xgenmm.server.config import ServerConfig

    assert _subparser("chat").parse_args([]).max_tokens == DEFAULT_MAX_TOKENS
    assert ChatXGenMM().max_tokens == DEFAULT_MAX_TOKENS
    assert XGenMM().max_tokens == DEFAULT_MAX_TOKENS
    assert XGenMM().metadata.num_output == DEFAULT_MAX_TOKENS
    # The two stated exceptions (docs/cli_and_server.md): captions are short, the server follows OpenAI.
    assert _subparser("caption").parse_args(["--out", "x.jsonl", "img"]).max_tokens == CAPTION_MAX_TOKENS
    assert ServerConfig().max_tokens_default is None
    docs = (REPO / "docs" / "cli_and_server.md").read_text()
    assert f"`max_tokens` defaults to {DEFAULT_MAX_TOKENS}" in docs and f"{CAPTION_MAX_TOKENS}" in docs


def test_dtype_help_matches_what_the_engine_picks_on_this_cpu():
    import torch

    from xgenmm.cpu_features import cpu_computes_bf16
    from xgenmm.placement import resolve_dtype

    help_text = " ".join(_subparser("chat").format_help().split())
    assert "bfloat16 on GPU and on CPUs that compute bf16 natively" in help_text
    assert "float32 on other CPUs" in help_text
    picked = resolve_dtype(None, None, torch.device("cpu"))
    assert picked == (torch.bfloat16 if cpu_computes_bf16() else torch.float32)
