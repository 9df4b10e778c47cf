"""Collection: which requests are shadowed or learned from, and which buffered rows calibrate."""
import threading

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
        self._lock = threading.Lock()   # torch.Generator is not thread-safe

    def decide(self, any_enabled: bool, shadow_rate: float, fast_available: bool):
        """(shadow, collect) for one request."""
        with self._lock:
            shadow = any_enabled and torch.rand(1, generator=self._gen).item() < shadow_rate
            if shadow or not fast_available:
                return shadow, True
            return False, torch.rand(1, generator=self._gen).item() < self.config.collect_rate

    def add(self, features, teacher: torch.Tensor, shadow: bool, any_enabled: bool):
        """Buffer rows that ran the whole backbone, each as a training or calibration row.

        Once exits take the easy rows, only shadow rows are an unbiased sample of the traffic,
        so all of them calibrate and the rows that reached the end (hard ones) train; before
        that, a seeded ``calib_fraction`` of requests is held out. Whole requests, not rows:
        a request often holds frames of one scene, and a scene on both sides of the split
        would make the held-out rows look easier than new traffic.
        """
        n = teacher.shape[0]
        if any_enabled:
            held = shadow
        else:
            with self._lock:
                held = torch.rand(1, generator=self._gen).item() < self.config.calib_fraction
        calib = torch.full((n,), held, dtype=torch.bool)
        self.buffer.add(features, teacher, torch.where(calib, CALIB, TRAIN))
