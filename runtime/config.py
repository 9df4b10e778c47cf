"""Settings of the online cache runtime, in one documented dataclass."""
from dataclasses import dataclass
from typing import Optional


@dataclass
class RuntimeConfig:
    """How the runtime learns, calibrates and watches its exits.

    agreement_budget: overall agreement with the backbone of the answers served (lower confidence
                      bound, not point estimate), e.g. 0.99. Shadow rows are answered by the
                      backbone, so the exits themselves are held to ``plan_budget``; an artifact
                      written by ``save`` (served with no shadow rows) is held to this budget.
    confidence:       one-sided confidence of that bound (Wilson score interval).
    buffer_mb:        memory cap of the feature buffer (pooled exit features + backbone logits).
    shadow_rate:      share of requests that run the full backbone once exits are on, so live
                      agreement is known; their rows also feed calibration. Whole requests, so
                      the others can run the fast path.
    calib_fraction:   share of unbiased rows held out for threshold calibration (never trained on).
    train_every:      rows served between learning rounds.
    min_train, min_calib: rows needed before exits may be switched on.
    epochs, batch_size, lr, weight_decay: distillation of each head per round (warm-started).
    max_train_rows:   a round trains on at most this many of the most recent rows.
    latency_weight:   the cost model mixes FLOPs share and measured latency share of each stage;
                      None: 0.5 with background learning, 0 (FLOPs only) in synchronous mode,
                      which must not depend on the clock to stay deterministic.
    drift_window:     shadow decisions judged at a time for drift; judged each time drift_min
                      new ones have arrived, with the one-sided drift_confidence (strict: a false
                      alarm switches every exit off).
    fast_after:       once a round trained on this many rows, requests without a shadow row run
                      the scripted model whole (no Python between stages; not buffered).
    collect_rate:     once the fast path is on, this share of the other requests still takes
                      the staged path, so the rows that reach the backbone keep teaching the
                      heads (0: the training set stops growing until drift resets it).
    cuda_graphs:      on CUDA, run each stage as a CUDA graph per bucketed batch size.
    background:       learn in a background thread (production) or inline and deterministically.
    seed:             seeds shadow sampling, the calibration split and training.
    """

    agreement_budget: float = 0.99
    confidence: float = 0.95
    buffer_mb: float = 256.0
    shadow_rate: float = 0.05
    calib_fraction: float = 0.3
    train_every: int = 1000
    min_train: int = 1000
    min_calib: int = 600
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_train_rows: int = 20000
    latency_weight: Optional[float] = None
    drift_window: int = 400
    drift_min: int = 150
    drift_confidence: float = 0.999
    fast_after: int = 4000
    collect_rate: float = 0.1
    cuda_graphs: bool = True
    background: bool = True
    seed: int = 0

    @property
    def plan_budget(self) -> float:
        """Agreement the exits must keep so that, with the shadow rows (always in agreement)
        mixed in, the answers served overall meet ``agreement_budget``."""
        shadow = min(max(self.shadow_rate, 0.0), 1.0)
        if shadow >= 1.0:
            return 0.0
        return max(0.0, (self.agreement_budget - shadow) / (1.0 - shadow))
