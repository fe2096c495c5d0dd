"""Dynamic batching of concurrent requests for an engine, with a bounded queue and per-request timeouts.

Each request (a list of items) waits in an asyncio queue; one worker task per operation collects items from the
queue until the batch is full (`max_batch`) or the first item has waited `max_wait_s`, then runs the engine on the
whole batch in a worker thread (so the event loop keeps accepting requests). All operations share one engine thread:
a model runs one batch at a time, and interleaving two batches would only slow both down.

The engine thread (`PriorityEngineThread`) takes its jobs in priority order, not in arrival order: embedding batches
(short: one forward pass) before generation batches (a whole decode), FIFO within a priority, so under overload an
embedding waits for the batch that is running, not for every reason batch queued before it. Starvation rule: after
`burst` jobs in a row (default 4) that each overtook an older waiting job, the next job is the oldest waiting one,
so generation still runs at least once every `burst + 1` jobs under a continuous stream of embeddings. While a batch
is with the engine, a batcher whose queue already holds a full batch hands that batch to the engine thread too (at
most one ahead): without it, the next embedding batch would be formed only once the last one has returned to the
event loop, by which time the engine thread has already started a waiting generation batch.

Back-pressure instead of unbounded latency: a request that would push the number of queued items past `max_queue`
is refused at once with `Overloaded` (HTTP 503); so is one that would wait longer than the kind of work's wait budget
(`BatchedEngine.max_queue_wait_s`, from the items queued and the rate the engine has been answering them at: a count
bound that is right on a GPU lets a queue of tens of seconds build up on a CPU). A request still unanswered after
`timeout_s` gets `RequestTimeout` (HTTP 504); if it was still queued, its items are dropped and never computed (so
is a batch waiting for the engine thread once all of its requests have timed out).

Written here rather than taken from a library: the batching libraries on PyPI (e.g. Ray Serve's @serve.batch) need
their own serving runtime; this is the small core that a FastAPI app on one engine needs.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
import weakref
from collections import Counter, deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

# Priorities of the engine work (`PriorityEngineThread`): lower runs first.
EMBED_PRIORITY = 0
GENERATE_PRIORITY = 1


class Overloaded(RuntimeError):
    """The queue is full: the client should retry later (HTTP 503)."""


class RequestTimeout(TimeoutError):
    """The request was not answered within the configured timeout (HTTP 504)."""


@dataclass
class _Pending:
    items: Sequence[Any]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    overloaded: int = 0
    timeouts: int = 0
    failed_batches: int = 0  # a batch that raised and was re-run request by request

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Throughput:
    """Items answered per second over the last `window_s` seconds, from the completions themselves: the rate a
    queue drains at, whatever the hardware. None until two completions fall in the window (nothing to divide by).
    Updated and read on the event loop only."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.perf_counter):
        self.window_s, self.clock = window_s, clock
        self._done: deque[tuple[float, int]] = deque()

    def record(self, items: int) -> None:
        now = self.clock()
        self._done.append((now, items))
        self._trim(now)

    def per_second(self) -> float | None:
        self._trim(self.clock())
        if len(self._done) < 2:
            return None
        span = self._done[-1][0] - self._done[0][0]  # first to last completion: idle time after them does not count
        return sum(n for _, n in itertools.islice(self._done, 1, None)) / span if span > 0 else None

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()


@dataclass
class _Job:
    seq: int
    future: Future
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict


class _EngineQueue:
    """The state the engine thread reads (kept apart from `PriorityEngineThread` so that the thread holds no
    reference to it, and dropping an unused `PriorityEngineThread` ends its thread, as a ThreadPoolExecutor does)."""

    def __init__(self, burst: int):
        self.burst = burst
        self.cv = threading.Condition()
        self.levels: dict[int, deque[_Job]] = {}
        self.seq = itertools.count()
        self.overtakes = 0  # consecutive jobs taken ahead of an older waiting job
        self.shutdown = False
        self.thread: threading.Thread | None = None

    def close(self, cancel: bool = False) -> None:
        with self.cv:
            self.shutdown = True
            if cancel:
                for q in self.levels.values():
                    while q:
                        q.popleft().future.cancel()
            self.cv.notify_all()

    def take(self) -> _Job | None:
        """The next job to run, marked running; None when there is none. Called with `cv` held."""
        while True:
            heads = []
            for prio in sorted(self.levels):
                q = self.levels[prio]
                while q and q[0].future.cancelled():  # cancelled while waiting: never run
                    q.popleft()
                if q:
                    heads.append(q[0])
            if not heads:
                return None
            first, oldest = heads[0], min(heads, key=lambda j: j.seq)
            # The starvation rule: `burst` overtakes in a row, then the oldest waiting job, whatever its priority.
            job = oldest if oldest is not first and self.overtakes >= self.burst else first
            for q in self.levels.values():
                if q and q[0] is job:
                    q.popleft()
                    break
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled just now
            self.overtakes = self.overtakes + 1 if job is not oldest else 0
            return job


_engine_queues: weakref.WeakSet[_EngineQueue] = weakref.WeakSet()


def _at_exit() -> None:
    # As concurrent.futures does for its executors: before the interpreter finalizes, stop the engine threads and
    # join them. Queued jobs are dropped (nobody waits for them), a running one finishes. A thread still inside the
    # engine at finalization would be torn down in its C++ code (std::terminate: the process aborts).
    states = list(_engine_queues)
    for state in states:
        state.close(cancel=True)
    for state in states:
        if state.thread is not None:
            state.thread.join()


threading._register_atexit(_at_exit)


def _engine_loop(state: _EngineQueue) -> None:
    while True:
        with state.cv:
            job = state.take()
            while job is None and not state.shutdown:
                state.cv.wait()
                job = state.take()
            if job is None:  # shut down and nothing left
                return
        try:
            result = job.fn(*job.args, **job.kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future, as an executor does
            job.future.set_exception(e)
        else:
            job.future.set_result(result)
        del job


class PriorityEngineThread:
    """One engine thread whose jobs run in priority order: `submit(priority, fn, *args)` returns a
    `concurrent.futures.Future`; the lowest priority number waiting runs next, FIFO within a priority.

    Starvation rule: a job that is taken while an older job of a less urgent priority waits "overtakes" it; after
    `burst` overtakes in a row the next job is the oldest waiting one, whatever its priority (then the count starts
    again). With two priorities, a waiting job of the less urgent one runs after at most `burst` more urgent jobs
    submitted after it (plus the running one and those submitted before it). A future cancelled before its job
    starts is never run. `shutdown` as `Executor.shutdown`."""

    def __init__(self, *, burst: int = 4, name: str = "engine"):
        if burst < 1:
            raise ValueError(f"burst must be >= 1 (got {burst})")
        self.name = name
        self._state = _EngineQueue(burst)
        _engine_queues.add(self._state)
        weakref.finalize(self, self._state.close)  # unreferenced: the thread finishes what it has and ends

    @property
    def burst(self) -> int:
        return self._state.burst

    @property
    def _thread(self) -> threading.Thread | None:
        return self._state.thread

    def submit(self, priority: int, fn: Callable[..., Any], /, *args, **kwargs) -> Future:
        st, future = self._state, Future()
        with st.cv:
            if st.shutdown:
                raise RuntimeError(f"{self.name}: cannot schedule new work after shutdown")
            st.levels.setdefault(priority, deque()).append(_Job(next(st.seq), future, fn, args, kwargs))
            if st.thread is None:
                # Not a daemon even when submitted from one (a server's event loop thread): joined at exit.
                st.thread = threading.Thread(target=_engine_loop, args=(st,), name=self.name, daemon=False)
                st.thread.start()
            st.cv.notify()
        return future

    def pending(self, priority: int | None = None) -> int:
        """Jobs waiting (not running, not cancelled): all, or of one priority."""
        with self._state.cv:
            return sum(not j.future.cancelled() for p, q in self._state.levels.items() if priority in (None, p)
                       for j in q)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._state.close(cancel=cancel_futures)
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


class MicroBatcher:
    """Groups the items of concurrent `submit` calls into batches for `fn(items) -> results` (same length)."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], *, max_batch: int, max_wait_s: float,
                 max_queue: int, timeout_s: float, executor: PriorityEngineThread | Executor | None = None,
                 priority: int = 0, name: str = "batch"):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"{name}: max_batch and max_queue must be >= 1 (got {max_batch}, {max_queue})")
        self.fn, self.name, self.priority = fn, name, priority
        self.max_batch, self.max_wait_s, self.max_queue, self.timeout_s = max_batch, max_wait_s, max_queue, timeout_s
        self.executor = executor or PriorityEngineThread(name=f"engine-{name}")
        self.stats = BatchStats()
        self.throughput = Throughput()
        self.queued_items = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Pending | None = None
        self._wake: asyncio.Future | None = None  # set by `submit` when a full batch waits

    def _ensure_worker(self) -> asyncio.Queue:
        # Created lazily inside the serving event loop (the app's loop, or a test's), never at import time.
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue, self._carry, self._wake, self.queued_items = asyncio.Queue(), None, None, 0
            self._worker = loop.create_task(self._run(), name=f"batcher-{self.name}")
        return self._queue

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        if len(items) > self.max_batch:
            raise ValueError(f"{len(items)} items in one request; at most {self.max_batch} are allowed")
        if self.queued_items + len(items) > self.max_queue:
            self.stats.overloaded += 1
            raise Overloaded(f"server busy: {self.queued_items} items queued (limit {self.max_queue}); retry later")
        queue = self._ensure_worker()
        pending = _Pending(items, asyncio.get_running_loop().create_future())
        self.queued_items += len(items)
        queue.put_nowait(pending)
        if self.queued_items >= self.max_batch and self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), self.timeout_s)
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            # Still queued: the worker skips it. In a batch waiting for the engine thread: the batch is dropped once
            # all of its requests have timed out. Already running: its result is dropped.
            pending.future.cancel()
            raise RequestTimeout(f"request not answered within {self.timeout_s:g}s") from None

    async def _collect(self) -> list[_Pending]:
        queue = self._queue
        first, self._carry = (self._carry, None) if self._carry is not None else (await queue.get(), None)
        batch, size = [first], len(first.items)
        deadline = time.perf_counter() + self.max_wait_s
        while size < self.max_batch:
            if queue.empty():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    break
            else:
                nxt = queue.get_nowait()
            if size + len(nxt.items) > self.max_batch:
                self._carry = nxt  # does not fit: it opens the next batch (order is kept)
                break
            batch.append(nxt)
            size += len(nxt.items)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        inflight: asyncio.Task | None = None  # the last batch handed to the engine, until it is answered
        while True:
            if inflight is not None:
                await self._until_answered_or_full(loop, inflight)
            ahead = inflight is not None and not inflight.done()  # a full batch waits: hand it over now
            batch = await self._collect()
            live = [p for p in batch if not p.future.done()]  # timed-out requests are not computed
            if ahead and live:
                # At most one batch ahead; its items count as queued until the batch before it is answered.
                task = loop.create_task(self._execute(loop, live))
                await asyncio.wait({inflight})
                inflight = task
            elif live:
                inflight = loop.create_task(self._execute(loop, live))
            for p in batch:  # a carried request stays counted until it opens its own batch
                self.queued_items -= len(p.items)

    async def _until_answered_or_full(self, loop, inflight: asyncio.Task) -> None:
        while not inflight.done() and self.queued_items < self.max_batch:
            self._wake = loop.create_future()
            await asyncio.wait({inflight, self._wake}, return_when=asyncio.FIRST_COMPLETED)
        self._wake = None

    def _submit_job(self, items: list[Any]) -> Future:
        if isinstance(self.executor, PriorityEngineThread):
            return self.executor.submit(self.priority, self.fn, items)
        return self.executor.submit(self.fn, items)

    async def _execute(self, loop, live: list[_Pending]) -> None:
        items = [it for p in live for it in p.items]
        try:
            job = self._submit_job(items)

            def abandon(_):  # every request of the batch timed out: a job still waiting for the engine is dropped
                if all(p.future.done() for p in live):
                    job.cancel()  # no effect once it runs

            for p in live:
                p.future.add_done_callback(abandon)
            answer = asyncio.wrap_future(job)
            try:
                await asyncio.wait({answer})  # unlike `await answer`, not raising when the job is cancelled
            except asyncio.CancelledError:  # this task was cancelled (the event loop is closing)
                job.cancel()
                raise
            if answer.cancelled():  # dropped before it ran: its requests timed out, or the engine shut down
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(Overloaded(f"{self.name}: the engine shut down; retry later"))
                return
            results = answer.result()
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: engine returned {len(results)} results for {len(items)} items")
        except Exception as e:  # noqa: BLE001 - one bad request must not fail the others: re-run one by one
            if len(live) > 1:
                self.stats.failed_batches += 1
                for p in live:
                    await self._execute(loop, [p])
            elif not live[0].future.done():
                live[0].future.set_exception(e)
            return
        self.stats.batches += 1
        self.stats.items += len(items)
        self.throughput.record(len(items))
        start = 0
        for p in live:
            if not p.future.done():
                p.future.set_result(list(results[start : start + len(p.items)]))
            start += len(p.items)


class ConcurrentCalls:
    """For engines that batch across concurrent calls themselves (vLLM's continuous batching: `concurrent_calls =
    True` on the engine): each request is its own engine call from a thread pool, so it joins the running batch at
    once; only the queue bound (503) and the timeout (504) apply. Items count as queued until their call returns,
    also after a timeout, so abandoned work still holds its place and load cannot grow without bound."""

    def __init__(self, fn: Callable[..., Sequence[Any]], *, max_queue: int, timeout_s: float,
                 executor: ThreadPoolExecutor, name: str = "calls"):
        self.fn, self.max_queue, self.timeout_s, self.executor, self.name = fn, max_queue, timeout_s, executor, name
        self.stats = BatchStats()
        self.throughput = Throughput()
        self.queued_items = 0

    async def submit(self, items: Sequence[Any], *args) -> list[Any]:
        if not items:
            return []
        if self.queued_items + len(items) > self.max_queue:
            self.stats.overloaded += 1
            raise Overloaded(f"server busy: {self.queued_items} items in flight (limit {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        self.queued_items += len(items)

        def done(_):
            self.queued_items -= len(items)
            self.stats.batches += 1
            self.stats.items += len(items)
            self.throughput.record(len(items))

        def done_threadsafe(f):
            try:
                loop.call_soon_threadsafe(done, f)
            except RuntimeError:  # the loop has closed (server shut down): nothing left to count
                pass

        call = self.executor.submit(self.fn, list(items), *args)
        call.add_done_callback(done_threadsafe)
        try:
            return list(await asyncio.wait_for(asyncio.wrap_future(call), self.timeout_s))
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            raise RequestTimeout(f"request not answered within {self.timeout_s:g}s") from None


class Admission:
    """The kinds of work a request admitted at the door has not yet queued. Until it does, it counts as one waiting
    item of each (`BatchedEngine.waiting`): under overload, a burst of requests passes the door while the queue is
    still short, and each is read, parsed and turned into engine inputs before its items reach the queue; counting
    only queued items, the door would admit the whole burst. (It was added when embeddings p50 at c=192 was 2.5x
    its c=64 value with a 2 s budget; that turned out to be the benchmark's own httpx client, not time between the
    door and the queue: docs/benchmarks.md. It stays as the guard against bursts it was written for; its tests
    fail without it.)"""

    def __init__(self, counts: Counter, ops: Sequence[str]):
        self.counts, self.ahead = counts, set(ops)
        for op in self.ahead:
            counts[op] += 1

    def queued(self, op: str) -> None:
        """The request's `op` items are in the queue now (or it will not queue any)."""
        if op in self.ahead:
            self.ahead.remove(op)
            self.counts[op] -= 1

    def close(self) -> None:
        for op in list(self.ahead):
            self.queued(op)


# The admission of the request being handled: set by `BatchedEngine.admission` around the app, read by
# `embed`/`generate` in the same request's task (Starlette runs endpoints in tasks that copy the context).
_ADMISSION: ContextVar[Admission | None] = ContextVar("llmrec_admission", default=None)


def _now_queued(op: str) -> None:
    admission = _ADMISSION.get()
    if admission is not None:
        admission.queued(op)


class BatchedEngine:
    """An `Engine` behind micro-batchers: `await embed(items)` and `await generate(items, max_new_tokens)` from
    many concurrent requests become few engine calls. All batchers share one engine thread, which runs a waiting
    embedding batch before waiting generation batches, except that after `embed_burst` embedding batches in a row
    that overtook a waiting generation batch, the oldest waiting generation batch runs (`PriorityEngineThread`).

    `max_queue_wait_s` (per kind of work, `embed` / `generate`; 0 or absent = no bound): the door check refuses a
    request whose work would wait longer than that behind the items already queued (`expected_wait`)."""

    def __init__(self, engine, *, max_batch: int, max_wait_s: float, max_queue: int, timeout_s: float,
                 embed_burst: int = 4, max_queue_wait_s: dict[str, float] | None = None):
        self.engine, self.max_queue = engine, max_queue
        self.max_queue_wait_s = {op: s for op, s in (max_queue_wait_s or {}).items() if s > 0}
        self.shed = 0  # requests refused by `admit` before they were read
        self.admitted: Counter = Counter()  # requests admitted whose work of a kind is not queued yet (`Admission`)
        self._kw = dict(max_batch=max_batch, max_wait_s=max_wait_s, max_queue=max_queue, timeout_s=timeout_s)
        self._executor = PriorityEngineThread(burst=embed_burst, name="engine")
        self.embedder = MicroBatcher(lambda items: list(engine.embed(items)), executor=self._executor,
                                     priority=EMBED_PRIORITY, name="embed", **self._kw)
        self._generators: dict[int, MicroBatcher] = {}
        self._concurrent: ConcurrentCalls | None = None
        if getattr(engine, "concurrent_calls", False):  # the engine batches across calls (vLLM)
            self._pool = ThreadPoolExecutor(max_workers=max(4, min(max_queue, 128)), thread_name_prefix="engine-gen")
            self._concurrent = ConcurrentCalls(engine.generate, max_queue=max_queue, timeout_s=timeout_s,
                                               executor=self._pool, name="generate")

    async def embed(self, items: Sequence[Any]):
        import numpy as np

        _now_queued("embed")
        rows = await self.embedder.submit(items)
        return np.stack(rows) if rows else np.zeros((0, self.engine.embedding_dim), dtype=np.float32)

    async def generate(self, items: Sequence[Any], max_new_tokens: int) -> list[str]:
        _now_queued("generate")
        if self._concurrent is not None:
            return await self._concurrent.submit(items, max_new_tokens)
        # One batcher per answer length: requests in one engine call share max_new_tokens.
        if max_new_tokens not in self._generators:
            self._generators[max_new_tokens] = MicroBatcher(
                lambda items, n=max_new_tokens: self.engine.generate(items, n), executor=self._executor,
                priority=GENERATE_PRIORITY, name=f"generate{max_new_tokens}", **self._kw)
        return await self._generators[max_new_tokens].submit(items)

    def stats(self) -> dict[str, dict[str, int]]:
        return {b.name: b.stats.as_dict() for b in self._batchers()}

    def _batchers(self) -> list:
        return [self.embedder, *self._generators.values(), *([self._concurrent] if self._concurrent else [])]

    def queued(self, op: str | None = None) -> int:
        """Items waiting (or, for an engine that batches across calls, in flight): all, or of one kind of work,
        `embed` or `generate` (all answer lengths together)."""
        if op == "embed":
            return self.embedder.queued_items
        if op == "generate":
            return sum(b.queued_items for b in self._batchers() if b is not self.embedder)
        return sum(b.queued_items for b in self._batchers())

    def waiting(self, op: str) -> int:
        """Work of kind `op` ahead of a new request: the items queued, plus one per admitted request that has not
        queued its `op` work yet (`Admission`)."""
        return self.queued(op) + self.admitted[op]

    @contextmanager
    def admission(self, ops: Sequence[str]) -> Iterator[Admission]:
        """Around the handling of a request `admit` let in: its work counts as waiting until it is queued."""
        admission = Admission(self.admitted, ops)
        token = _ADMISSION.set(admission)
        try:
            yield admission
        finally:
            _ADMISSION.reset(token)
            admission.close()

    def expected_wait(self, op: str) -> float | None:
        """Seconds a new item of `op` would wait behind the work waiting now (`waiting`), at the rate the engine
        has answered that kind of work lately (Little's law); None while that rate is unknown (no recent
        completions)."""
        rates = [r for b in self._batchers() if (b is self.embedder) == (op == "embed")
                 if (r := b.throughput.per_second()) is not None]
        return self.waiting(op) / sum(rates) if rates and sum(rates) > 0 else None

    def refusal(self, ops: Sequence[str]) -> str | None:
        """Why a new request needing `ops` would be refused now, or None: a kind of work at `max_queue` items, or
        one whose expected wait is over its `max_queue_wait_s`."""
        for op in ops:
            if self.queued(op) >= self.max_queue:
                return f"{self.queued(op)} {op} items queued (limit {self.max_queue})"
            wait, budget = self.expected_wait(op), self.max_queue_wait_s.get(op)
            if budget is not None and wait is not None and wait > budget:
                return (f"{self.waiting(op)} {op} items waiting, about {wait:.1f}s of work "
                        f"(serve.max_{op}_queue_wait_s={budget:g})")
        return None

    def admit(self, ops: Sequence[str]) -> str | None:
        """The server's door check for a new request, before its body is read: None to admit it, else why it is
        refused (`refusal`; counted in `shed`). Each batcher's own count bound still applies to the requests admitted
        (`submit` raises `Overloaded`)."""
        why = self.refusal(ops)
        if why is not None:
            self.shed += 1
        return why

    def retry_after(self, ops: Sequence[str]) -> int:
        """Seconds a refused client should wait (Retry-After): the longest expected wait of its work, at least 1."""
        waits = [w for op in ops if (w := self.expected_wait(op)) is not None]
        return max(1, math.ceil(max(waits, default=1.0)))

    def overloaded(self) -> int:
        """Requests refused with 503 so far: at the door (`admit`) and by a full operation queue."""
        return self.shed + sum(b.stats.overloaded for b in self._batchers())

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._concurrent is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
