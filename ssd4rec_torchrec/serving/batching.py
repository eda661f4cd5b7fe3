"""Micro-batching: requests from concurrent coroutines share one call of a batch function in a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(RuntimeError):
    """The micro-batch queue is full."""


class MicroBatcher(Generic[T, R]):
    """Queues items from concurrent coroutines and runs ``fn`` on batches of up to ``max_batch`` of them in a
    worker thread, after at most ``max_wait_ms`` from a batch's first item. ``on_batch(n)`` is called (in the
    event loop) with the size of every batch that ran. Items whose caller gave up (a cancelled future, e.g.
    a missed deadline) are dropped before the batch runs."""

    def __init__(self, fn: Callable[[list[T]], list[R]], max_batch: int = 64, max_wait_ms: float = 2.0,
                 max_queue: int = 10_000, on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tower")
        self.queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.items = 0

    def depth(self) -> int:
        """Items waiting in the queue now."""
        return self.queue.qsize() if self.queue is not None else 0

    def _start(self) -> asyncio.Queue[tuple[T, asyncio.Future[R]]]:
        loop = asyncio.get_running_loop()
        if self.queue is None or self.loop is not loop or self.task is None or self.task.done():
            self.loop, self.queue = loop, asyncio.Queue()
            self.task = loop.create_task(self._worker())
        return self.queue

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        queue = self._start()
        if queue.qsize() + len(items) > self.max_queue:
            raise Overloaded(f"{queue.qsize()} requests queued")
        futures = [asyncio.get_running_loop().create_future() for _ in items]
        for item, fut in zip(items, futures):
            queue.put_nowait((item, fut))
        return list(await asyncio.gather(*futures))

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    async def _collect(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _worker(self) -> None:
        queue = self.queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, fut) for item, fut in await self._collect(queue) if not fut.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # the requests get the error (500); the worker lives on
                log.exception("micro-batch of %d failed", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.items += len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["MicroBatcher", "Overloaded"]
