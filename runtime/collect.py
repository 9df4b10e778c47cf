"""Collection: which requests are shadowed or learned from, and which buffered rows calibrate."""
import threading

import numpy as np
import torch

from .buffer import CALIB, TRAIN, FeatureBuffer
from .config import CollectConfig


class Collector:
    """Seeded per-request decisions and the feature buffer they fill.

    Shadowing takes whole requests, not rows: the other requests then have nothing to check and
    can run the fast path; the share of rows shadowed is the same.
    """

    def __init__(self, buffer: FeatureBuffer, config: CollectConfig, seed: int):
        self.buffer = buffer
        self.config = config
        self._gen = torch.Generator().manual_seed(seed)
        self._draws = []                # uniforms drawn ahead from ``_gen``, in its order
        self._lock = threading.Lock()   # torch.Generator is not thread-safe
        self._seed = seed
        self._seen = 0                  # rows through add(): the clock hold-out blocks follow
        self._roles = {}
        self.warmup_share = config.warmup_collect_rate   # idle_collect_rate while backed off
        self._idle_rounds = 0                            # rounds in a row that found too little

    def after_round(self, idle: bool):
        """Back off after ``idle_rounds`` rounds in a row that were ``idle`` (no exit on, and
        none would save more than ``idle_below`` even at the point estimate:
        ``LearningLoop.run``): then only an ``idle_collect_rate`` share of requests teaches.
        Any other round restores ``warmup_collect_rate``."""
        c = self.config
        self._idle_rounds = self._idle_rounds + 1 if idle else 0
        self.warmup_share = min(c.idle_collect_rate, c.warmup_collect_rate) \
            if self._idle_rounds >= c.idle_rounds else c.warmup_collect_rate

    def reset(self):
        """New traffic (a drift alarm): teach at the full warmup share again."""
        self._idle_rounds = 0
        self.warmup_share = self.config.warmup_collect_rate

    def adopt(self, share: float):
        """The share a learner elsewhere set (replica mode, ``runtime.scaleout``), kept within
        ``idle_collect_rate`` and ``warmup_collect_rate``."""
        c = self.config
        self.warmup_share = min(max(float(share), min(c.idle_collect_rate,
                                                      c.warmup_collect_rate)),
                                c.warmup_collect_rate)

    @property
    def spacing(self) -> float:
        """How many times ``train_every`` rows the next round waits for: the rounds then see
        about as many new rows as at the full warmup share."""
        return self.config.warmup_collect_rate / self.warmup_share

    def decide(self, any_enabled: bool, shadow_rate: float, fast_available: bool,
               doubt_rate: float = 0.0):
        """(shadow, collect, calibrates) for one request: shadowed requests teach; before any
        exit is on, a ``warmup_collect_rate`` share teaches (less while backed off:
        ``after_round``); with exits on, every request teaches until the whole-model path
        serves, then a ``collect_rate`` share.

        In doubt (``doubt_rate`` above ``shadow_rate``) more requests are shadowed, to judge
        them; only those the plain ``shadow_rate`` would have taken calibrate (``calibrates``),
        so the calibration rows stay one even sample of the traffic over time instead of
        crowding into the doubt's few hundred rows (one or two scenes of a camera)."""
        with self._lock:
            u = self._uniform() if any_enabled else 1.0
            if u < max(shadow_rate, doubt_rate):
                return True, True, u < shadow_rate
            if not any_enabled and self.warmup_share < 1.0:
                return False, self._uniform() < self.warmup_share, False
            if not fast_available:
                return False, True, False
            return False, self._uniform() < self.config.collect_rate, False

    DRAW_AHEAD = 256

    def _uniform(self) -> float:
        """The generator's next uniform (under the lock). Drawn ``DRAW_AHEAD`` at a time: the
        same numbers in the same order as one ``torch.rand(1)`` per call, without a tensor op
        per request (about 10 us each on a cache-cold request path)."""
        if not self._draws:
            self._draws = torch.rand(self.DRAW_AHEAD, generator=self._gen).tolist()[::-1]
        return self._draws.pop()

    GROUP = 20   # blocks dealt out together: exactly round(calib_fraction * 20) of them held out

    def _held_out(self, block: int) -> bool:
        """Block ``block``'s role. Blocks are dealt in seeded groups of ``GROUP``, a fixed number
        of each group held out, so the held-out share is exact every ``GROUP`` blocks rather
        than a streak of coin flips (which left short streams with too few held-out rows)."""
        group = block // self.GROUP
        if group not in self._roles:
            g = torch.Generator().manual_seed(self._seed * 1_000_003 + group)
            k = round(self.config.calib_fraction * self.GROUP)
            if len(self._roles) > 2:
                self._roles.clear()
            self._roles[group] = (torch.randperm(self.GROUP, generator=g) < k).tolist()
        return self._roles[group][block % self.GROUP]

    def add(self, features, teacher: torch.Tensor, shadow: bool, any_enabled: bool,
            rows: int = None):
        """Buffer rows that ran the whole backbone, each as a training or calibration row.

        Once exits take the easy rows, only shadow rows are an unbiased sample of the traffic,
        so all of them calibrate and the rows that reached the end (hard ones) train. Before
        that, seeded blocks of consecutive rows are held out (``holdout_block_rows``), and the
        training rows within ``holdout_gap_rows`` of a held-out block are not kept (roles are
        dealt in advance, so the next block's is known). ``rows``: the request's size, when
        rows that left at exits are not in ``teacher`` (they still advance the block clock).
        """
        n = teacher.shape[0]
        with self._lock:
            start = self._seen
            self._seen += n if rows is None else rows
            if any_enabled:
                role = np.full(n, CALIB if shadow else TRAIN, dtype=np.int64)
                keep = None
            else:   # rows start .. start + n - 1, block by block (plain ints: cheap per request)
                B, G = self.config.holdout_block_rows, self.config.holdout_gap_rows
                role = np.empty(n, dtype=np.int64)
                keep = np.ones(n, dtype=bool)
                for b in range(start // B, (start + n - 1) // B + 1):
                    lo, hi = max(b * B, start) - start, min((b + 1) * B, start + n) - start
                    held = self._held_out(b)
                    role[lo:hi] = CALIB if held else TRAIN
                    if G and not held:   # training rows next to a held-out block are not kept
                        if b > 0 and self._held_out(b - 1):
                            keep[lo:max(lo, min(hi, b * B + G - start))] = False
                        if self._held_out(b + 1):
                            keep[max(lo, (b + 1) * B - G - start):hi] = False
        if keep is not None and not keep.all():
            kept = torch.from_numpy(keep).to(teacher.device)
            features = [f[kept] for f in features]
            teacher, role = teacher[kept], role[keep]
        self.buffer.add(features, teacher, role)
