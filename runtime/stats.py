"""Serving counters: traffic, rows per exit, FLOPs, latency and live agreement, safe under threads."""
import collections
import threading

import torch


def quantiles(values) -> dict:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    t = torch.tensor(list(values), dtype=torch.float64)
    return {"p50": t.quantile(0.5).item(), "p99": t.quantile(0.99).item(), "mean": t.mean().item()}


class Counters:
    """Everything ``stats()`` counts about the traffic served since load; one lock, one update
    per request, so the counters always add up to the rows served."""

    def __init__(self, num_exits: int, drift_window: int = 400):
        self.num_exits = num_exits
        self._lock = threading.Lock()
        self.requests = 0
        self.rows = 0
        self.rows_per_exit = [0] * (num_exits + 1)
        self.flops_spent = 0.0
        self.latency = collections.deque(maxlen=20000)
        self.latency_learning = collections.deque(maxlen=20000)
        self.shadow_rows = 0
        self.shadow_agree = 0
        self.exit_shadow = [collections.deque(maxlen=drift_window) for _ in range(num_exits)]

    def record(self, counts, flops: float, latency_ms: float, learning: bool,
               shadow_ok=None, shadow_exit=None):
        """One request: rows per exit, FLOPs spent, latency, and its shadow decisions if any."""
        ok = shadow_ok.cpu().tolist() if shadow_ok is not None else None
        would = shadow_exit.cpu().tolist() if shadow_exit is not None else None
        with self._lock:
            self.requests += 1
            self.rows += sum(counts)
            self.rows_per_exit = [a + b for a, b in zip(self.rows_per_exit, counts)]
            self.flops_spent += flops
            (self.latency_learning if learning else self.latency).append(latency_ms)
            if ok is not None:
                self.shadow_rows += len(ok)
                self.shadow_agree += sum(ok)
                for e, a in zip(would, ok):
                    if e < self.num_exits:
                        self.exit_shadow[e].append(a)

    def forget_shadow(self):
        """Per-exit live agreement restarts (the exits were switched off)."""
        with self._lock:
            for d in self.exit_shadow:
                d.clear()

    def snapshot(self, total_flops: float) -> dict:
        with self._lock:
            E = self.num_exits
            return {
                "requests": self.requests,
                "rows": self.rows,
                "rows_per_exit": list(self.rows_per_exit),
                "exit_rate": 1 - self.rows_per_exit[E] / max(self.rows, 1),
                "live_agreement": self.shadow_agree / self.shadow_rows if self.shadow_rows else None,
                "live_agreement_per_exit": [sum(d) / len(d) if d else None for d in self.exit_shadow],
                "shadow_rows": self.shadow_rows,
                "flops_saved": 1 - self.flops_spent / (self.rows * total_flops) if self.rows else 0.0,
                "latency_ms": quantiles(self.latency),
                "latency_while_learning_ms": quantiles(self.latency_learning),
            }
