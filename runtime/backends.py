"""Serving backends: where a request's stages and heads run on the CPU (TorchScript or onnxruntime).

``torchscript``: the artifact's scripted stages (``serving.serve_staged``) and, once learned, the
whole cached model as one scripted module (``serving.serve_fast``).

``onnxruntime``: each stage is exported to ONNX once, at load. Every published serving state is
compiled into a ``Plan``: the whole cached model as one session (``compiler.export``'s graph:
after an enabled exit the rows that stay are compressed and an If runs the rest when any did;
each branch holds the weights it reads; for a single row, a second graph with one If on its
decision per exit and no index bookkeeping; each form built when the traffic needs it), which
serves every request that teaches nothing; and,
for requests that teach, one session per *segment* (the stages up to an enabled exit, then that
exit's head) returning the activation, the head's logits and confidence and the pooled features,
with the exit decision in numpy between sessions (``exit_rule.leaves_np``). Exits that are off
are in neither. (The composed graphs replaced segments for serving on 2026-11-28: against the
best backbone mode on the demo's learned artifact, -63% at batch 1 where segments gave -54%, a
row missing every exit +33% where they gave +65%, +82% rows/s at batch 64 where +58%;
docs/latency.md.) Two sessions are built
once: the plain backbone (all stages, nothing else) and the *collect* model (the backbone plus
every exit's pooled features), which serves the requests that learn or are shadowed while no
exit is on.

Heads pool with ``compiler.heads.StridedPool`` (``AveragePool`` / ``MaxPool`` with a kernel and a
stride, plus a ``Gather`` where adaptive pooling's windows overlap unevenly): the same windows as
``ExitHead``'s adaptive pooling, far cheaper in onnxruntime than one ``Slice`` per window.
"""
import logging
import threading
import time
import weakref
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from compiler import exit_rule
from compiler.heads import StridedPool

from .config import ConfigError

log = logging.getLogger("layer_cache.runtime")

BACKENDS = ("auto", "torchscript", "onnxruntime")
OPSET = 18


class BackendError(ConfigError):
    """A serving backend that cannot be built for this artifact or machine; says what to do."""


def resolve(name: str, device) -> str:
    """The backend ``name`` stands for on ``device``: ``auto`` is onnxruntime on the CPU when it
    is installed (faster here; see docs/latency.md), TorchScript otherwise."""
    if name not in BACKENDS:
        raise BackendError(f"unknown serving backend {name!r}; use one of {', '.join(BACKENDS)}")
    dev = torch.device(device)
    if name == "onnxruntime" and dev.type != "cpu":
        raise BackendError(f"the onnxruntime backend serves on the CPU only, not {dev}; use "
                           f"backend='torchscript' (or 'auto')")
    if name == "auto":
        if dev.type != "cpu":
            return "torchscript"
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            return "torchscript"
        return "onnxruntime"
    return name


# ----- onnxruntime ------------------------------------------------------------------------------
_IN_MEMORY = {}   # key -> numpy array: the weights of models built by ``hold_weights_in_memory``
_IN_MEMORY_PREFIX = "layer_cache_in_memory:"


def hold_weights_in_memory(model, min_bytes: int = 1024) -> list:
    """Move ``model``'s initializers of at least ``min_bytes`` (graph and subgraphs) out of the
    protobuf into process memory, in place; the model then names each by a key (an external
    data location) that ``_session`` resolves. Returns the keys (``release_weights``).

    A backend composes a plan's nine or so graphs from its stages each round; with the weights
    in the protobuf every composition, serialisation and parse copied them in C++ holding the
    GIL (several milliseconds at a time on the demo model: every request waited). Now they
    copy names."""
    from onnx import TensorProto, numpy_helper
    plain = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64,
             TensorProto.INT32)   # numpy's own types, which onnxruntime takes from numpy
    keys = []
    for g in _graphs(model.graph):
        for t in g.initializer:
            if t.data_location == TensorProto.EXTERNAL or t.data_type not in plain:
                continue
            arr = numpy_helper.to_array(t)
            if arr.nbytes < min_bytes:
                continue
            arr = np.ascontiguousarray(arr)
            key = f"{_IN_MEMORY_PREFIX}{id(arr):x}"   # unique while the registry holds it
            _IN_MEMORY[key] = arr
            keys.append(key)
            dims, dtype, name = list(t.dims), t.data_type, t.name
            t.Clear()
            t.name, t.data_type = name, dtype
            t.dims.extend(dims)
            t.data_location = TensorProto.EXTERNAL
            e = t.external_data.add()
            e.key, e.value = "location", key
    return keys


def release_weights(keys):
    """Forget weights ``hold_weights_in_memory`` kept (sessions built on them keep their own)."""
    for k in keys:
        _IN_MEMORY.pop(k, None)


def _graphs(graph):
    """``graph`` and every subgraph in it (If branches, loop bodies), depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.g.ByteSize():
                yield from _graphs(a.g)
            for sub in a.graphs:
                yield from _graphs(sub)


def _in_memory_weights(model):
    """(names, OrtValues) of ``model``'s main-graph initializers held in process memory.
    onnxruntime takes such weights for the main graph only: a subgraph's (an If branch holds
    the weights it reads) are written back into ``model``, in place."""
    import onnxruntime as ort
    names, values = [], []
    for i, g in enumerate(_graphs(model.graph)):   # the main graph first
        for t in g.initializer:
            if not (t.external_data and t.external_data[0].value.startswith(_IN_MEMORY_PREFIX)):
                continue
            arr = _IN_MEMORY[t.external_data[0].value]
            if i == 0:
                names.append(t.name)
                values.append(ort.OrtValue.ortvalue_from_numpy(arr))
            else:
                del t.external_data[:]
                t.data_location = t.DEFAULT
                t.raw_data = arr.tobytes()
    return names, values


def _session(model, threads: int = 1, layout: bool = True):
    """An onnxruntime CPU session of ``model`` (an ONNX ModelProto, its bytes, or a file path):
    every graph optimisation, ``threads`` intra-op threads, sequential. ``layout`` False leaves
    out the layout optimisations (the blocked NCHWc convolutions), for measuring what they buy
    (``tools/miss_probe.py``). The tools time every onnxruntime model this way too. Weights a
    ModelProto holds in process memory (``hold_weights_in_memory``) are handed over from there;
    the session keeps a reference to them."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if layout else \
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.log_severity_level = 3
    held = ([], [])
    if hasattr(model, "SerializeToString"):
        held = _in_memory_weights(model)
        if held[0]:
            opts.add_external_initializers(*held)
        model = model.SerializeToString()
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    sess.layer_cache_weights = held[1]   # onnxruntime reads them in place: keep them alive
    return sess


def head_model(pool_model, classifier: nn.Module, hint: str):
    """A head as one ONNX model (input ``x``, output ``y``: logits): its pooling (exported once;
    None: ``x`` is already pooled) then its classifier's layers, built from the learned weights
    with no torch export."""
    from compiler.export import _Composer
    from onnx import TensorProto, helper
    c = _Composer(OPSET)
    nodes: list = []
    f = "x" if pool_model is None else \
        c.inline(nodes, pool_model, f"{hint}_pool/", "x", f"{hint}_pool")
    logits = _classifier_nodes(c, nodes, f, classifier, hint)
    nodes.append(helper.make_node("Identity", [logits], ["y"], name=c.name("Id")))
    graph = helper.make_graph(nodes, hint,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=c.initializers)
    return helper.make_model(graph, ir_version=c.ir_version,
                             opset_imports=[helper.make_opsetid(d, v)
                                            for d, v in sorted(c.opsets.items())])


def _classifier_nodes(c, nodes: list, f: str, classifier: nn.Module, hint: str) -> str:
    """A head's classifier (Linear / ReLU layers) as Gemm / Relu nodes reading ``f``."""
    h = f
    for j, layer in enumerate(classifier):
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach().cpu().float().numpy()
            b = layer.bias.detach().cpu().float().numpy()
            h = c.node(nodes, "Gemm", [h, c.const(w, "float32", f"{hint}_w{j}"),
                                       c.const(b, "float32", f"{hint}_b{j}")], f"{hint}_fc{j}",
                       transB=1)
        elif isinstance(layer, nn.ReLU):
            h = c.node(nodes, "Relu", [h], f"{hint}_relu{j}")
        else:
            raise BackendError(f"{hint}: classifier layer {type(layer).__name__} has no ONNX "
                               f"form here; use backend='torchscript'")
    return h


FORMS = ("one", "many")   # a plan's composed graphs: for one-row batches, for larger ones


class Plan:
    """One serving state compiled for onnxruntime (immutable, but for the forms built late).

    ``composed``: the whole cached model as one session, the graph ``compiler.export`` writes
    (after each enabled exit the rows that stay are compressed and an If runs the rest when any
    did; each branch holds the weights it reads), in two forms: ``many`` for any batch and
    ``one`` for a batch of one row (an If per exit, no index bookkeeping). They serve the
    requests that teach nothing. Each costs far more memory than the rest of the plan (its
    branches hold their own weights: about 120-140 MB each for MobileNetV2), so a plan builds
    the forms its predecessor served (``used``; both for the first); a form first needed later
    is built then, once, on that request (``build``).
    ``collecting``: segments (session, exit, threshold as float32, the exits whose pooled
    features it returns), the stages up to an enabled exit and that exit's head, with the exit
    decision in numpy between them, for requests that teach the heads. ``shadow``: (session,
    [(exit, threshold)]): the whole backbone with every exit's pooled features and every
    enabled head on every row, for shadowed requests (one session run, not one per segment).
    ``whole``: the state was learned on ``fast_after`` rows, so requests need no longer all teach
    (``ServingState.servable_whole``; then a ``collect_rate`` share does). Any request with
    nothing to check or teach inline runs ``composed``, before that too.
    """

    def __init__(self, composed: dict, build, collecting, shadow, num_exits: int,
                 num_classes: int, whole: bool):
        self._composed = dict(composed)   # form -> session, for the forms built so far
        self._build = build               # form -> its session
        self._lock = threading.Lock()
        self.used = set()                 # the forms requests ran
        self.collecting = collecting
        self.shadow = shadow
        self.num_exits = num_exits
        self.num_classes = num_classes
        self.whole = whole

    def composed(self, form: str):
        """The session of composed ``form``, built now if it was not (once)."""
        sess = self._composed.get(form)
        if sess is None:
            with self._lock:
                sess = self._composed.get(form)
                if sess is None:
                    sess = self._composed[form] = self._build(form)
        return sess

    @property
    def built(self) -> set:
        return set(self._composed)

    def run_collect(self, x: np.ndarray):
        """(logits, exit index, features per exit of the rows that ran the whole backbone,
        their backbone output); the last two are None when every row left at an exit."""
        n, E = x.shape[0], self.num_exits
        idx = np.arange(n)
        exit_of = np.full(n, E, dtype=np.int64)
        out, h, feats = None, x, [None] * E
        for sess, e, thr, fidx in self.collecting[:-1]:
            h, logits, conf, *fs = sess.run(None, {"x": h})
            for j, f in zip(fidx, fs):
                feats[j] = f
            take = exit_rule.leaves_np(conf, thr)
            if take.any():
                if out is None:
                    out = np.empty((n, logits.shape[1]), dtype=np.float32)
                rows = idx[take]
                out[rows] = logits[take]
                exit_of[rows] = e
                keep = ~take
                if not keep.any():
                    return out, exit_of, None, None
                h, idx = h[keep], idx[keep]
                feats = [f[keep] if f is not None else None for f in feats]
        sess, _, _, fidx = self.collecting[-1]
        y, *fs = sess.run(None, {"x": h})
        for j, f in zip(fidx, fs):
            feats[j] = f
        if out is None:
            return y, exit_of, feats, y
        out[idx] = y
        return out, exit_of, feats, y

    def run_shadow(self, x: np.ndarray):
        """A shadow request: every row runs the whole backbone and every enabled exit's head
        (``shadow``, one session), with the exit each row would have left at (``num_exits``:
        none) and that exit's answer (-1: none), decided as ``run_collect`` decides; (backbone
        output, would, would_pred, pooled features per exit)."""
        n, E = x.shape[0], self.num_exits
        sess, on = self.shadow
        y, *outs = sess.run(None, {"x": x})
        would = np.full(n, E, dtype=np.int64)
        would_pred = np.full(n, -1, dtype=np.int64)
        for k, (e, thr) in enumerate(on):
            logits, conf = outs[2 * k], outs[2 * k + 1]
            newly = exit_rule.leaves_np(conf, thr) & (would == E)
            would[newly] = e
            would_pred[newly] = logits[newly].argmax(1)
        return y, would, would_pred, outs[2 * len(on):]

    def run(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(logits [n, K], exit index [n] int64) for a float32 batch, rows in input order."""
        form = "one" if x.shape[0] == 1 else "many"
        self.used.add(form)
        logits, exit_of = self.composed(form).run(None, {"input": x})
        return logits, exit_of


class OnnxRuntimeBackend:
    """Stages as onnxruntime sessions with the exit decision outside the graph (module doc)."""

    name = "onnxruntime"

    def __init__(self, stages: Sequence, exits: list, input_shape: Sequence[int],
                 num_classes: int, threads: int = 1):
        try:
            from compiler.export import _Composer, export_module
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise BackendError(f"the onnxruntime backend needs onnx and onnxruntime ({e}); install "
                               f"them (pip install onnx onnxruntime) or use "
                               f"backend='torchscript'") from None
        self._Composer = _Composer
        self.threads = threads
        self.num_exits = len(exits)
        self.num_classes = num_classes
        self.exits = exits
        t0 = time.perf_counter()
        x = torch.randn((2,) + tuple(input_shape), generator=torch.Generator().manual_seed(0))
        self.stage_models, self.pool_models, self.shapes = [], [], []
        with torch.no_grad():
            h = x
            for i, st in enumerate(stages):
                m, _ = export_module(st, h, f"stage {i}", OPSET)
                self.stage_models.append(m)
                h = st(h)
                if i < self.num_exits:
                    self.shapes.append(tuple(h.shape))
                    pool = StridedPool(exits[i]["head"]["pool"], h.shape).eval()
                    pm, _ = export_module(pool, h, f"the pooling of exit {i}", OPSET)
                    self.pool_models.append(pm)
        keys = [k for m in self.stage_models + self.pool_models for k in hold_weights_in_memory(m)]
        weakref.finalize(self, release_weights, keys)
        self.backbone = _session(self._chain(features=False), threads)
        self.collector = _session(self._chain(features=True), threads)
        self.build_seconds = time.perf_counter() - t0

    # -- graphs --
    def _finish(self, c, nodes, outputs, start: int = 0):
        """A session's model: input ``x``, the activation stage ``start`` reads, declared with
        its shape past the batch (onnxruntime plans a graph whose input rank and sizes it knows
        ~5% faster at batch 1 on the demo model than one whose input shape is unknown)."""
        from onnx import TensorProto, helper
        shape = self._input_shape() if start == 0 else self.shapes[start - 1][1:]
        shape = [d if d > 0 else f"d{i}" for i, d in enumerate(shape)]   # 0: a dynamic size
        graph = helper.make_graph(
            nodes, "layer_cache_segment",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"] + shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=c.initializers)
        return helper.make_model(graph, ir_version=c.ir_version, functions=c.functions,
                                 opset_imports=[helper.make_opsetid(d, v)
                                                for d, v in sorted(c.opsets.items())])

    def _chain(self, features: bool):
        """All stages; with ``features`` also every exit's pooled features (f0 ... f{E-1})."""
        from onnx import helper
        c = self._Composer(OPSET)
        nodes, h, outs = [], "x", []
        for s, m in enumerate(self.stage_models):
            h = c.inline(nodes, m, f"s{s}/", h, f"stage{s}_out")
            if features and s < self.num_exits:
                f = c.inline(nodes, self.pool_models[s], f"p{s}/", h, f"pool{s}")
                nodes.append(helper.make_node("Identity", [f], [f"f{s}"], name=c.name("Id")))
                outs.append(f"f{s}")
        nodes.append(helper.make_node("Identity", [h], ["y"], name=c.name("Id")))
        return self._finish(c, nodes, ["y"] + outs)

    def _segment(self, start: int, stop: int, exit_: Optional[int], classifier=None,
                 features: bool = False, heads: Optional[dict] = None):
        """Stages ``start``..``stop``; then, for an exit, its head: outputs h, logits, conf
        (or y, after the last stage); with ``features`` also f<j> for every exit j among the
        stages (its pooled features). ``heads`` (exit: classifier, with ``exit_`` None): y, then
        each of those heads' logits<e> and conf<e>, every row through them all."""
        from compiler.export import confidence_nodes
        from onnx import helper
        heads = heads or {}
        c = self._Composer(OPSET)
        nodes, h, pooled = [], "x", {}
        for s in range(start, stop + 1):
            h = c.inline(nodes, self.stage_models[s], f"s{s}/", h, f"stage{s}_out")
            if s < self.num_exits and (s == exit_ or s in heads or features):
                pooled[s] = c.inline(nodes, self.pool_models[s], f"p{s}/", h, f"pool{s}")
        extra = [(pooled[j], f"f{j}") for j in sorted(pooled)] if features else []
        if exit_ is None:
            outs = [(h, "y")]
            for e in sorted(heads):
                logits = _classifier_nodes(c, nodes, pooled[e], heads[e], f"head{e}")
                outs += [(logits, f"logits{e}"),
                         (confidence_nodes(c, nodes, logits, f"head{e}"), f"conf{e}")]
            outs += extra
        else:
            logits = _classifier_nodes(c, nodes, pooled[exit_], classifier, f"head{exit_}")
            conf = confidence_nodes(c, nodes, logits, f"head{exit_}")
            outs = [(h, "h"), (logits, "logits"), (conf, "conf")] + extra
        for src, dst in outs:
            nodes.append(helper.make_node("Identity", [src], [dst], name=c.name("Id")))
        return self._finish(c, nodes, [dst for _, dst in outs], start)

    def composed(self, classifiers, thresholds, one_row: bool = False):
        """The whole cached model under these heads and thresholds (``inf``: off) as one ONNX
        graph: ``compiler.export``'s composition of the stages and the heads (``one_row``: its
        form for batches of one row)."""
        from compiler.export import _compose
        on = [e for e, t in enumerate(thresholds) if t != float("inf")]
        heads = {e: head_model(self.pool_models[e], classifiers[e], f"head{e}") for e in on}
        out_type = self.stage_models[-1].graph.output[0].type.tensor_type.elem_type
        return _compose(self.stage_models, heads, {e: float(thresholds[e]) for e in on},
                        self.num_classes, {"input_shape": [-1] + list(self._input_shape())},
                        OPSET, out_type, one_row)

    def compile(self, classifiers, thresholds, whole: bool = True,
                forms=FORMS) -> Optional[Plan]:
        """The plan for a serving state (None when no exit is on: the backbone session serves),
        with the composed ``forms`` built now (the others when first needed: ``Plan``)."""
        on = [e for e, t in enumerate(thresholds) if t != float("inf")]
        if not on:
            return None
        collecting, start = [], 0
        for e in on:
            thr = np.float32(thresholds[e])
            sess = _session(self._segment(start, e, e, classifiers[e], True), self.threads)
            collecting.append((sess, e, thr, list(range(start, e + 1))))
            start = e + 1
        last = _session(self._segment(start, self.num_exits, None, None, True), self.threads)
        collecting.append((last, None, None, list(range(start, self.num_exits))))
        shadow = _session(self._segment(0, self.num_exits, None, None, True,
                                        {e: classifiers[e] for e in on}), self.threads)
        def build(form):
            return _session(self.composed(classifiers, thresholds, form == "one"), self.threads)
        return Plan({f: build(f) for f in FORMS if f in forms}, build, collecting,
                    (shadow, [(e, np.float32(thresholds[e])) for e in on]),
                    self.num_exits, self.num_classes, whole)

    # -- running --
    def run_backbone(self, x: np.ndarray) -> np.ndarray:
        return self.backbone.run(None, {"x": x})[0]

    def run_collect(self, x: np.ndarray):
        """(backbone output, [pooled features per exit]) for every row."""
        y, *feats = self.collector.run(None, {"x": x})
        return y, feats

    # -- costs --
    def profile(self, classifiers, batch: int = 8, reps: int = 7):
        """Latency (ms) of each stage and of each head with its decision, in onnxruntime: a
        stage as its own session; a head as the extra time a segment that ends at that exit
        takes over the bare stage (pooling, classifier, confidence, the outputs, the decision).
        The minimum over repetitions after a warm-up."""
        def timed(fn):
            fn()
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            return best * 1e3

        x = np.random.default_rng(0).standard_normal((batch,) + self._input_shape()) \
            .astype(np.float32)
        stage_ms, head_ms, h = [], [], x
        for s in range(self.num_exits + 1):
            bare = _session(self._segment(s, s, None), self.threads)
            stage_ms.append(timed(lambda: bare.run(None, {"x": h})))
            if s < self.num_exits:
                seg = _session(self._segment(s, s, s, classifiers[s]), self.threads)
                with_head = timed(lambda: exit_rule.leaves_np(seg.run(None, {"x": h})[2],
                                                              np.float32(0.5)).any())
                head_ms.append(max(with_head - stage_ms[-1], 0.0))
            h = bare.run(None, {"x": h})[0]
        return torch.tensor(stage_ms, dtype=torch.float64), torch.tensor(head_ms,
                                                                         dtype=torch.float64)

    def miss_profile(self, classifiers, reps: int = 15) -> torch.Tensor:
        """Per exit, what a row pays at batch 1 when that exit alone is on and the row misses
        it, as a share of the backbone session's time: the head, the decision and the If, in
        the one-row graph that serves batch 1 (``Plan.composed("one")``). Turns interleaved; the
        minimum over ``reps``."""
        x = np.random.default_rng(0).standard_normal((1,) + self._input_shape()) \
            .astype(np.float32)
        never = float(exit_rule.DISABLED_THRESHOLD)
        inf = float("inf")
        alone = [_session(self.composed(classifiers, [never if j == e else inf
                                                      for j in range(self.num_exits)], True),
                          self.threads) for e in range(self.num_exits)]
        best = [float("inf")] * (self.num_exits + 1)
        for _ in range(reps + 1):   # the first pass warms up
            for k in range(self.num_exits + 1):
                t0 = time.perf_counter()
                if k == self.num_exits:
                    self.backbone.run(None, {"x": x})
                else:
                    alone[k].run(None, {"input": x})
                best[k] = min(best[k], time.perf_counter() - t0)
        base = best[-1]
        return torch.tensor([max(b - base, 0.0) / base for b in best[:-1]], dtype=torch.float64)

    def _input_shape(self):
        shape = self.stage_models[0].graph.input[0].type.tensor_type.shape
        return tuple(d.dim_value for d in shape.dim[1:])
