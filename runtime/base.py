"""Runtime: what every task's runtime shares (learning rounds, publishing, drift, stats, saving)."""
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

from .buffer import CALIB, FeatureBuffer
from .calibrate import INF, independent_rows_needed
from .collect import Collector
from .config import RuntimeConfig
from .correlation import DesignEffect
from .costs import CostModel, default_latency_weight
from .drift import ALARM, DriftMonitor
from .learner import HeadLearner, NonFiniteRound, RoundCancelled
from .learning import LearnerThread, LearningLoop
from .pacing import InFlight, quicken_gil_switch
from .serving import Served, ServingState
from .stats import Counters
from .tasks import task_for
from .teaching import DeferredTeacher

log = logging.getLogger("layer_cache.runtime")


def _saved_shares(manifest: dict):
    """The share of rows leaving at each exit (last: the backbone) that a save measured on its
    held-out rows under the artifact's thresholds (``Runtime.save``; checked with the manifest,
    ``compiler/manifest.py``), or None (an artifact saved without them)."""
    shares = manifest.get("runtime", {}).get("exit_shares")
    return None if shares is None else tuple(float(v) for v in shares)


def _saved_design_effect(manifest: dict):
    """The design effect of the traffic an artifact's save had seen (its stats), or None."""
    v = manifest.get("runtime", {}).get("stats", {}).get("design_effect")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 \
        else None


class InputError(ValueError):
    """A request the runtime will not serve; the message says what is wrong with it."""


def head_classifier(spec: dict, weights: dict) -> nn.Sequential:
    """An exit's classifier as its head ``spec`` builds it, with ``weights`` (a state dict)
    loaded, in eval mode."""
    k, d, hidden = spec["num_classes"], spec["feature_dim"], spec["hidden"]
    clf = nn.Sequential(*([nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k)] if hidden
                          else [nn.Linear(d, k)]))
    clf.load_state_dict(weights)
    return clf.eval()


def classifier_from(spec: dict, scripted) -> nn.Sequential:
    """A scripted head's classifier as a plain module on the CPU."""
    return head_classifier(spec, {n: p.detach().clone().cpu()
                                  for n, p in scripted.state_dict().items()})


class Runtime:
    """An artifact in production, whatever its task (``self.task``, ``runtime/tasks.py``):
    ``predict`` answers, the exits learn from what it serves.

    A subclass opens its artifact (``_open``), checks a request and serves it (``predict``,
    ``_run``) and says what else it reports (``_report``); the rest is here. One lock orders
    publishing against drift: a state is swapped whole under it, and a round's proposal is
    dropped if drift struck after the round began (``generation``).
    """

    DEFAULTS: dict = {}
    """Settings (by name) a task's runtime starts from where no ``config`` is given; the
    caller's overrides still win."""

    @classmethod
    def default_config(cls) -> RuntimeConfig:
        """``RuntimeConfig()`` with this runtime's ``DEFAULTS``."""
        return RuntimeConfig().with_overrides(**cls.DEFAULTS)

    def __init__(self, path: str, device="cpu", config: Optional[RuntimeConfig] = None):
        self.config = config or self.default_config()
        self.config.validate()
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ArtifactError("device 'cuda' asked for but CUDA is not available; use device='cpu'")
        self.path = str(path)
        self.module, self.manifest = self._open()
        self.task = task_for(self.manifest)
        self.exits = self.manifest["exits"]
        self.num_exits = len(self.exits)
        self.input_shape = tuple(self.manifest["input_shape"][1:])
        blocks = [getattr(self.module.blocks, str(i)) for i in range(self.num_exits)]
        self.stages = [b.stage for b in blocks] + [self.module.final]
        self.heads = [b.head for b in blocks]
        scripted_stages = list(self.stages)
        specs = [e["head"] for e in self.exits]
        classifiers = tuple(classifier_from(s, b.head.classifier).to(self.device)
                            for s, b in zip(specs, blocks))
        thresholds = tuple(float(b.threshold) if bool(b.enabled) else INF for b in blocks)
        self.costs = self._build_serving(classifiers)
        # An artifact's thresholds may have been chosen by FLOPs (synchronous mode); where time
        # is priced in, serve the prefix of its exits that pays here (its bound still holds).
        # Its next round is far off: once exits are on only shadow rows calibrate.
        saved = thresholds
        thresholds, shares = self.costs.cheapest_prefix(thresholds, _saved_shares(self.manifest))
        if thresholds != saved:
            log.info("loaded exits %s switched off: here they cost rows that pass them more "
                     "time than they save (measured at load)",
                     [e for e, (a, b) in enumerate(zip(saved, thresholds)) if a != b])
        self.learner = HeadLearner(list(classifiers), self.config.seed)
        if self.manifest.get("runtime", {}).get("learned"):
            self.learner.adopt([c.cpu() for c in classifiers])
        classes = int(self.manifest["num_classes"])   # the heads' classes, in either task
        self.buffer = FeatureBuffer([s["feature_dim"] for s in specs], classes,
                                    self.config.collect.buffer_mb, self.config.collect.calib_share)
        self.collector = Collector(self.buffer, self.config.collect, self.config.seed)
        # calibration and drift count rows as n / deff
        self.design = DesignEffect(classes, self.config.guarantee.correlation_block_rows)
        self.loop = self._make_loop(scripted_stages)
        self.drift = DriftMonitor(self.config.drift, self.config.guarantee.plan_budget,
                                  self.design)
        self.counters = Counters(self.num_exits)
        # plain requests' bookkeeping, done in bulk (ServingConfig.settle_every)
        every = self.config.serving.settle_every
        self._settle_every = every if every is not None else (16 if self.config.background else 1)
        self._held = collections.deque()

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
        self._promise = None   # the last round's saving at the held-out point estimate
        self._learning = False
        self._paused = False
        self._closed = False
        self._delegate = None                  # replica mode: see CachedRuntime.delegate_learning
        self._state = self._first_state(classifiers, thresholds,
                                        shares if any(t != INF for t in thresholds) else None)
        # A loaded artifact's exits are watched from its first request, as a round's would be:
        # its next round may be tens of thousands of rows away (once exits are on only shadow
        # rows calibrate), and until then a shift would go unseen.
        self.drift.reset(self._state.exit_shares, watching=self._state.any_enabled,
                         deff=_saved_design_effect(self.manifest))
        self.in_flight = InFlight()            # deferred teaching yields to requests (pacing.py)
        self._thread = LearnerThread(self) if self.config.background else None
        if self.config.background:
            quicken_gil_switch(self.config.serving.gil_switch_ms)
        c = self.config.collect
        # CPU only: on CUDA the staged path's CUDA graphs are captured per batch size and not
        # meant to be replayed from two threads at once (and the GPU is not the GIL's problem).
        self._teacher = DeferredTeacher(self._featurize, c.deferred_mb,
                                        self.in_flight.yield_to_requests) \
            if self.config.background and c.deferred and self.device.type == "cpu" else None

    @classmethod
    def open(cls, path: str, device="cpu", background: bool = True,
             config: Optional[RuntimeConfig] = None, **overrides) -> "Runtime":
        """This runtime on ``path``; ``overrides`` set RuntimeConfig fields by name."""
        config = (config or cls.default_config()).with_overrides(background=background,
                                                                 **overrides)
        return cls(path, device, config)

    # ----- what a task's runtime says -----------------------------------------------------------
    def _open(self):
        """(module, manifest) of the artifact at ``self.path``, checked."""
        raise NotImplementedError

    def _build_serving(self, classifiers) -> CostModel:
        """The cost model (FLOPs only here), after building what the serving path needs."""
        return CostModel(self.manifest)

    def _latency_weight(self, onnxruntime: bool) -> float:
        """``ServingConfig.latency_weight`` in force (``costs.default_latency_weight`` when
        unset); ``onnxruntime``: requests run in the onnxruntime backend."""
        w = self.config.serving.latency_weight
        return default_latency_weight(self.config.background, onnxruntime) if w is None else w

    def _make_loop(self, scripted_stages) -> LearningLoop:
        """The learning rounds' loop."""
        return LearningLoop(self.learner, self.buffer, self.costs, self.config, self.exits,
                            scripted_stages, self.device, self.design, self.task)

    def _first_state(self, classifiers, thresholds, exit_shares=None) -> ServingState:
        """The serving state of the artifact as loaded (``exit_shares``: as its save measured
        them, or None)."""
        return ServingState(classifiers, thresholds, exit_shares=exit_shares)

    def _compile(self, classifiers, thresholds, whole: bool):
        """A state's plan in a faster backend; None: this runtime has none."""
        return None

    def _run(self, state: ServingState, x: torch.Tensor, shadow: bool, collect: bool) -> Served:
        """Serve one checked request under ``state``."""
        raise NotImplementedError

    def _teaches_inline(self, state: ServingState) -> bool:
        """True: a request that teaches under ``state`` costs little more than serving it, so it
        teaches inline rather than through the deferred teacher."""
        return False

    def _collect(self, served: Served, shadow: bool, any_enabled: bool, rows: int):
        """Buffer what a request taught (``Collector.add``). ``rows``, the request's size, is not
        read here: only the rows that ran the whole model advance the hold-out blocks' clock."""
        self.collector.add(served.features, served.teacher, shadow, any_enabled)

    def _report(self, state: ServingState) -> dict:
        """What ``stats()`` adds to the counters, read under the lock."""
        raise NotImplementedError

    def _saved(self) -> dict:
        """What ``save`` adds to the manifest's ``runtime`` record."""
        return {}

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
    def predict(self, x, return_exits: bool = False):
        """The answer per row, in input order; with ``return_exits`` also each row's exit
        (``num_exits``: the whole model). Checks ``x``, then ``_serve``."""
        raise NotImplementedError

    def _serve(self, x: torch.Tensor, state: ServingState, learn: bool = True) -> Served:
        """One checked request under ``state``: shadow or collect it, serve it (``_run``), then
        count it, feed drift and maybe start a round; ``learn``: it may teach the heads."""
        with self.in_flight:
            return self._serve_counted(x, state, learn)

    def _serve_counted(self, x: torch.Tensor, state: ServingState, learn: bool) -> Served:
        t0 = time.perf_counter()
        doubt = (self.drift if self._delegate is None else self._delegate).in_doubt
        shadow, collect, calibrates = self.collector.decide(
            state.any_enabled, self.config.guarantee.shadow_rate, state.servable_whole,
            self.config.drift.doubt_shadow_rate if doubt else 0.0)
        teach = collect and learn
        defer = teach and not shadow and self._teacher is not None and \
            not self._teacher.behind and not self._teaches_inline(state)
        served = self._run(state, x, shadow, teach and not defer)
        deferred = defer and self._defer(x, served, state)
        latency = (time.perf_counter() - t0) * 1e3
        if not shadow and served.features is None and self._settle_every > 1:
            # plain (nothing to buffer or judge here): booked in bulk
            self._held.append((state, served, latency, deferred))
            if len(self._held) >= self._settle_every:
                self._settle()
            return served
        self._settle()   # the requests held back first, in order
        self._book(state, served, latency, calibrates, deferred)
        return served

    def _book(self, state: ServingState, served: Served, latency: float,
              calibrates: bool = False, deferred: bool = False):
        """A served request's bookkeeping: the correlation estimate, what it taught, the
        counters and drift (``_account``), the round trigger."""
        self.design.observe(self.task.answers(served.out))
        rows = served.exit_of.shape[0]
        if served.features is not None:   # shadowed in doubt alone: judged, not calibrating
            self._collect(served, calibrates, state.any_enabled, rows)
        self._account(state, served, latency)
        if not deferred:   # else counted by the deferred teacher, once buffered
            self._maybe_learn(rows)

    def _settle(self):
        """Book the plain requests held back (``ServingConfig.settle_every``), oldest first.
        Any thread may settle; each request is booked once (``deque.popleft`` is atomic)."""
        held = self._held
        while held:
            try:
                item = held.popleft()
            except IndexError:   # another thread took the last one
                return
            state, served, latency, deferred = item
            self._book(state, served, latency, deferred=deferred)

    def __call__(self, x):
        return self.predict(x)

    def _defer(self, x: torch.Tensor, served: Served, state: ServingState) -> bool:
        """Hand a served request's rows that reached the end to the deferred teacher; False
        when there were none or its queue is full."""
        if state.any_enabled:
            e = served.exit_of
            # numpy on CPU: every taught request asks, and most of them have no row to teach
            rest = (e.numpy() if e.device.type == "cpu" else e.cpu().numpy()) == self.num_exits
            if not rest.any():
                return False
            if not rest.all():
                x = x[torch.from_numpy(rest).to(x.device)]
        return self._teacher.submit(x, state.any_enabled, served.exit_of.shape[0],
                                    state.generation)

    @torch.no_grad()   # grad mode is per thread: the teacher's thread starts with it on
    def _featurize(self, x: torch.Tensor, any_enabled: bool, rows: int, generation: int):
        """The deferred teacher's work (its thread): the rows through the whole backbone with
        every exit's pooled features, buffered as the request would have buffered them; rows
        served before a drift alarm are dropped."""
        state = self._state
        if generation != self._generation:
            return
        off = ServingState(state.classifiers, (INF,) * self.num_exits)
        served = self._run(off, x, False, True)
        if served.features is not None and generation == self._generation:
            self._collect(served, False, any_enabled, rows)
        self._maybe_learn(rows)   # counted once buffered: a round then finds them

    def _account(self, state: ServingState, served: Served, latency: float):
        E = self.num_exits
        if served.exit_of.shape[0] == 1:  # one row: no bincount
            counts = [0] * (E + 1)
            e = served.exit_of
            counts[int(e.numpy()[0] if e.device.type == "cpu" else e[0])] = 1
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
            # under the lock: a round that reads the new generation must find the old rows gone
            # (else it trains on them and publishes exits on, as a generation it may publish in)
            self.buffer.clear()
            self.design.reset()   # old and new traffic in one window would read as correlation
            self.collector.reset()   # new traffic: learn at the full warmup share
        self.counters.forget_shadow()
        log.warning("drift: %s; exits off, relearning from new traffic", verdict.reason)

    # ----- learning -----------------------------------------------------------------------------
    def _maybe_learn(self, n):
        if self._delegate is not None:
            return
        with self._lock:
            self._pending += n
            due = self._pending >= self.config.learning.train_every * self.collector.spacing
        if due and not self._paused:
            if self._thread is not None:
                self._thread.wake.set()
                return
            try:
                self.learn()
            except Exception:  # counted in stats(); the request was answered, serving goes on
                log.exception("learning round failed; exits keep their previous state")

    def _should_stop(self) -> bool:
        # Rounds do not wait for requests in flight (pacing.py): with many serving threads a
        # request is always in flight, rounds then took 5-10x longer, and drift on the state in
        # force went unanswered (tests/test_runtime_threads.py). The learner yields the GIL per
        # step instead (learner.py).
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
                proposal = self.loop.run(round_index, self._should_stop, after_drift=generation > 0)
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

    def _whole_paths(self, classifiers, thresholds, whole: bool):
        """(scripted whole model, onnxruntime plan) of a state; ``whole``: its heads learned
        on ``fast_after`` rows. The scripted model is built only where no plan serves the
        state whole: building it holds the GIL (about 60 ms on the demo model, beside 90 ms for
        the plan), and while a plan serves it would never run."""
        compiled = self._compile(classifiers, thresholds, whole)
        fast = None
        if whole and (compiled is None or not compiled.whole):
            fast = self.loop.fast_module(classifiers, thresholds)
        return fast, compiled

    def _publish(self, p, generation: int) -> bool:
        fast, compiled = self._whole_paths(p.classifiers, p.thresholds, p.whole)
        with self._lock:
            if generation != self._generation:
                self._rounds_discarded += 1
                log.info("learning round dropped: drift struck while it ran")
                return False
            self._rounds += 1
            self._state = ServingState(p.classifiers, p.thresholds, self._state.version + 1,
                                       generation, fast, p.exit_shares, p.plan, compiled)
            self.drift.reset(p.exit_shares, carry=True)
            was = self.collector.warmup_share
            if p.promise is not None:
                self._promise = p.promise
                self.collector.after_round(p.idle)
        if self.collector.warmup_share != was:
            log.info("round %d: %.0f%% of requests teach now (the exits would save %.1f%% if "
                     "the held-out agreement were exact)", self._rounds,
                     100 * self.collector.warmup_share, 100 * p.promise)
        if p.plan:
            log.info("round %d: exits %s, expected saving %.1f%%, agreement %.4f (bound %.4f, %d "
                     "held-out rows)", self._rounds,
                     [round(t, 4) if t != INF else "off" for t in p.thresholds],
                     100 * p.plan.saving, p.plan.agreement, p.plan.lower_bound, p.plan.n)
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
        self._settle()
        out = self.counters.snapshot(self.costs.total_flops)
        with self._lock:
            out.update(self._report(self._state))
            out.update(self._monitor_report())
        return out

    def _monitor_report(self) -> dict:
        """The drift monitor's and the design effect's part of ``stats()``."""
        return {"drift_events": self.drift.events, "drift_doubts": self.drift.doubts,
                "in_doubt": self.drift.in_doubt, "design_effect": self.design.value}

    def _state_report(self, state: ServingState) -> dict:
        """The serving state's part of ``stats()``."""
        plan = state.plan
        return {"thresholds": [None if t == INF else t for t in state.thresholds],
                "enabled": [t != INF for t in state.thresholds],
                "state_version": state.version,
                "plan": None if plan is None else {"saving": plan.saving,
                                                   "agreement": plan.agreement,
                                                   "lower_bound": plan.lower_bound,
                                                   "calib_rows": plan.n}}

    def _learning_report(self) -> dict:
        """``stats()["learning"]``: rounds, their failures and time, rows trained and buffered."""
        rounds = list(self._round_seconds)
        return {"rounds": self._rounds, "rounds_discarded": self._rounds_discarded,
                "rounds_failed": self._rounds_failed,
                "rounds_nonfinite": self._rounds_nonfinite, "last_error": self._last_error,
                "paused": self._paused,
                "round_seconds_last": rounds[-1] if rounds else None,
                "round_seconds_max": max(rounds) if rounds else None,
                "rows_trained": self.learner.rows,
                "train_flops": self.learner.flops, "train_seconds": self._train_seconds,
                "warmup_share": self.collector.warmup_share,
                "promise": self._promise,
                "buffer_rows": self.buffer.size,
                "buffer_capacity": self.buffer.capacity,
                "buffer_rows_rejected": self.buffer.rows_rejected,
                **DeferredTeacher.stats_of(self._teacher),
                **self._evidence_report()}

    def _evidence_report(self) -> dict:
        """How much independent evidence calibration has: held-out rows, what they are worth at
        the traffic's design effect, and the fewest worth with which any exit could switch on
        (``calibrate.independent_rows_needed``). Below it, no exit is on for lack of evidence,
        not for lack of easy rows."""
        g = self.config.guarantee
        held = self.buffer.count(CALIB)
        return {"held_out_rows": held,
                "held_out_independent_rows": held / max(1.0, self.design.value),
                "independent_rows_needed": independent_rows_needed(g.plan_budget, g.confidence,
                                                                   g.threshold_rule)}

    # ----- persistence --------------------------------------------------------------------------
    def _standalone_thresholds(self, state: ServingState) -> tuple:
        """(thresholds, the share of held-out rows leaving at each exit under them or None)
        for serving with no shadow rows (a saved artifact, its ONNX export): held to
        the full agreement budget rather than ``plan_budget``, on the capped held-out rows.

        With no plan (no round chose these thresholds) they are the artifact's own, which the
        save that wrote them already held to the full budget, or all off: kept as they are.
        Exits that would save no more than ``LearningConfig.min_saving`` are saved off.
        """
        if state.plan is None or not state.any_enabled or self.config.guarantee.shadow_rate <= 0:
            # a round's shares for these thresholds on its held-out rows, or the loaded ones
            return state.thresholds, (state.exit_shares if state.any_enabled else None)
        cfeats, cteacher = self.loop.calib_rows()
        if cteacher.shape[0] < self.config.learning.min_calib:
            return (INF,) * self.num_exits, None
        plan, shares = self.loop.choose(lambda e, f: state.classifiers[e](f.to(self.device)),
                                        cfeats, cteacher, self.config.guarantee.agreement_budget,
                                        self.config.seed + state.version)
        return tuple(plan.thresholds), shares

    def save(self, path: str):
        """Write the serving state's heads, thresholds and flags into an artifact, atomically.

        Reads one serving state (immutable), so a round publishing meanwhile cannot mix in.
        """
        state = self._state
        thresholds, shares = self._standalone_thresholds(state)
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
                               "exit_shares": None if shares is None else [float(v) for v in shares],
                               "state_version": state.version, **self._saved()}
        artifact.save(module, manifest, path)

    def close(self):
        """Stop learning within a second, abandoning a round in progress; serving still works."""
        self._closed = True
        self._settle()
        if self._teacher is not None:
            self._teacher.close()
        if self._thread is not None:
            if not self._thread.close():
                log.warning("learner thread still busy after %.0f s; left to finish as a daemon",
                            LearnerThread.JOIN_SECONDS)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
