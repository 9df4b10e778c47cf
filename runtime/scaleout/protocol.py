"""What replicas and the learner send each other: typed messages and the link's settings (no Ray)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


class ScaleoutError(ValueError):
    """A scale-out setting or cluster the deployment cannot use; the message says what to do."""


@dataclass
class LinkConfig:
    """How a replica talks to the learner.

    flush_ms:          a replica sends what it collected at least this often.
    max_rows_per_message: most feature rows in one report (a request's rows may be split).
    max_pending_rows:  rows a replica holds while the learner is behind; past it the oldest
                       are dropped (counted), never whole requests' answers: serving goes on.
    max_inflight:      unanswered reports per replica; while that many are out, rows wait.
    send_rate:         share of collected rows sent (seeded per replica); 1: all.
    poll_timeout_s:    a replica's long poll for a newer state returns after this at the latest;
                       a publish answers every waiting poll at once (push latency, poll safety).
    """

    flush_ms: float = 100.0
    max_rows_per_message: int = 512
    max_pending_rows: int = 8192
    max_inflight: int = 2
    send_rate: float = 1.0
    poll_timeout_s: float = 5.0

    def validate(self) -> "LinkConfig":
        if self.flush_ms <= 0:
            raise ScaleoutError(f"flush_ms must be > 0, got {self.flush_ms}")
        for name in ("max_rows_per_message", "max_pending_rows", "max_inflight"):
            if getattr(self, name) < 1:
                raise ScaleoutError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.send_rate <= 1.0:
            raise ScaleoutError(f"send_rate must be in (0, 1], got {self.send_rate}")
        if self.poll_timeout_s <= 0:
            raise ScaleoutError(f"poll_timeout_s must be > 0, got {self.poll_timeout_s}")
        return self


@dataclass
class Decisions:
    """Requests one replica served under one state version, summed: rows per exit (for shadow
    requests, where they would have left) and the shadow rows' agreement, in serving order."""

    version: int
    exit_counts: List[int]
    shadow_ok: np.ndarray          # bool [m]


@dataclass
class ServedTotals:
    """A replica's counters since it started (for pooled FLOPs saved and agreement)."""

    requests: int = 0
    rows: int = 0
    flops_spent: float = 0.0
    shadow_rows: int = 0
    shadow_agree: int = 0
    rows_per_exit: List[int] = field(default_factory=list)


@dataclass
class Report:
    """One message from a replica: collected rows (pooled exit features as float16, the
    backbone's logits, each row's role: 0 train, 1 calibrate), its requests' decisions, and
    how many rows it dropped because the learner was behind."""

    replica: str
    generation: int                     # the drift generation the rows were collected in
    features: Optional[List[np.ndarray]]
    teacher: Optional[np.ndarray]
    role: Optional[np.ndarray]
    decisions: List[Decisions]
    dropped_rows: int
    totals: ServedTotals

    @property
    def rows(self) -> int:
        return 0 if self.teacher is None else int(self.teacher.shape[0])


@dataclass
class PublishedState:
    """The learner's serving state: what every replica swaps in, whole, between batches.

    classifiers: per exit, the classifier's state_dict (numpy; reads raw pooled features).
    thresholds:  per exit, None: off.
    fast:        the learner trained on ``fast_after`` rows: replicas serve the whole-model
                 paths (their onnxruntime plan, or the scripted model where none serves).
    in_doubt:    the pooled drift monitor doubts the exit shares: replicas raise the shadow rate.
    published_unix: the learner's clock when it was published.
    warmup_share: the share of requests that teach while no exit is on (lowered while the
                 exits would not pay: ``CollectConfig.idle_collect_rate``).
    """

    version: int
    generation: int
    classifiers: List[Dict[str, np.ndarray]]
    thresholds: List[Optional[float]]
    exit_shares: Optional[List[float]]
    fast: bool
    in_doubt: bool
    published_unix: float
    warmup_share: float = 1.0
