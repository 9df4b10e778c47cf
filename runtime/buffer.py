"""A bounded buffer of pooled exit features and the backbone's logits, where held-out rows keep
their share of the memory."""
import collections
import threading
from typing import List

import numpy as np
import torch

# Row roles: TRAIN rows teach the heads; CALIB rows (unbiased, held out) choose thresholds.
TRAIN, CALIB = 0, 1
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class FeatureBuffer:
    """Holds recent rows within a memory cap; features are stored as float16.

    When full, a new row replaces the oldest row of its own role, except that a held-out row
    replaces the oldest training row while held-out rows fill less than ``calib_share`` of the
    buffer. So training rows never push out held-out ones below that share: the held-out rows
    are the calibration's evidence (each cost a request that could have trained), and a model
    with wide features fills the buffer in a few thousand rows (vgg16_bn's 43,000 values a row:
    3,100 rows in 256 MB), where a plain ring dropped the evidence and switched the exits off.
    """

    def __init__(self, feature_dims: List[int], num_classes: int, memory_mb: float,
                 calib_share: float = 0.5):
        row_bytes = 2 * sum(feature_dims) + 4 * num_classes + 2
        self.capacity = max(int(memory_mb * 2 ** 20 // row_bytes), 64)
        self.calib_cap = max(1, min(self.capacity - 1, int(calib_share * self.capacity)))
        self.features = [torch.zeros(self.capacity, d, dtype=torch.float16) for d in feature_dims]
        self.teacher = torch.zeros(self.capacity, num_classes)
        self._stores = [f.numpy() for f in self.features]   # numpy views: what add writes
        self._teacher = self.teacher.numpy()
        self.added = 0
        self.rows_rejected = 0
        self.lock = threading.Lock()
        self._version = np.zeros(self.capacity, dtype=np.int64)   # bumped when a slot is reused
        self._cleared = 0                                          # bumped by clear()
        self._reset()

    def _reset(self):
        self._free = collections.deque(range(self.capacity))   # slots, lowest first
        self._slots = {TRAIN: collections.deque(), CALIB: collections.deque()}  # oldest first

    @property
    def size(self) -> int:
        """Rows held."""
        return self.capacity - len(self._free)

    def add(self, feats: List[torch.Tensor], teacher: torch.Tensor, role):
        """Append rows (features per exit [n, d_i], teacher logits [n, K], role [n]: a tensor,
        an array or a list).

        A row whose features do not fit float16 or whose teacher is not finite is dropped and
        counted (``rows_rejected``): one such row would make every head's standardisation,
        and so every head, non-finite. Done in numpy on views of the rows and of the stores: a
        request of one row pays a few numpy calls, not two dozen torch ops."""
        n = teacher.shape[0]
        if n == 0:
            return
        feats = [_array(f).reshape(n, -1) for f in feats]
        teacher, role = _array(teacher), np.asarray(_array(role) if torch.is_tensor(role) else role)
        ok = np.isfinite(teacher).all(1)
        for f in feats:   # NaN compares False: dropped
            ok &= np.abs(f).max(1) <= FLOAT16_MAX
        if not ok.all():
            with self.lock:
                self.rows_rejected += int((~ok).sum())
            feats, teacher, role = [f[ok] for f in feats], teacher[ok], role[ok]
            n = teacher.shape[0]
            if n == 0:
                return
        with self.lock:
            where = {}   # slot -> row of this batch (a later row may take an earlier one's slot)
            for i, r in enumerate(role.tolist()):
                where[self._slot(r)] = i
            slots = np.fromiter(where.keys(), dtype=np.int64, count=len(where))
            rows = np.fromiter(where.values(), dtype=np.int64, count=len(where))
            for store, f in zip(self._stores, feats):
                store[slots] = f[rows]            # float16 on assignment
            self._teacher[slots] = teacher[rows]
            self.added += n

    def _slot(self, role: int) -> int:
        """A slot for a new row of ``role``: a free one, else the oldest row's that it may
        replace. Under the lock."""
        if self._free:
            slot = self._free.popleft()
        else:
            calib = self._slots[CALIB]
            take_calib = (role == CALIB and len(calib) >= self.calib_cap) or \
                not self._slots[TRAIN]
            slot = (calib if take_calib else self._slots[TRAIN]).popleft()
            self._version[slot] += 1   # an old row's slot: a snapshot copying it drops it
        self._slots[role].append(slot)
        return slot

    def count(self, role: int) -> int:
        """Rows held with ``role``."""
        with self.lock:
            return len(self._slots[role])

    def clear(self):
        with self.lock:
            self._reset()
            self._cleared += 1

    def snapshot(self, role: int, limit: int = 0):
        """Copies of (features per exit, teacher) of rows with ``role`` in arrival order, the
        most recent ``limit``.

        The copy (tens of MB for a large round) runs outside the lock, so requests that buffer
        rows meanwhile do not wait for it. A row whose slot was given to a new row during the
        copy (its ``_version`` moved; a slot may change role then) is left out, and after a
        ``clear`` the snapshot is empty, as if it had been taken after it."""
        with self.lock:
            slots = list(self._slots[role])
            sel = np.array(slots[-limit:] if limit else slots, dtype=np.int64)
            versions, cleared = self._version[sel], self._cleared
        feats, teacher = self._copy(torch.from_numpy(sel))
        with self.lock:
            kept = self._version[sel] == versions if cleared == self._cleared else \
                np.zeros(len(sel), dtype=bool)
        if not kept.all():
            keep = torch.from_numpy(kept)
            feats, teacher = [f[keep] for f in feats], teacher[keep]
        return [f.float() for f in feats], teacher

    def _copy(self, sel: torch.Tensor):
        """The rows in slots ``sel``, copied (float16 features, teacher)."""
        return [f[sel] for f in self.features], self.teacher[sel]


def _array(t) -> np.ndarray:
    """A tensor's values as a CPU numpy array (a view where it can be)."""
    if not torch.is_tensor(t):
        return np.asarray(t)
    if t.requires_grad:
        t = t.detach()
    return (t if t.device.type == "cpu" else t.cpu()).numpy()
