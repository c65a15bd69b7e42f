"""The micro-batcher of the uvicorn host: samples of concurrent requests explained together."""
import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ..errors import OnnxcamError
from .protocol import ApiError, QueueFull

class Batcher:
    """Gathers samples from concurrent `submit` calls into batches of at most `max_batch`, waiting at most
    `wait_s` after a batch's first sample for more, and runs `run_batch(samples) -> results` (one result or
    exception per sample) in `workers` threads. At most `max_queue` samples wait; beyond that `submit`
    raises QueueFull. `close` stops taking samples and finishes the queued and running ones."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int = 16, max_queue: int = 64,
                 wait_s: float = 0.005, workers: int = 1,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or workers < 1 or wait_s < 0:
            raise OnnxcamError("max_batch, max_queue and workers must be positive, the batch wait not negative")
        self.run_batch, self.max_batch, self.max_queue = run_batch, max_batch, max_queue
        self.wait_s, self.workers, self.on_batch = wait_s, workers, on_batch
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._closing = False
        self._started = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Call from the running event loop (the app's lifespan)."""
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._free = asyncio.Semaphore(self.workers)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="onnxcam-batch")
        self._running: set[asyncio.Task] = set()
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._started = True

    async def submit(self, samples: Sequence) -> list:
        """Queues all samples (or none) and returns their results in order."""
        if not self._started or self._closing:
            raise QueueFull("the server is not accepting work (starting or shutting down)")
        if len(samples) > self.max_queue:
            raise ApiError(413, f"{len(samples)} instances in one request; at most {self.max_queue} (--max-queue)")
        if len(self._queue) + len(samples) > self.max_queue:  # forget samples whose request went away
            self._queue = deque(item for item in self._queue if not item[1].done())
        if len(self._queue) + len(samples) > self.max_queue:
            raise QueueFull(f"server busy: {len(self._queue)} samples queued (--max-queue {self.max_queue})")
        futures = [self._loop.create_future() for _ in samples]
        self._queue.extend(zip(samples, futures))
        self._arrived.set()
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        if not self._started:
            return
        self._closing = True
        self._arrived.set()
        await self._dispatcher
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _dispatch(self) -> None:
        while True:
            await self._free.acquire()  # a worker is free: whatever queued meanwhile joins the next batch
            batch = await self._collect()
            if not batch:  # closing and drained
                self._free.release()
                return
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _collect(self) -> list:
        batch: list = []
        deadline = 0.0
        while len(batch) < self.max_batch:
            if self._queue:
                item = self._queue.popleft()
                if not item[1].done():  # skip samples whose request went away
                    if not batch:
                        deadline = self._loop.time() + self.wait_s
                    batch.append(item)
                continue
            if self._closing:
                break
            self._arrived.clear()
            if not batch:
                await self._arrived.wait()
                continue
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self, batch: list) -> None:
        try:
            start = time.perf_counter()
            try:
                results = await self._loop.run_in_executor(self._executor, self.run_batch,
                                                           [sample for sample, _ in batch])
            except Exception as exc:
                results = [exc] * len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - start)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._free.release()
