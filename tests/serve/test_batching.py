"""The micro-batcher: concurrent requests share engine calls, the queue is bounded, timeouts answer, errors stay
with the request that caused them."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve.batching import BatchedEngine, MicroBatcher, Overloaded, RequestTimeout


class Recorder:
    def __init__(self, delay: float = 0.0):
        self.calls: list[list] = []
        self.delay = delay
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items):
        self.release.wait(5)
        time.sleep(self.delay)
        if "bad" in items:
            raise ValueError("bad item")
        self.calls.append(list(items))
        return [x * 10 for x in items]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_answered_in_order():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, max_wait_s=0.05, max_queue=100, timeout_s=5)

    async def main():
        return await asyncio.gather(*(b.submit([i, i + 100]) for i in range(6)))

    out = run(main())
    assert out == [[i * 10, (i + 100) * 10] for i in range(6)]
    assert all(len(c) <= 8 for c in rec.calls) and len(rec.calls) < 6  # fewer engine calls than requests
    assert sum(len(c) for c in rec.calls) == 12 and b.queued_items == 0


def test_full_queue_raises_overloaded_and_recovers():
    rec = Recorder()
    rec.release.clear()  # the engine is stuck on the first batch
    b = MicroBatcher(rec, max_batch=2, max_wait_s=0.0, max_queue=4, timeout_s=5)

    async def main():
        first = asyncio.ensure_future(b.submit([1, 2]))
        await asyncio.sleep(0.05)  # the first batch is now running, the queue is empty
        queued = [asyncio.ensure_future(b.submit([3, 4])), asyncio.ensure_future(b.submit([5, 6]))]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match=r"4 items queued \(limit 4\)"):
            await b.submit([7])
        rec.release.set()
        return await first, [await q for q in queued], await b.submit([8])

    assert run(main()) == ([10, 20], [[30, 40], [50, 60]], [80])
    assert b.stats.overloaded == 1


def test_timeout_answers_and_skips_work_of_queued_requests():
    rec = Recorder(delay=0.3)
    b = MicroBatcher(rec, max_batch=1, max_wait_s=0.0, max_queue=10, timeout_s=0.1)

    async def main():
        results = await asyncio.gather(b.submit([1]), b.submit([2]), return_exceptions=True)
        await asyncio.sleep(0.5)
        return results

    results = run(main())
    assert all(isinstance(r, RequestTimeout) for r in results)
    assert rec.calls == [[1]]  # the second request timed out while queued and was never computed
    assert b.stats.timeouts == 2


def test_one_bad_request_fails_alone():
    b = MicroBatcher(Recorder(), max_batch=8, max_wait_s=0.05, max_queue=100, timeout_s=5)

    async def main():
        return await asyncio.gather(b.submit([1]), b.submit(["bad"]), b.submit([2]), return_exceptions=True)

    good1, bad, good2 = run(main())
    assert good1 == [10] and good2 == [20]
    assert isinstance(bad, ValueError) and "bad item" in str(bad)
    with pytest.raises(ValueError, match="at most 8"):
        run(b.submit(list(range(9))))


def test_batched_engine_matches_direct_engine_calls(tiny_bundle, embed_inputs, reason_inputs):
    from serve.engines.hf import HFEngine

    engine = HFEngine(tiny_bundle)
    be = BatchedEngine(engine, max_batch=16, max_wait_s=0.02, max_queue=64, timeout_s=30)

    async def main():
        embs = await asyncio.gather(*(be.embed([it]) for it in embed_inputs))
        texts = await asyncio.gather(*(be.generate([it], 6) for it in reason_inputs))
        return embs, texts

    embs, texts = run(main())
    direct = engine.embed(embed_inputs)
    for i, e in enumerate(embs):
        assert e.shape == (1, engine.embedding_dim)
        assert abs(e[0] - direct[i]).max() < 1e-5
    assert [t[0] for t in texts] == engine.generate(reason_inputs, 6)
    assert be.stats()["embed"]["batches"] < len(embed_inputs)
    be.close()


class ContinuousEngine:
    """An engine that batches across concurrent calls itself (like the vLLM engine): records call overlap."""

    concurrent_calls = True
    embedding_dim = 2

    def __init__(self, delay: float = 0.2):
        self.delay, self.active, self.max_active = delay, 0, 0
        self.lock = threading.Lock()

    def generate(self, items, max_new_tokens):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        return [f"{it}:{max_new_tokens}" for it in items]

    def embed(self, items):
        return [[1.0, 0.0] for _ in items]


def test_engines_that_batch_across_calls_get_concurrent_calls_with_the_same_bounds():
    engine = ContinuousEngine()
    be = BatchedEngine(engine, max_batch=8, max_wait_s=0.01, max_queue=6, timeout_s=5)

    async def main():
        got = await asyncio.gather(*(be.generate([f"r{i}"], 8 + i) for i in range(5)))
        busy = [asyncio.ensure_future(be.generate(["a", "b", "c"], 4)) for _ in range(2)]
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded, match="6 items in flight"):
            await be.generate(["x"], 4)
        await asyncio.gather(*busy)
        return got, be.queued()

    got, left = run(main())
    assert got == [[f"r{i}:{8 + i}"] for i in range(5)]  # per-request budgets, no grouping by budget needed
    assert engine.max_active >= 3 and left == 0  # the calls overlapped: the engine's own batching can merge them
    assert be.stats()["generate"]["overloaded"] == 1
    slow = BatchedEngine(ContinuousEngine(delay=0.5), max_batch=8, max_wait_s=0.01, max_queue=6, timeout_s=0.1)
    with pytest.raises(RequestTimeout):
        run(slow.generate(["x"], 4))
    be.close()
    slow.close()
