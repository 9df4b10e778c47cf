"""The input guard: which requests lie inside the traffic seen so far, so heads may answer and learn."""
import collections
import math
import statistics
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .config import GuardConfig

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)   # bfloat16 has no numpy view


@dataclass(frozen=True)
class Verdict:
    """One request judged: ``finite`` (False: some row holds NaN or Inf, ``bad_rows`` names them);
    ``inside``: every row is within range of the traffic seen so far; ``learn``: its rows may be
    learned from (inside, and past the warm-up)."""

    finite: bool
    inside: bool
    learn: bool
    bad_rows: tuple = ()


class InputGuard:
    """Per-row scale (largest absolute value) against ``range_factor`` x the median scale of the
    last ``range_window_rows`` rows. Every row enters the window, judged inside or not, so a lasting
    change of scale becomes the new normal once it is most of the window (the drift monitor
    then judges it), while a few hostile rows never move the median.
    """

    RECOMPUTE_EVERY = 256  # rows between median updates (one median per request would cost)

    def __init__(self, config: GuardConfig):
        self.config = config
        self._scales = collections.deque(maxlen=config.range_window_rows)   # plain floats
        self._seen = 0
        self._since = 0
        self._limit = math.inf       # no limit until the first median
        self._median = None
        self._lock = threading.Lock()
        self.rows_outside = 0
        self.requests_outside = 0

    @property
    def limit(self) -> float:
        """The scale above which a row is outside (``inf`` until the warm-up has a median)."""
        return self._limit

    def seed(self, median: float):
        """Start from a median saved with the artifact (``stats()["median"]``), so a reloaded
        cache judges its first requests against the traffic it learned from."""
        if median is not None and math.isfinite(median) and median >= 0:
            with self._lock:
                self._median = median   # kept by the next save until traffic gives its own
                self._limit = self.config.range_factor * max(median, 1e-6)

    def judge(self, x: torch.Tensor) -> Verdict:
        """Judge a batch [N, ...] of floats; records its rows' scales when they are finite."""
        n = x.shape[0]
        if x.numel() == 0:   # rows of no values (x[0] would cost an indexing op per request)
            scales = [0.0] * n
        elif x.dtype in NUMPY_FLOATS and x.device.type == "cpu" and not x.requires_grad:
            # numpy's min and max: on a request path whose caches a large model has just
            # flushed, two numpy reductions cost half of torch.aminmax and its two .item()s
            a = x.numpy().reshape(n, -1)
            if n == 1:
                scales = [max(-float(a.min()), float(a.max()))]
            else:
                scales = np.maximum(-a.min(axis=1), a.max(axis=1)).tolist()
        else:
            # min and max in one pass, no temporary as large as the input (abs() would
            # allocate one per request: at 224 px that alone costs more than the check)
            lo, hi = torch.aminmax(x.reshape(n, -1), dim=1)
            scales = torch.maximum(-lo, hi).tolist()
        # NaN propagates through min and max; a float64 value past float32's range serves as Inf
        bad = [i for i, v in enumerate(scales) if not (v <= FLOAT32_MAX)]
        if bad:
            return Verdict(False, False, False, tuple(bad))
        top = max(scales)
        with self._lock:
            inside = top <= self._limit
            warm = self._seen >= self.config.range_warmup_rows
            if not inside:
                self.rows_outside += sum(v > self._limit for v in scales)
                self.requests_outside += 1
            self._record(scales)
        return Verdict(True, inside, inside and warm)

    def _record(self, scales):
        self._scales.extend(scales)
        self._seen += len(scales)
        self._since += len(scales)
        if self._seen >= self.config.range_warmup_rows and (self._since >= self.RECOMPUTE_EVERY
                                                            or self._limit == math.inf):
            self._since = 0
            med = statistics.median(self._scales)
            self._median = med
            # an all-zero window has no scale to compare with: judge against the smallest float
            self._limit = self.config.range_factor * max(med, 1e-6)

    def stats(self) -> dict:
        with self._lock:
            return {"median": self._median,
                    "limit": None if self._limit == math.inf else self._limit,
                    "rows_outside": self.rows_outside, "requests_outside": self.requests_outside,
                    "rows_judged": self._seen}
