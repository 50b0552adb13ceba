"""`tensor_parallel_size=2` on the vLLM backend: the fixture checkpoint split over two CPU workers (one core each)
gives the golden greedy tokens for every fixture case. This exercises what only tensor parallelism does: the folded
32015-row embedding and biased head sharded by vocabulary, Phi-3's attention heads (zero-padded, see head_padding.py)
and MLP split across ranks, and our vision encoder replicated on each rank.

Runs in its own process: vLLM's CPU workers need their thread binding set in the environment before vLLM starts
(`VLLM_CPU_OMP_THREADS_BIND`, one core per rank), and tensor parallelism always uses worker processes.
Runs only where vLLM is installed (`.venv-vllm`, via `.ci/vllm.sh`); see conftest.py for why it is skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

SCRIPT = r"""
import json, sys
from pathlib import Path
from PIL import Image

def main():
    from xgenmm import SamplingParams
    from xgenmm.lazy_engine import EngineClients
    ckpt, fixtures = sys.argv[1], Path(sys.argv[2])
    engine = EngineClients.open("vllm", model=ckpt, dtype="float32", tensor_parallel_size=2,
                        kv_cache_memory_bytes=256 * 1024**2)
    requests, expected = [], []
    for case in json.loads((fixtures / "cases.json").read_text())["cases"]:
        for sample in case["samples"]:
            request = {"prompt_token_ids": sample["input_ids"]}
            if sample["images"]:
                request["multi_modal_data"] = {"image": [Image.open(fixtures / p) for p in sample["images"]]}
            requests.append(request)
            expected.append(sample["generated_ids"])
    outs = engine.sync.generate(requests, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    engine.handle.shutdown()
    print("RESULT " + json.dumps({"got": got, "expected": expected}))

if __name__ == "__main__":
    main()
"""


def test_tensor_parallel_2_gives_the_golden_tokens(fixture_checkpoint_with_tokenizer, fixture_dir, tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, "tensor_parallel_size=2 on CPU needs two cores (the CI machines have 2)"
    script = tmp_path / "tp2.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_OMP_THREADS_BIND=f"{cores[0]}|{cores[1]}")
    proc = subprocess.run([sys.executable, str(script), str(fixture_checkpoint_with_tokenizer), str(fixture_dir)],
                          env=env, capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert len(result["got"]) == 11
    assert result["got"] == result["expected"]
