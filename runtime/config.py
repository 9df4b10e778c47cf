"""Settings of the online cache runtime: one documented dataclass per part, gathered in RuntimeConfig."""
import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional


class ConfigError(ValueError):
    """A setting the runtime does not know or cannot use; the message names the valid ones."""


THRESHOLD_RULES = ("ltt", "ltt-fitted", "ltt-both", "crossfit")   # GuaranteeConfig.threshold_rule


@dataclass
class GuaranteeConfig:
    """What the answers served must keep (read by calibration and the drift monitor).

    agreement_budget: overall agreement with the backbone of the answers served, as a lower
                      confidence bound (not a point estimate), e.g. 0.99. Shadow rows are answered
                      by the backbone, so the exits themselves are held to ``plan_budget``; an
                      artifact written by ``save`` (served with no shadow rows) is held to this.
    confidence:       one-sided confidence of that bound.
    shadow_rate:      share of requests that run the whole backbone once exits are on, so live
                      agreement is known and calibration rows keep arriving unbiased.
    threshold_rule:   how held-out rows choose thresholds (runtime/calibrate.py): "ltt"
                      (Learn-then-Test: one threshold for every exit, swept down a grid fixed in
                      advance; every held-out row tests it in order with an exact binomial test;
                      valid by construction), "ltt-fitted" (the same test, but 30% of the rows
                      order per-exit settings and only the rest test them; over 20 demo streams
                      it saved 52.3% at the median against 57.2%: BENCHMARKS.md),
                      "ltt-both" (both, each at half the error level, the better plan served;
                      measured on few streams only: docs/detection.md) or "crossfit" (greedy
                      search against a Wilson bound raised by cross-fitted search optimism; a
                      heuristic that fell below a 99% budget in 3 of 20 demo streams:
                      tools.honesty_check, BENCHMARKS.md).
    correlation_block_rows: the design effect (runtime/correlation.py), by which calibration
                      and drift count correlated rows as fewer independent ones, is measured
                      over blocks of this many consecutive rows, and cannot exceed it, so
                      correlation that lasts longer is undercounted. Longer blocks are more
                      cautious and need longer streams: on the Fashion-MNIST camera (scenes of
                      24 frames on average) 64-row blocks read 30 instead of 16 and certified
                      no exit in 16,000 frames (docs/camera.md); on the detection demo's scene
                      streams (backgrounds of 60-240 frames), with 64-row hold-out blocks, no
                      block size tried kept every stream within a 99% budget while saving;
                      hold-out blocks that outlast a scene did (``CollectConfig``,
                      docs/detection.md). Shuffled traffic reads about 1 at any block size.
    """

    agreement_budget: float = 0.99
    confidence: float = 0.95
    shadow_rate: float = 0.05
    threshold_rule: str = "ltt"
    correlation_block_rows: int = 16

    @property
    def plan_budget(self) -> float:
        """Agreement the exits must keep so that, with the shadow rows (always in agreement)
        mixed in, the answers served overall meet ``agreement_budget``."""
        shadow = min(max(self.shadow_rate, 0.0), 1.0)
        if shadow >= 1.0:
            return 0.0
        return max(0.0, (self.agreement_budget - shadow) / (1.0 - shadow))


@dataclass
class CollectConfig:
    """Which served rows are kept to learn from (runtime/collect.py).

    buffer_mb:      memory cap of the feature buffer (pooled exit features + backbone logits).
    calib_share:    the share of that buffer held-out rows may fill before they replace each
                    other; below it, training rows never replace them (``buffer.py``). A model
                    with wide features fills 256 MB within a few thousand rows (vgg16_bn's
                    heads before the compiler's ``max_feature_dim``: 3,100), and a plain ring
                    then pushed out the held-out rows, the calibration's only evidence, and
                    switched every exit off.
    calib_fraction: before any exit is on, share of rows held out for calibration (never trained
                    on); once exits are on, the shadow rows (the unbiased ones) calibrate.
                    Over demo streams (seeds 0-7, BENCHMARKS.md) 0.5 saved most: 0.3 / 0.4 /
                    0.5 / 0.7 gave medians of 58.2 / 58.6 / 59.4 / 45.9% at a 99% budget, and
                    0.3 / 0.5 gave 40.8 / 49.8% at 99.5% (a thin hold-out certifies late; a
                    thick one leaves the heads too few rows).
    collect_rate:   once the scripted fast path serves, this share of the other requests still
                    takes the staged path so rows that reach the backbone keep teaching the heads.
    warmup_collect_rate: while no exit is on, this share of requests teaches (the backbone plus
                    every exit's pooled features, about +20% time); the others run the bare
                    backbone. 1.0 learns fastest; below 0.5 the median request costs what the
                    backbone does while the first rounds run, and exits switch on about
                    1/rate times later (docs/latency.md).
    idle_collect_rate, idle_below, idle_rounds: while no exit is on and ``idle_rounds``
                    rounds in a row found that the exits would save at most ``idle_below``
                    of the backbone's cost even if the held-out agreement were exact (the
                    bound aside: more rows alone would not make them pay), only an
                    ``idle_collect_rate`` share of requests teaches, and rounds come that many
                    times further apart. Back to ``warmup_collect_rate`` as soon as a round
                    finds more, and after a drift alarm. The point estimate is optimistic: on
                    ImageNet MobileNetV2's snapshot stream rounds read 5.6-6.1% there while
                    their certified plans saved 0.5-1.5%. Full-share teaching costs a request
                    about 3% of that model's time at batch 1 and the deferred teacher a second
                    backbone pass per row (docs/latency.md). Several rounds, because the first
                    heads, trained on the first rows, promise less than they will.
                    ``idle_below`` None: 0.10 where the cost model mixes in measured time,
                    0 where it counts FLOPs only (synchronous mode then backs off only where
                    no exit would pay at all). ``idle_collect_rate`` 1.0: never back off.
    holdout_block_rows, holdout_gap_rows: before any exit is on, rows are held out in whole
                    blocks of this many consecutive rows, and training rows within
                    ``holdout_gap_rows`` of a held-out block are not kept at all: a camera's
                    scene (or a client's run) then rarely sits on both sides of the split,
                    where the held-out rows would look easier than new traffic. A block must
                    outlast a scene: with 64-row blocks (16-row gaps) 2 of 12 detection scene
                    streams, whose backgrounds last 60-240 frames, fell below a 99% budget;
                    with 256 (64) none of 8 (a detection runtime's default,
                    ``DetectionRuntime.DEFAULTS``). Longer blocks deal the hold-out share out
                    in lumps of 20 blocks, so a short stream may see its first round much
                    later; over 40 shuffled demo streams 256 (64) let 1 fall below the
                    budget, 64 (16) none (docs/detection.md).
    deferred:       background mode: a request that teaches (not a shadowed one) is answered on
                    the fastest path, and a background thread runs its rows that reached the
                    end through the backbone again with every exit's pooled features and
                    buffers them (runtime/teaching.py). Those rows cost twice the CPU; no
                    request waits for it. While that thread falls behind (a saturated CPU),
                    requests teach inline. False (and on CUDA): the request computes its
                    features itself.
    deferred_mb:    at most this many MB of input wait for that thread; a request that finds
                    the queue full does not teach (``stats()["learning"]["deferred_rows_dropped"]``).
    """

    buffer_mb: float = 256.0
    calib_share: float = 0.5
    calib_fraction: float = 0.5
    collect_rate: float = 0.1
    warmup_collect_rate: float = 1.0
    idle_collect_rate: float = 0.125
    idle_below: Optional[float] = None
    idle_rounds: int = 3
    holdout_block_rows: int = 64
    holdout_gap_rows: int = 16
    deferred: bool = True
    deferred_mb: float = 64.0


@dataclass
class LearningConfig:
    """Learning rounds (runtime/learning.py): distil the heads, choose thresholds, publish.

    train_every:      rows served between rounds.
    min_train, min_calib: rows needed before exits may be switched on.
    min_train_after_drift: after a drift alarm the heads keep what they had learned and go on
                      from there, so a round of the new traffic needs only this many training
                      rows (at most ``min_train``); ``min_calib`` held-out rows of the new
                      traffic still gate every exit, and calibration on them is what keeps the
                      budget. With ``min_train`` rows the exits came back some 3,000 rows after
                      an alarm, as at a cold start (docs/drift.md).
    max_train_rows, max_calib_rows: a round uses at most this many of the most recent rows, so
                      its time is bounded whatever the buffer holds. Held-out rows are counted
                      as independent rows: with correlated traffic (design effect d, at most
                      ``correlation_block_rows``: runtime/correlation.py) a round reads up to d
                      times ``max_calib_rows`` rows, as the bound counts each of them 1/d.
    epochs, batch_size, lr, weight_decay: distillation of the heads per round (warm-started).
    yield_until_exits: background mode, before any exit is on: while a round runs, requests are
                      served one at a time, so the learner gets a core instead of a share of the
                      GIL and cores among many serving threads (with 8 threads on 2 cores a round
                      otherwise outlasts thousands of rows and no exit ever switches on). Once an
                      exit is on, serving never waits for learning.
    min_saving:       a round switches exits on only if its certified plan saves more than
                      this share of the backbone's cost; else every exit stays off. None: 0.05
                      where the cost model mixes in measured time (background mode), whose
                      estimate is within a few points of the truth at best and leaves out
                      what exits on cost besides (shadow requests, teaching until the
                      whole-model path serves); 0 where it counts FLOPs only (synchronous
                      mode: FLOPs are exact). On ImageNet MobileNetV2's snapshot stream,
                      plans certified at 0.5-1.5% of the time switched an exit on, and the
                      mean request got slower (docs/latency.md).
    """

    train_every: int = 1000
    min_train: int = 1000
    min_calib: int = 500
    min_train_after_drift: int = 250
    max_train_rows: int = 20000
    max_calib_rows: int = 6000
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    yield_until_exits: bool = True
    min_saving: Optional[float] = None


@dataclass
class ServingConfig:
    """How requests are run (runtime/serving.py).

    fast_after:     once a round trained on this many rows, requests with nothing to check or
                    learn from run the model whole (no Python between stages): the onnxruntime
                    plan, or the scripted model where no plan serves (``_whole_paths``).
    cuda_graphs:    on CUDA, run each stage as a CUDA graph per bucketed batch size (unmeasured:
                    no GPU was lent to this project).
    latency_weight: the cost model mixes each stage's FLOPs share and measured latency share;
                    None: with background learning 1.0 on the onnxruntime backend and 0.5 on
                    TorchScript, 0 (FLOPs only) in synchronous mode, which must not depend on
                    the clock to stay deterministic. With the onnxruntime backend a head's
                    latency is what a row that passes it pays at batch 1, its branch included
                    (``miss_profile``, measured at load).
    backend:        where requests run (runtime/backends.py): "onnxruntime" (each learned
                    state as one composed onnxruntime graph, a one-row form at batch 1; requests
                    that teach run segments with the decision in numpy; CPU only; detection:
                    the artifact's stored ONNX parts, runtime/detection_ort.py), "torchscript"
                    (the artifact's scripted stages), or "auto": onnxruntime on the CPU when
                    onnx and onnxruntime are installed and the stages export (a detection
                    artifact holds its parts), TorchScript otherwise (docs/latency.md has the
                    measurements behind it). The cost model's latency is measured in the
                    backend chosen (detection: in onnxruntime only; with TorchScript its cost
                    model counts FLOPs).
    max_miss_overhead: a cap on what a row that misses every exit pays for passing the enabled
                    heads, as a share of the backbone's time (measured at load in the backend
                    chosen, ``CostModel.miss_overhead``), e.g. 0.05: calibration never enables a
                    set of exits above it, so the slowest requests (the tail latency) stay
                    within 5% of the backbone's. None: no cap (exits are chosen for saving only).
                    A tiny backbone may allow no exit at all under a tight cap.
    gil_switch_ms:  background mode: the interpreter's GIL switch interval
                    (``sys.setswitchinterval``) is lowered to this many milliseconds at load
                    if it is longer (it is process-wide; never raised). Python's default, 5 ms,
                    lets the learner and the deferred teacher, while they run Python, keep a
                    request waiting for the GIL up to 5 ms, a dozen requests' time on a 0.4 ms
                    model. Measured on the demo's learning stream at batch 1 (docs/latency.md):
                    ahead in every window where both settings switched on the same exits, level
                    where they did not. None: leave it as it is.
    settle_every:   a request that is not shadowed and buffers nothing itself (it teaches
                    nothing, or hands its rows to the deferred teacher) is booked (counters,
                    drift, the correlation estimate, the round trigger) in bulk with the others
                    held back, every this many requests, and at ``stats()``, ``save`` and
                    ``close``.
                    Right after a pass of a large model the CPU's caches hold the model, not
                    the runtime's Python, so each bookkeeping step cost a request tens of
                    microseconds; booked together they run warm (docs/latency.md). A drift
                    alarm or a round may then come up to this many requests later. None: 16 in
                    background mode, 1 (each request at once) in synchronous mode, whose rounds
                    then start at the same requests as ever.
    """

    fast_after: int = 4000
    cuda_graphs: bool = True
    latency_weight: Optional[float] = None
    backend: str = "auto"
    max_miss_overhead: Optional[float] = None
    gil_switch_ms: Optional[float] = 0.5
    settle_every: Optional[int] = None


@dataclass
class DriftConfig:
    """The drift monitor (runtime/drift.py): when traffic stops looking like what calibrated it.

    Two signals. Every request: the share of rows leaving at each exit, tested against the
    shares calibration predicted (no backbone answer needed); a shift puts the runtime *in
    doubt*, which raises the shadow rate to ``doubt_shadow_rate`` until ``doubt_rows`` shadow
    rows have been judged; if those rows disagree with the backbone significantly more often
    than the budget allows (``doubt_alarm_p``), the alarm strikes. Shadow rows: a CUSUM test
    of disagreement (in-control rate: the budget's, out of control: ``shift_factor`` times it
    plus ``shift_margin``) raises the alarm at ``cusum_threshold`` (log-likelihood ratio). The
    alarm switches every exit off, forgets the buffered traffic and relearns.

    window_rows:      rows per exit-share test.
    doubt_looks:      on independent traffic the test also looks at a window's counts so far
                      this many times per window (every 32 rows by default), each look at
                      ``doubt_p`` / ``doubt_looks``: a large shift is doubted within a few
                      dozen rows instead of after a window of spoiled answers (1: whole
                      windows only). Correlated traffic always waits for whole windows.
    doubt_p:          the exit-share test's p-value threshold per window (chi-square; strict:
                      a doubt costs ``doubt_rows`` rows of backbone time). 1e-5 (was 1e-6):
                      a stable stream then doubts once in ~25 million rows, and a rotation
                      of the demo's traffic, which moves its exit shares less than other
                      shifts, is doubted before a learning round re-calibrates on the mixed traffic
                      (first 1,000 shifted rows 97.1% instead of 95.5%; docs/drift.md).
    doubt_windows:    on correlated traffic (a design effect above 1.5 when the state was
                      published), consecutive windows that must each reject before doubt. A
                      camera's scene can swing one window's shares far beyond what the design
                      effect of 16-row blocks allows (the detection demo's stationary scene
                      streams: 2-5 false doubts each with 1, none with 2); a shift persists. On
                      independent traffic one window suffices: its test is exact there.
    doubt_shadow_rate: the shadow rate in doubt. 1.0 (the default): every request in doubt is
                      answered by the backbone and judged, so answers a shift has spoiled are
                      not served while the evidence gathers; a doubt then costs ``doubt_rows``
                      rows of saving (0.5 cost the same: twice the rows at half the rate).
    doubt_rows:       shadow rows judged before a doubt ends.
    doubt_alarm_p:    at the end of a doubt, the p-value (exact binomial test, rows scaled by
                      the design effect) below which its rows' disagreement is read as a shift
                      that breaks the budget: the alarm strikes (exits off, relearn). It
                      catches shifts too moderate for the CUSUM (3-4x the budget's rate); on
                      traffic that keeps the budget, one doubt in 100 ends in a needless
                      relearning (0: no such test).
    watch_threshold:  a second CUSUM on the shadow rows, tuned to ``watch_factor`` x the
                      budget's rate, puts the monitor in doubt when it passes this level
                      (0: never). It catches heads grown wrong but no less sure, which leave
                      the exit shares where they were (the share test cannot see it) and
                      reach the alarm's CUSUM only by chance at twice the budget's rate; the
                      doubt's rows then decide, as for any doubt.
    watch_factor:     the watch CUSUM's out-of-control disagreement rate, x the budget's.
    cusum_threshold:  the CUSUM's alarm level (log-likelihood ratio).
    shift_factor, shift_margin: the CUSUM's out-of-control disagreement rate, ``shift_factor``
                      x the budget's rate + ``shift_margin``.
    """

    window_rows: int = 256
    doubt_looks: int = 8
    doubt_p: float = 1e-5
    doubt_windows: int = 2
    doubt_shadow_rate: float = 1.0
    doubt_rows: int = 400
    doubt_alarm_p: float = 0.01
    watch_threshold: float = 3.0
    watch_factor: float = 2.0
    cusum_threshold: float = 15.0
    shift_factor: float = 3.0
    shift_margin: float = 0.01


@dataclass
class GuardConfig:
    """The input guard (runtime/guard.py): which requests the heads may answer and learn from.

    A row's scale is its largest absolute input value. A request holding a row more than
    ``range_factor`` times the median scale of the last ``range_window_rows`` rows is far outside the
    traffic seen so far: the backbone answers it whole and nothing learns from it (heads were
    never taught on such rows, and one such row can overflow the buffered features). The first
    ``range_warmup_rows`` rows are answered and judged but not learned from: the median needs them.
    """

    range_factor: float = 10.0
    range_window_rows: int = 1024
    range_warmup_rows: int = 64


@dataclass
class RuntimeConfig:
    """Every setting of the runtime, one section per part.

    background: learn in a background thread (production) or inline and deterministically.
    seed:       seeds shadow sampling, the calibration split and training.

    ``RuntimeConfig().with_overrides(agreement_budget=0.995, epochs=2)`` sets fields of any
    section by name (names are unique across sections); ``runtime.load`` takes the same names.
    """

    guarantee: GuaranteeConfig = field(default_factory=GuaranteeConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    background: bool = True
    seed: int = 0

    SECTIONS = ("guarantee", "collect", "learning", "serving", "drift", "guard")

    def with_overrides(self, **overrides) -> "RuntimeConfig":
        """A copy with fields set by name, whichever section holds them."""
        top = {k: overrides.pop(k) for k in ("background", "seed") if k in overrides}
        sections = {}
        for name in self.SECTIONS:
            section = getattr(self, name)
            mine = {f.name: overrides.pop(f.name) for f in fields(section) if f.name in overrides}
            sections[name] = replace(section, **mine) if mine else section
        if overrides:
            known = sorted(["background", "seed"] + [f.name for n in self.SECTIONS
                                                     for f in fields(getattr(self, n))])
            raise ConfigError(f"unknown runtime setting(s) {sorted(overrides)}; known: "
                              f"{', '.join(known)}")
        cfg = replace(self, **sections, **top)
        cfg.validate()
        return cfg

    def validate(self):
        g = self.guarantee
        if not 0.0 < g.agreement_budget <= 1.0:
            raise ConfigError(f"agreement_budget must be in (0, 1], got {g.agreement_budget}")
        if not 0.5 <= g.confidence < 1.0:
            raise ConfigError(f"confidence must be in [0.5, 1), got {g.confidence}")
        for name, v in (("shadow_rate", g.shadow_rate), ("calib_fraction", self.collect.calib_fraction),
                        ("collect_rate", self.collect.collect_rate),
                        ("warmup_collect_rate", self.collect.warmup_collect_rate),
                        ("idle_collect_rate", self.collect.idle_collect_rate),
                        ("doubt_shadow_rate", self.drift.doubt_shadow_rate),
                        ("doubt_alarm_p", self.drift.doubt_alarm_p)):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {v}")
        d = self.drift
        if isinstance(d.watch_threshold, bool) or not (
                isinstance(d.watch_threshold, (int, float)) and 0.0 <= d.watch_threshold < math.inf):
            raise ConfigError(f"watch_threshold must be 0 (no watch) or a finite log-likelihood "
                              f"ratio such as 3.0, got {d.watch_threshold!r}")
        if not (isinstance(d.watch_factor, (int, float)) and 1.0 < d.watch_factor < math.inf):
            raise ConfigError(f"watch_factor must be above 1 (x the budget's disagreement rate), "
                              f"such as 2.0, got {d.watch_factor!r}")
        if not 0.0 < self.collect.calib_share < 1.0:
            raise ConfigError(f"calib_share must be above 0 and below 1 (the rest of the buffer "
                              f"holds training rows), got {self.collect.calib_share}")
        if self.collect.warmup_collect_rate <= 0.0:
            raise ConfigError("warmup_collect_rate must be above 0 (at 0 nothing would ever "
                              "teach the exits); 1.0 learns fastest")
        for name, v in (("idle_below", self.collect.idle_below),
                        ("min_saving", self.learning.min_saving)):
            if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ConfigError(f"{name} must be None (the default for the cost model) or a "
                                  f"share of the backbone's cost in [0, 1), got {v!r}")
        if self.collect.idle_collect_rate <= 0.0:
            raise ConfigError("idle_collect_rate must be above 0 (at 0 a model whose exits do "
                              "not pay yet would stop learning for good); 1.0 never backs off")
        if g.threshold_rule not in THRESHOLD_RULES:
            raise ConfigError(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, got "
                              f"{g.threshold_rule!r}")
        if self.serving.backend not in ("auto", "torchscript", "onnxruntime"):
            raise ConfigError(f"backend must be 'auto', 'torchscript' or 'onnxruntime', got "
                              f"{self.serving.backend!r}")
        cap = self.serving.max_miss_overhead
        if cap is not None and not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
            raise ConfigError(f"max_miss_overhead must be None (no cap) or a share above 0 such as "
                              f"0.05, got {cap}")
        ms = self.serving.gil_switch_ms
        if ms is not None and not (isinstance(ms, (int, float)) and 0.001 <= ms <= 100):
            raise ConfigError(f"gil_switch_ms must be None (leave the interpreter's setting) or "
                              f"between 0.001 and 100 milliseconds, got {ms!r}")
        k = self.serving.settle_every
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 4096):
            raise ConfigError(f"settle_every must be None (the mode's default) or a whole number "
                              f"of requests from 1 to 4096, got {k!r}")
        c = self.collect
        if c.holdout_block_rows < 1 or not 0 <= c.holdout_gap_rows < c.holdout_block_rows:
            raise ConfigError(f"holdout_block_rows must be at least 1 and holdout_gap_rows in "
                              f"[0, holdout_block_rows), got {c.holdout_block_rows} and "
                              f"{c.holdout_gap_rows}")
        if not (math.isfinite(self.guard.range_factor) and self.guard.range_factor > 1.0):
            raise ConfigError(f"range_factor must be a finite number above 1, got "
                              f"{self.guard.range_factor}")
        if self.guard.range_window_rows < 1 or self.guard.range_warmup_rows < 0:
            raise ConfigError(f"range_window_rows must be at least 1 and range_warmup_rows at least 0, got "
                              f"{self.guard.range_window_rows} and {self.guard.range_warmup_rows}")
        for name, v, zero_ok in (("lr", self.learning.lr, False),
                                 ("buffer_mb", self.collect.buffer_mb, False),
                                 ("deferred_mb", self.collect.deferred_mb, False),
                                 ("weight_decay", self.learning.weight_decay, True)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or zero_ok and v == 0)):
                raise ConfigError(f"{name} must be a finite number "
                                  f"{'at least 0' if zero_ok else 'above 0'}, got {v}")
        if self.learning.lr > 1.0:
            raise ConfigError(f"lr must be at most 1 (Adam steps that large overflow the heads), "
                              f"got {self.learning.lr}")
        if not isinstance(self.drift.doubt_looks, int) or self.drift.doubt_looks < 1:
            raise ConfigError(f"doubt_looks must be a whole number of looks per window, at least 1 "
                              f"(1: whole windows only), got {self.drift.doubt_looks!r}")
        if not isinstance(self.drift.doubt_windows, int) or self.drift.doubt_windows < 1:
            raise ConfigError(f"doubt_windows must be a whole number of windows, at least 1 "
                              f"(1: doubt on the first window that rejects), got "
                              f"{self.drift.doubt_windows!r}")
        if not isinstance(g.correlation_block_rows, int) or g.correlation_block_rows < 1:
            raise ConfigError(f"correlation_block_rows must be a whole number of rows, at least 1 "
                              f"(1: rows counted as independent), got {g.correlation_block_rows!r}")
        if not isinstance(self.collect.idle_rounds, int) or self.collect.idle_rounds < 1:
            raise ConfigError(f"idle_rounds must be a whole number of rounds, at least 1, got "
                              f"{self.collect.idle_rounds!r}")
        for name in ("train_every", "min_train", "min_calib", "min_train_after_drift",
                     "max_train_rows", "max_calib_rows", "epochs", "batch_size"):
            if getattr(self.learning, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self.learning, name)}")
