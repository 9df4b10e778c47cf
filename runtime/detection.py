"""DetectionRuntime: a detection artifact in production, on the runtime's shared parts.

The same parts as ``CachedRuntime`` (``runtime.base.Runtime``: feature buffer and collection,
distillation, threshold calibration with its bound, shadow checks, drift monitor, cost model,
counters), with the task interface (``runtime/tasks.py``: ``DetectionTask``) saying what
differs: the backbone's output is a list of per-frame dicts, a head learns "would the detector
find anything at or above the service's score threshold", an exit answers "nothing", and a
frame that leaves gets an empty result in the detector's format (the artifact's own ``empty``:
boxes, scores and labels, and masks or keypoints for Mask / Keypoint R-CNN). Frames that go on
get exactly the detector's output.

Its own here: the artifact's loader; the serving paths (on the CPU by default onnxruntime
sessions per learned state, ``runtime/detection_ort.py``: the exits model, its teaching model
and the collect model; else stage by stage and a scripted ``CachedDetector``; the
classification runtime's plans and CUDA graphs are built around one output tensor); the input
check and the learning loop's task-aware calibration.
"""
import logging
import math
import warnings
from typing import Optional

import torch

from compiler import artifact, exit_rule
from compiler.errors import ArtifactError

from .backends import BackendError, resolve
from .base import InputError, Runtime
from .calibrate import INF
from .config import RuntimeConfig
from .costs import CostModel
from .learning import LearningLoop
from .serving import Served, ServingState
from .tasks import Task

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


def serve_staged(module, stages, heads, task: Task, state: ServingState, x: torch.Tensor,
                 shadow: bool, collect: bool) -> Served:
    """Stage by stage: exits take their confident frames (``exit_rule``); the live state between
    stages is the newest tensor plus the taps so far (the FPN's or the SSD head's inputs). A
    ``shadow`` request runs every frame to the end and records where each would have left; frames
    that leave get the artifact's own ``module.empty``."""
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
    served = Served(task.assemble(n, exited, idx, dets, x, module.empty), exit_of)
    teacher = task.teacher(dets) if dets is not None else None
    if shadow:
        served.shadow_exit = would
        served.shadow_ok = (would == E) | task.agrees(would_logits, teacher)
    if collect and teacher is not None and len(feats) == E and all(f is not None for f in feats):
        served.features, served.teacher = feats, teacher
    return served


def serve_collected(ort, task: Task, state: ServingState, x: torch.Tensor, shadow: bool,
                    collect: bool) -> Served:
    """Every frame through the whole detector in onnxruntime, with each exit's pooled features
    (``DetectionOrt.collect``): requests that teach while no exit is on, and shadowed requests
    (the live heads then say, in torch, where each frame would have left). As ``serve_staged``
    with the same flags: every frame gets the detector's answer."""
    n, E = x.shape[0], ort.num_exits
    out, feats = ort.collect(x)
    served = Served(out, torch.full((n,), E, dtype=torch.long))
    teacher = task.teacher(out)
    if shadow:
        would = torch.full((n,), E, dtype=torch.long)
        would_logits = torch.zeros((n, 2))
        for e in range(E):
            if state.thresholds[e] == INF:
                continue
            logits = state.classifiers[e](feats[e])
            newly = exit_rule.leaves(task.confidence(logits),
                                     torch.tensor(state.thresholds[e]), True) & (would == E)
            would[newly] = e
            would_logits[newly] = logits[newly].float()
        served.shadow_exit = would
        served.shadow_ok = (would == E) | task.agrees(would_logits, teacher)
    if collect:
        served.features, served.teacher = feats, teacher
    return served


def serve_teaching(compiled, task: Task, x: torch.Tensor) -> Served:
    """A request that teaches while exits are on, in onnxruntime (``OrtDetector.teach``): frames
    leave where the serving state says, as when served; those that ran the whole detector teach,
    with their pooled features at every exit. As ``serve_staged`` unshadowed with ``collect``."""
    out, exit_of, feats = compiled.teach(x)
    served = Served(out, exit_of)
    rest = exit_of == len(feats)
    if bool(rest.any()):
        served.features = [f[rest] for f in feats]
        served.teacher = task.teacher([d for d, r in zip(out, rest.tolist()) if r])
    return served


class DetectionLoop(LearningLoop):
    """``LearningLoop`` for detectors: the same rounds (the task gives confidence and
    agreement); its whole-model path is a scripted ``CachedDetector`` made of the artifact's
    own pieces (transform, stages, FPN, tail) and the learned heads."""

    def __init__(self, module, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.module = module

    def fast_module(self, classifiers, thresholds):
        """The serving state as one scripted detector (CPU), or None."""
        if self.device.type != "cpu" or all(t == INF for t in thresholds):
            return None
        return self.whole_module(classifiers, thresholds)

    def whole_module(self, classifiers, thresholds):
        """A scripted ``CachedDetector`` with these heads and thresholds (all ``inf``: the
        detector itself, as one call)."""
        from compiler.detection import OUTPUT_KEYS, CachedDetector
        m = self.module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = self.exit_blocks(classifiers, thresholds)
            # artifacts compiled before Mask / Keypoint R-CNN support carry no format fields
            keys = list(getattr(m, "output_keys", OUTPUT_KEYS))
            return torch.jit.script(CachedDetector(
                m.transform, blocks, self.scripted_stages[-1], m.fpn, m.tail, list(m.tap_names),
                float(m.score_threshold), keys, int(getattr(m, "num_keypoints", 0))).eval())


class DetectionRuntime(Runtime):
    """A detection artifact in production: ``predict`` answers per frame, the exits learn from
    what it serves (no labels), within the agreement budget."""

    # A detector's frames come from cameras: hold-out blocks that outlast a background (60-240
    # frames on the demo's streams), else its held-out frames look easier than new scenes and
    # the budget fails (2 of 12 scene streams with 64 / 16; docs/detection.md).
    DEFAULTS = {"holdout_block_rows": 256, "holdout_gap_rows": 64}

    def _open(self):
        return load_artifact(self.path, map_location=self.device)

    def _make_loop(self, scripted_stages) -> DetectionLoop:
        return DetectionLoop(self.module, self.learner, self.buffer, self.costs, self.config,
                             self.exits, scripted_stages, self.device, self.design, self.task)

    def _build_serving(self, classifiers) -> CostModel:
        """The onnxruntime pieces when the backend setting resolves to onnxruntime (the
        artifact's stored ONNX parts, ``runtime/detection_ort.py``). Under ``auto`` an artifact
        without them serves with TorchScript, with a warning; asked for by name, that is an
        error. The cost model mixes in the latency measured there (``latency_weight``), and
        ``max_miss_overhead`` caps what a frame that passes every enabled exit pays."""
        self._ort = None
        asked = self.config.serving.backend
        if resolve(asked, self.device) == "onnxruntime":
            from .detection_ort import DetectionOrt
            try:
                self._ort = DetectionOrt(self.module, self.manifest, self.path)
            except Exception as e:  # export and session errors come in many types
                if asked == "onnxruntime":
                    raise BackendError(f"cannot serve with onnxruntime: {e}; or use "
                                       f"backend='torchscript'") from None
                log.warning("serving with TorchScript: the onnxruntime backend cannot be built "
                            "(%s)", e)
        w = self._latency_weight(self._ort is not None)
        if self._ort is None or (not w and self.config.serving.max_miss_overhead is None):
            return super()._build_serving(classifiers)
        # In onnxruntime a head costs far more than its FLOPs (pooling, the If that hands the
        # branch its inputs): 5-10% of the detector each, against 0.1% of its FLOPs.
        return CostModel(self.manifest, w, self._ort.profile(list(classifiers)))

    def _first_state(self, classifiers, thresholds, exit_shares=None) -> ServingState:
        """A learned artifact serves whole (it is its own fast path) until the first round.
        Also builds the whole detector as one call (onnxruntime, or scripted on the CPU), for
        requests served with every exit off that neither teach inline nor are shadowed."""
        cpu = self.device.type == "cpu"
        if self._ort is not None:
            self._detector = self._ort.detector
        else:
            self._detector = self.loop.whole_module(classifiers, (INF,) * self.num_exits) \
                if cpu else None
        fast = self.module if any(t != INF for t in thresholds) and cpu else None
        return ServingState(classifiers, thresholds, fast=fast, exit_shares=exit_shares,
                            compiled=self._compile(classifiers, thresholds, fast is not None))

    def _compile(self, classifiers, thresholds, whole: bool):
        """A state as one onnxruntime session (``detection_ort.OrtDetector``); None: no exit
        on, or TorchScript serves."""
        if self._ort is None or all(t == INF for t in thresholds):
            return None
        try:
            return self._ort.compile(classifiers, thresholds, whole)
        except Exception as e:  # serving goes on with the scripted path
            log.warning("onnxruntime session not built (%s); this state serves with TorchScript",
                        e)
            return None

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
        lo, hi = torch.aminmax(x)   # one pass; NaN propagates, and the common case ends here
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
            bad = torch.nonzero(~finite).flatten().tolist()
            raise InputError(f"images {bad[:10]} contain NaN or Inf; clean or drop them and resend "
                             f"(nothing was served or learned)")
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def predict(self, x, return_exits: bool = False):
        """The detector's answer per image, in input order: a list of dicts in the detector's
        format (boxes, labels, scores; masks or keypoints for Mask / Keypoint R-CNN); frames an
        exit is confident hold nothing get an empty one (the artifact's ``empty``). ``x``: a tensor
        [N, C, H, W] or a list of [C, H, W] tensors of one size. With ``return_exits`` also each
        frame's exit (``num_exits``: the whole detector)."""
        served = self._serve(self._check(x), self._state)
        return (served.out, served.exit_of) if return_exits else served.out

    def _run(self, state: ServingState, x: torch.Tensor, shadow: bool, collect: bool) -> Served:
        """The whole-model path (onnxruntime, or scripted) when the request neither teaches
        inline nor is shadowed; in onnxruntime, the collect model when it is shadowed or teaches
        with every exit off (all frames before the first exit; the deferred teacher's) and the
        state's teaching model when it teaches with exits on; else stage by stage."""
        if not shadow and not collect:
            whole = (state.compiled or state.fast) if state.any_enabled else self._detector
            if whole is not None:
                out, exit_of = whole.forward_with_exits(x)
                return Served(out, exit_of)
        if self._ort is not None and (shadow or not state.any_enabled):
            return serve_collected(self._ort, self.task, state, x, shadow, collect)
        if collect and state.compiled is not None:
            return serve_teaching(state.compiled, self.task, x)
        return serve_staged(self.module, self.stages, self.heads, self.task, state, x, shadow,
                            collect)

    def _teaches_inline(self, state: ServingState) -> bool:
        """A state's teaching model costs a served request little more than serving it, less
        than serving it and then running its frames again in the deferred teacher."""
        return state.compiled is not None

    def _collect(self, served: Served, shadow: bool, any_enabled: bool, rows: int):
        """Frames that left at exits advance the hold-out blocks' clock too."""
        self.collector.add(served.features, served.teacher, shadow, any_enabled, rows=rows)

    # ----- monitoring ---------------------------------------------------------------------------
    def _report(self, state: ServingState) -> dict:
        return {"task": "detection",
                "backend": "torchscript" if self._ort is None else "onnxruntime",
                "score_threshold": self.task.min_score,
                "exit_names": [e["name"] for e in self.exits] + ["detector"],
                **self._state_report(state),
                "learning": self._learning_report()}


def load(path: str, device="cpu", background: bool = True, config: Optional[RuntimeConfig] = None,
         **overrides) -> DetectionRuntime:
    """Open a detection artifact for serving; ``overrides`` set RuntimeConfig fields by name
    (``holdout_block_rows``: consecutive frames held out together for calibration)."""
    return DetectionRuntime.open(path, device, background, config, **overrides)
