"""Serve an artifact: split batches at confident exits, learn heads from live traffic, watch drift."""
import collections
import copy
import io
import logging
import threading
import time
import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from compiler import artifact
from compiler.errors import ArtifactError
from compiler.heads import ExitHead, HeadSpec

from .buffer import CALIB, TRAIN, FeatureBuffer
from .calibrate import INF, choose_thresholds_corrected, wilson_upper, z_of
from .config import RuntimeConfig
from .cuda_graphs import GraphedStage
from .learner import HeadLearner

log = logging.getLogger("layer_cache.runtime")


class InputError(ValueError):
    """A request the runtime will not serve; the message says what is wrong with it."""


@dataclass(frozen=True)
class ServingState:
    """What predict reads: swapped whole, never edited, so readers need no lock."""

    classifiers: tuple
    thresholds: tuple      # INF: exit off
    version: int = 0
    fast: Optional[torch.jit.ScriptModule] = None  # the same exits, scripted (CPU)

    @property
    def any_enabled(self) -> bool:
        return any(t != INF for t in self.thresholds)


def _classifier_from(spec: dict, scripted) -> nn.Sequential:
    k, d, hidden = spec["num_classes"], spec["feature_dim"], spec["hidden"]
    layers = [nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k)] if hidden else [nn.Linear(d, k)]
    clf = nn.Sequential(*layers)
    clf.load_state_dict({n: p.detach().clone().cpu() for n, p in scripted.state_dict().items()})
    return clf.eval()


def _set_exit(block, threshold: float):
    """Write one exit's threshold (INF: off) into an artifact block's buffers."""
    on = threshold != INF
    block.enabled.fill_(on)
    block.threshold.fill_(threshold if on else artifact.DISABLED_THRESHOLD)


def _quantiles(values) -> dict:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    t = torch.tensor(list(values), dtype=torch.float64)
    return {"p50": t.quantile(0.5).item(), "p99": t.quantile(0.99).item(), "mean": t.mean().item()}


class CachedRuntime:
    """An artifact in production: ``predict`` answers, the exits learn from what it serves."""

    def __init__(self, path: str, device="cpu", config: Optional[RuntimeConfig] = None):
        self.config = config or RuntimeConfig()
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ArtifactError("device 'cuda' asked for but CUDA is not available; use device='cpu'")
        self.path = str(path)
        self.module, self.manifest = artifact.load(self.path, map_location=self.device)
        blocks = [getattr(self.module.blocks, str(i)) for i in range(len(self.manifest["exits"]))]
        self.stages = [b.stage for b in blocks] + [self.module.final]
        self._scripted_stages = list(self.stages)
        if self.device.type == "cuda" and self.config.cuda_graphs:
            self.stages = [GraphedStage(s) for s in self.stages]
        self.heads = [b.head for b in blocks]
        self.exits = self.manifest["exits"]
        self.num_exits = len(self.exits)
        self.input_shape = tuple(self.manifest["input_shape"][1:])
        self.z_drift = z_of(self.config.drift_confidence)
        specs = [e["head"] for e in self.exits]
        classifiers = [_classifier_from(s, b.head.classifier).to(self.device)
                       for s, b in zip(specs, blocks)]
        thresholds = tuple(float(b.threshold) if bool(b.enabled) else INF for b in blocks)
        fast = self.module if any(t != INF for t in thresholds) and self.device.type == "cpu" else None
        self._state = ServingState(tuple(classifiers), thresholds, fast=fast)
        self.learner = HeadLearner(classifiers, self.config.seed)
        if self.manifest.get("runtime", {}).get("learned"):
            self.learner.adopt([c.cpu() for c in classifiers])
        self.buffer = FeatureBuffer([s["feature_dim"] for s in specs], self.manifest["num_classes"],
                                    self.config.buffer_mb)
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self._stats_lock = threading.Lock()
        self._learn_lock = threading.Lock()
        self._init_costs()
        self._reset_stats()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._learning = False
        self._thread = None
        if self.config.background:
            self._thread = threading.Thread(target=self._worker, name="layer-cache-learner",
                                            daemon=True)
            self._thread.start()

    # ----- cost model -------------------------------------------------------------------------
    def _init_costs(self):
        total = float(self.manifest["total_flops"])
        self.stage_flops = torch.tensor(self.manifest["stage_flops"], dtype=torch.float64)
        self.head_flops = torch.tensor([e["head"]["flops"] for e in self.exits], dtype=torch.float64)
        self.total_flops = total
        lat_stage, lat_head = self._profile()
        w = self.config.latency_weight
        if w is None:
            w = 0.5 if self.config.background else 0.0
        ref = lat_stage.sum()
        self.stage_cost = (1 - w) * self.stage_flops / total + w * lat_stage / ref
        self.head_cost = (1 - w) * self.head_flops / total + w * lat_head / ref
        self.stage_latency_ms, self.head_latency_ms = lat_stage.tolist(), lat_head.tolist()

    @torch.no_grad()
    def _profile(self, batch: int = 8, reps: int = 7):
        """Latency of each stage and each head (with its decision) on this device.

        The minimum over repetitions, after a warm-up: the least disturbed by other load.
        """
        def timed(fn, arg):
            times = []
            fn(arg)
            for _ in range(reps):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                out = fn(arg)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
            return out, min(times) * 1e3

        h = torch.randn((batch,) + self.input_shape, device=self.device)
        stage_ms, head_ms = [], []
        clfs = self._state.classifiers
        for i, stage in enumerate(self.stages):
            h, ms = timed(stage, h)
            stage_ms.append(ms)
            if i < self.num_exits:
                _, ms = timed(lambda a, i=i: bool(torch.softmax(clfs[i](self.heads[i].features(a)),
                                                                1).amax(1).ge(0.5).any()), h)
                head_ms.append(ms)
        return torch.tensor(stage_ms, dtype=torch.float64), torch.tensor(head_ms, dtype=torch.float64)

    # ----- serving ------------------------------------------------------------------------------
    def _check(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor batch of shape [N, {', '.join(map(str, self.input_shape))}], "
                             f"got {type(x).__name__}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"expected a batch of shape [N, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(x.shape)}; reshape the input (batch dimension first)")
        if not x.is_floating_point():
            raise InputError(f"expected floating-point input, got {str(x.dtype).replace('torch.', '')}; "
                             f"convert it with x.float()")
        if x.shape[0] == 0:
            raise InputError("empty batch: send at least one row")
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise InputError(f"rows {bad[:10]} contain NaN or Inf; clean or drop them and resend "
                             f"(nothing was served or learned)")
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, return_exits: bool = False):
        """The backbone's output for each row (rows in input order); exits answer confident rows.

        With ``return_exits`` also returns each row's exit index (``num_exits``: the backbone).
        """
        x = self._check(x)
        t0 = time.perf_counter()
        state = self._state
        n, E = x.shape[0], self.num_exits
        # Shadow whole requests, not rows: the other requests then have nothing to check or
        # learn from and can run the fast path; the share of rows shadowed is the same.
        shadow = state.any_enabled and \
            torch.rand(1, generator=self._gen).item() < self.config.shadow_rate
        if state.fast is not None and not shadow and \
                torch.rand(1, generator=self._gen).item() >= self.config.collect_rate:
            # Nothing to check or learn from in this request: the scripted model serves it
            # whole, without Python between the stages.
            out, exit_of = state.fast.forward_with_exits(x)
            latency = (time.perf_counter() - t0) * 1e3
            self._account(n, exit_of, shadow, None, None, out, state, latency)
            self._maybe_learn(n)
            return (out, exit_of) if return_exits else out
        idx = torch.arange(n, device=self.device)
        exit_of = torch.full((n,), E, dtype=torch.long, device=self.device)
        would = torch.full((n,), E, dtype=torch.long, device=self.device)   # shadow rows' exit
        would_pred = torch.full((n,), -1, dtype=torch.long, device=self.device)
        out, feats, h = None, [], x
        for e in range(E):
            h = self.stages[e](h)
            f = self.heads[e].features(h)
            feats.append(f)
            if state.thresholds[e] == INF:
                continue
            logits = state.classifiers[e](f)
            hit = torch.softmax(logits, 1).amax(1) >= state.thresholds[e]
            if shadow:  # record where each row would have left; every row goes on
                newly = hit & (would == E)
                would[newly] = e
                would_pred[newly] = logits.argmax(1)[newly]
                continue
            take = hit
            if bool(take.any()):
                if out is None:
                    out = torch.empty((n,) + tuple(logits.shape[1:]), device=self.device)
                out[idx[take]] = logits[take]
                exit_of[idx[take]] = e
                keep = ~take
                h, idx = h[keep], idx[keep]
                feats = [g[keep] for g in feats]
                if h.shape[0] == 0:
                    break
        y = None
        if h.shape[0] > 0:
            y = self.stages[E](h)
            if out is None:
                out = y
            else:
                out[idx] = y.to(out.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        latency = (time.perf_counter() - t0) * 1e3
        if y is not None and len(feats) == E:
            self._collect(feats, y, shadow, state)
        self._account(n, exit_of, shadow, would, would_pred, out, state, latency)
        self._maybe_learn(n)
        return (out, exit_of) if return_exits else out

    def __call__(self, x):
        return self.predict(x)

    # ----- learning -----------------------------------------------------------------------------
    def _collect(self, feats, teacher, shadow: bool, state):
        """Buffer rows that ran the whole backbone; choose which are held out for calibration."""
        n = teacher.shape[0]
        u = torch.rand(n, generator=self._gen)
        if state.any_enabled:
            # Only shadow rows are an unbiased sample of traffic once exits take the easy rows,
            # so all of them calibrate; the rows that reached the end (hard ones) train.
            calib = torch.full((n,), shadow, dtype=torch.bool)
        else:
            calib = u < self.config.calib_fraction
        role = torch.where(calib, CALIB, TRAIN)
        self.buffer.add(feats, teacher, role)

    def _maybe_learn(self, n):
        """Count served rows; every ``train_every`` of them, run (or wake) a learning round."""
        with self._stats_lock:
            self._pending += n
            due = self._pending >= self.config.train_every
        if due:
            if self._thread is None:
                self.learn()
            else:
                self._wake.set()

    def _worker(self):
        while not self._stop.is_set():
            self._wake.wait(0.5)
            if self._wake.is_set() and not self._stop.is_set():
                self._wake.clear()
                try:
                    self.learn()
                except Exception:  # keep serving on the old heads; say why
                    log.exception("learning round failed; exits keep their previous state")

    def learn(self) -> bool:
        """One learning round: distil heads on buffered rows, re-choose thresholds, publish.

        Runs inline in synchronous mode and in the learner thread otherwise; returns True when
        a new serving state was published.
        """
        cfg = self.config
        with self._learn_lock:
            with self._stats_lock:
                self._pending = 0
                self._learning = True
                restart, self._drifted = self._drifted, False
            if restart:  # traffic changed: standardise features on the new traffic
                self.learner.reset_normalisation()
            try:
                feats, teacher = self.buffer.snapshot(TRAIN, cfg.max_train_rows)
                if teacher.shape[0] < cfg.min_train:
                    return False
                t0 = time.perf_counter()
                self.learner.train(feats, teacher, cfg.epochs, cfg.batch_size, cfg.lr,
                                   cfg.weight_decay)
                cfeats, cteacher = self.buffer.snapshot(CALIB)
                self._train_seconds += time.perf_counter() - t0
                plan = None
                if cteacher.shape[0] >= cfg.min_calib:
                    plan = self._choose(lambda e, f: self.learner.predict(e, f), cfeats, cteacher,
                                        cfg.plan_budget)
                self._publish(plan, teacher.shape[0] >= cfg.fast_after)
                return True
            finally:
                with self._stats_lock:
                    self._learning = False

    def _choose(self, head_logits, cfeats, cteacher, budget: float):
        """Thresholds for ``budget`` on the held-out rows (cfeats, cteacher)."""
        target = cteacher.argmax(1)
        confs, agrees = [], []
        with torch.no_grad():
            for e in range(self.num_exits):
                p = torch.softmax(head_logits(e, cfeats[e]).float().cpu(), 1)
                confs.append(p.amax(1))
                agrees.append(p.argmax(1) == target)
        return choose_thresholds_corrected(
            torch.stack(confs).double(), torch.stack(agrees), self.stage_cost, self.head_cost,
            budget, self.config.confidence, self.config.seed + self._rounds)

    def _standalone_thresholds(self, state, plan) -> tuple:
        """Thresholds for serving with no shadow rows (a saved artifact, its ONNX export): held to
        the full agreement budget rather than to ``plan_budget``, on the same held-out rows.

        With no ``plan`` (no round chose thresholds yet) they are the artifact's own, which the
        save that wrote them already held to the full budget, or all off: kept as they are.
        """
        if plan is None or all(t == INF for t in state.thresholds) or \
                self.config.shadow_rate <= 0:
            return state.thresholds
        cfeats, cteacher = self.buffer.snapshot(CALIB)
        if cteacher.shape[0] < self.config.min_calib:
            return (INF,) * self.num_exits
        plan = self._choose(lambda e, f: state.classifiers[e](f.to(self.device)), cfeats,
                            cteacher, self.config.agreement_budget)
        return tuple(plan.thresholds)

    def _fast_module(self, classifiers, thresholds):
        """The serving state as one scripted CachedModel (CPU; on CUDA the staged path runs
        its CUDA graphs), sharing the artifact's scripted stages."""
        if self.device.type != "cpu" or all(t == INF for t in thresholds):
            return None
        blocks = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for e, ex in enumerate(self.exits):
                head = ExitHead(HeadSpec(*(ex["head"][k] for k in ("pool", "feature_dim", "hidden",
                                                                    "num_classes"))))
                head.classifier.load_state_dict(classifiers[e].state_dict())
                blk = artifact.ExitBlock(self._scripted_stages[e], torch.jit.script(head.eval()))
                _set_exit(blk, thresholds[e])
                blocks.append(blk)
            return torch.jit.script(artifact.CachedModel(blocks, self._scripted_stages[-1]).eval())

    def _publish(self, plan, fast_ok: bool):
        classifiers = tuple(self.learner.folded(e).to(self.device) for e in range(self.num_exits))
        thresholds = tuple(plan.thresholds) if plan else (INF,) * self.num_exits
        fast = self._fast_module(classifiers, thresholds) if fast_ok else None
        with self._stats_lock:
            self._rounds += 1
            self._plan = plan
            self._state = ServingState(classifiers, thresholds, self._state.version + 1, fast)
        if plan:
            log.info("round %d: exits %s, expected saving %.1f%%, agreement %.4f (bound %.4f, %d "
                     "held-out rows)", self._rounds,
                     [round(t, 4) if t != INF else "off" for t in thresholds], 100 * plan.saving,
                     plan.agreement, plan.lower_bound, plan.n)

    # ----- monitoring ---------------------------------------------------------------------------
    def _reset_stats(self):
        E = self.num_exits
        self._requests = 0
        self._rows = 0
        self._rows_per_exit = [0] * (E + 1)
        self._flops_spent = 0.0
        self._latency = collections.deque(maxlen=20000)
        self._latency_learning = collections.deque(maxlen=20000)
        self._shadow_rows = 0
        self._shadow_agree = 0
        self._exit_shadow = [collections.deque(maxlen=self.config.drift_window) for _ in range(E)]
        self._window = collections.deque(maxlen=self.config.drift_window)
        self._unjudged = 0
        self._drift_events = 0
        self._drifted = False
        self._rounds = 0
        self._pending = 0
        self._train_seconds = 0.0
        self._plan = None
        self._row_flops_cache = None

    def _row_flops(self, state) -> list:
        """FLOPs of a row leaving at each exit (last: the backbone), heads it passed included."""
        cached = self._row_flops_cache
        if cached is None or cached[0] != state.version:
            on = torch.tensor([t != INF for t in state.thresholds], dtype=torch.float64)
            heads = self.head_flops * on
            cum = torch.cumsum(self.stage_flops, 0) + torch.cat([torch.cumsum(heads, 0), heads.sum()[None]])
            cached = self._row_flops_cache = (state.version, cum.tolist())
        return cached[1]

    def _account(self, n, exit_of, shadow, would, would_pred, out, state, latency):
        E = self.num_exits
        exit_cpu = exit_of.cpu()
        counts = torch.bincount(exit_cpu, minlength=E + 1).tolist()
        flops = sum(c * f for c, f in zip(counts, self._row_flops(state)))
        drift = False
        with self._stats_lock:
            self._requests += 1
            self._rows += n
            self._rows_per_exit = [a + b for a, b in zip(self._rows_per_exit, counts)]
            self._flops_spent += flops
            (self._latency_learning if self._learning else self._latency).append(latency)
            if shadow:  # every row ran the backbone: judge where it would have left
                ok = (would == E) | (would_pred == out.argmax(1))
                self._shadow_rows += n
                self._shadow_agree += int(ok.sum())
                self._window.extend(ok.tolist())
                self._unjudged += len(ok)
                for e_, a in zip(would.tolist(), ok.tolist()):
                    if e_ < E:
                        self._exit_shadow[e_].append(a)
                # Judge only every drift_min new decisions: testing after every batch would
                # raise false alarms by sheer repetition.
                if self._unjudged >= self.config.drift_min:
                    self._unjudged = 0
                    w = len(self._window)
                    drift = wilson_upper(sum(self._window), w, self.z_drift) < \
                        self.config.plan_budget
        if drift:
            self._on_drift(sum(self._window) / len(self._window))

    def _on_drift(self, live):
        """Live agreement fell below the budget: switch every exit off now, forget old traffic, relearn."""
        with self._stats_lock:
            self._drift_events += 1
            self._drifted = True
            self._state = ServingState(self._state.classifiers, (INF,) * self.num_exits,
                                       self._state.version + 1)
            self._window.clear()
            self._unjudged = 0
            for d in self._exit_shadow:
                d.clear()
        self.buffer.clear()
        log.warning("drift: live agreement %.3f below budget %.3f; exits off, relearning from new "
                    "traffic", live, self.config.plan_budget)

    def stats(self) -> dict:
        """Counters since load: traffic, exits, live agreement, FLOPs saved, latency, learning."""
        with self._stats_lock:
            E = self.num_exits
            plan = self._plan
            return {
                "requests": self._requests,
                "rows": self._rows,
                "exit_names": [e["name"] for e in self.exits] + ["backbone"],
                "rows_per_exit": list(self._rows_per_exit),
                "exit_rate": 1 - self._rows_per_exit[E] / max(self._rows, 1),
                "live_agreement": self._shadow_agree / self._shadow_rows if self._shadow_rows else None,
                "live_agreement_per_exit": [sum(d) / len(d) if d else None for d in self._exit_shadow],
                "shadow_rows": self._shadow_rows,
                "flops_saved": 1 - self._flops_spent / max(self._rows * self.total_flops, 1),
                "latency_ms": _quantiles(self._latency),
                "latency_while_learning_ms": _quantiles(self._latency_learning),
                "stage_latency_ms": self.stage_latency_ms,
                "head_latency_ms": self.head_latency_ms,
                "thresholds": [None if t == INF else t for t in self._state.thresholds],
                "enabled": [t != INF for t in self._state.thresholds],
                "plan": None if plan is None else {"saving": plan.saving, "agreement": plan.agreement,
                                                   "lower_bound": plan.lower_bound,
                                                   "calib_rows": plan.n},
                "learning": {"rounds": self._rounds, "rows_trained": self.learner.rows,
                             "train_flops": self.learner.flops, "train_seconds": self._train_seconds,
                             "buffer_rows": self.buffer.size, "buffer_capacity": self.buffer.capacity},
                "drift_events": self._drift_events,
            }

    # ----- persistence --------------------------------------------------------------------------
    def save(self, path: str):
        """Write the learned heads, thresholds and on/off flags into an artifact, atomically."""
        with self._stats_lock:
            state, plan = self._state, self._plan
        thresholds = self._standalone_thresholds(state, plan)
        blob = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(self.module, blob)
            blob.seek(0)
            module = torch.jit.load(blob, map_location="cpu")  # a private copy: serving goes on
        for e in range(self.num_exits):
            blk = getattr(module.blocks, str(e))
            blk.head.classifier.load_state_dict({k: v.cpu() for k, v in
                                                 state.classifiers[e].state_dict().items()})
            _set_exit(blk, thresholds[e])
        manifest = copy.deepcopy(self.manifest)
        manifest["runtime"] = {"learned": True, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "agreement_budget": self.config.agreement_budget,
                               "thresholds": [None if t == INF else t for t in thresholds],
                               "stats": self.stats()}
        artifact.save(module, manifest, path)

    def close(self):
        """Stop the learner thread (serving still works, learning stops)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str, device="cpu", background: bool = True, config: Optional[RuntimeConfig] = None,
         **overrides) -> CachedRuntime:
    """Open an artifact for serving; ``overrides`` set RuntimeConfig fields by name."""
    config = replace(config or RuntimeConfig(), background=background, **overrides)
    return CachedRuntime(path, device, config)
