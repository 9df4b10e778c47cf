"""A bounded ring buffer of pooled exit features and the backbone's logits for the same rows."""
import threading
from typing import List

import torch

# Row roles: TRAIN rows teach the heads; CALIB rows (unbiased, held out) choose thresholds.
TRAIN, CALIB = 0, 1
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class FeatureBuffer:
    """Holds the most recent rows within a memory cap; features are stored as float16."""

    def __init__(self, feature_dims: List[int], num_classes: int, memory_mb: float):
        row_bytes = 2 * sum(feature_dims) + 4 * num_classes + 2
        self.capacity = max(int(memory_mb * 2 ** 20 // row_bytes), 64)
        self.features = [torch.zeros(self.capacity, d, dtype=torch.float16) for d in feature_dims]
        self.teacher = torch.zeros(self.capacity, num_classes)
        self.role = torch.zeros(self.capacity, dtype=torch.uint8)
        self.stamp = torch.zeros(self.capacity, dtype=torch.long)  # arrival order
        self.size = 0
        self.next = 0
        self.added = 0
        self.rows_rejected = 0
        self.lock = threading.Lock()

    def add(self, feats: List[torch.Tensor], teacher: torch.Tensor, role: torch.Tensor):
        """Append rows (features per exit [n, d_i], teacher logits [n, K], role [n]).

        A row whose features do not fit float16 or whose teacher is not finite is dropped and
        counted (``rows_rejected``): one such row would make every head's standardisation,
        and so every head, non-finite."""
        n = teacher.shape[0]
        if n == 0:
            return
        # one concatenation checks every exit's features (a request of one row pays a few ops)
        scale = torch.cat([f.reshape(n, -1) for f in feats], 1).abs().amax(1) if feats else \
            torch.zeros(n)
        ok = torch.isfinite(teacher).all(1) & (scale <= FLOAT16_MAX).to(teacher.device)  # NaN: False
        if not bool(ok.all()):
            with self.lock:
                self.rows_rejected += int((~ok).sum())
            feats, teacher, role = [f[ok] for f in feats], teacher[ok], role[ok]
            n = teacher.shape[0]
            if n == 0:
                return
        with self.lock:
            for start in range(0, n, self.capacity):
                self._add(feats, teacher, role, start, min(n, start + self.capacity))

    def _add(self, feats, teacher, role, a, b):
        m = b - a
        first = min(m, self.capacity - self.next)   # rows before the ring wraps
        for lo, hi, at in ((a, a + first, self.next), (a + first, b, 0)):
            if hi > lo:
                dst = slice(at, at + hi - lo)
                for store, f in zip(self.features, feats):
                    store[dst].copy_(f[lo:hi])       # casts to float16, moves to the CPU
                self.teacher[dst].copy_(teacher[lo:hi])
                self.role[dst].copy_(role[lo:hi])
                self.stamp[dst] = torch.arange(self.added + lo - a, self.added + hi - a)
        self.next = (self.next + m) % self.capacity
        self.size = min(self.size + m, self.capacity)
        self.added += m

    def count(self, role: int) -> int:
        """Rows held with ``role``."""
        with self.lock:
            return int((self.role[:self.size] == role).sum())

    def clear(self):
        with self.lock:
            self.size = 0
            self.next = 0

    def snapshot(self, role: int, limit: int = 0):
        """Copies of (features per exit, teacher) of rows with ``role``, most recent ``limit``."""
        with self.lock:
            sel = torch.nonzero(self.role[:self.size] == role).flatten()
            if limit and sel.numel() > limit:
                order = torch.argsort(self.stamp[sel], descending=True)[:limit]
                sel = sel[order]
            return [f[sel].float() for f in self.features], self.teacher[sel].clone()
