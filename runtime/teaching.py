"""Deferred teaching: a request is answered first; a background thread then computes what it teaches.

A request that teaches would otherwise pay, on its own latency, for every exit's pooled features
(about +15% of the backbone's time on the demo model) and for buffering them (Python work that
counts at batch 1). In background mode the runtime instead answers it on the fastest path and
hands its rows that reached the end to this queue; one thread runs them, batched, through the
backbone again with every exit's features and buffers them. Those rows cost twice the CPU, but no
request waits for it.

When the thread falls behind (more than one batch waiting: the CPU or the GIL is saturated,
e.g. by many serving threads), requests teach inline again until it catches up, so a busy
service still learns as fast as it did without this thread. The queue is also bounded in bytes
of input: a request that finds it full does not teach (counted). Items carry the
drift generation they were served in; an item from before a drift alarm is dropped, not
learned from.
"""
import collections
import logging
import threading
import weakref
from typing import Callable

import torch

log = logging.getLogger("layer_cache.runtime")


class DeferredTeacher:
    """A bounded queue of answered requests, featurised and buffered by one daemon thread.

    ``featurize(x, any_enabled, rows, generation)`` runs on that thread, in submission order, on
    the items queued at that moment concatenated into one batch (at batch 1, one backbone call
    and one buffer add for many requests: far less CPU and GIL than one each).
    """

    JOIN_SECONDS = 2.0
    BATCH_ROWS = 256      # queued requests featurised together: one backbone call, one buffer add
    LINGER_SECONDS = 0.02

    def __init__(self, featurize: Callable, max_mb: float, pace: Callable = None):
        # Held weakly (a bound method of the runtime): a runtime dropped without close() is
        # still collected, and this thread then ends within LINGER_SECONDS.
        self._featurize = weakref.WeakMethod(featurize)
        self._pace = pace            # called before each batch: yields to requests in flight
        self._max_bytes = int(max_mb * 2 ** 20)
        self._items = collections.deque()
        self._cv = threading.Condition()
        self._bytes = 0
        self._rows = 0               # rows queued
        self._busy = False
        self._closed = False
        self.rows_taught = 0
        self.rows_dropped = 0        # the queue was full: not learned from
        self.items_failed = 0
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="layer-cache-teacher")
        self._thread.start()

    def submit(self, x: torch.Tensor, any_enabled: bool, rows: int, generation: int) -> bool:
        """Queue ``x`` (copied: the caller may reuse its tensor); False when full or closed."""
        nbytes = x.element_size() * x.numel()
        with self._cv:
            if self._closed or self._bytes + nbytes > self._max_bytes:
                self.rows_dropped += int(x.shape[0])
                return False
            self._bytes += nbytes
        item = (x.detach().clone(), any_enabled, rows, generation, nbytes)
        with self._cv:
            self._items.append(item)
            self._rows += int(x.shape[0])
            if self._rows >= self.BATCH_ROWS:
                self._cv.notify()
        return True

    def _take(self):
        """The queued items that can run as one batch: consecutive, alike in ``any_enabled``
        and generation, at most ``BATCH_ROWS`` rows (the first always). Under the lock."""
        first = self._items.popleft()
        batch, n = [first], int(first[0].shape[0])
        while self._items:
            nxt = self._items[0]
            if (nxt[1], nxt[3]) != (first[1], first[3]) or \
                    n + int(nxt[0].shape[0]) > self.BATCH_ROWS:
                break
            batch.append(self._items.popleft())
            n += int(nxt[0].shape[0])
        return batch

    def _loop(self):
        while True:
            with self._cv:
                # Linger for more: a batch of many requests costs less CPU and GIL than each
                # alone (an idle thread wakes LINGER_SECONDS apart: cheap).
                self._cv.wait_for(lambda: self._closed or self._rows >= self.BATCH_ROWS,
                                  self.LINGER_SECONDS)
                featurize = self._featurize()
                if self._closed or featurize is None:
                    return
                if not self._items:
                    del featurize
                    continue
                batch = self._take()
                self._rows -= sum(int(b[0].shape[0]) for b in batch)
                self._busy = True
            x = batch[0][0] if len(batch) == 1 else torch.cat([b[0] for b in batch])
            _, any_enabled, _, generation, _ = batch[0]
            nbytes = sum(b[4] for b in batch)
            try:
                if self._pace is not None:
                    self._pace()
                featurize(x, any_enabled, sum(b[2] for b in batch), generation)
                self.rows_taught += int(x.shape[0])
            except Exception:  # the request was answered; its rows are simply not learned from
                self.items_failed += 1
                if self.items_failed & (self.items_failed - 1) == 0:
                    log.exception("deferred teaching failed (%d so far); rows not learned from",
                                  self.items_failed)
            finally:
                del featurize
                with self._cv:
                    self._bytes -= nbytes
                    self._busy = False
                    self._cv.notify_all()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued item is buffered (tests, save); False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._items and not self._busy, timeout)

    @property
    def pending_rows(self) -> int:
        return self._rows

    @property
    def behind(self) -> bool:
        """More rows wait than one batch: the thread is not keeping up (the CPU or the GIL is
        saturated), so requests should teach inline meanwhile, as without this thread."""
        return self._rows >= self.BATCH_ROWS

    @staticmethod
    def stats_of(teacher) -> dict:
        """``stats()["learning"]``'s deferred-teaching counts (zeros when there is no teacher:
        synchronous mode, or ``deferred=False``)."""
        if teacher is None:
            return {"deferred_rows_taught": 0, "deferred_rows_dropped": 0,
                    "deferred_rows_pending": 0, "deferred_failures": 0}
        return {"deferred_rows_taught": teacher.rows_taught,
                "deferred_rows_dropped": teacher.rows_dropped,
                "deferred_rows_pending": teacher.pending_rows,
                "deferred_failures": teacher.items_failed}

    def close(self):
        """Stop the thread; queued items are dropped (the runtime is closing)."""
        with self._cv:
            self._closed = True
            self._items.clear()
            self._cv.notify_all()
        self._thread.join(self.JOIN_SECONDS)
