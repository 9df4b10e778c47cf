"""CachedRuntime: the artifact in production, composed of parts with one job each.

- serving (``serving.py``): one request against the immutable ``ServingState``;
- collection (``collect.py``): shadow/collect decisions and the feature buffer;
- learning (``learning.py``): rounds on capped recent rows, in a thread or inline;
- drift (``drift.py``): exit shares on every request, CUSUM on shadow rows;
- costs (``costs.py``), counters (``stats.py``), persistence (``compiler.artifact.save``).

This class only wires them and owns the one lock that orders publishing against drift: a
state is swapped whole under it, and a round's proposal is dropped if drift struck after the
round began (``generation``).
"""
import collections
import copy
import io
import logging
import threading
import time
import warnings
from typing import Optional

import torch
from torch import nn

from compiler import artifact
from compiler.errors import ArtifactError

from .backends import BackendError, OnnxRuntimeBackend, resolve
from .buffer import FeatureBuffer
from .calibrate import INF
from .collect import Collector
from .config import RuntimeConfig
from .costs import CostModel, profile
from .cuda_graphs import GraphedStage
from .correlation import DesignEffect
from .drift import ALARM, DriftMonitor
from .guard import InputGuard
from .learner import HeadLearner, NonFiniteRound, RoundCancelled
from .learning import LearnerThread, LearningLoop
from .serving import ServingState, serve_collected, serve_fast, serve_plan, serve_staged
from .stats import Counters
from .tasks import task_of_artifact

log = logging.getLogger("layer_cache.runtime")


class InputError(ValueError):
    """A request the runtime will not serve; the message says what is wrong with it."""


def _classifier_from(spec: dict, scripted) -> nn.Sequential:
    k, d, hidden = spec["num_classes"], spec["feature_dim"], spec["hidden"]
    layers = [nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k)] if hidden else [nn.Linear(d, k)]
    clf = nn.Sequential(*layers)
    clf.load_state_dict({n: p.detach().clone().cpu() for n, p in scripted.state_dict().items()})
    return clf.eval()


class CachedRuntime:
    """An artifact in production: ``predict`` answers, the exits learn from what it serves."""

    def __init__(self, path: str, device="cpu", config: Optional[RuntimeConfig] = None):
        self.config = config or RuntimeConfig()
        self.config.validate()
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ArtifactError("device 'cuda' asked for but CUDA is not available; use device='cpu'")
        self.path = str(path)
        self.module, self.manifest = artifact.load(self.path, map_location=self.device)
        self.exits = self.manifest["exits"]
        self.num_exits = len(self.exits)
        self.input_shape = tuple(self.manifest["input_shape"][1:])
        blocks = [getattr(self.module.blocks, str(i)) for i in range(self.num_exits)]
        self.stages = [b.stage for b in blocks] + [self.module.final]
        scripted_stages = list(self.stages)
        if self.device.type == "cuda" and self.config.serving.cuda_graphs:
            self.stages = [GraphedStage(s) for s in self.stages]
        self.heads = [b.head for b in blocks]
        specs = [e["head"] for e in self.exits]
        classifiers = tuple(_classifier_from(s, b.head.classifier).to(self.device)
                            for s, b in zip(specs, blocks))
        thresholds = tuple(float(b.threshold) if bool(b.enabled) else INF for b in blocks)

        self.backend = self._make_backend(scripted_stages)
        w = self.config.serving.latency_weight
        if w is None:
            w = 0.5 if self.config.background else 0.0
        self.costs = CostModel(self.manifest, w, profile(self.stages, self.heads, classifiers,
                                                         self.input_shape, self.device,
                                                         backend=self.backend))
        self.learner = HeadLearner(list(classifiers), self.config.seed)
        if self.manifest.get("runtime", {}).get("learned"):
            self.learner.adopt([c.cpu() for c in classifiers])
        self.buffer = FeatureBuffer([s["feature_dim"] for s in specs], self.manifest["num_classes"],
                                    self.config.collect.buffer_mb)
        self.collector = Collector(self.buffer, self.config.collect, self.config.seed)
        self.design = DesignEffect(int(self.manifest["num_classes"]))
        self.loop = LearningLoop(self.learner, self.buffer, self.costs, self.config, self.exits,
                                 scripted_stages, self.device, self.design)
        self.drift = DriftMonitor(self.config.drift, self.config.guarantee.plan_budget,
                                  self.design)
        self.guard = InputGuard(self.config.guard)
        self.guard.seed(self.manifest.get("runtime", {}).get("input_scale_median"))
        self.counters = Counters(self.num_exits)

        self._lock = threading.Lock()          # orders publish, drift and the round counters
        self._learn_lock = threading.Lock()    # one round at a time
        self._generation = 0                   # bumped by every drift alarm
        self._norm_generation = 0
        self._pending = 0
        self._rounds = 0
        self._rounds_discarded = 0
        self._rounds_failed = 0
        self._rounds_nonfinite = 0
        self._last_error = None
        self._round_seconds = collections.deque(maxlen=100)  # bounded: runs for days
        self._train_seconds = 0.0
        self._learning = False
        self._paused = False
        self._closed = False
        self._yield_gate = threading.Lock()
        self._delegate = None                  # replica mode: see delegate_learning
        fast = self.module if any(t != INF for t in thresholds) and self.device.type == "cpu" else None
        self._state = ServingState(classifiers, thresholds, fast=fast,
                                   compiled=self._compile(classifiers, thresholds, fast is not None))
        self._thread = LearnerThread(self) if self.config.background else None

    def _make_backend(self, stages):
        """The onnxruntime backend when the setting resolves to it (``backends.resolve``), else
        None (TorchScript). Under ``auto`` a model whose stages do not export falls back to
        TorchScript with a warning; asked for by name, that is an error."""
        asked = self.config.serving.backend
        if resolve(asked, self.device) != "onnxruntime":
            return None
        try:
            return OnnxRuntimeBackend(stages, self.exits, self.input_shape,
                                      int(self.manifest["num_classes"]))
        except Exception as e:  # export and session errors come in many types; all fall back
            if asked == "onnxruntime":
                raise BackendError(f"cannot serve '{self.path}' with onnxruntime: {e}; use "
                                   f"backend='torchscript'") from None
            log.warning("serving with TorchScript: the onnxruntime backend cannot be built (%s)", e)
            return None

    def _compile(self, classifiers, thresholds, whole: bool):
        """A state's onnxruntime plan (None: no exit on, or TorchScript); ``whole``: it may
        serve requests with nothing to learn from (else only those that teach use it)."""
        if self.backend is None or all(t == INF for t in thresholds):
            return None
        try:
            return self.backend.compile(classifiers, thresholds, whole)
        except Exception as e:  # serving goes on with the scripted fast path
            log.warning("onnxruntime plan not built (%s); this state serves with TorchScript", e)
            return None

    # ----- compatibility views of the cost model ----------------------------------------------
    @property
    def stage_flops(self):
        return self.costs.stage_flops

    @property
    def head_flops(self):
        return self.costs.head_flops

    @property
    def total_flops(self):
        return self.costs.total_flops

    @property
    def stage_cost(self):
        return self.costs.stage_cost

    @property
    def head_cost(self):
        return self.costs.head_cost

    @property
    def state(self) -> ServingState:
        """The serving state in force now (immutable)."""
        return self._state

    # ----- serving ------------------------------------------------------------------------------
    def _check(self, x):
        """The batch as float32 on the device, and the guard's verdict on it; a request the
        runtime will not serve raises ``InputError`` and changes nothing."""
        shape = ", ".join(map(str, self.input_shape))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor batch of shape [N, {shape}], "
                             f"got {type(x).__name__}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"expected a batch of shape [N, {shape}], got {list(x.shape)}; "
                             f"reshape the input (batch dimension first)")
        if not x.is_floating_point():
            raise InputError(f"expected floating-point input, got {str(x.dtype).replace('torch.', '')}; "
                             f"convert it with x.float()")
        if x.shape[0] == 0:
            raise InputError("empty batch: send at least one row")
        verdict = self.guard.judge(x)
        if not verdict.finite:
            raise InputError(f"rows {list(verdict.bad_rows[:10])} contain NaN, Inf or values beyond "
                             f"float32's range; clean or drop them and resend (nothing was served "
                             f"or learned)")
        return x.to(self.device, torch.float32), verdict

    @torch.no_grad()
    def predict(self, x: torch.Tensor, return_exits: bool = False):
        """The backbone's output for each row (rows in input order); exits answer confident rows.

        With ``return_exits`` also returns each row's exit index (``num_exits``: the backbone).
        Safe to call from many threads at once.
        """
        x, verdict = self._check(x)
        if not verdict.inside:
            return self._predict_outside(x, return_exits)
        state = self._state
        if self._learning and self._thread is not None and not state.any_enabled and \
                self.config.learning.yield_until_exits:
            with self._yield_gate:   # one request at a time while the first rounds run
                return self._predict(x, return_exits, self._state, verdict.learn)
        return self._predict(x, return_exits, state, verdict.learn)

    def _predict_outside(self, x, return_exits):
        """A request far outside the traffic seen so far (``guard.py``): the backbone answers
        every row, and nothing learns from it or reads it as drift."""
        t0 = time.perf_counter()
        state = self._state
        off = ServingState(state.classifiers, (INF,) * self.num_exits, state.version,
                           state.generation)
        if self.backend is not None:
            served = serve_collected(self.backend, off, x, False, False)
        else:
            served = serve_staged(self.stages, self.heads, off, x, False, False)
        counts = [0] * self.num_exits + [x.shape[0]]
        self.counters.record(counts, self.costs.flops_of(counts, off.enabled_key),
                             (time.perf_counter() - t0) * 1e3, self._learning)
        k = self.guard.requests_outside
        if k & (k - 1) == 0:  # 1st, 2nd, 4th, 8th...: never a line per request
            log.warning("%d request(s) so far outside the traffic seen (row scale above %.3g): "
                        "answered by the backbone, not learned from", k, self.guard.limit)
        return (served.out, served.exit_of) if return_exits else served.out

    def _predict(self, x, return_exits, state, learn: bool = True):
        t0 = time.perf_counter()
        rate = self.config.guarantee.shadow_rate
        if (self.drift if self._delegate is None else self._delegate).in_doubt:
            rate = max(rate, self.config.drift.doubt_shadow_rate)
        shadow, collect = self.collector.decide(state.any_enabled, rate, state.servable_whole)
        collect = collect and learn
        if state.compiled is not None and state.compiled.whole and not shadow and not collect:
            served = serve_plan(state, x)
        elif state.fast is not None and not shadow and not collect:
            served = serve_fast(state, x)
        elif self.backend is not None:
            served = serve_collected(self.backend, state, x, shadow, collect)
        else:
            served = serve_staged(self.stages, self.heads, state, x, shadow, collect)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        latency = (time.perf_counter() - t0) * 1e3
        self.design.observe(served.out)
        if served.features is not None:
            self.collector.add(served.features, served.teacher, shadow, state.any_enabled)
        self._account(state, served, latency)
        self._maybe_learn(x.shape[0])
        out, exit_of = served.out, served.exit_of
        return (out, exit_of) if return_exits else out

    def __call__(self, x):
        return self.predict(x)

    def _account(self, state: ServingState, served, latency: float):
        E = self.num_exits
        if served.exit_of.shape[0] == 1:  # one row: no bincount
            counts = [0] * (E + 1)
            counts[int(served.exit_of[0])] = 1
        else:
            counts = torch.bincount(served.exit_of.cpu(), minlength=E + 1).tolist()
        self.counters.record(counts, self.costs.flops_of(counts, state.enabled_key), latency,
                             self._learning, served.shadow_ok, served.shadow_exit)
        would = counts if served.shadow_exit is None else \
            torch.bincount(served.shadow_exit.cpu(), minlength=E + 1).tolist()
        if self._delegate is not None:
            self._delegate.observe(state.version, would, served.shadow_ok)
        else:
            self.observe(state.version, would, served.shadow_ok)

    def observe(self, version: int, exit_counts, shadow_ok) -> bool:
        """Feed the drift monitor one request served under state ``version``: rows per exit
        (for a shadow request, where they would have left) and, if shadowed, each row's
        agreement. Requests served under an older state are ignored. True if the alarm struck.

        ``predict`` calls it; the learner of ``runtime.scaleout`` calls it with its replicas'
        requests, so one monitor watches the pooled traffic.
        """
        state = self._state
        if version != state.version:
            return False  # a newer state is in force: this request says nothing about it
        verdict = self.drift.observe(exit_counts, shadow_ok)
        if verdict.state == ALARM:
            self._on_drift(state, verdict)
            return True
        return False

    def _on_drift(self, seen: ServingState, verdict):
        """Live agreement fell below the budget: every exit off now, forget old traffic, relearn."""
        with self._lock:
            if self._state.version != seen.version:
                return  # another thread already acted on this state
            self._generation += 1
            self._state = seen.exits_off(self._generation)
            self.drift.reset(None)
        self.counters.forget_shadow()
        self.buffer.clear()
        log.warning("drift: %s; exits off, relearning from new traffic", verdict.reason)

    # ----- learning -----------------------------------------------------------------------------
    def _maybe_learn(self, n):
        if self._delegate is not None:
            return
        with self._lock:
            self._pending += n
            due = self._pending >= self.config.learning.train_every
        if due and not self._paused:
            if self._thread is not None:
                self._thread.wake.set()
                return
            try:
                self.learn()
            except Exception:  # counted in stats(); the request was answered, serving goes on
                log.exception("learning round failed; exits keep their previous state")

    def _should_stop(self) -> bool:
        return self._thread is not None and self._thread.stop.is_set()

    def learn(self) -> bool:
        """One learning round: distil heads on recent rows, re-choose thresholds, publish.

        Runs inline in synchronous mode and in the learner thread otherwise. Returns True when
        a new serving state was published. A round that began before a drift alarm is dropped;
        a round that raises leaves serving on the previous state and is counted in ``stats()``.
        """
        if self._paused or self._closed or self._delegate is not None:
            return False
        with self._learn_lock:
            with self._lock:
                self._pending = 0
                generation, round_index = self._generation, self._rounds
                restart = self._norm_generation != generation
                self._norm_generation = generation
            if restart:  # traffic changed: standardise features on the new traffic
                self.learner.reset_normalisation()
            self._learning = True
            t0 = time.perf_counter()
            try:
                proposal = self.loop.run(round_index, self._should_stop)
            except RoundCancelled:
                return False
            except NonFiniteRound as e:
                with self._lock:
                    self._rounds_nonfinite += 1
                    self._last_error = f"{type(e).__name__}: {e}"
                log.warning("learning round discarded: %s; exits keep their previous state", e)
                return False
            except Exception as e:
                with self._lock:
                    self._rounds_failed += 1
                    self._last_error = f"{type(e).__name__}: {e}"
                raise
            finally:
                self._learning = False
                self._round_seconds.append(time.perf_counter() - t0)
            if proposal is None:
                return False
            self._train_seconds += time.perf_counter() - t0
            return self._publish(proposal, generation)

    def _publish(self, p, generation: int) -> bool:
        compiled = self._compile(p.classifiers, p.thresholds, p.fast is not None)
        with self._lock:
            if generation != self._generation:
                self._rounds_discarded += 1
                log.info("learning round dropped: drift struck while it ran")
                return False
            self._rounds += 1
            self._state = ServingState(p.classifiers, p.thresholds, self._state.version + 1,
                                       generation, p.fast, p.exit_shares, p.plan, compiled)
            self.drift.reset(p.exit_shares)
        if p.plan:
            log.info("round %d: exits %s, expected saving %.1f%%, agreement %.4f (bound %.4f, %d "
                     "held-out rows)", self._rounds,
                     [round(t, 4) if t != INF else "off" for t in p.thresholds],
                     100 * p.plan.saving, p.plan.agreement, p.plan.lower_bound, p.plan.n)
        return True

    # ----- replica mode (runtime.scaleout) --------------------------------------------------------
    def delegate_learning(self, sink):
        """Serve as one of many replicas whose learning happens elsewhere (``runtime.scaleout``).

        From now on no round runs here and the local drift monitor is not fed: collected rows go
        to ``sink.add(features, teacher, role)`` (``FeatureBuffer.add``'s signature), each
        request's decisions to ``sink.observe(version, exit_counts, shadow_ok)`` (``observe``'s),
        and ``sink.in_doubt`` raises the shadow rate as the local monitor's doubt would. States
        come back through ``adopt_state``. ``sink``'s methods run on the serving path: they must
        not block. Irreversible for this runtime.
        """
        self._delegate = sink
        self.collector.buffer = sink
        if self._thread is not None:
            self._thread.close()
        self.buffer.clear()

    def adopt_state(self, version: int, generation: int, classifiers_state, thresholds,
                    exit_shares=None, fast: bool = False) -> bool:
        """Install a serving state published by a learner elsewhere (replica mode).

        ``classifiers_state``: per exit, the classifier's ``state_dict`` (reads raw features);
        ``thresholds``: per exit (None or ``inf``: off); ``fast``: also build the scripted fast
        path (the learner trained on ``fast_after`` rows). Built outside the lock, swapped whole
        under it; a version not newer than the one in force is ignored (returns False).
        """
        if version <= self._state.version:
            return False
        specs = [e["head"] for e in self.exits]
        classifiers = []
        for spec, sd in zip(specs, classifiers_state):
            k, d, hidden = spec["num_classes"], spec["feature_dim"], spec["hidden"]
            clf = nn.Sequential(*([nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k)]
                                  if hidden else [nn.Linear(d, k)]))
            clf.load_state_dict({n: torch.as_tensor(v).float() for n, v in sd.items()})
            classifiers.append(clf.eval().to(self.device))
        classifiers = tuple(classifiers)
        thresholds = tuple(INF if t is None else float(t) for t in thresholds)
        module = self.loop.fast_module(classifiers, thresholds) if fast else None
        compiled = self._compile(classifiers, thresholds, fast)
        with self._lock:
            if version <= self._state.version:
                return False
            self._generation = max(self._generation, generation)
            self._state = ServingState(classifiers, thresholds, version, generation, module,
                                       None if exit_shares is None else tuple(exit_shares),
                                       compiled=compiled)
        return True

    def pause_learning(self):
        """Stop starting rounds (serving and collection go on); a round in progress finishes."""
        self._paused = True

    def resume_learning(self):
        self._paused = False

    @property
    def learning_paused(self) -> bool:
        return self._paused

    # ----- monitoring ---------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters since load: traffic, exits, live agreement, FLOPs saved, latency, learning."""
        out = self.counters.snapshot(self.costs.total_flops)
        with self._lock:
            state = self._state
            plan = state.plan
            rounds = list(self._round_seconds)
            out.update({
                "exit_names": [e["name"] for e in self.exits] + ["backbone"],
                "backend": "torchscript" if self.backend is None else self.backend.name,
                "stage_latency_ms": self.costs.stage_latency_ms,
                "head_latency_ms": self.costs.head_latency_ms,
                "thresholds": [None if t == INF else t for t in state.thresholds],
                "enabled": [t != INF for t in state.thresholds],
                "state_version": state.version,
                "plan": None if plan is None else {"saving": plan.saving, "agreement": plan.agreement,
                                                   "lower_bound": plan.lower_bound,
                                                   "calib_rows": plan.n},
                "learning": {"rounds": self._rounds, "rounds_discarded": self._rounds_discarded,
                             "rounds_failed": self._rounds_failed,
                             "rounds_nonfinite": self._rounds_nonfinite, "last_error": self._last_error,
                             "paused": self._paused,
                             "round_seconds_last": rounds[-1] if rounds else None,
                             "round_seconds_max": max(rounds) if rounds else None,
                             "rows_trained": self.learner.rows,
                             "train_flops": self.learner.flops, "train_seconds": self._train_seconds,
                             "buffer_rows": self.buffer.size,
                             "buffer_capacity": self.buffer.capacity,
                             "buffer_rows_rejected": self.buffer.rows_rejected},
                "guard": self.guard.stats(),
                "design_effect": self.design.value,
                "drift_events": self.drift.events,
                "drift_doubts": self.drift.doubts,
                "in_doubt": self.drift.in_doubt,
            })
        return out

    # ----- persistence --------------------------------------------------------------------------
    def _standalone_thresholds(self, state: ServingState) -> tuple:
        """Thresholds for serving with no shadow rows (a saved artifact, its ONNX export): held to
        the full agreement budget rather than ``plan_budget``, on the capped held-out rows.

        With no plan (no round chose these thresholds) they are the artifact's own, which the
        save that wrote them already held to the full budget, or all off: kept as they are.
        """
        if state.plan is None or not state.any_enabled or self.config.guarantee.shadow_rate <= 0:
            return state.thresholds
        cfeats, cteacher = self.loop.calib_rows()
        if cteacher.shape[0] < self.config.learning.min_calib:
            return (INF,) * self.num_exits
        plan = self.loop.choose(lambda e, f: state.classifiers[e](f.to(self.device)), cfeats,
                                cteacher, self.config.guarantee.agreement_budget,
                                self.config.seed + state.version)
        return tuple(plan.thresholds)

    def save(self, path: str):
        """Write the serving state's heads, thresholds and flags into an artifact, atomically.

        Reads one serving state (immutable), so a round publishing meanwhile cannot mix in.
        """
        state = self._state
        thresholds = self._standalone_thresholds(state)
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
            artifact.set_exit(blk, thresholds[e])
        manifest = copy.deepcopy(self.manifest)
        manifest["runtime"] = {"learned": True, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "agreement_budget": self.config.guarantee.agreement_budget,
                               "thresholds": [None if t == INF else t for t in thresholds],
                               "state_version": state.version,
                               "input_scale_median": self.guard.stats()["median"],
                               "stats": self.stats()}
        artifact.save(module, manifest, path)

    def close(self):
        """Stop learning within a second, abandoning a round in progress; serving still works."""
        self._closed = True
        if self._thread is not None:
            if not self._thread.close():
                log.warning("learner thread still busy after %.0f s; left to finish as a daemon",
                            LearnerThread.JOIN_SECONDS)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str, device="cpu", background: bool = True, config: Optional[RuntimeConfig] = None,
         **overrides) -> CachedRuntime:
    """Open an artifact for serving; ``overrides`` set RuntimeConfig fields by name. A detection
    artifact opens as ``runtime.detection.DetectionRuntime`` (the same parts, its task's rules)."""
    config = (config or RuntimeConfig()).with_overrides(background=background, **overrides)
    if task_of_artifact(path) == "detection":
        from .detection import DetectionRuntime
        return DetectionRuntime(path, device, config)
    return CachedRuntime(path, device, config)
