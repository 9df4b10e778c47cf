"""``python -m compiler.export ARTIFACT -o model.onnx``: an artifact with its exits as one ONNX model.

The ONNX model takes ``input`` [batch, ...] (dynamic batch) and returns ``logits`` [batch, K] and
``exit_index`` [batch] (int64), the same as the artifact's ``forward_with_exits``: a row leaves at
the first enabled exit whose softmax max-probability is >= that exit's threshold and takes that
head's logits; ``exit_index`` = the exit's number, or the number of exits for rows that ran the
whole backbone. Rows come back in input order. Disabled exits are left out of the graph.

How: every stage and every enabled head is exported on its own (the TorchScript stages with the
TorchScript-based exporter, heads from equivalent eager modules; ``--exporter dynamo`` uses the
torch.export-based exporter instead), then one graph is composed around them. After an enabled
exit's stage::

    logits = head(h); take = ReduceMax(Softmax(logits)) >= threshold
    out[idx[take]] = logits[take]; exit_index[idx[take]] = i          (ScatterND)
    h, idx = h[~take], idx[~take]                                     (Compress)
    If rows left > 0: the next stages, exits and the final stage; else: out, exit_index as they are

so no stage ever runs on rows that have left, and an empty remainder never reaches a stage.
"""
import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from . import artifact
from .config import ArgumentParser, number
from .errors import ArtifactWriteError, ExportError, UsageError, first_line, run_cli
from .heads import ExitHead, HeadSpec, StridedPool

DEFAULT_OPSET = 18
MIN_OPSET = 15                  # Shape(start, end), GreaterOrEqual, ScatterND, Compress
INPUT, LOGITS, EXIT_INDEX = "input", "logits", "exit_index"
BATCH = "batch"
EXAMPLE_BATCH = 2               # > 1: keeps the exporters from specialising the batch dimension
EXPORTERS = ("auto", "torchscript", "dynamo")
PRODUCER = "layer-cache compiler.export"


def _import_onnx():
    """``onnx`` or an ExportError that says what to install."""
    try:
        import onnx
        from onnx import helper, numpy_helper  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the 'onnx' package ({e}); install it with "
                          f"pip install onnx onnxscript onnxruntime") from None
    return onnx


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"checking an ONNX model needs the 'onnxruntime' package ({e}); install "
                          f"it with pip install onnxruntime") from None
    return onnxruntime


# ----- eager stand-ins ------------------------------------------------------------------------
class ExportHead(nn.Module):
    """An exit head as an export-friendly eager module; computes what ``ExitHead`` computes.

    ``avgmax<k>x<k>`` pools with ``StridedPool``: AveragePool / MaxPool with adaptive pooling's
    kernel and stride (and a Gather where its bins overlap unevenly; one slice per bin only
    where bins differ in size), because the TorchScript exporter refuses adaptive pooling whose
    output size does not divide the input, and one slice per bin is slow in onnxruntime.
    """

    def __init__(self, spec: HeadSpec, shape, classifier_state: dict):
        super().__init__()
        self.mode = spec.pool
        self.classifier = ExitHead(spec).classifier
        self.classifier.load_state_dict(classifier_state)
        self.pool = StridedPool(spec.pool, shape)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        return self.pool(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(h).float())


# ----- exporting one module -------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _operator_of(e: BaseException) -> Optional[str]:
    """The operator an exporter error is about, e.g. 'aten::cummax', if it names one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    for pat in (r"operator '(\w+::\w+)'", r"op='(\w+)\.(\w+)'", r"ONNX export of operator (\w+)",
                r"\b(\w+::\w+)", r"torch\.ops\.(\w+)\.(\w+)"):
        m = re.search(pat, text)
        if m:
            op = "::".join(m.groups())
            return op if "::" in op else "aten::" + op
    return None


@contextlib.contextmanager
def _fds_silenced(fds=(1, 2)):
    """Point file descriptors 1 and 2 at a scratch file: the TorchScript exporter's C++ log.

    (torch 2.14's ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled`` rather
    than its result, so its log is always on, and it prints the whole graph on a failed export.)
    """
    saved = {}
    try:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        for fd in fds:
            saved[fd] = os.dup(fd)
    except (OSError, ValueError, AttributeError):
        for fd in saved.values():
            os.close(fd)
        saved = {}
    if not saved:
        yield
        return
    try:
        with tempfile.TemporaryFile() as scratch:
            for fd in saved:
                os.dup2(scratch.fileno(), fd)
            try:
                yield
            finally:
                for fd, dup in saved.items():
                    os.dup2(dup, fd)
    finally:
        for dup in saved.values():
            os.close(dup)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' warnings, progress prints, log lines and C++ log."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export",
                                              "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    get_log = getattr(torch._C, "_jit_is_onnx_log_enabled", None)
    set_log = getattr(torch._C, "_jit_set_onnx_log_enabled", None)
    log_was = get_log() if get_log else None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), _fds_silenced():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if set_log and log_was is not None:
            set_log(log_was)  # the TorchScript exporter leaves its log switched on


def _legacy_max_opset() -> int:
    """The highest opset the TorchScript-based exporter handles; 0 where this torch lacks it."""
    try:
        import torch.onnx.utils  # noqa: F401  (the TorchScript-based exporter)
        from torch.onnx import _constants
        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 0


def _max_opset(onnx) -> int:
    """The highest opset both torch's exporters and the installed onnx know."""
    try:
        from torch.onnx import _constants
        return min(int(_constants.ONNX_MAX_OPSET), onnx.defs.onnx_opset_version())
    except (ImportError, AttributeError):
        return min(DEFAULT_OPSET, onnx.defs.onnx_opset_version())


def _export_torchscript(module, example, opset):
    onnx = _import_onnx()
    f = io.BytesIO()
    with _quiet():
        torch.onnx.export(module, (example,), f, input_names=["x"], output_names=["y"],
                          opset_version=opset, dynamo=False, do_constant_folding=True,
                          dynamic_axes={"x": {0: BATCH}, "y": {0: BATCH}})
    return onnx.load_from_string(f.getvalue())


def _export_dynamo(module, example, opset):
    """The torch.export-based exporter; a ScriptModule is converted to an ExportedProgram first."""
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter is built on it)
    except ImportError as e:
        raise ExportError(f"the dynamo exporter needs the 'onnxscript' package ({e}); install it "
                          f"with pip install onnxscript, or use --exporter torchscript") from None
    if isinstance(module, torch.jit.ScriptModule):
        try:
            from torch._export.converter import TS2EPConverter
        except ImportError:
            raise ExportError("this torch has no TorchScript-to-ExportedProgram converter; use "
                              "--exporter torchscript") from None
        with _quiet():
            module = TS2EPConverter(module, (example,)).convert().module()
    with _quiet():
        prog = torch.onnx.export(module, (example,), input_names=["x"], output_names=["y"],
                                 opset_version=opset, dynamo=True, external_data=False,
                                 dynamic_shapes=({0: torch.export.Dim(BATCH)},), verbose=False)
    return prog.model_proto


def _fixed_batch(model, module, example: torch.Tensor) -> Optional[str]:
    """Why ``model`` (an exported part) fails at another batch size than the example's, or None.

    Given a scripted module, the dynamo exporter converts it to a program first and can fix the
    example's batch into a reshape: the model then loads and fails (or answers wrongly) on any
    other batch. Run it once at batch + 1 in onnxruntime; unchecked where that is not installed
    (or the part is past 2 GiB).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if model.ByteSize() >= 2 ** 31:   # a protobuf past 2 GiB cannot be loaded from memory
        return None
    x = torch.cat([example, example[:1]])
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    except Exception as e:  # onnxruntime raises its own types; the first line says enough
        return _first_line(e)[:160]
    with torch.no_grad():
        want = module(x)
    if tuple(got.shape) != tuple(want.shape) or \
            not np.allclose(got, want.numpy(), atol=1e-3, rtol=1e-3):
        return f"at batch {x.shape[0]} its output differs from the artifact's"
    return None


def export_module(module, example: torch.Tensor, what: str, opset: int, exporter: str = "auto"):
    """One tensor -> tensor module as an ONNX model (input 'x', output 'y', dynamic batch).

    Returns (model, exporter used). A dynamo export must also run at another batch size
    (``_fixed_batch``). Failures become one-line ExportErrors naming ``what`` and, where the
    exporter says, the operator.
    """
    tries = {"auto": ["torchscript", "dynamo"], "torchscript": ["torchscript"],
             "dynamo": ["dynamo"]}[exporter]
    if exporter == "auto" and opset > _legacy_max_opset():
        tries = ["dynamo"]
    first = None
    for name in tries:
        try:
            fn = _export_torchscript if name == "torchscript" else _export_dynamo
            model = fn(module, example, opset)
        except Exception as e:  # the exporters raise many types; all are reported the same way
            first = first or e
            continue
        why = _fixed_batch(model, module, example) if name == "dynamo" else None
        if why is None:
            return model, name
        first = first or ExportError(
            f"cannot export {what} to ONNX opset {opset}: the exported graph runs only at the "
            f"example's batch size ({why}) (the artifact itself still runs in TorchScript)")
    if isinstance(first, ExportError):
        raise first
    op, line = _operator_of(first), _first_line(first)
    if len(line) > 240:
        line = line[:237] + "..."
    unsupported = ("is not supported", "No ONNX function found", "No decompositions registered")
    if op and any(u in str(first) for u in unsupported):
        raise ExportError(f"cannot export {what} to ONNX opset {opset}: operator {op} is not "
                          f"supported by the ONNX exporter (the artifact itself still runs in "
                          f"TorchScript)")
    if op:
        raise ExportError(f"cannot export {what} to ONNX opset {opset}: operator {op}: {line}")
    raise ExportError(f"cannot export {what} to ONNX opset {opset}: {line}")


# ----- composing the graph --------------------------------------------------------------------
class _Composer:
    """Builds the exits graph; names are unique across the main graph and all If branches."""

    def __init__(self, opset: int):
        self.onnx = _import_onnx()
        self.opset = opset
        self.initializers = []
        self.functions = []
        self.opsets = {"": opset}
        self.ir_version = 8
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def node(self, nodes: list, op: str, inputs, hint=None, n_out=1, **attrs):
        outs = [self.name(hint or op.lower()) for _ in range(n_out)]
        nodes.append(self.onnx.helper.make_node(op, list(inputs), outs, name=self.name(op),
                                                **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype, hint="const") -> str:
        import numpy as np
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.array(value, dtype=dtype),
                                                                   name))
        return name

    def inline(self, nodes: list, model, prefix: str, src: str, hint: str) -> str:
        """Add ``model``'s nodes to ``nodes`` reading ``src``; returns the output's name.

        Initializers and functions go to the main graph (If branches read outer-scope names).
        """
        return self.inline_many(nodes, model, prefix, [src], hint, outputs=1)[0]

    def inline_many(self, nodes: list, model, prefix: str, srcs, hint: str,
                    outputs: Optional[int] = None,
                    initializers: Optional[list] = None) -> List[str]:
        """``inline`` for a model of several inputs and outputs; returns the outputs' names, in
        order (``outputs``: how many it must have; None: any). ``srcs``: the values fed to its
        inputs, in order (a list), or by input name (a dict; inputs the exporter dropped as
        unused are simply not fed). ``initializers``: the list of the (branch) graph that
        ``nodes`` belong to, to hold the model's weights there; None: the main graph's.
        (onnxruntime hands an If branch every outer-scope value it reads on each call, so weights
        kept in the branch that reads them make deep branches cheap.)"""
        helper = self.onnx.helper
        model = self.onnx.compose.add_prefix(model, prefix)
        g = model.graph
        inits = {i.name for i in g.initializer}
        inputs = [i.name for i in g.input if i.name not in inits]
        if isinstance(srcs, dict):
            missing = [i[len(prefix):] for i in inputs if i[len(prefix):] not in srcs]
            if missing:
                raise ExportError(f"{hint}: its inputs {missing} are not among {list(srcs)}")
            srcs = [srcs[i[len(prefix):]] for i in inputs]
        if len(inputs) != len(srcs) or (outputs is not None and len(g.output) != outputs):
            raise ExportError(f"{hint}: expected an exported module with {len(srcs)} input(s) "
                              f"and {outputs or 'some'} output(s), got {len(inputs)} and "
                              f"{len(g.output)}")
        (self.initializers if initializers is None else initializers).extend(g.initializer)
        for f in model.functions:
            self.functions.append(f)
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx"):
                if op.version != self.opset:
                    raise ExportError(f"{hint} was exported at opset {op.version}, not "
                                      f"{self.opset}")
                continue
            self.opsets[op.domain] = max(self.opsets.get(op.domain, 0), op.version)
        self.ir_version = max(self.ir_version, model.ir_version)
        for src, name in zip(srcs, inputs):
            nodes.append(helper.make_node("Identity", [src], [name], name=self.name("Identity")))
        nodes.extend(g.node)
        outs = []
        for o in g.output:
            outs.append(self.name(hint))
            nodes.append(helper.make_node("Identity", [o.name], [outs[-1]],
                                          name=self.name("Identity")))
        return outs

    def reduce_max(self, nodes, x, axis, hint):
        if self.opset >= 18:
            return self.node(nodes, "ReduceMax", [x, self.const([axis], "int64", "axes")], hint,
                             keepdims=0)
        return self.node(nodes, "ReduceMax", [x], hint, axes=[axis], keepdims=0)


def confidence_nodes(c: _Composer, nodes: list, logits: str, hint: str) -> str:
    """``exit_rule.confidence`` as ONNX nodes: ReduceMax(Softmax(logits, axis=1), axis=1), [n]."""
    prob = c.node(nodes, "Softmax", [logits], f"{hint}_prob", axis=1)
    return c.reduce_max(nodes, prob, 1, f"{hint}_conf")


def _compose(stages: List, heads: dict, thresholds: dict, num_classes: int, manifest: dict,
             opset: int, out_elem_type: int, one_row: bool = False):
    """The full ONNX model from exported stages (n exits + final) and enabled heads {i: model}.

    ``one_row``: a model for batches of exactly one row (the runtime's batch-1 path): after an
    enabled exit one If on that row's decision, with no index bookkeeping (Compress, ScatterND),
    which a row that misses every exit would otherwise pay at each exit."""
    c = _Composer(opset)
    onnx, helper = c.onnx, c.onnx.helper
    TP = onnx.TensorProto
    n_exits = len(stages) - 1
    enabled = sorted(heads)
    main = []

    def run_stages(nodes, inits, h, start, stop):
        for s in range(start, stop + 1):
            h = c.inline_many(nodes, stages[s], f"stage{s}/", [h], f"stage{s}_out", outputs=1,
                              initializers=inits)[0]
        return h

    def branch(name, body, out, exit_of, weights=()):
        """An If branch: its nodes, its outputs (logits, exit index) and its own weights."""
        return helper.make_graph(body, c.name(name), [],
                                 [helper.make_tensor_value_info(out, TP.FLOAT, None),
                                  helper.make_tensor_value_info(exit_of, TP.INT64, None)],
                                 initializer=list(weights))

    def to_float(nodes, y):
        return y if out_elem_type == TP.FLOAT else c.node(nodes, "Cast", [y], "final_logits",
                                                          to=TP.FLOAT)

    shape1 = c.node(main, "Shape", [INPUT], "batch_size", start=0, end=1)        # [N]
    if not enabled:
        y = run_stages(main, c.initializers, INPUT, 0, n_exits)
        main.append(helper.make_node("Identity", [y], [LOGITS], name=c.name("Identity")))
        main.append(helper.make_node("ConstantOfShape", [shape1], [EXIT_INDEX],
                                     name=c.name("ConstantOfShape"),
                                     value=helper.make_tensor("v", TP.INT64, [1], [n_exits])))
        logits_type = out_elem_type
    elif one_row:
        def segment1(nodes, inits, h, start):
            """Stages from ``start`` on for one row; returns (logits, exit_index) made inside
            ``nodes`` (a branch's outputs must be)."""
            nxt = next((e for e in enabled if e >= start), None)
            if nxt is None:
                y = to_float(nodes, run_stages(nodes, inits, h, start, n_exits))
                return y, c.node(nodes, "Constant", [], "exit_of",
                                 value=helper.make_tensor(c.name("v"), TP.INT64, [1], [n_exits]))
            h = run_stages(nodes, inits, h, start, nxt)
            logits = c.inline_many(nodes, heads[nxt], f"head{nxt}/", [h], f"head{nxt}_logits",
                                   outputs=1, initializers=inits)[0]
            take = c.node(nodes, "GreaterOrEqual",
                          [confidence_nodes(c, nodes, logits, f"head{nxt}"),
                           c.const([thresholds[nxt]], "float32", f"threshold{nxt}")],
                          f"exit{nxt}_take")
            then_nodes = [helper.make_node("Identity", [logits], [c.name("out")],
                                           name=c.name("Id"))]
            t_ex = c.node(then_nodes, "Constant", [], "exit_of",
                          value=helper.make_tensor(c.name("v"), TP.INT64, [1], [nxt]))
            else_nodes, else_inits = [], []
            e_out, e_ex = segment1(else_nodes, else_inits, h, nxt + 1)

            return c.node(nodes, "If", [take], "rest", n_out=2,
                          then_branch=branch(f"after_exit{nxt}_leaves", then_nodes,
                                             then_nodes[0].output[0], t_ex),
                          else_branch=branch(f"after_exit{nxt}_goes_on", else_nodes, e_out,
                                             e_ex, else_inits))

        f_out, f_ex = segment1(main, c.initializers, INPUT, 0)
        main.append(helper.make_node("Identity", [f_out], [LOGITS], name=c.name("Identity")))
        main.append(helper.make_node("Identity", [f_ex], [EXIT_INDEX], name=c.name("Identity")))
        logits_type = TP.FLOAT
    else:
        n_scalar = c.node(main, "Squeeze", [shape1, c.const([0], "int64", "axes")], "n")
        idx = c.node(main, "Range", [c.const(0, "int64", "zero"), n_scalar,
                                     c.const(1, "int64", "one")], "row_index")
        out_shape = c.node(main, "Concat", [shape1, c.const([num_classes], "int64", "k")],
                           "out_shape", axis=0)
        out = c.node(main, "ConstantOfShape", [out_shape], "out",
                     value=helper.make_tensor("v", TP.FLOAT, [1], [0.0]))
        ex = c.node(main, "ConstantOfShape", [shape1], "exit_of",
                    value=helper.make_tensor("v", TP.INT64, [1], [n_exits]))

        def segment(nodes, inits, h, idx, out, ex, start):
            """Stages from ``start`` on, with the exits among them, their weights in ``inits``
            (the branch's own: see ``_Composer.inline_many``); returns (out, exit_index)."""
            nxt = next((e for e in enabled if e >= start), None)
            if nxt is None:
                y = to_float(nodes, run_stages(nodes, inits, h, start, n_exits))
                rows = c.node(nodes, "Unsqueeze", [idx, c.const([1], "int64", "axes")], "rows")
                # a branch's outputs must be made inside it: ex comes from the outer scope
                return (c.node(nodes, "ScatterND", [out, rows, y], "out"),
                        c.node(nodes, "Identity", [ex], "exit_of"))
            h = run_stages(nodes, inits, h, start, nxt)
            logits = c.inline_many(nodes, heads[nxt], f"head{nxt}/", [h], f"head{nxt}_logits",
                                   outputs=1, initializers=inits)[0]
            conf = confidence_nodes(c, nodes, logits, f"head{nxt}")
            take = c.node(nodes, "GreaterOrEqual",
                          [conf, c.const(thresholds[nxt], "float32", f"threshold{nxt}")],
                          f"exit{nxt}_take")
            taken = c.node(nodes, "Compress", [idx, take], f"exit{nxt}_rows", axis=0)
            rows = c.node(nodes, "Unsqueeze", [taken, c.const([1], "int64", "axes")], "rows")
            out = c.node(nodes, "ScatterND",
                         [out, rows, c.node(nodes, "Compress", [logits, take], "taken", axis=0)],
                         "out")
            fill = c.node(nodes, "Expand", [c.const(nxt, "int64", f"exit{nxt}"),
                                            c.node(nodes, "Shape", [taken], "n_taken")], "fill")
            ex = c.node(nodes, "ScatterND", [ex, rows, fill], "exit_of")
            keep = c.node(nodes, "Not", [take], f"exit{nxt}_keep")
            h = c.node(nodes, "Compress", [h, keep], f"exit{nxt}_h", axis=0)
            idx = c.node(nodes, "Compress", [idx, keep], "row_index", axis=0)
            left = c.node(nodes, "Greater", [c.node(nodes, "Size", [idx], "rows_left"),
                                             c.const(0, "int64", "zero")], "any_left")
            then_nodes, then_inits = [], []
            t_out, t_ex = segment(then_nodes, then_inits, h, idx, out, ex, nxt + 1)
            else_nodes = [helper.make_node("Identity", [out], [c.name("out")], name=c.name("Id")),
                          helper.make_node("Identity", [ex], [c.name("exit_of")],
                                           name=c.name("Id"))]
            e_out, e_ex = else_nodes[0].output[0], else_nodes[1].output[0]

            return c.node(nodes, "If", [left], "rest", n_out=2,
                          then_branch=branch(f"after_exit{nxt}_rows_left", then_nodes, t_out,
                                             t_ex, then_inits),
                          else_branch=branch(f"after_exit{nxt}_none_left", else_nodes, e_out,
                                             e_ex))

        f_out, f_ex = segment(main, c.initializers, INPUT, idx, out, ex, 0)
        main.append(helper.make_node("Identity", [f_out], [LOGITS], name=c.name("Identity")))
        main.append(helper.make_node("Identity", [f_ex], [EXIT_INDEX], name=c.name("Identity")))
        logits_type = TP.FLOAT

    rows = 1 if one_row else BATCH
    graph = helper.make_graph(
        main, "layer_cache_exits",
        [helper.make_tensor_value_info(INPUT, TP.FLOAT,
                                       [rows] + list(manifest["input_shape"][1:]))],
        [helper.make_tensor_value_info(LOGITS, logits_type, [rows, num_classes]),
         helper.make_tensor_value_info(EXIT_INDEX, TP.INT64, [rows])],
        initializer=c.initializers)
    model = helper.make_model(graph, producer_name=PRODUCER, ir_version=c.ir_version,
                              opset_imports=[helper.make_opsetid(d, v)
                                             for d, v in sorted(c.opsets.items())],
                              functions=c.functions)
    return model


# ----- the library entry ----------------------------------------------------------------------
def export_onnx(artifact_path: str, onnx_path: str, opset: int = DEFAULT_OPSET,
                exporter: str = "auto", one_row: bool = False) -> dict:
    """Export an artifact with its enabled exits to ``onnx_path``; returns a summary dict.

    ``one_row``: a model for batches of exactly one row (``_compose``), faster at batch 1,
    above all for rows that miss every exit. (Detection artifacts always take one frame.)

    Raises ArtifactError for a missing/corrupt artifact and ExportError when a part cannot be
    exported (the message names the part and, where known, the operator).
    """
    onnx = _import_onnx()
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter '{exporter}'; use one of {', '.join(EXPORTERS)}")
    top = _max_opset(onnx)
    if not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset} is not supported; use {MIN_OPSET} to {top} "
                          f"(default {DEFAULT_OPSET})")
    onnx_path = os.fspath(onnx_path)
    _check_output(os.fspath(artifact_path), onnx_path)
    if artifact.read_manifest(artifact_path).get("task") == "detection":
        from . import detection_onnx
        model, summary = detection_onnx.build(os.fspath(artifact_path), opset)
        _write(model, onnx_path)
        return dict(summary, path=onnx_path, bytes=os.path.getsize(onnx_path))
    # artifact.load checks the file's content hash, its manifest (compiler.manifest) and the
    # model against it: every manifest field read below is there and agrees with the model.
    module, manifest = artifact.load(artifact_path, map_location="cpu")
    if manifest.get("input_dtype", "float32") != "float32":
        raise ExportError(f"the artifact takes {manifest['input_dtype']} input; ONNX export "
                          f"handles float32 models only")
    exits = manifest["exits"]
    n = len(exits)
    try:
        blocks = [getattr(module.blocks, str(i)) for i in range(n)]
        final = module.final
    except AttributeError as e:
        raise ExportError(f"artifact '{artifact_path}' does not hold the staged model its manifest "
                          f"describes ({e})") from None
    names = [e.get("name", f"exit{i}") for i, e in enumerate(exits)]
    where = [f"stage {i} (up to exit {i} '{names[i]}')" for i in range(n)] + \
            [f"the final stage (after exit {n - 1} '{names[-1]}')" if n else "the model"]
    enabled = [i for i, b in enumerate(blocks) if bool(b.enabled)]
    thresholds = {i: float(blocks[i].threshold) for i in enabled}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((EXAMPLE_BATCH,) + tuple(manifest["input_shape"][1:]), generator=gen)
    stage_models, heads, used = [], {}, set()
    with torch.no_grad():
        h = x
        for i, st in enumerate([b.stage for b in blocks] + [final]):
            m, how = export_module(st, h, where[i], opset, exporter)
            stage_models.append(m)
            used.add(how)
            h = st(h)
            if i in thresholds:
                spec = HeadSpec(**{k: exits[i]["head"][k] for k in
                                   ("pool", "feature_dim", "hidden", "num_classes")})
                state = {k: v.detach().cpu() for k, v in
                         blocks[i].head.classifier.state_dict().items()}
                eager = ExportHead(spec, tuple(h.shape), state).eval()
                want, got = blocks[i].head(h), eager(h)
                if got.shape != want.shape or not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                    diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
                    raise ExportError(f"exit {i} '{names[i]}': the head's eager stand-in differs "
                                      f"from the artifact's ({diff}); report this artifact")
                heads[i], how = export_module(eager, h, f"the head of exit {i} '{names[i]}'",
                                              opset, exporter)
                used.add(how)
    num_classes = int(manifest["num_classes"])
    final_type = stage_models[-1].graph.output[0].type.tensor_type.elem_type
    model = _compose(stage_models, heads, thresholds, num_classes, manifest, opset, final_type,
                     one_row)
    model.doc_string = ("layer-cache artifact with early exits; outputs: logits [batch, classes], "
                        "exit_index [batch] (int64, the exit a row left at; "
                        f"{n} = ran the whole model)")
    meta = {
        "opset": str(opset),
        "layer_cache.num_exits": str(n),
        "layer_cache.enabled_exits": json.dumps(enabled),
        "layer_cache.exit_names": json.dumps(names),
        "layer_cache.thresholds": json.dumps({str(i): t for i, t in thresholds.items()}),
        "layer_cache.exit_index_meaning": f"0..{n - 1}: exit; {n}: whole model",
        "layer_cache.source_sha256": str(manifest.get("source_sha256")),
        "layer_cache.exporter": ",".join(sorted(used)),
        "layer_cache.batch": "1" if one_row else "dynamic",
        "torch_version": torch.__version__,
    }
    onnx.helper.set_model_props(model, meta)

    external = _write(model, onnx_path)
    return {"path": onnx_path, "opset": opset, "bytes": os.path.getsize(onnx_path),
            "num_exits": n, "enabled_exits": enabled, "exit_names": names,
            "thresholds": [thresholds[i] for i in enabled], "num_classes": num_classes,
            "input_shape": [1 if one_row else BATCH] + list(manifest["input_shape"][1:]),
            "one_row": one_row,
            "exporter": sorted(used), "external_data": external,
            "nodes": len(model.graph.node), "inputs": [INPUT], "outputs": [LOGITS, EXIT_INDEX],
            "notice": None if enabled else
            f"no exit of '{artifact_path}' is enabled; exported the plain backbone (exit_index is "
            f"{n} for every row); learn exits with the runtime first to get early exits"}


def _write(model, onnx_path: str) -> bool:
    """Write ``model`` beside the target (a locked temp file, see artifact.temp_beside), check
    the written file (the checker takes a path past 2 GiB), then move it into place: a failed
    export leaves no file and an older one whole. Returns whether weights went to a .data file."""
    onnx = _import_onnx()
    external = model.ByteSize() > 1_800_000_000  # protobuf's 2 GiB limit
    with artifact.temp_beside(onnx_path, ".onnx", "the ONNX model") as tmp:
        try:
            if external:
                onnx.save(model, tmp, save_as_external_data=True,
                          location=os.path.basename(onnx_path) + ".data")
            else:
                onnx.save(model, tmp)
        except (OSError, ValueError) as e:
            raise ArtifactWriteError(f"cannot save the ONNX model to '{onnx_path}': "
                                     f"{getattr(e, 'strerror', None) or first_line(e)}") from None
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except Exception as e:
            raise ExportError(f"the composed ONNX model fails the ONNX checker: "
                              f"{_first_line(e)}; report this artifact") from None
        try:
            os.replace(tmp, onnx_path)
        except OSError as e:
            raise ArtifactWriteError(f"cannot save the ONNX model to '{onnx_path}': "
                                     f"{e.strerror or first_line(e)}") from None
    return external


MAX_CHECK_ROWS = 100_000


def _check_output(artifact_path: str, onnx_path: str):
    """The ONNX path is a file path in an existing folder, and not the artifact itself."""
    if os.path.isdir(onnx_path):
        raise UsageError(f"-o/--output '{onnx_path}' is a directory; give a file path such as "
                         f"{os.path.join(onnx_path, 'model.onnx')}")
    folder = os.path.dirname(os.path.abspath(onnx_path))
    if not os.path.isdir(folder):
        raise UsageError(f"-o/--output '{onnx_path}': folder '{folder}' does not exist; create it "
                         f"first")
    if os.path.abspath(onnx_path) == os.path.abspath(artifact_path) or (
            os.path.exists(onnx_path) and os.path.exists(artifact_path)
            and os.path.samefile(onnx_path, artifact_path)):
        raise UsageError(f"-o/--output '{onnx_path}' is the artifact itself; writing there would "
                         f"overwrite it; give another path, e.g. a .onnx file")


def check_onnx(artifact_path: str, onnx_path: str, rows: int = 64, seed: int = 0,
               batch: Optional[int] = None) -> dict:
    """Run ``rows`` random rows through onnxruntime and the artifact; compare logits and exits."""
    if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= MAX_CHECK_ROWS:
        raise UsageError(f"--check {rows!r} is out of range; give 0 to {MAX_CHECK_ROWS} rows")
    ort = _import_ort()
    module, manifest = artifact.load(artifact_path, map_location="cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((rows,) + tuple(manifest["input_shape"][1:]), generator=g)
    sess = ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want, want_exit = module.forward_with_exits(x)
    if sess.get_inputs()[0].shape[0] == 1:   # a --one-row model: the rows one at a time
        runs = [sess.run([LOGITS, EXIT_INDEX], {INPUT: x[r:r + 1].numpy()}) for r in range(rows)]
        got = np.concatenate([a for a, _ in runs]) if rows else np.zeros((0, want.shape[1]),
                                                                         np.float32)
        got_exit = np.concatenate([b for _, b in runs]) if rows else np.zeros(0, np.int64)
    else:
        got, got_exit = sess.run([LOGITS, EXIT_INDEX], {INPUT: x.numpy()})
    got, got_exit = torch.from_numpy(got), torch.from_numpy(got_exit)
    same = got_exit == want_exit
    diff = (got[same] - want[same]).abs().max().item() if bool(same.any()) else 0.0
    return {"rows": rows, "exit_agreement": same.float().mean().item() if rows else 1.0,
            "argmax_agreement": (got.argmax(1) == want.argmax(1)).float().mean().item()
            if rows else 1.0, "max_logit_diff": diff,
            "exits_onnx": torch.bincount(got_exit, minlength=len(manifest["exits"]) + 1).tolist(),
            "exits_torch": torch.bincount(want_exit,
                                          minlength=len(manifest["exits"]) + 1).tolist()}


# ----- CLI ------------------------------------------------------------------------------------
def build_parser():
    p = ArgumentParser(prog="python -m compiler.export",
                                description="Export an artifact with its enabled exits as one ONNX "
                                            "model: dynamic batch, outputs logits and exit_index "
                                            "(int64). See docs/onnx.md.")
    p.add_argument("artifact", help="artifact from python -m compiler.rewrite (or a runtime save)")
    p.add_argument("-o", "--output", help="ONNX path (default: <artifact stem>.onnx)")
    p.add_argument("--opset", type=number(int), default=DEFAULT_OPSET,
                   help=f"ONNX (ai.onnx) opset to target (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="torch exporter for stages and heads: torchscript (the TorchScript-based "
                        "one), dynamo (torch.export-based) or auto (torchscript, dynamo if it fails)")
    p.add_argument("--one-row", action="store_true",
                   help="a model for batches of exactly one row: one If per exit on the row's "
                        "decision, no batch bookkeeping; faster at batch 1, above all for rows "
                        "that miss every exit")
    p.add_argument("--check", type=number(int, 0, MAX_CHECK_ROWS), default=0, metavar="N",
                   help=f"compare onnxruntime with the artifact on N random rows (0 to "
                        f"{MAX_CHECK_ROWS}; 0: no check)")
    return p


def main(argv=None) -> int:
    """The CLI: 0 on success, 1 when --check finds a mismatch, 2 with one ``error: ...`` line
    on stderr for any bad input."""
    return run_cli(_main, argv, "try a smaller --check")


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    out = args.output or os.path.splitext(args.artifact)[0] + ".onnx"
    summary = export_onnx(args.artifact, out, args.opset, args.exporter, args.one_row)
    n = summary["num_exits"]
    if not summary["enabled_exits"]:
        print(f"notice: {summary['notice']}", file=sys.stderr)
        exits = "no exits (plain backbone)"
    else:
        exits = ", ".join(f"{i} '{summary['exit_names'][i]}' >= {t:.4g}"
                          for i, t in zip(summary["enabled_exits"], summary["thresholds"]))
        exits = f"{len(summary['enabled_exits'])} of {n} exits enabled: {exits}"
    if summary.get("task") == "detection":
        print(f"wrote {out}: ONNX opset {summary['opset']}, {summary['bytes'] / 1024:.1f} KiB, "
              f"{exits}; one frame per call: input {summary['inputs'][0]} "
              f"{summary['input_shape']}, outputs {', '.join(summary['outputs'])} "
              f"({n} = whole detector)")
        return _check_detection(args.artifact, out, args.check) if args.check > 0 else 0
    rows = summary["input_shape"][0]
    print(f"wrote {out}: ONNX opset {summary['opset']}, {summary['bytes'] / 1024:.1f} KiB, "
          f"{exits}; inputs {INPUT} {summary['input_shape']}, outputs {LOGITS} "
          f"[{rows}, {summary['num_classes']}], {EXIT_INDEX} [{rows}] int64 "
          f"({n} = whole model); exporter {'+'.join(summary['exporter'])}")
    if args.check > 0:
        r = check_onnx(args.artifact, out, args.check)
        ok = r["exit_agreement"] == 1.0 and r["max_logit_diff"] <= 1e-3
        print(f"check on {r['rows']} random rows: max logit diff {r['max_logit_diff']:.3g}, "
              f"exit agreement {r['exit_agreement']:.2%}, argmax agreement "
              f"{r['argmax_agreement']:.2%}, rows per exit onnx {r['exits_onnx']} torch "
              f"{r['exits_torch']}{'' if ok else '  MISMATCH'}")
        if not ok:
            print("error: the ONNX model does not match the artifact; report this artifact",
                  file=sys.stderr)
            return 1
    return 0


def _check_detection(artifact_path: str, onnx_path: str, frames: int) -> int:
    from . import detection_onnx
    r = detection_onnx.check(artifact_path, onnx_path, frames)
    ok = r["exit_agreement"] == 1.0 and r["answer_agreement"] == 1.0
    print(f"check on {r['frames']} random frames: same exit {r['exit_agreement']:.2%}, same "
          f"answer {r['answer_agreement']:.2%}{'' if ok else '  MISMATCH'}")
    if not ok:
        print("error: the ONNX model does not match the artifact; report this artifact",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
