"""The micro-batcher: concurrent requests share engine calls, the queue is bounded, timeouts answer, errors stay
with the request that caused them."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from serve.batching import (
    EMBED_PRIORITY,
    BatchedEngine,
    MicroBatcher,
    Overloaded,
    PriorityEngineThread,
    RequestTimeout,
    Throughput,
)


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


def test_a_batcher_also_runs_on_a_plain_executor():
    rec = Recorder()
    with ThreadPoolExecutor(max_workers=1) as pool:
        b = MicroBatcher(rec, max_batch=4, max_wait_s=0.01, max_queue=10, timeout_s=5, executor=pool)

        async def main():
            return await asyncio.gather(*(b.submit([i]) for i in range(6)))

        assert run(main()) == [[i * 10] for i in range(6)]
    assert sorted(x for c in rec.calls for x in c) == list(range(6)) and b.queued_items == 0


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


# ------------------------------------------------------------------------------------------------ engine thread order

def held_thread(burst: int) -> tuple[PriorityEngineThread, threading.Event, list]:
    """An engine thread busy with a first job until the returned event is set; jobs append to the returned log."""
    t, gate, started, log = PriorityEngineThread(burst=burst), threading.Event(), threading.Event(), []

    def hold():
        started.set()
        gate.wait(5)
        log.append("hold")

    t.submit(0, hold)
    assert started.wait(5)
    return t, gate, log


def until(cond, timeout: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout
    while not cond():
        assert time.perf_counter() < deadline, "condition not reached"
        time.sleep(0.002)


async def until_async(cond, timeout: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout
    while not cond():
        assert time.perf_counter() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def test_engine_thread_runs_urgent_jobs_first_fifo_within_a_priority():
    t, gate, log = held_thread(burst=10)
    futs = [t.submit(prio, log.append, name) for prio, name in [(1, "g1"), (0, "e1"), (1, "g2"), (0, "e2"),
                                                                (2, "x"), (0, "e3")]]
    assert t.pending() == 6 and t.pending(0) == 3 and t.pending(1) == 2
    gate.set()
    for f in futs:
        f.result(5)
    assert log == ["hold", "e1", "e2", "e3", "g1", "g2", "x"]
    t.shutdown()


def test_engine_thread_runs_the_oldest_job_after_burst_overtakes():
    t, gate, log = held_thread(burst=2)
    futs = [t.submit(1, log.append, "g1"), *(t.submit(0, log.append, f"e{i}") for i in range(1, 6)),
            t.submit(1, log.append, "g2")]
    gate.set()
    for f in futs:
        f.result(5)
    # e1 and e2 overtake g1, then g1 (the oldest) runs; e3..e5 are older than g2 and overtake nothing
    assert log == ["hold", "e1", "e2", "g1", "e3", "e4", "e5", "g2"]
    t.shutdown()


def test_generation_progresses_under_a_continuous_embedding_stream():
    t, gate, log = held_thread(burst=3)

    def embed(i):
        log.append(f"e{i}")
        if i < 8:
            t.submit(0, embed, i + 1)  # the next embedding arrives while this one runs: the stream never pauses

    t.submit(1, log.append, "g")
    t.submit(0, embed, 1)
    gate.set()
    until(lambda: len(log) == 10)
    assert log == ["hold", "e1", "e2", "e3", "g", "e4", "e5", "e6", "e7", "e8"]
    t.shutdown()


def test_engine_thread_never_runs_a_cancelled_job():
    t, gate, log = held_thread(burst=1)
    a, b, c = t.submit(1, log.append, "a"), t.submit(0, log.append, "b"), t.submit(1, log.append, "c")
    assert a.cancel() and b.cancel()
    assert t.pending() == 1
    gate.set()
    assert c.result(5) is None
    assert log == ["hold", "c"] and a.cancelled() and b.cancelled()
    t.shutdown()
    with pytest.raises(ValueError, match="burst"):
        PriorityEngineThread(burst=0)


def test_engine_thread_shutdown_like_an_executor():
    t, gate, log = held_thread(burst=4)
    x, y = t.submit(1, log.append, "x"), t.submit(0, log.append, "y")
    t.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        t.submit(0, log.append, "z")
    gate.set()
    t._thread.join(5)
    assert x.cancelled() and y.cancelled() and log == ["hold"] and not t._thread.is_alive()

    t, gate, log = held_thread(burst=4)  # without cancel_futures: what is queued still runs, then the thread ends
    t.submit(1, log.append, "x")
    t.submit(0, log.append, "y")
    gate.set()
    t.shutdown(wait=True)
    assert log == ["hold", "y", "x"] and not t._thread.is_alive()


def test_engine_thread_is_joined_at_exit_even_when_started_from_a_daemon_thread():
    # A server's event loop may run in a daemon thread; the engine thread must still finish its running job before
    # the interpreter finalizes (a thread torn down inside torch at exit aborts the process).
    code = """if True:
        import threading, time
        from serve.batching import PriorityEngineThread
        t, started = PriorityEngineThread(), threading.Event()
        def job():  # still running when the interpreter exits: it waits for the exit hook, then works on
            started.set()
            deadline = time.monotonic() + 10
            while not t._state.shutdown and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            print("finished", flush=True)
        starter = threading.Thread(target=lambda: t.submit(0, job), daemon=True)
        starter.start()
        starter.join()
        started.wait(10)
        t.submit(1, print, "queued job ran")  # queued behind the running job: dropped at exit
        print("daemon" if t._thread.daemon else "not a daemon", flush=True)
    """
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["not a daemon", "finished"]


class GatedEngine:
    """A fake engine whose calls wait at a gate (so that work can be queued behind the first call) and are logged.
    The first `embed_waits` embedding calls also wait (up to 2 s) until the next embedding batch is queued at the
    engine thread, as it is when a full batch waits while one runs."""

    embedding_dim = 2

    def __init__(self, embed_waits: int = 0):
        self.gate, self.entered = threading.Event(), threading.Event()
        self.log: list[str] = []
        self.embed_waits, self.thread = embed_waits, None

    def generate(self, items, max_new_tokens):
        self.entered.set()
        self.gate.wait(5)
        self.log.append(f"gen{max_new_tokens}")
        return [f"{it}:{max_new_tokens}" for it in items]

    def embed(self, items):
        self.entered.set()
        self.gate.wait(5)
        if self.embed_waits > 0:
            self.embed_waits -= 1
            deadline = time.perf_counter() + 2
            while self.thread.pending(EMBED_PRIORITY) == 0 and time.perf_counter() < deadline:
                time.sleep(0.002)
        self.log.append("embed")
        return [[float(len(self.log)), 0.0] for _ in items]


def gated_engine(embed_waits: int = 0, **kw) -> tuple[GatedEngine, BatchedEngine]:
    engine = GatedEngine(embed_waits)
    be = BatchedEngine(engine, **{"max_batch": 4, "max_wait_s": 0.0, "max_queue": 32, "timeout_s": 10, **kw})
    engine.thread = be._executor
    return engine, be


def test_an_embedding_overtakes_queued_generation_batches():
    engine, be = gated_engine()

    async def main():
        held = asyncio.ensure_future(be.generate(["r4"], 4))
        await until_async(engine.entered.is_set)  # generate4 runs (held at the gate)
        gens = [asyncio.ensure_future(be.generate([f"r{n}"], n)) for n in (5, 6, 7)]
        await until_async(lambda: be._executor.pending() == 3)  # three generation batches wait
        emb = asyncio.ensure_future(be.embed(["s"]))
        await until_async(lambda: be._executor.pending() == 4)
        engine.gate.set()
        return await held, await asyncio.gather(*gens), await emb

    held, gens, emb = run(main())
    assert engine.log == ["gen4", "embed", "gen5", "gen6", "gen7"]  # not after the generation queued before it
    assert held == ["r4:4"] and gens == [["r5:5"], ["r6:6"], ["r7:7"]] and emb.shape == (1, 2)
    be.close()


def test_full_embedding_batches_run_back_to_back_ahead_of_waiting_generation():
    # Three full embedding batches queue while generation runs and another generation batch waits: the batcher
    # hands the next full batch to the engine while one runs, so all three run before the waiting generation.
    engine, be = gated_engine(embed_waits=2, max_batch=2)

    async def main():
        held = asyncio.ensure_future(be.generate(["r4"], 4))
        await until_async(engine.entered.is_set)
        gen = asyncio.ensure_future(be.generate(["r5"], 5))
        await until_async(lambda: be._executor.pending() == 1)
        embs = [asyncio.ensure_future(be.embed([f"s{i}"])) for i in range(6)]
        await until_async(lambda: be._executor.pending() == 3)  # generate5, the first embedding batch, one ahead
        assert be.queued("embed") == 4  # the batch ahead still counts as queued until the one before it is answered
        engine.gate.set()
        return await held, await gen, await asyncio.gather(*embs)

    held, gen, embs = run(main())
    assert engine.log == ["gen4", "embed", "embed", "embed", "gen5"]
    assert held == ["r4:4"] and gen == ["r5:5"] and [e.shape for e in embs] == [(1, 2)] * 6
    assert be.stats()["embed"]["batches"] == 3 and be.queued() == 0
    be.close()


def test_waiting_generation_runs_after_embed_burst_embedding_batches():
    engine, be = gated_engine(embed_waits=9, max_batch=2, embed_burst=2)

    async def main():
        held = asyncio.ensure_future(be.generate(["r4"], 4))
        await until_async(engine.entered.is_set)
        gen = asyncio.ensure_future(be.generate(["r5"], 5))
        await until_async(lambda: be._executor.pending() == 1)
        embs = [asyncio.ensure_future(be.embed([f"s{i}"])) for i in range(20)]  # ten full batches
        await until_async(lambda: be._executor.pending() == 3)
        engine.gate.set()
        return await held, await gen, await asyncio.gather(*embs)

    run(main())
    assert engine.log == ["gen4", "embed", "embed", "gen5"] + ["embed"] * 8
    be.close()


def test_a_batch_whose_requests_timed_out_at_the_engine_thread_is_never_run():
    engine, be = gated_engine(timeout_s=0.2)

    async def main():
        held = asyncio.ensure_future(be.generate(["a"], 4))
        await until_async(engine.entered.is_set)
        queued = asyncio.ensure_future(be.generate(["b"], 5))
        await until_async(lambda: be._executor.pending() == 1)  # generate5 waits for the engine thread
        got = await asyncio.gather(held, queued, return_exceptions=True)
        engine.gate.set()
        return got, await be.generate(["c"], 6)  # same priority, submitted later: runs after generate5 would

    (held, queued), last = run(main())
    assert isinstance(held, RequestTimeout) and isinstance(queued, RequestTimeout) and last == ["c:6"]
    assert engine.log == ["gen4", "gen6"]  # generate5 was dropped at the engine thread
    assert be.stats()["generate5"]["batches"] == 0 and be.stats()["generate5"]["timeouts"] == 1
    be.close()


def test_close_cancels_queued_engine_work_and_answers_its_requests():
    engine, be = gated_engine(timeout_s=10)

    async def main():
        held = asyncio.ensure_future(be.generate(["a"], 4))
        await until_async(engine.entered.is_set)
        queued = [asyncio.ensure_future(be.generate(["b"], 5)), asyncio.ensure_future(be.embed(["c"]))]
        await until_async(lambda: be._executor.pending() == 2)
        be.close()
        got = await asyncio.gather(*queued, return_exceptions=True)  # answered now (503), not at their timeout (504)
        engine.gate.set()
        return await held, got

    held, got = run(main())
    assert held == ["a:4"]
    assert all(isinstance(r, Overloaded) and "shut down" in str(r) for r in got)
    be._executor._thread.join(5)
    assert engine.log == ["gen4"] and not be._executor._thread.is_alive()


# ------------------------------------------------------------------------------------------------ wait budget

def test_throughput_is_items_per_second_between_the_first_and_last_completion_in_the_window():
    now = [0.0]
    rate = Throughput(window_s=10.0, clock=lambda: now[0])
    assert rate.per_second() is None
    rate.record(2)
    assert rate.per_second() is None  # one completion: no interval yet
    for t, n in ((1.0, 4), (2.0, 4)):
        now[0] = t
        rate.record(n)
    now[0] = 5.0  # idle since the last completion: the rate is what the engine did while it worked
    assert rate.per_second() == pytest.approx(4.0)
    now[0] = 11.5  # the first two completions left the window
    assert rate.per_second() is None


class TimedEngine:
    """Embeddings that take `delay` seconds per call and wait at `gate` (open by default)."""

    embedding_dim = 2

    def __init__(self, delay: float):
        self.delay, self.gate = delay, threading.Event()
        self.gate.set()

    def embed(self, items):
        self.gate.wait(5)
        time.sleep(self.delay)
        return [[1.0, 0.0] for _ in items]


def test_the_door_refuses_work_that_would_wait_past_its_budget():
    engine = TimedEngine(delay=0.05)  # 2 items per call: at most 40 items/s
    be = BatchedEngine(engine, max_batch=2, max_wait_s=0.0, max_queue=1000, timeout_s=10,
                       max_queue_wait_s={"embed": 0.3, "generate": 0})

    async def main():
        for _ in range(4):  # the engine's rate, measured from these completions
            await be.embed(["a", "b"])
        assert be.admit(["embed"]) is None and be.expected_wait("embed") == 0
        engine.gate.clear()
        queued = [asyncio.ensure_future(be.embed(["a", "b"])) for _ in range(10)]
        await until_async(lambda: be.queued("embed") >= 16)
        refused, wait, retry = be.admit(["embed"]), be.expected_wait("embed"), be.retry_after(["embed"])
        other = be.admit(["generate"])  # no budget, no queue
        engine.gate.set()
        await asyncio.gather(*queued)
        return refused, wait, retry, other, be.admit(["embed"])

    refused, wait, retry, other, after = run(main())
    assert wait >= 16 / 40  # at least 16 items queued at no more than 40 items/s
    assert "embed items waiting, about" in refused and "serve.max_embed_queue_wait_s=0.3" in refused
    assert retry == max(1, int(-(-wait // 1)))
    assert other is None and after is None and be.shed == 1
    be.close()


def test_requests_past_the_door_count_as_waiting_until_their_work_is_queued():
    """A burst admitted while the queue was short is still being read and parsed: each of its requests counts as
    one waiting item of every kind of work it needs until it queues that work, so the door refuses the next one."""
    engine = TimedEngine(delay=0.05)
    be = BatchedEngine(engine, max_batch=2, max_wait_s=0.0, max_queue=1000, timeout_s=10,
                       max_queue_wait_s={"embed": 0.3, "generate": 0})

    async def main():
        for _ in range(4):  # the engine's rate: at most 40 items/s
            await be.embed(["a", "b"])
        with be.admission(["embed", "generate"]):
            during = be.waiting("embed"), be.waiting("generate")
            await be.embed(["a"])  # its embedding is queued (and done): it no longer counts
            after_embed = be.admitted["embed"], be.admitted["generate"]
        with ExitStack() as burst:
            for _ in range(16):  # 16 requests past the door, none queued yet: 16 / 40 items/s > 0.3 s
                burst.enter_context(be.admission(["embed"]))
            refused = be.admit(["embed"])
        return during, after_embed, refused, be.admit(["embed"]), dict(be.admitted)

    during, after_embed, refused, after_burst, left = run(main())
    assert during == (1, 1) and after_embed == (0, 1)
    assert refused is not None and refused.startswith("16 embed items waiting")
    assert after_burst is None and not any(left.values())
    be.close()
