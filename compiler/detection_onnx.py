"""Detection artifacts in ONNX: the detector's frozen parts exported at compile time, and the
learned exits composed around them by ``python -m compiler.export``.

Why at compile time: the artifact holds the detector as TorchScript, and torchvision's detectors
reach ONNX only through its own path, tracing the *eager* model one image at a time (their
transform and post-processing take ONNX-specific branches while tracing). Only the compiler has
the eager model, so it traces the pieces between cut points there and stores them in the
artifact (a uint8 buffer, ``onnx_parts``, sealed by the artifact's content hash like every other
member; a runtime ``save`` keeps it). The export then needs only the artifact: the pieces, the
learned heads (exported from their weights) and the thresholds.

Pieces (one frame, batch 1, as torchvision's ONNX path)::

    part 0:    image [1, C, H, W]      -> tensors, h, taps...   (the transform, body up to exit 0)
    part k:    tensors, h, taps...     -> tensors, h, taps...   (body from exit k-1 to exit k)
    part E:    tensors, h, taps...     -> the detector's outputs (rest of the body, FPN, head,
                                                                  post-processing)

``tensors`` is the transformed image (anchors read its size), ``h`` the newest body output and
``taps`` the FPN's inputs so far (``DetectionCut.carries``).

The composed model (``compose``): after part k, when exit k is enabled, ``If(P(nothing) >=
threshold)``: then the detector's empty answer (its keys, dtypes and per-detection shapes) and
``exit_index`` k; else the next parts. A frame that leaves never runs the rest.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import ExportError
from .export import DEFAULT_OPSET as OPSET   # parts are traced by the TorchScript-based exporter

PARTS, PART_SIZES = "onnx_parts", "onnx_part_sizes"   # the artifact's buffers
IMAGE, EXIT_INDEX = "image", "exit_index"


class _Part(nn.Module):
    """Body children between two cuts (the transform before the first, FPN, head and
    post-processing after the last), in eager mode, as one traceable function of tensors."""

    def __init__(self, model, steps, first: bool, last: bool, tap_names: List[str],
                 sizes, original, fpn: Optional[nn.Module], tail: Optional[nn.Module]):
        super().__init__()
        self.model = model
        self.steps = steps
        self.layers = nn.ModuleList([st.module for st in steps])     # registered for tracing
        self.tap_fns = nn.ModuleList([st.tap_fn for st in steps])
        self.first, self.last = first, last
        self.tap_names = tap_names
        self.sizes, self.original = sizes, original
        self.fpn, self.tail = fpn, tail

    def forward(self, *live):
        from .detection import _prepare, _run_step
        if self.first:
            tensors, _ = _prepare(self.model, live[0])
            h, taps = tensors, []
        else:
            tensors, h, taps = live[0], live[1], list(live[2:])
        for st in self.steps:
            h, tapped = _run_step(st, h)
            if tapped is not None:
                taps.append(tapped)
        if not self.last:
            return (tensors, h) + tuple(taps)
        features = self.fpn(OrderedDict(zip(self.tap_names, taps)))
        dets = self.tail(tensors, self.sizes, features)
        out = self.model.transform.postprocess(dets, self.sizes, self.original)[0]
        return tuple(out.values())


def _live_names(taps: int) -> List[str]:
    return ["tensors", "h"] + [f"tap{i}" for i in range(taps)]


def export_parts(an, cuts, opset: int = OPSET) -> Tuple[List[bytes], dict]:
    """The detector of analysis ``an`` cut at ``cuts`` as ONNX pieces (see the module doc).

    Returns (serialized models, manifest entry). Raises ExportError naming the piece that does
    not export, with the exporter's reason."""
    import copy
    import io
    import warnings

    from .detection import _feature_stage, _NoBackbone, _prepare, _tail, body_steps
    from .export import _first_line, _quiet
    model = copy.deepcopy(an.model).eval()
    steps = body_steps(model, an.kind)
    tap_names = [st.tap for st in steps if st.tap is not None]
    example = an.example
    with torch.no_grad():
        sizes = _prepare(model, example)[1]      # constants of the traced pieces
    original = [tuple(example.shape[2:])]
    fpn = _feature_stage(model, an.kind)
    model.backbone = _NoBackbone()
    tail = _tail(model, an.kind)
    bounds = [c.position + 1 for c in cuts]
    spans = list(zip([0] + bounds, bounds + [len(steps)]))
    blobs, live, taps = [], [example], 0
    for s, (a, b) in enumerate(spans):
        first, last = s == 0, s == len(spans) - 1
        part = _Part(model, steps[a:b], first, last, tap_names, sizes, original,
                     fpn if last else None, tail if last else None).eval()
        names_in = [IMAGE] if first else _live_names(taps)
        new_taps = taps + sum(st.tap is not None for st in steps[a:b])
        names_out = list(an.output_keys) if last else [f"{n}_out" for n in _live_names(new_taps)]
        f = io.BytesIO()
        what = "the detector's last part" if last else f"the detector up to exit {s}"
        try:
            with torch.no_grad(), _quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(part, tuple(live), f, input_names=names_in,
                                  output_names=names_out, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
                live = list(part(*live)) if not last else live
        except Exception as e:   # the exporter raises many types; all are reported the same way
            raise ExportError(f"{what} does not export to ONNX through torchvision's tracing "
                              f"path: {_first_line(e)[:200]}") from None
        blobs.append(f.getvalue())
        taps = new_taps
    info = {"opset": opset, "batch": 1, "parts": len(blobs), "bytes": [len(b) for b in blobs],
            "outputs": list(an.output_keys), "input_shape": [1] + list(example.shape[1:])}
    return blobs, info


def attach(module, manifest: dict, an, cuts):
    """Store the ONNX pieces in the scripted artifact ``module`` and describe them in
    ``manifest["onnx"]``; when the detector does not export, the manifest says why instead
    (the artifact still serves in TorchScript, and ``compiler.export`` prints the reason)."""
    try:
        blobs, info = export_parts(an, cuts)
    except ExportError as e:
        manifest["onnx"] = {"unavailable": str(e)}
        return
    data = b"".join(blobs)
    module.onnx_parts = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
    module.onnx_part_sizes = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
    manifest["onnx"] = info


def parts_of(module, manifest: dict, where: str) -> List[bytes]:
    """The stored pieces of a detection artifact, or an ExportError that says why there are none
    and what to do."""
    info = manifest.get("onnx")
    if not isinstance(info, dict) or "parts" not in info:
        why = info.get("unavailable") if isinstance(info, dict) else None
        if why:
            raise ExportError(f"'{where}' has no ONNX parts: at compile time {why}; serve the "
                              f"TorchScript artifact")
        raise ExportError(f"'{where}' was compiled without the detector's ONNX parts (before "
                          f"they existed); re-run python -m compiler.rewrite on the detector, "
                          f"or serve the TorchScript artifact")
    sizes = getattr(module, PART_SIZES, None)
    data = getattr(module, PARTS, None)
    if sizes is None or data is None or int(sizes.sum()) != data.numel() \
            or sizes.numel() != len(manifest["exits"]) + 1:
        raise ExportError(f"'{where}' does not hold the ONNX parts its manifest describes; "
                          f"re-run python -m compiler.rewrite on the detector")
    raw = data.cpu().numpy().tobytes()
    out, at = [], 0
    for n in sizes.tolist():
        out.append(raw[at: at + n])
        at += n
    return out


def _renamed(value_info, name: str):
    out = type(value_info)()
    out.CopyFrom(value_info)
    out.name = name
    return out


def compose(parts: list, heads: Dict[int, object], thresholds: Dict[int, float],
            empty: Dict[str, torch.Tensor], input_shape: List[int], opset: int,
            pools: Optional[List[Tuple[object, int]]] = None):
    """The exits model: ``parts`` (ONNX models, E + 1) with exit k's ``heads[k]`` and
    ``thresholds[k]`` for each enabled k; a frame that leaves gets ``empty`` (the artifact's
    ``empty()``: the detector's keys, dtypes and per-detection shapes). Input ``image``
    ``input_shape`` ([1, C, H, W]); outputs the detector's keys and ``exit_index`` [1] (int64;
    E = ran the whole detector).

    ``pools`` (the runtime's teaching model): per exit, its pooling as an ONNX model and the
    width D of what it gives; every exit then pools (on or off), ``heads[k]`` read the pooled
    features, and outputs ``f0`` ... [1, D] follow ``exit_index``: a frame's pooled features at
    each exit, zeros at the exits after the one it left at."""
    from .export import _Composer
    c = _Composer(opset)
    onnx, helper = c.onnx, c.onnx.helper
    TP = onnx.TensorProto
    E = len(parts) - 1
    tail = parts[-1].graph
    keys = [o.name for o in tail.output]
    types = {o.name: o.type.tensor_type.elem_type for o in tail.output}
    feat_names = [f"f{e}" for e in range(E)] if pools is not None else []
    for f in feat_names:
        types[f] = TP.FLOAT
    if keys != list(empty):
        raise ExportError(f"the stored detector parts answer with {keys}, the artifact with "
                          f"{list(empty)}; re-run python -m compiler.rewrite on the detector")
    main: list = []

    def empties(nodes, exit_no):
        outs = []
        for k in keys:
            arr = onnx.numpy_helper.from_array(
                empty[k].numpy().astype(onnx.helper.tensor_dtype_to_np_dtype(types[k])),
                c.name(k))
            outs.append(c.node(nodes, "Constant", [], f"empty_{k}", value=arr))
        outs.append(c.node(nodes, "Constant", [], "exit_index",
                           value=helper.make_tensor(c.name("x"), TP.INT64, [1], [exit_no])))
        for e in range(exit_no + 1, E if pools is not None else 0):   # not reached: zeros
            d = pools[e][1]
            outs.append(c.node(nodes, "Constant", [], f"unreached_f{e}",
                               value=helper.make_tensor(c.name("x"), TP.FLOAT, [1, d], [0.0] * d)))
        return outs

    def segment(nodes, inits, live: Dict[str, str], start: int) -> List[str]:
        """Parts from ``start`` on into ``nodes``, their weights into ``inits`` (the graph's
        own: see ``_Composer.inline_many``), each enabled exit an If; returns the outputs."""
        for s in range(start, E + 1):
            outs = c.inline_many(nodes, parts[s], f"part{s}/", live, f"part{s}",
                                 initializers=inits)
            if s == E:
                return outs + [c.node(nodes, "Constant", [], "exit_index",
                                      value=helper.make_tensor(c.name("x"), TP.INT64, [1],
                                                               [E]))] + pooled
            live = {o.name[:-len("_out")]: v for o, v in zip(parts[s].graph.output, outs)}
            head_in = live["h"]
            if pools is not None:
                head_in = c.inline_many(nodes, pools[s][0], f"pool{s}/", [live["h"]],
                                        f"pool{s}", outputs=1, initializers=inits)[0]
                pooled.append(head_in)
            if s in heads:
                logits = c.inline_many(nodes, heads[s], f"head{s}/", [head_in],
                                       f"head{s}_logits", outputs=1, initializers=inits)[0]
                prob = c.node(nodes, "Softmax", [logits], f"head{s}_prob", axis=1)
                nothing = c.node(nodes, "Gather", [prob, c.const([0], "int64", "nothing")],
                                 f"head{s}_nothing", axis=1)
                take = c.node(nodes, "GreaterOrEqual",
                              [nothing, c.const([[thresholds[s]]], "float32", f"threshold{s}")],
                              f"exit{s}_take")
                cond = c.node(nodes, "Reshape", [take, c.const([1], "int64", "one")], "cond")
                then_nodes: list = []
                t_out = empties(then_nodes, s)
                else_nodes: list = []
                else_inits: list = []
                before, pooled[:] = list(pooled), []     # features pooled so far stay outside
                e_out = segment(else_nodes, else_inits, live, s + 1)
                later = feat_names[s + 1:]

                def branch(body, outs, tag, weights=()):
                    return helper.make_graph(
                        body, c.name(f"exit{s}_{tag}"), [],
                        [helper.make_tensor_value_info(o, types[k] if k in types else TP.INT64,
                                                       None)
                         for o, k in zip(outs, keys + [EXIT_INDEX] + later)],
                        initializer=list(weights))

                got = c.node(nodes, "If", [cond], f"after_exit{s}",
                             n_out=len(keys) + 1 + len(later),
                             then_branch=branch(then_nodes, t_out, "leaves"),
                             else_branch=branch(else_nodes, e_out, "goes_on", else_inits))
                got = [got] if isinstance(got, str) else list(got)
                return got[:len(keys) + 1] + before + got[len(keys) + 1:]
        raise AssertionError("unreachable")

    pooled: List[str] = []
    outs = segment(main, c.initializers, {IMAGE: IMAGE}, 0)
    names = keys + [EXIT_INDEX] + feat_names
    for o, n in zip(outs, names):
        main.append(helper.make_node("Identity", [o], [n], name=c.name("Identity")))
    graph = helper.make_graph(
        main, "layer_cache_detection_exits",
        [helper.make_tensor_value_info(IMAGE, TP.FLOAT, list(input_shape))],
        [_renamed(o, o.name) for o in tail.output]      # the detector's own types and shapes
        + [helper.make_tensor_value_info(EXIT_INDEX, TP.INT64, [1])]
        + [helper.make_tensor_value_info(f, TP.FLOAT, [1, pools[e][1]])
           for e, f in enumerate(feat_names)],
        initializer=c.initializers)
    return helper.make_model(graph, producer_name="layer-cache compiler.export",
                             ir_version=c.ir_version,
                             opset_imports=[helper.make_opsetid(d, v)
                                            for d, v in sorted(c.opsets.items())],
                             functions=c.functions)


def build(artifact_path: str, opset: int):
    """The exits model of the detection artifact at ``artifact_path`` and a summary dict; raises
    ExportError (one line, saying what to do) when it cannot be built."""
    import json

    import torchvision  # noqa: F401  (registers the nms op the detector's TorchScript calls)

    from . import artifact
    from .export import ExportHead, _import_onnx, export_module
    from .heads import HeadSpec
    onnx = _import_onnx()
    module, manifest = artifact.load(artifact_path, map_location="cpu")
    blobs = parts_of(module, manifest, artifact_path)
    stored = int(manifest["onnx"]["opset"])
    if opset != stored:
        raise ExportError(f"the detector's parts in '{artifact_path}' were exported at ONNX opset "
                          f"{stored} when it was compiled; export with --opset {stored}")
    parts = [onnx.load_from_string(b) for b in blobs]
    exits = manifest["exits"]
    names = [e["name"] for e in exits]
    blocks = [getattr(module.blocks, str(i)) for i in range(len(exits))]
    thresholds = {i: float(b.threshold) for i, b in enumerate(blocks) if bool(b.enabled)}
    shape = [1] + list(manifest["input_shape"][1:])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    heads = {}
    with torch.no_grad():
        h, taps = module.prepare(x)[0], []
        for i, blk in enumerate(blocks):
            h, taps = blk.stage(h, taps)
            if i not in thresholds:
                continue
            spec = HeadSpec(**{k: exits[i]["head"][k] for k in
                               ("pool", "feature_dim", "hidden", "num_classes")})
            state = {k: v.detach().cpu() for k, v in blk.head.classifier.state_dict().items()}
            eager = ExportHead(spec, tuple(h.shape), state).eval()
            if not torch.allclose(eager(h), blk.head(h), atol=1e-4, rtol=1e-4):
                raise ExportError(f"exit {i} '{names[i]}': the head's eager stand-in differs "
                                  f"from the artifact's; report this artifact")
            heads[i], _ = export_module(eager, h, f"the head of exit {i} '{names[i]}'", opset,
                                        "torchscript")
        empty = module.empty(x)
    model = compose(parts, heads, thresholds, empty, shape, opset)
    E = len(exits)
    model.doc_string = (f"layer-cache detection artifact with 'nothing here' exits; one frame "
                        f"per call; outputs: {', '.join(empty)} as the detector returns them, "
                        f"exit_index [1] (int64, the exit the frame left at; {E} = ran the whole "
                        f"detector)")
    onnx.helper.set_model_props(model, {
        "opset": str(opset), "layer_cache.task": "detection",
        "layer_cache.num_exits": str(E),
        "layer_cache.enabled_exits": json.dumps(sorted(thresholds)),
        "layer_cache.exit_names": json.dumps(names),
        "layer_cache.thresholds": json.dumps({str(i): t for i, t in thresholds.items()}),
        "layer_cache.exit_index_meaning": f"0..{E - 1}: exit; {E}: whole detector",
        "layer_cache.source_sha256": str(manifest.get("source_sha256")),
        "torch_version": torch.__version__})
    enabled = sorted(thresholds)
    summary = {
        "opset": opset, "num_exits": E, "enabled_exits": enabled, "exit_names": names,
        "thresholds": [thresholds[i] for i in enabled], "input_shape": shape,
        "inputs": [IMAGE], "outputs": list(empty) + [EXIT_INDEX], "exporter": ["torchscript"],
        "nodes": len(model.graph.node), "task": "detection",
        "notice": None if enabled else
        f"no exit of '{artifact_path}' is enabled; exported the plain detector (exit_index is "
        f"{E} for every frame); learn exits with the runtime first to get early exits"}
    return model, summary


def check(artifact_path: str, onnx_path: str, frames: int = 16, seed: int = 0) -> dict:
    """Run ``frames`` random frames through onnxruntime and the artifact, one at a time; compare
    each frame's exit and answer (``compiler.detection.outputs_equal``, atol 1e-3)."""
    import torchvision  # noqa: F401  (registers the nms op)

    from . import artifact
    from .detection import outputs_equal
    from .export import _import_ort
    ort = _import_ort()
    module, manifest = artifact.load(artifact_path, map_location="cpu")
    so = ort.SessionOptions()
    so.log_severity_level = 3   # no optimizer notes on the console
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    keys = [o.name for o in sess.get_outputs()]
    g = torch.Generator().manual_seed(seed)
    same_exit = same_answer = 0
    exits_onnx, exits_torch = [], []
    with torch.no_grad():
        for _ in range(frames):
            x = torch.rand([1] + list(manifest["input_shape"][1:]), generator=g)
            want, want_exit = module.forward_with_exits(x)
            got = dict(zip(keys, sess.run(None, {IMAGE: x.numpy()})))
            got_exit = int(got.pop(EXIT_INDEX)[0])
            exits_onnx.append(got_exit)
            exits_torch.append(int(want_exit[0]))
            same_exit += got_exit == int(want_exit[0])
            same_answer += outputs_equal([{k: torch.from_numpy(v) for k, v in got.items()}],
                                         want, atol=1e-3, rtol=1e-3)
    return {"frames": frames, "exit_agreement": same_exit / max(frames, 1),
            "answer_agreement": same_answer / max(frames, 1),
            "exits_onnx": exits_onnx, "exits_torch": exits_torch}
