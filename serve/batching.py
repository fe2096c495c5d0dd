"""Dynamic batching of concurrent requests for an engine, with a bounded queue and per-request timeouts.

Each request (a list of items) waits in an asyncio queue; one worker task per operation collects items from the
queue until the batch is full (`max_batch`) or the first item has waited `max_wait_s`, then runs the engine on the
whole batch in a worker thread (so the event loop keeps accepting requests). All operations share one engine thread:
a model runs one batch at a time, and interleaving two batches would only slow both down.

Back-pressure instead of unbounded latency: a request that would push the number of queued items past `max_queue`
is refused at once with `Overloaded` (HTTP 503), and a request still unanswered after `timeout_s` gets
`RequestTimeout` (HTTP 504); if it was still queued, its items are dropped and never computed.

Written here rather than taken from a library: the batching libraries on PyPI (e.g. Ray Serve's @serve.batch) need
their own serving runtime; this is the ~100-line core that a FastAPI app on one engine needs.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


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


class MicroBatcher:
    """Groups the items of concurrent `submit` calls into batches for `fn(items) -> results` (same length)."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], *, max_batch: int, max_wait_s: float,
                 max_queue: int, timeout_s: float, executor: ThreadPoolExecutor | None = None, name: str = "batch"):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"{name}: max_batch and max_queue must be >= 1 (got {max_batch}, {max_queue})")
        self.fn, self.name = fn, name
        self.max_batch, self.max_wait_s, self.max_queue, self.timeout_s = max_batch, max_wait_s, max_queue, timeout_s
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        self.stats = BatchStats()
        self.queued_items = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Pending | None = None

    def _ensure_worker(self) -> asyncio.Queue:
        # Created lazily inside the serving event loop (the app's loop, or a test's), never at import time.
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue, self._carry, self.queued_items = asyncio.Queue(), None, 0
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
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), self.timeout_s)
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            pending.future.cancel()  # still queued: the worker skips it; already running: its result is dropped
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
        while True:
            batch = await self._collect()
            for p in batch:  # a carried request stays counted until it opens its own batch
                self.queued_items -= len(p.items)
            live = [p for p in batch if not p.future.done()]  # timed-out requests are not computed
            if live:
                await self._execute(loop, live)

    async def _execute(self, loop, live: list[_Pending]) -> None:
        items = [it for p in live for it in p.items]
        try:
            results = await loop.run_in_executor(self.executor, self.fn, items)
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


class BatchedEngine:
    """An `Engine` behind micro-batchers: `await embed(items)` and `await generate(items, max_new_tokens)` from
    many concurrent requests become few engine calls. All batchers share one engine thread."""

    def __init__(self, engine, *, max_batch: int, max_wait_s: float, max_queue: int, timeout_s: float):
        self.engine, self.max_queue = engine, max_queue
        self.shed = 0  # requests refused by `admit` before they were read
        self._kw = dict(max_batch=max_batch, max_wait_s=max_wait_s, max_queue=max_queue, timeout_s=timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.embedder = MicroBatcher(lambda items: list(engine.embed(items)), executor=self._executor, name="embed",
                                     **self._kw)
        self._generators: dict[int, MicroBatcher] = {}
        self._concurrent: ConcurrentCalls | None = None
        if getattr(engine, "concurrent_calls", False):  # the engine batches across calls (vLLM)
            self._pool = ThreadPoolExecutor(max_workers=max(4, min(max_queue, 128)), thread_name_prefix="engine-gen")
            self._concurrent = ConcurrentCalls(engine.generate, max_queue=max_queue, timeout_s=timeout_s,
                                               executor=self._pool, name="generate")

    async def embed(self, items: Sequence[Any]):
        import numpy as np

        rows = await self.embedder.submit(items)
        return np.stack(rows) if rows else np.zeros((0, self.engine.embedding_dim), dtype=np.float32)

    async def generate(self, items: Sequence[Any], max_new_tokens: int) -> list[str]:
        if self._concurrent is not None:
            return await self._concurrent.submit(items, max_new_tokens)
        # One batcher per answer length: requests in one engine call share max_new_tokens.
        if max_new_tokens not in self._generators:
            self._generators[max_new_tokens] = MicroBatcher(
                lambda items, n=max_new_tokens: self.engine.generate(items, n), executor=self._executor,
                name=f"generate{max_new_tokens}", **self._kw)
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

    def admit(self, ops: Sequence[str]) -> bool:
        """The server's door check for a new request, before its body is read: False (and counted) while a kind of
        work the request needs already has `max_queue` items. Each batcher's own bound still applies to the
        requests admitted (`submit` raises `Overloaded`)."""
        if any(self.queued(op) >= self.max_queue for op in ops):
            self.shed += 1
            return False
        return True

    def overloaded(self) -> int:
        """Requests refused with 503 so far: at the door (`admit`) and by a full operation queue."""
        return self.shed + sum(b.stats.overloaded for b in self._batchers())

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._concurrent is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
