"""Dynamic batching: requests from many clients share one ``predict`` call, each gets its rows back.

One worker thread takes the oldest waiting request and, when the traffic is busy (the last
batch gathered more than one request), waits up to ``max_wait_s`` (from that request's arrival)
for others until ``max_batch`` rows are queued; a lone request on a quiet server runs at once,
since nobody is coming to share its batch (``wait_when_idle``: wait anyway). It runs them as one batch and
hands each request its own slice, in order. Requests whose client went away (future cancelled)
or whose deadline passed are dropped before the batch runs, so they cost nothing. The queue is
bounded in requests: ``submit`` raises QueueFull at once past it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

log = logging.getLogger("runtime.server")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already; answer 503 with Retry-After."""


class ShuttingDown(Exception):
    """The batcher no longer accepts requests."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it was run."""


@dataclass
class _Item:
    x: object               # rows: a numpy array or a torch tensor, first dimension the batch
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: Optional[float]

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


class BatchObserver:
    """Hooks the batcher calls (the metrics implement them); every method is optional."""

    def on_batch(self, rows: int, requests: int, seconds: float):
        pass

    def on_queue_wait(self, seconds: float):
        pass

    def on_dropped(self, reason: str, rows: int):
        pass


def _apply(item: _Item, result, error: Optional[BaseException]):
    if item.future.done():  # cancelled: the client went away, or its deadline passed
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(result)


def _apply_all(answers: list):
    for item, result, error in answers:
        _apply(item, result, error)


def _resolve_all(answers: list):
    """Hand ``[(item, result, error)]`` to their event loops: one wake-up per loop, not per item."""
    by_loop: dict = {}
    for a in answers:
        by_loop.setdefault(a[0].loop, []).append(a)
    for loop, mine in by_loop.items():
        try:
            loop.call_soon_threadsafe(_apply_all, mine)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


def _resolve(item: _Item, result=None, error: Optional[BaseException] = None):
    _resolve_all([(item, result, error)])


def _concat(xs: list):
    """One batch from the requests' rows: numpy arrays stay numpy, anything else becomes torch."""
    if len(xs) == 1:
        return xs[0]
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.concatenate(xs)
    return torch.cat([torch.as_tensor(x) for x in xs])


class DynamicBatcher:
    """Gather queued requests into batches for ``predict(x) -> (out, exits)`` on a worker thread."""

    def __init__(self, predict: Callable, max_batch: int = 32, max_wait_s: float = 0.005,
                 max_queue: int = 256, observer: Optional[BatchObserver] = None,
                 wait_when_idle: bool = False):
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.observer = observer or BatchObserver()
        self._queue: collections.deque = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self.batch_seconds = 0.0   # running mean of one batch's time, for Retry-After
        self._busy = False         # the last batch gathered more than one request
        self.wait_when_idle = wait_when_idle

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queue)

    def start(self):
        self._thread = threading.Thread(target=self._run, name="layer-cache-batcher", daemon=True)
        self._thread.start()

    def submit(self, x, deadline: Optional[float] = None) -> asyncio.Future:
        """Queue ``x`` (rows already checked; numpy or torch); await the returned future for
        ``(out, exits)``, each the request's own rows of what ``predict`` returned.

        Call from the event loop. ``deadline`` is a ``time.monotonic()`` instant. Nothing here
        runs torch: its calls release the GIL, and the event loop would then wait for the
        batcher thread to hand it back.
        """
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.create_future(), loop, time.monotonic(), deadline)
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} requests waiting); retry later")
            self._queue.append(item)
            self._queued_rows += item.rows
            self._cond.notify()
        return item.future

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: the time to work off the queue, at least 1."""
        batches = max(1, self.depth * 1.0 / max(self.max_batch, 1))
        return max(1, int(batches * self.batch_seconds + 0.999))

    def close(self, drain: bool = True, timeout: float = 30.0):
        """Stop accepting; with ``drain`` answer what is queued first, else fail it (ShuttingDown)."""
        with self._cond:
            self._closing = True
            if not drain:
                _resolve_all([(item, None, ShuttingDown("the server shut down before running it"))
                              for item in self._queue])
                self._queue.clear()
                self._queued_rows = 0
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("batcher: queue not drained within %.0f s", timeout)
            self._thread = None

    # ----- worker -------------------------------------------------------------------------------
    def _take(self) -> Optional[list]:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            flush_at = self._queue[0].enqueued + self.max_wait_s
            while self._queued_rows < self.max_batch and not self._closing and \
                    (self._busy or self.wait_when_idle or len(self._queue) > 1):
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, rows = [], 0
            while self._queue:
                item = self._queue[0]
                if batch and rows + item.rows > self.max_batch:
                    break
                self._queue.popleft()
                self._queued_rows -= item.rows
                batch.append(item)
                rows += item.rows
            self._busy = len(batch) > 1
            return batch

    def _run(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.monotonic()
            live, expired = [], []
            for item in batch:
                if item.future.done():
                    self.observer.on_dropped("cancelled", item.rows)
                elif item.deadline is not None and now > item.deadline:
                    self.observer.on_dropped("deadline", item.rows)
                    expired.append((item, None, DeadlineExceeded(
                        f"deadline passed after {now - item.enqueued:.3f} s in the queue")))
                else:
                    self.observer.on_queue_wait(now - item.enqueued)
                    live.append(item)
            if expired:
                _resolve_all(expired)
            if live:
                self._serve(live)

    def _serve(self, items: list):
        t0 = time.perf_counter()
        try:
            x = _concat([i.x for i in items])
            out, exits = self.predict(x)
        except Exception as e:  # noqa: BLE001 - one bad request must not fail its neighbours
            if len(items) > 1:
                for item in items:
                    self._serve([item])
                return
            log.error("predict failed: %s: %s", type(e).__name__, e)
            _resolve(items[0], error=e)
            return
        seconds = time.perf_counter() - t0
        self.batch_seconds = 0.9 * self.batch_seconds + 0.1 * seconds if self.batch_seconds \
            else seconds
        self.observer.on_batch(int(x.shape[0]), len(items), seconds)
        answers, start = [], 0
        for item in items:
            stop = start + item.rows
            answers.append((item, (out[start:stop], exits[start:stop]), None))
            start = stop
        _resolve_all(answers)
