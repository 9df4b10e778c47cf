"""Background work yields to the requests in flight: the teacher waits for gaps, the GIL switches often.

Python runs one thread at a time (the GIL). The deferred teacher (``teaching.py``) featurises
queued requests with small tensor ops and Python between them; while it runs beside a request,
the request's own Python waits for the GIL at every turn. So it calls ``yield_to_requests``
before each batch: while any request is being served it waits (at most ``max_wait`` seconds, so
it still advances on a saturated service), and runs in the gaps.

Learning rounds do not wait here: with many serving threads a request is always in flight,
rounds then ran 5-10x longer, and drift on the state in force went unanswered for a minute
(``tests/test_runtime_threads.py``). The learner yields the GIL after each step instead.

Between those yields a thread running Python keeps the GIL until another has waited the
interpreter's switch interval, 5 ms by default: on a 0.4 ms model that is a dozen requests' time.
Background mode lowers it (``quicken_gil_switch``, ``ServingConfig.gil_switch_ms``).
"""
import logging
import sys
import threading

log = logging.getLogger("layer_cache.runtime")


def quicken_gil_switch(ms):
    """Lower the interpreter's GIL switch interval to ``ms`` milliseconds if it is longer
    (``ServingConfig.gil_switch_ms``; None: leave it). A thread running Python keeps the GIL
    until another has waited this long, so background learning's Python would otherwise hold a
    request up to Python's default 5 ms. Process-wide, never raised."""
    if ms is not None and sys.getswitchinterval() > ms / 1000.0:
        log.info("GIL switch interval %.2f ms -> %.2f ms (gil_switch_ms): background learning "
                 "then holds a request's Python at most that long", 1000 * sys.getswitchinterval(),
                 ms)
        sys.setswitchinterval(ms / 1000.0)


class InFlight:
    """Counts the requests being served; ``with in_flight:`` around each."""

    MAX_WAIT = 0.002     # a step waits at most this long: rounds slow down, never stall

    def __init__(self):
        self._n = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def __enter__(self):
        with self._lock:
            self._n += 1
            self._idle.clear()
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._n -= 1
            if self._n == 0:
                self._idle.set()

    @property
    def count(self) -> int:
        return self._n

    def yield_to_requests(self, max_wait: float = MAX_WAIT) -> bool:
        """From a background thread: wait until no request is in flight, at most ``max_wait``
        seconds. True when none is (or none was by the deadline)."""
        return self._idle.wait(max_wait)
