"""Dynamic batching: requests that arrive together run as one forward pass.

A model on a CPU or a GPU answers a batch of B images in much less than B times one image's time, but a
service's clients send one image each. The batcher sits between them (TorchServe's and Triton's dynamic
batching, in a few lines of asyncio):

    the first request opens a batch; it closes when it holds `max_batch` images, or `max_wait` seconds after
    that first request arrived, whichever comes first; it then runs in the model's one thread while the next
    batch gathers.

So a lone client waits at most `max_wait` beyond its own forward pass (and not at all when `max_batch` is 1),
and under load the batches fill while the model is busy, without waiting. Requests that ask for different
things (another inference mode) are batched apart, by their `key`. A batch that fails (out of memory, one
image the model cannot take) is run again one request at a time, so that a failing request fails alone and
the others are answered.
"""

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class QueueFull(Exception):
    """More requests are waiting than the service takes; the client may try again later (HTTP 503)."""


@dataclass
class Pending:
    key: object  # requests of one key run together (the inference mode)
    payload: object  # what run_batch receives for it (an image)
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """run_batch(key, payloads) -> one result per payload, in order; it runs in one worker thread (the
    model's), never two batches at a time. submit() awaits a request's result, or raises its exception."""

    def __init__(self, run_batch, *, max_batch: int = 8, max_wait: float = 0.01, max_queue: int = 256):
        if max_batch < 1 or max_wait < 0 or max_queue < 1:
            raise ValueError(f"max_batch >= 1, max_wait >= 0 and max_queue >= 1 expected, got {max_batch}, "
                             f"{max_wait}, {max_queue}")
        self.run_batch, self.max_batch, self.max_wait, self.max_queue = run_batch, max_batch, max_wait, max_queue
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.sizes = Counter()  # batch size -> how many batches ran at it
        self.in_flight = 0  # submitted, not answered yet
        self.alive = False

    def settings(self) -> dict:
        return {"max_batch": self.max_batch, "max_wait_ms": round(self.max_wait * 1000, 3),
                "max_queue": self.max_queue}

    def stats(self) -> dict:
        """The requests waiting or running; the batches so far, by size ({size: count}), and the requests they
        answered."""
        return {"in_flight": self.in_flight, "batches": sum(self.sizes.values()),
                "requests": sum(s * n for s, n in self.sizes.items()),
                "batch_sizes": {str(size): count for size, count in sorted(self.sizes.items())}}

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self.serve_batches(), name="batcher")
        self.alive = True

    async def stop(self) -> None:
        """Answer what is queued, then stop (a service's shutdown, after its requests in flight)."""
        self.alive = False
        if self.worker is not None:
            await self.queue.put(None)
            await self.worker
        self.model_thread.shutdown(wait=True)

    async def submit(self, key, payload):
        if not self.alive:
            raise QueueFull("the service is shutting down")
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.queue.qsize()} requests are waiting (at most {self.max_queue}): try again later")
        pending = Pending(key, payload, asyncio.get_running_loop().create_future())
        self.in_flight += 1
        try:
            await self.queue.put(pending)
            return await pending.future
        finally:
            self.in_flight -= 1

    async def serve_batches(self) -> None:
        stopping = False
        while not stopping:
            first = await self.queue.get()
            if first is None:
                break
            batch = [first]
            deadline = first.arrived + self.max_wait
            while len(batch) < self.max_batch:
                try:  # what is queued already joins at once; then wait for more until the deadline
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except TimeoutError:
                        break
                if item is None:  # stop after this batch
                    stopping = True
                    break
                batch.append(item)
            for key in dict.fromkeys(p.key for p in batch):
                await self.run([p for p in batch if p.key == key])
        while not self.queue.empty():  # requests that came with the stop: answered too
            item = self.queue.get_nowait()
            if item is not None:
                await self.run([item])

    async def run(self, group: list[Pending]) -> None:
        group = [p for p in group if not p.future.cancelled()]  # a client that went away is not run for
        if not group:
            return
        loop = asyncio.get_running_loop()
        key, payloads = group[0].key, [p.payload for p in group]
        try:
            results = await loop.run_in_executor(self.model_thread, self.run_batch, key, payloads)
            self.sizes[len(group)] += 1
        except Exception as error:
            if len(group) == 1:
                self.sizes[1] += 1
                settle(group[0].future, error=error)
                return
            for pending in group:  # one at a time: the failing request fails alone
                await self.run([pending])
            return
        for pending, result in zip(group, results):
            settle(pending.future, result=result)


def settle(future: asyncio.Future, *, result=None, error=None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
