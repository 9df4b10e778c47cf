"""DetectionRuntime: a detection artifact in production, composed of the runtime's own parts.

The same parts as ``CachedRuntime`` (feature buffer and collection, distillation, threshold
calibration with its bound, shadow checks, drift monitor, cost model, counters), with the task
interface (``runtime/tasks.py``: ``DetectionTask``) saying what differs: the backbone's output
is a list of per-frame dicts, a head learns "would the detector find anything at or above the
service's score threshold", an exit answers "nothing", and a frame that leaves gets an empty
result in the detector's format. Frames that go on get exactly the detector's output.

A separate class, not a branch in ``core.py``: the classification runtime's serving paths
(onnxruntime plans, the fused fast path, CUDA graphs) are built around one output tensor.
"""
import collections
import copy
import io
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from compiler import artifact, exit_rule
from compiler.errors import ArtifactError

from .buffer import CALIB, TRAIN, FeatureBuffer
from .calibrate import INF, choose_thresholds_corrected, choose_thresholds_ltt, exit_shares
from .collect import Collector
from .config import RuntimeConfig
from .core import InputError
from .correlation import DesignEffect
from .costs import CostModel
from .drift import ALARM, DriftMonitor
from .learner import HeadLearner, RoundCancelled
from .learning import LearnerThread, LearningLoop, Proposal
from .serving import ServingState
from .stats import Counters
from .tasks import DetectionTask, Task, head_confidences

log = logging.getLogger("layer_cache.runtime")


def load_artifact(path: str, map_location=None):
    """(module, manifest) of a detection artifact: the manifest checked by
    ``compiler.artifact.read_manifest``, the model by one frame of zeros through it."""
    manifest = artifact.read_manifest(path)
    if manifest.get("task") != "detection":
        raise ArtifactError(f"'{path}' is not a detection artifact (task "
                            f"{manifest.get('task', 'classification')!r}); open it with "
                            f"runtime.load")
    try:
        import torchvision  # noqa: F401  registers torchvision's C++ ops (nms) the file calls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location=map_location).eval()
        with torch.no_grad():
            module(torch.zeros([1] + list(manifest["input_shape"][1:]),
                               device=next(iter(module.buffers())).device))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"artifact '{path}' cannot be loaded or run ({msg}); re-create it "
                            f"with python -m compiler.rewrite") from None
    return module, manifest


def _classifier_from(spec: dict, scripted) -> nn.Sequential:
    d, hidden, k = spec["feature_dim"], spec["hidden"], spec["num_classes"]
    clf = nn.Sequential(*([nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k)] if hidden
                          else [nn.Linear(d, k)]))
    clf.load_state_dict({n: p.detach().clone().cpu() for n, p in scripted.state_dict().items()})
    return clf.eval()


@dataclass
class Served:
    """One request's answer and what it taught (as ``runtime.serving.Served``)."""

    out: list
    exit_of: torch.Tensor
    features: Optional[List[torch.Tensor]] = None
    teacher: Optional[torch.Tensor] = None
    shadow_ok: Optional[torch.Tensor] = None
    shadow_exit: Optional[torch.Tensor] = None


def serve_staged(module, stages, heads, task: Task, state: ServingState, x: torch.Tensor,
                 shadow: bool, collect: bool) -> Served:
    """Stage by stage: exits take their confident frames (``exit_rule``); the live state between
    stages is the newest tensor plus the FPN's taps so far. A ``shadow`` request runs every
    frame to the end and records where each would have left."""
    n, E = x.shape[0], len(heads)
    dev = x.device
    tensors, sizes = module.prepare(x)
    idx = torch.arange(n, device=dev)
    exit_of = torch.full((n,), E, dtype=torch.long, device=dev)
    would = torch.full((n,), E, dtype=torch.long, device=dev)
    would_logits = torch.zeros((n, 2), device=dev)
    exited, feats = [], []
    h, taps = tensors, []
    for e in range(E):
        h, taps = stages[e](h, taps)
        on = state.thresholds[e] != INF
        f = heads[e].features(h) if (collect or on) else None
        feats.append(f)
        if not on:
            continue
        logits = state.classifiers[e](f)
        hit = exit_rule.leaves(task.confidence(logits),
                               torch.tensor(state.thresholds[e], device=dev), True)
        if shadow:
            newly = hit & (would == E)
            would[newly] = e
            would_logits[newly] = logits[newly].float()
            continue
        if bool(hit.any()):
            exited.append((idx[hit], logits[hit]))
            exit_of[idx[hit]] = e
            keep = ~hit
            h, idx = h[keep], idx[keep]
            taps = [t[keep] for t in taps]
            feats = [g[keep] if g is not None else None for g in feats]
            if h.shape[0] == 0:
                break
    dets = None
    if h.shape[0] > 0:
        h, taps = stages[E](h, taps)
        rows = idx.tolist()
        whole = len(rows) == n
        dets = module.finish(tensors if whole else tensors[idx], taps,
                             sizes if whole else [sizes[r] for r in rows],
                             [(x.shape[2], x.shape[3])] * len(rows))
    served = Served(task.assemble(n, exited, idx, dets, x), exit_of)
    teacher = task.teacher(dets) if dets is not None else None
    if shadow:
        served.shadow_exit = would
        served.shadow_ok = (would == E) | task.agrees(would_logits, teacher)
    if collect and teacher is not None and len(feats) == E and all(f is not None for f in feats):
        served.features, served.teacher = feats, teacher
    return served


class DetectionLoop(LearningLoop):
    """``LearningLoop`` with the task's confidences: distil, calibrate, propose (no fused path)."""

    def __init__(self, *args, task: Task, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = task

    def choose(self, head_logits, feats, teacher, budget: float, round_seed: int,
               should_stop=None):
        """``LearningLoop.choose`` with the task's confidence and agreement: the same rule, the
        same bound, held-out frames counted as frames / design effect."""
        conf, agree = head_confidences(self.task, head_logits, feats, teacher)
        g = self.config.guarantee
        rule = choose_thresholds_ltt if g.threshold_rule == "ltt" else choose_thresholds_corrected
        deff = 1.0 if self.design is None else max(1.0, self.design.value)
        return rule(conf, agree, self.costs.stage_cost, self.costs.head_cost, budget, g.confidence,
                    round_seed, should_stop=should_stop, effective_rows=conf.shape[1] / deff)

    def run(self, round_index: int, should_stop) -> Optional[Proposal]:
        cfg = self.config.learning
        feats, teacher = self.buffer.snapshot(0, cfg.max_train_rows)
        if teacher.shape[0] < cfg.min_train:
            return None
        self.learner.train(feats, teacher, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay,
                           should_stop=should_stop)
        cfeats, cteacher = self.calib_rows()
        plan, shares = None, None
        predict = lambda e, f: self.learner.predict(e, f)   # noqa: E731
        if cteacher.shape[0] >= cfg.min_calib:
            plan = self.choose(predict, cfeats, cteacher, self.config.guarantee.plan_budget,
                               self.config.seed + round_index, should_stop)
            conf, _ = head_confidences(self.task, predict, cfeats, cteacher)
            shares = tuple(exit_shares(conf, plan.thresholds))
        classifiers = tuple(self.learner.folded(e).to(self.device) for e in range(len(self.exits)))
        thresholds = tuple(plan.thresholds) if plan else (INF,) * len(self.exits)
        return Proposal(classifiers, thresholds, plan, shares if plan and plan.saving > 0 else None,
                        None, teacher.shape[0], cteacher.shape[0])


class DetectionRuntime:
    """A detection artifact in production: ``predict`` answers per frame, the exits learn from
    what it serves (no labels), within the agreement budget."""

    def __init__(self, path: str, device="cpu", config: Optional[RuntimeConfig] = None):
        self.config = config or RuntimeConfig()
        self.config.validate()
        self.device = torch.device(device)
        self.path = str(path)
        self.module, self.manifest = load_artifact(self.path, map_location=self.device)
        self.task = DetectionTask(self.manifest["score_threshold"])
        self.exits = self.manifest["exits"]
        self.num_exits = len(self.exits)
        self.input_shape = tuple(self.manifest["input_shape"][1:])
        blocks = [getattr(self.module.blocks, str(i)) for i in range(self.num_exits)]
        self.stages = [b.stage for b in blocks] + [self.module.final]
        self.heads = [b.head for b in blocks]
        specs = [e["head"] for e in self.exits]
        classifiers = tuple(_classifier_from(s, b.head.classifier).to(self.device)
                            for s, b in zip(specs, blocks))
        thresholds = tuple(float(b.threshold) if bool(b.enabled) else INF for b in blocks)
        self.costs = CostModel(self.manifest)   # FLOPs: calibration minimises what users read
        self.learner = HeadLearner(list(classifiers), self.config.seed)
        if self.manifest.get("runtime", {}).get("learned"):
            self.learner.adopt([c.cpu() for c in classifiers])
        self.buffer = FeatureBuffer([s["feature_dim"] for s in specs], 2,
                                    self.config.collect.buffer_mb)
        # Camera frames: calibration holds out whole blocks of consecutive frames
        # (CollectConfig.holdout_block_rows), as for classification.
        self.collector = Collector(self.buffer, self.config.collect, self.config.seed)
        # How correlated the frames are (a camera's runs of alike frames), over the frames'
        # answers nothing/something: calibration and the drift tests count frames / deff.
        self.design = DesignEffect(2)
        self.loop = DetectionLoop(self.learner, self.buffer, self.costs, self.config, self.exits,
                                  self.stages, self.device, self.design, task=self.task)
        self.drift = DriftMonitor(self.config.drift, self.config.guarantee.plan_budget,
                                  self.design)
        self.counters = Counters(self.num_exits)
        self._lock = threading.Lock()
        self._learn_lock = threading.Lock()
        self._generation = 0
        self._norm_generation = 0
        self._pending = 0
        self._rounds = 0
        self._rounds_discarded = 0
        self._rounds_failed = 0
        self._last_error = None
        self._round_seconds = collections.deque(maxlen=100)
        self._train_seconds = 0.0
        self._learning = False
        self._paused = False
        self._closed = False
        self._state = ServingState(classifiers, thresholds)
        self._thread = LearnerThread(self) if self.config.background else None

    @property
    def state(self) -> ServingState:
        return self._state

    @property
    def stage_flops(self):
        return self.costs.stage_flops

    @property
    def head_flops(self):
        return self.costs.head_flops

    @property
    def total_flops(self):
        return self.costs.total_flops

    # ----- serving ------------------------------------------------------------------------------
    def _check(self, x) -> torch.Tensor:
        c, hgt, wid = self.input_shape
        want = f"[N, {c}, {hgt}, {wid}]"
        if isinstance(x, (list, tuple)):
            if not x:
                raise InputError("empty list of images: send at least one")
            if not all(isinstance(t, torch.Tensor) for t in x):
                raise InputError(f"expected a list of image tensors [{c}, {hgt}, {wid}], got "
                                 f"{sorted({type(t).__name__ for t in x})}")
            shapes = {tuple(t.shape) for t in x}
            if len(shapes) != 1:
                raise InputError(f"images in one request must have one size, got "
                                 f"{sorted(shapes)[:3]}; resize them to {c}x{hgt}x{wid}")
            if x[0].dim() != 3:
                raise InputError(f"expected images [{c}, {hgt}, {wid}], got {list(x[0].shape)}")
            x = torch.stack(list(x))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a batch of images {want} (a tensor or a list of tensors), "
                             f"got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"expected images {want}, got {list(x.shape)}; the detector was "
                             f"compiled for {c} channel(s) of {hgt}x{wid}")
        if not x.is_floating_point():
            raise InputError(f"expected floating-point images, got "
                             f"{str(x.dtype).replace('torch.', '')}; convert with x.float()")
        if x.shape[0] == 0:
            raise InputError("empty batch: send at least one image")
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise InputError(f"images {bad[:10]} contain NaN or Inf; clean or drop them and resend "
                             f"(nothing was served or learned)")
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def predict(self, x, return_exits: bool = False):
        """The detector's answer per image, in input order: a list of dicts of boxes, labels and
        scores; frames an exit is confident hold nothing get an empty one. ``x``: a tensor
        [N, C, H, W] or a list of [C, H, W] tensors of one size. With ``return_exits`` also each
        frame's exit (``num_exits``: the whole detector)."""
        x = self._check(x)
        state = self._state
        t0 = time.perf_counter()
        rate = self.config.guarantee.shadow_rate
        if self.drift.in_doubt:
            rate = max(rate, self.config.drift.doubt_shadow_rate)
        shadow, collect = self.collector.decide(state.any_enabled, rate, False)
        served = serve_staged(self.module, self.stages, self.heads, self.task, state, x, shadow,
                              collect)
        latency = (time.perf_counter() - t0) * 1e3
        self.design.observe(torch.nn.functional.one_hot(self.task.found(served.out).long(), 2))
        if served.features is not None:
            self.collector.add(served.features, served.teacher, shadow, state.any_enabled,
                               rows=x.shape[0])
        self._account(state, served, latency)
        self._maybe_learn(x.shape[0])
        return (served.out, served.exit_of) if return_exits else served.out

    def __call__(self, x):
        return self.predict(x)

    def _account(self, state: ServingState, served: Served, latency: float):
        E = self.num_exits
        counts = torch.bincount(served.exit_of.cpu(), minlength=E + 1).tolist()
        self.counters.record(counts, self.costs.flops_of(counts, state.enabled_key), latency,
                             self._learning, served.shadow_ok, served.shadow_exit)
        would = counts if served.shadow_exit is None else \
            torch.bincount(served.shadow_exit.cpu(), minlength=E + 1).tolist()
        if state.version == self._state.version:
            verdict = self.drift.observe(would, served.shadow_ok)
            if verdict.state == ALARM:
                self._on_drift(state, verdict)

    def _on_drift(self, seen: ServingState, verdict):
        """Agreement fell below the budget: every exit off now, forget old traffic, relearn."""
        with self._lock:
            if self._state.version != seen.version:
                return
            self._generation += 1
            self._state = seen.exits_off(self._generation)
            self.drift.reset(None)
        self.counters.forget_shadow()
        self.buffer.clear()
        log.warning("drift: %s; exits off, relearning from new traffic", verdict.reason)

    # ----- learning -----------------------------------------------------------------------------
    def _maybe_learn(self, n):
        with self._lock:
            self._pending += n
            due = self._pending >= self.config.learning.train_every
        if due and not self._paused:
            if self._thread is not None:
                self._thread.wake.set()
                return
            try:
                self.learn()
            except Exception:
                log.exception("learning round failed; exits keep their previous state")

    def learn(self) -> bool:
        """One round: distil the heads on recent frames, re-choose thresholds, publish."""
        if self._paused or self._closed:
            return False
        with self._learn_lock:
            with self._lock:
                self._pending = 0
                generation, round_index = self._generation, self._rounds
                restart = self._norm_generation != generation
                self._norm_generation = generation
            if restart:
                self.learner.reset_normalisation()
            self._learning = True
            t0 = time.perf_counter()
            stop = (lambda: self._thread.stop.is_set()) if self._thread is not None else None
            try:
                p = self.loop.run(round_index, stop)
            except RoundCancelled:
                return False
            except Exception as e:
                with self._lock:
                    self._rounds_failed += 1
                    self._last_error = f"{type(e).__name__}: {e}"
                raise
            finally:
                self._learning = False
                self._round_seconds.append(time.perf_counter() - t0)
            if p is None:
                return False
            self._train_seconds += time.perf_counter() - t0
            with self._lock:
                if generation != self._generation:
                    self._rounds_discarded += 1
                    return False
                self._rounds += 1
                self._state = ServingState(p.classifiers, p.thresholds, self._state.version + 1,
                                           generation, None, p.exit_shares, p.plan)
                self.drift.reset(p.exit_shares)
            if p.plan:
                log.info("round %d: exits %s, expected saving %.1f%%, agreement %.4f (bound %.4f, "
                         "%d held-out frames)", self._rounds,
                         [round(t, 4) if t != INF else "off" for t in p.thresholds],
                         100 * p.plan.saving, p.plan.agreement, p.plan.lower_bound, p.plan.n)
            return True

    def pause_learning(self):
        self._paused = True

    def resume_learning(self):
        self._paused = False

    # ----- monitoring and persistence -----------------------------------------------------------
    def stats(self) -> dict:
        """Counters since load: traffic, frames per exit, live agreement, FLOPs saved, learning."""
        out = self.counters.snapshot(self.costs.total_flops)
        with self._lock:
            state = self._state
            plan = state.plan
            rounds = list(self._round_seconds)
            out.update({
                "task": "detection",
                "score_threshold": self.task.min_score,
                "exit_names": [e["name"] for e in self.exits] + ["detector"],
                "thresholds": [None if t == INF else t for t in state.thresholds],
                "enabled": [t != INF for t in state.thresholds],
                "state_version": state.version,
                "plan": None if plan is None else {
                    "saving": plan.saving, "agreement": plan.agreement,
                    "lower_bound": plan.lower_bound, "calib_rows": plan.n},
                "learning": {"rounds": self._rounds, "rounds_discarded": self._rounds_discarded,
                             "rounds_failed": self._rounds_failed, "last_error": self._last_error,
                             "paused": self._paused,
                             "round_seconds_last": rounds[-1] if rounds else None,
                             "rows_trained": self.learner.rows,
                             "train_flops": self.learner.flops,
                             "train_seconds": self._train_seconds,
                             "buffer_rows": self.buffer.size},
                "drift_events": self.drift.events,
                "in_doubt": self.drift.in_doubt,
                "design_effect": self.design.value,
            })
        return out

    def _standalone_thresholds(self, state: ServingState) -> tuple:
        """Thresholds held to the full budget (a saved artifact has no shadow frames)."""
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
        """Write the learned heads and thresholds into a detection artifact, atomically."""
        state = self._state
        thresholds = self._standalone_thresholds(state)
        blob = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(self.module, blob)
            blob.seek(0)
            module = torch.jit.load(blob, map_location="cpu")
        for e in range(self.num_exits):
            blk = getattr(module.blocks, str(e))
            blk.head.classifier.load_state_dict({k: v.cpu() for k, v in
                                                 state.classifiers[e].state_dict().items()})
            artifact.set_exit(blk, thresholds[e])
        manifest = copy.deepcopy(self.manifest)
        manifest["runtime"] = {"learned": True,
                               "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "agreement_budget": self.config.guarantee.agreement_budget,
                               "thresholds": [None if t == INF else t for t in thresholds],
                               "state_version": state.version}
        artifact.save(module, manifest, path)

    def close(self):
        self._closed = True
        if self._thread is not None:
            self._thread.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str, device="cpu", background: bool = True, config: Optional[RuntimeConfig] = None,
         **overrides) -> DetectionRuntime:
    """Open a detection artifact for serving; ``overrides`` set RuntimeConfig fields by name
    (``holdout_block_rows``: consecutive frames held out together for calibration)."""
    config = (config or RuntimeConfig()).with_overrides(background=background, **overrides)
    return DetectionRuntime(path, device, config)
