"""CachedRuntime: a classification artifact in production, composed of parts with one job each.

- serving (``serving.py``): one request against the immutable ``ServingState``, in TorchScript,
  its fused fast path, onnxruntime (``backends.py``) or CUDA graphs (``cuda_graphs.py``);
- the input guard (``guard.py``): requests far outside the traffic seen are not learned from;
- replica mode (``runtime.scaleout``): learning delegated to a learner elsewhere;
- everything else (collection, learning rounds, publishing, drift, costs, counters,
  persistence) is the shared ``runtime.base.Runtime``, with the classification task.
"""
import logging
import threading
import time
from typing import Optional

import torch

from compiler import artifact

from .backends import FORMS, BackendError, OnnxRuntimeBackend, resolve
from .base import InputError, Runtime, head_classifier
from .calibrate import INF
from .config import RuntimeConfig
from .costs import CostModel, profile
from .cuda_graphs import GraphedStage
from .guard import InputGuard
from .serving import (Served, ServingState, serve_backbone, serve_collected, serve_fast,
                      serve_plan, serve_staged)
from .tasks import task_of_artifact

log = logging.getLogger("layer_cache.runtime")


class CachedRuntime(Runtime):
    """A classification artifact in production: ``predict`` answers, the exits learn from what
    it serves."""

    def __init__(self, path: str, device="cpu", config: Optional[RuntimeConfig] = None):
        super().__init__(path, device, config)
        self.guard = InputGuard(self.config.guard)
        self.guard.seed(self.manifest.get("runtime", {}).get("input_scale_median"))
        self._yield_gate = threading.Lock()
        # Under max_miss_overhead, a model none of whose exits fits the cap can never switch one
        # on: requests then stop teaching (they would pay the teaching path for nothing).
        cap = self.config.serving.max_miss_overhead
        E = self.num_exits
        self.exits_possible = cap is None or any(
            self.costs.miss_overhead([j == e for j in range(E)]) <= cap for e in range(E))
        if not self.exits_possible:
            cheapest = min(self.costs.miss_overhead([j == e for j in range(E)]) for e in range(E))
            log.warning("max_miss_overhead=%g allows no exit on this model (the cheapest adds "
                        "%.1f%% to a request that misses it): serving the backbone only, "
                        "nothing learned; raise the cap to let exits on", cap, 100 * cheapest)

    def _open(self):
        return artifact.load(self.path, map_location=self.device)

    def _build_serving(self, classifiers) -> CostModel:
        """CUDA graphs and the onnxruntime backend where configured; the cost model mixes in
        the latency measured in them (``latency_weight``)."""
        scripted_stages = list(self.stages)
        if self.device.type == "cuda" and self.config.serving.cuda_graphs:
            self.stages = [GraphedStage(s) for s in self.stages]
        self.backend = self._make_backend(scripted_stages)
        w = self._latency_weight(self.backend is not None)
        miss = None   # each exit's miss overhead: what a cap tests and the time a head is priced at
        if self.backend is not None and (w or self.config.serving.max_miss_overhead is not None):
            miss = self.backend.miss_profile(list(classifiers))
        return CostModel(self.manifest, w, profile(self.stages, self.heads, classifiers,
                                                   self.input_shape, self.device,
                                                   backend=self.backend), miss)

    def _first_state(self, classifiers, thresholds, exit_shares=None) -> ServingState:
        fast = self.module if any(t != INF for t in thresholds) and self.device.type == "cpu" else None
        return ServingState(classifiers, thresholds, fast=fast, exit_shares=exit_shares,
                            compiled=self._compile(classifiers, thresholds, fast is not None))

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
        # the composed forms the plan in force served (both for the first): the others cost
        # memory and build time for nothing unless the traffic changes (Plan builds them then)
        prev = getattr(self, "_state", None)
        prev = prev.compiled if prev is not None else None
        forms = FORMS if prev is None else (set(prev.used) or prev.built)
        try:
            return self.backend.compile(classifiers, thresholds, whole, forms)
        except Exception as e:  # serving goes on with the scripted fast path
            log.warning("onnxruntime plan not built (%s); this state serves with TorchScript", e)
            return None

    # ----- serving ------------------------------------------------------------------------------
    @property
    def _shape_text(self) -> str:
        return ", ".join(map(str, self.input_shape))

    def _check(self, x):
        """The batch as float32 on the device, and the guard's verdict on it; a request the
        runtime will not serve raises ``InputError`` and changes nothing."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor batch of shape [N, {self._shape_text}], "
                             f"got {type(x).__name__}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"expected a batch of shape [N, {self._shape_text}], got "
                             f"{list(x.shape)}; reshape the input (batch dimension first)")
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
        if x.dtype != torch.float32 or x.device != self.device:
            x = x.to(self.device, torch.float32)
        return x, verdict

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
                served = self._serve(x, self._state, verdict.learn and self.exits_possible)
        else:
            served = self._serve(x, state, verdict.learn and self.exits_possible)
        return (served.out, served.exit_of) if return_exits else served.out

    def _predict_outside(self, x, return_exits):
        """A request far outside the traffic seen so far (``guard.py``): the backbone answers
        every row, and nothing learns from it or reads it as drift."""
        t0 = time.perf_counter()
        state = self._state
        off = ServingState(state.classifiers, (INF,) * self.num_exits, state.version,
                           state.generation)
        served = self._run(off, x, False, False)
        counts = [0] * self.num_exits + [x.shape[0]]
        self.counters.record(counts, self.costs.flops_of(counts, off.enabled_key),
                             (time.perf_counter() - t0) * 1e3, self._learning)
        k = self.guard.requests_outside
        if k & (k - 1) == 0:  # 1st, 2nd, 4th, 8th...: never a line per request
            log.warning("%d request(s) so far outside the traffic seen (row scale above %.3g): "
                        "answered by the backbone, not learned from", k, self.guard.limit)
        return (served.out, served.exit_of) if return_exits else served.out

    def _run(self, state: ServingState, x: torch.Tensor, shadow: bool, collect: bool) -> Served:
        """The fastest path the request allows: the onnxruntime plan or the fused scripted model
        when it neither teaches nor is shadowed (a request whose teaching is deferred included),
        else stage by stage."""
        if state.compiled is not None and not shadow and not collect:
            served = serve_plan(state, x)
        elif self.backend is not None and not state.any_enabled and not collect:
            served = serve_backbone(self.backend, x)
        elif state.fast is not None and not shadow and not collect:
            served = serve_fast(state, x)
        elif self.backend is not None:
            served = serve_collected(self.backend, state, x, shadow, collect)
        else:
            served = serve_staged(self.stages, self.heads, state, x, shadow, collect)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return served

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
                    exit_shares=None, fast: bool = False,
                    warmup_share: Optional[float] = None) -> bool:
        """Install a serving state published by a learner elsewhere (replica mode).

        ``classifiers_state``: per exit, the classifier's ``state_dict`` (reads raw features);
        ``thresholds``: per exit (None or ``inf``: off); ``fast``: the learner trained on
        ``fast_after`` rows, so the whole-model paths serve (``_whole_paths``);
        ``warmup_share``: the share of requests that teach while no exit is on, as the learner
        set it (``Collector.adopt``).
        Built outside the lock, swapped whole under it; a version not newer than the one in
        force is ignored (returns False).
        """
        if version <= self._state.version:
            return False
        specs = [e["head"] for e in self.exits]
        classifiers = tuple(
            head_classifier(spec, {n: torch.as_tensor(v).float() for n, v in sd.items()})
            .to(self.device) for spec, sd in zip(specs, classifiers_state))
        thresholds = tuple(INF if t is None else float(t) for t in thresholds)
        module, compiled = self._whole_paths(classifiers, thresholds, fast)
        with self._lock:
            if version <= self._state.version:
                return False
            self._generation = max(self._generation, generation)
            self._state = ServingState(classifiers, thresholds, version, generation, module,
                                       None if exit_shares is None else tuple(exit_shares),
                                       compiled=compiled)
            if warmup_share is not None:
                self.collector.adopt(warmup_share)
        return True

    # ----- monitoring and persistence -----------------------------------------------------------
    def _report(self, state: ServingState) -> dict:
        return {"exit_names": [e["name"] for e in self.exits] + ["backbone"],
                "backend": "torchscript" if self.backend is None else self.backend.name,
                "exits_possible": self.exits_possible,
                "stage_latency_ms": self.costs.stage_latency_ms,
                "head_latency_ms": self.costs.head_latency_ms,
                **self._state_report(state),
                "learning": self._learning_report(),
                "guard": self.guard.stats()}

    def _saved(self) -> dict:
        """The guard's median (the next load's guard starts from it) and the stats at save."""
        return {"input_scale_median": self.guard.stats()["median"], "stats": self.stats()}


def load(path: str, device="cpu", background: bool = True, config: Optional[RuntimeConfig] = None,
         **overrides) -> Runtime:
    """Open an artifact for serving; ``overrides`` set RuntimeConfig fields by name. A detection
    artifact opens as ``runtime.detection.DetectionRuntime`` (the same parts, its task's rules)."""
    if task_of_artifact(path) == "detection":
        from .detection import DetectionRuntime
        return DetectionRuntime.open(path, device, background, config, **overrides)
    return CachedRuntime.open(path, device, background, config, **overrides)
