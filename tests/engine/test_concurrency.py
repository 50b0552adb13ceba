"""64 requests from threads and from asyncio tasks, some cancelled midway: all others complete correctly, and every
KV block is back in the pool afterwards."""

from __future__ import annotations

import asyncio
import threading

import pytest

from xgenmm import LLM, AsyncLLM, RequestOutputKind, SamplingParams
from xgenmm.client import open_engine

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _prompt(i: int) -> str:
    return f"<|user|>\nquestion number {i % 8} about {'cats' if i % 2 else 'dogs'}<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def handle(tiny_checkpoint):
    engine_handle = open_engine("native", str(tiny_checkpoint), "cpu", "float32", max_num_seqs=32, shared=False)
    yield engine_handle
    engine_handle.shutdown()


@pytest.fixture(scope="module")
def reference(handle):
    llm = LLM.from_handle(handle)
    return {i: llm.generate(_prompt(i), PARAMS)[0].outputs[0].token_ids for i in range(8)}


def _assert_pool_drained(handle):
    bm = handle.core.block_manager
    assert handle.core.num_requests == 0
    assert bm.num_free_blocks == bm.num_total_blocks
    bm.check_invariants()


def test_64_threads_some_cancelled(handle, reference):
    llm = LLM.from_handle(handle)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    long_params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    def worker(i: int) -> None:
        try:
            if i % 5 == 0:  # cancelled midway: read two steps then close the stream
                stream = llm.stream(_prompt(i), long_params)
                next(stream)
                next(stream)
                stream.close()
            else:
                results[i] = llm.generate(_prompt(i), PARAMS)[0].outputs[0].token_ids
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert len(results) == 64 - len(range(0, 64, 5))
    for i, tokens in results.items():
        assert tokens == reference[i % 8], i
    llm.generate(_prompt(0), PARAMS)  # the handle has handled every abort by the time this returns
    _assert_pool_drained(handle)


def test_64_asyncio_tasks_some_cancelled(handle, reference):
    allm = AsyncLLM.from_handle(handle)

    # The long ones (every fourth) are cancelled midway: once each has streamed its first output, far from its
    # max_tokens, so the cancel always lands while the request is still running (a fixed sleep raced a fast CI run).
    started = {i: asyncio.Event() for i in range(0, 64, 4)}

    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        params = SamplingParams(temperature=0.0, max_tokens=6 if i % 4 else 1500, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        async for out in allm.generate(_prompt(i), params):
            tokens.extend(out.outputs[0].token_ids)
            if i in started:
                started[i].set()
        return tokens

    async def main():
        tasks = [asyncio.create_task(one(i)) for i in range(64)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), timeout=120)
        for i in started:
            tasks[i].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    for i, res in enumerate(results):
        if i % 4 == 0:
            assert isinstance(res, asyncio.CancelledError), (i, res)
        else:
            assert res == reference[i % 8], i
    LLM.from_handle(handle).generate(_prompt(0), PARAMS)
    assert handle.stats().num_running == 0
    _assert_pool_drained(handle)


def test_a_failing_request_does_not_disturb_concurrent_ones(handle, reference):
    allm = AsyncLLM.from_handle(handle)

    async def ok(i):
        out = None
        async for out in allm.generate(_prompt(i), PARAMS):
            pass
        return out.outputs[0].token_ids

    async def bad():
        async for _ in allm.generate("word " * 5000, PARAMS):
            pass

    async def main():
        return await asyncio.gather(ok(1), bad(), ok(2), return_exceptions=True)

    r1, err, r2 = asyncio.run(main())
    assert r1 == reference[1] and r2 == reference[2]
    assert "context" in str(err) or "max_model_len" in str(err)
