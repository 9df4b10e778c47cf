"""Detection serving in onnxruntime: the artifact's stored ONNX parts (``compiler/detection_onnx``)
composed with the live heads into one session per serving state, run one frame at a time.

The composed model is the one ``python -m compiler.export`` writes for a detection artifact:
after each enabled exit an ``If`` whose taken branch is the detector's empty answer, so a frame
that leaves never runs the rest. Heads are built from the learned weights directly (the pooling
exported once at load, the classifier as Gemm / Relu nodes), so a new serving state costs a
graph composition and a session, no torch export. Frames run one by one, as torchvision's own
ONNX path exports detectors (its transform and post-processing trace for one image).

Each state has a second session, its *teaching* model: the same exits, every exit pooling, and
each exit's pooled features as extra outputs; requests that teach while exits are on run it.
The exits-off state's teaching model, built once, is the *collect* model (every piece in a row
with each exit's pooled features): frames that teach while no exit is on (every frame before
the first exit, and the deferred teacher's) and shadowed frames run it.
"""
import time
from typing import Dict, List

import numpy as np
import torch

from compiler.heads import StridedPool

from .backends import OPSET, BackendError, _session, head_model


class OrtDetector:
    """One serving state as two composed sessions: ``forward_with_exits`` as the scripted
    ``CachedDetector``'s, and ``teach``, the same exits with each exit's pooled features as
    outputs (requests that teach)."""

    def __init__(self, session, teaching, keys: List[str], whole: bool):
        self.session = session
        self.teaching = teaching
        self.keys = keys          # the detector's, in its order
        self.whole = whole        # as ``backends.Plan.whole``: learned on ``fast_after`` rows

    def forward_with_exits(self, x: torch.Tensor):
        out, exits, _ = self._run(self.session, x)
        return out, exits

    def teach(self, x: torch.Tensor):
        """(answers, exits, each exit's pooled features [n, D]) with the serving state's exits:
        a frame that left at exit k has zeros for the exits after k."""
        return self._run(self.teaching, x)

    def _run(self, session, x: torch.Tensor):
        k = len(self.keys)
        out, exits, feats = [], [], []
        for i in range(x.shape[0]):
            got = session.run(None, {"image": x[i:i + 1].numpy()})
            out.append({key: torch.from_numpy(v) for key, v in zip(self.keys, got)})
            exits.append(int(got[k][0]))
            feats.append(got[k + 1:])
        feats = [torch.from_numpy(np.concatenate(f)) for f in zip(*feats)] if feats else []
        return out, torch.tensor(exits, dtype=torch.long), feats


class DetectionOrt:
    """The artifact's parts and each exit's pooling as ONNX, ready to compose (built at load)."""

    def __init__(self, module, manifest: dict, path: str, threads: int = 1):
        from compiler import detection_onnx
        from compiler.errors import ExportError
        from compiler.export import _import_onnx, export_module
        t0 = time.perf_counter()
        onnx = _import_onnx()
        try:
            blobs = detection_onnx.parts_of(module, manifest, path)
        except ExportError as e:
            raise BackendError(str(e)) from None
        if int(manifest["onnx"]["opset"]) != OPSET:
            raise BackendError(f"'{path}' holds ONNX parts of opset {manifest['onnx']['opset']}, "
                               f"the runtime composes opset {OPSET}; re-run python -m "
                               f"compiler.rewrite on the detector")
        self.parts = [onnx.load_from_string(b) for b in blobs]
        self.threads = threads
        self.num_exits = len(manifest["exits"])
        self.input_shape = [1] + list(manifest["input_shape"][1:])
        x = torch.zeros(self.input_shape, device=next(iter(module.buffers())).device)
        self.pools, self.widths = [], []
        with torch.no_grad():
            h, taps = module.prepare(x)[0], []
            for e in range(self.num_exits):
                h, taps = getattr(module.blocks, str(e)).stage(h, taps)
                pool = StridedPool(manifest["exits"][e]["head"]["pool"], h.shape).eval()
                self.pools.append(export_module(pool, h.cpu(), f"the pooling of exit {e}",
                                                OPSET, "torchscript")[0])
                self.widths.append(int(pool(h.cpu()).shape[1]))
            self.empty = {k: v.cpu() for k, v in module.empty(x).items()}
        self.detector = self.compile(None, (float("inf"),) * self.num_exits)
        self.build_seconds = time.perf_counter() - t0

    def collect(self, x: torch.Tensor):
        """(the detector's answer per frame, each exit's pooled features [n, D]) for frames
        [n, C, H, W] run one by one through the whole detector: the exits-off state's teaching
        model (every piece in a row, each exit's pooling as an extra output)."""
        out, _, feats = self.detector.teach(x)
        return out, feats

    def profile(self, classifiers, reps: int = 15):
        """(stage_ms [E + 1], head_ms [E]) at batch 1 in onnxruntime, for the cost model: each
        piece as its own session on a frame of zeros; a head as what a frame that passes its
        exit pays in the composed model (pooling, classifier, decision and the If), measured as
        that exit alone on at a threshold no frame reaches, less the detector session in the same
        pass. Turns interleaved; medians over ``reps`` passes after a warm-up pass."""
        from compiler import exit_rule
        E = self.num_exits
        x = np.zeros(self.input_shape, dtype=np.float32)
        pieces = [_session(p, self.threads) for p in self.parts]
        never = float(exit_rule.DISABLED_THRESHOLD)
        alone = [_session(self._serving_model(
            classifiers, [never if j == e else float("inf") for j in range(E)]), self.threads)
            for e in range(E)]
        feeds, live = [], {"image": x}
        for sess, part in zip(pieces, self.parts):
            feed = {i.name: live[i.name] for i in sess.get_inputs()}
            feeds.append(feed)
            live = {o.name[:-len("_out")]: v
                    for o, v in zip(part.graph.output, sess.run(None, feed))}
        runs = [lambda s=s, f=f: s.run(None, f) for s, f in zip(pieces, feeds)]
        runs += [lambda a=a: a.run(None, {"image": x}) for a in alone]
        runs.append(lambda: self.detector.session.run(None, {"image": x}))
        times = np.zeros((reps + 1, len(runs)))
        for r in range(reps + 1):
            for k, run in enumerate(runs):
                t0 = time.perf_counter()
                run()
                times[r, k] = (time.perf_counter() - t0) * 1e3
        times = times[1:]   # the first pass warms up
        stage_ms = np.median(times[:, :E + 1], axis=0)
        # paired within a pass, so load that comes and goes hits both sides of a difference
        head_ms = np.maximum(np.median(times[:, E + 1:2 * E + 1] - times[:, -1:], axis=0), 0.0)
        return torch.tensor(stage_ms, dtype=torch.float64), torch.tensor(head_ms,
                                                                         dtype=torch.float64)

    def compile(self, classifiers, thresholds, whole: bool = True) -> OrtDetector:
        """The serving state (heads, thresholds; ``inf`` = off) as its two sessions."""
        from compiler import detection_onnx
        on = [e for e, t in enumerate(thresholds) if t != float("inf")]
        classify = {e: head_model(None, classifiers[e], f"head{e}") for e in on}
        teaching = detection_onnx.compose(self.parts, classify,
                                          {e: float(thresholds[e]) for e in on}, self.empty,
                                          self.input_shape, OPSET,
                                          pools=list(zip(self.pools, self.widths)))
        return OrtDetector(_session(self._serving_model(classifiers, thresholds), self.threads),
                           _session(teaching, self.threads), list(self.empty), whole)

    def _serving_model(self, classifiers, thresholds):
        """The exits model ``compiler.export`` writes, for these heads and thresholds."""
        from compiler import detection_onnx
        on = [e for e, t in enumerate(thresholds) if t != float("inf")]
        heads: Dict[int, object] = {e: head_model(self.pools[e], classifiers[e], f"head{e}")
                                    for e in on}
        return detection_onnx.compose(self.parts, heads, {e: float(thresholds[e]) for e in on},
                                      self.empty, self.input_shape, OPSET)
