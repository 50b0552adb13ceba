"""Fixtures for the vLLM backend tests (run by `.ci/vllm.sh` in the separate `.venv-vllm`, see docs/vllm.md).

The main test environment has no vLLM by design (vLLM pins its own torch / transformers), so every module here starts
with `pytest.importorskip("vllm")`: in `.venv` they are skipped, in `.venv-vllm` they run. The environment variables
below are the documented CPU recipe: no hub access, vLLM's engine in this process (7x faster to start than its
multiprocess default), a 1 GiB KV cache.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
