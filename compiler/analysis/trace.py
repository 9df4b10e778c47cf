"""Turn a model into a clean torch.fx GraphModule and annotate every node with shape, bytes and FLOPs.

The annotation lives under ``node.meta[META]`` as a :class:`NodeInfo`; read it with :func:`info`.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.fx as fx

from ..errors import ShapeError, TraceFailure
from .flops import FlopCounter

META = "layer_cache"

# Modules torch.fx cannot trace through (data-dependent Python control flow inside); they stay
# as opaque calls in the graph. Extend per model with RewriteConfig.leaf_modules / --leaf-module.
DEFAULT_LEAF_MODULES = (torch.nn.MultiheadAttention,)


@dataclass
class NodeInfo:
    """What the example input made of one node."""

    is_tensor: bool
    shape: Optional[tuple] = None
    dtype: Optional[str] = None
    bytes: int = 0
    flops: int = 0
    unsupported: Counter = field(default_factory=Counter)


def info(node: fx.Node) -> NodeInfo:
    """The analysis result of ``node``; annotate() must have run."""
    return node.meta[META]


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple, leaf_names: Sequence[str]):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = set(leaf_names)

    def is_leaf_module(self, m, qualname):
        return (isinstance(m, self.leaf_types) or qualname in self.leaf_names
                or type(m).__name__ in self.leaf_names or super().is_leaf_module(m, qualname))


def trace_module(model: torch.nn.Module, leaf_modules: Sequence[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; ``leaf_modules`` names (qualified names or class names) are not traced into."""
    tracer = _LeafTracer(DEFAULT_LEAF_MODULES, leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
        where = ""
        stack = getattr(tracer, "module_stack", None)
        if stack:
            where = f" inside module '{list(stack.keys())[-1]}'"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TraceFailure(
            f"torch.fx cannot trace the model{where}: {msg}. Mark the untraceable submodule as a "
            f"leaf with --leaf-module NAME (class or qualified name), or export it with "
            f"torch.export and pass the .pt2 file") from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def clean_exported(gm: fx.GraphModule) -> fx.GraphModule:
    """Make ``ExportedProgram.module()`` a plain GraphModule: no guards, asserts or pytree codegen.

    The guards pin the batch size the program was exported with; cut stages must accept any.
    """
    graph = gm.graph
    _unflatten_as_reshape(graph)
    _reread_sizes(graph)
    for node in list(graph.nodes):
        drop = (node.op == "call_module" and str(node.target).startswith("_guards"))
        drop |= node.op == "call_function" and "_assert" in str(node.target)
        if drop and not node.users:
            graph.erase_node(node)
        elif node.target is torch.ops.aten.sym_size.int:
            # the same size as a plain int: TorchScript's aten::size, which ONNX exports (it
            # has no aten::sym_size, and the other exporter would bake the example's batch)
            node.target = torch.ops.aten.size
        elif isinstance(node.target, torch._ops.OpOverload):
            # TorchScript cannot script `torch.ops.aten.x.default`, only the packet; tracing
            # instead would bake symbolic sizes (the batch) into reshapes.
            node.target = node.target.overloadpacket
    out = next(n for n in graph.nodes if n.op == "output")
    if isinstance(out.args[0], (tuple, list)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)
    graph._codegen = fx.graph.CodeGen()
    graph.eliminate_dead_code()
    new = fx.GraphModule(gm, graph, "ExportedModel")
    for p in new.parameters():
        p.requires_grad_(False)
    return new


def _unflatten_as_reshape(graph: fx.Graph):
    """``unflatten(x, dim, sizes)`` as a reshape to its full shape (symbolic sizes read from
    ``x``): the TorchScript ONNX exporter loses the rank of an unflatten's output, and the
    transpose after it (in every decomposed ``nn.MultiheadAttention``) then fails to export."""
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not torch.ops.aten.unflatten.int:
            continue
        x, dim, sizes = n.args
        v = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(v, torch.Tensor) or not all(isinstance(k, int) for k in sizes):
            continue
        dim = dim % v.dim()
        shape = []
        with graph.inserting_before(n):
            for d, size in enumerate(v.shape):
                if d == dim:
                    shape += list(sizes)
                elif isinstance(size, torch.SymInt):
                    read = graph.call_function(torch.ops.aten.sym_size.int, (x, d))
                    read.meta["val"] = size
                    shape.append(read)
                else:
                    shape.append(int(size))
            flat = graph.call_function(torch.ops.aten.reshape.default, (x, shape))
        flat.meta = dict(n.meta)
        n.replace_all_uses_with(flat)
        graph.erase_node(n)


def _reread_sizes(graph: fx.Graph):
    """Compute each symbolic size right before each of its uses, reading it from the nearest
    earlier tensor that has it in its shape.

    torch.export reads the batch size once, from the input (``sym_size(x, 0)``), and shares it
    and sizes derived from it (``4 * batch``) with every later reshape: values live across the
    whole graph, so no single tensor cuts the model (a ViT got one cut point, at 89%). Sunk
    to their uses, each stage computes them from its own activations. Needs the program's
    symbolic shapes (``meta["val"]``); without them the graph is left as it is.
    """
    for n in reversed(list(graph.nodes)):   # users first: a size's copies then sit by their users
        if n.op != "call_function" or not isinstance(n.meta.get("val"), torch.SymInt):
            continue
        if n.target is torch.ops.aten.sym_size.int:
            expr = n.meta["val"].node.expr
            for u in list(n.users):
                src = _nearest_with_size(u, expr)
                if src is None:
                    continue
                with graph.inserting_before(u):
                    local = graph.call_function(torch.ops.aten.sym_size.int, src)
                local.meta = dict(n.meta)
                u.replace_input_with(n, local)
        elif all(isinstance(a.meta.get("val"), torch.SymInt) for a in n.all_input_nodes):
            for u in list(n.users):   # arithmetic on sizes only: one copy per use
                with graph.inserting_before(u):
                    local = graph.node_copy(n)
                u.replace_input_with(n, local)
        if not n.users:
            graph.erase_node(n)


def _nearest_with_size(node: fx.Node, expr):
    """(tensor node, dim): the latest node before ``node`` whose shape has size ``expr``."""
    p = node.prev
    while p.op != "root":
        v = p.meta.get("val")
        if p.op != "get_attr" and isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == expr:
                    return p, d
        p = p.prev
    return None


class Annotator(fx.Interpreter):
    """Runs the graph on a real example input and records NodeInfo per node (never edits the graph)."""

    hint = "Check --input-shape"

    def run_node(self, n):
        counter = FlopCounter()
        try:
            with counter:
                out = super().run_node(n)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ShapeError(f"node '{n.name}' ({n.op} {getattr(n.target, '__name__', n.target)}) "
                             f"failed on the example input: {msg}. {self.hint}") from None
        if isinstance(out, torch.Tensor):
            n.meta[META] = NodeInfo(True, tuple(out.shape), str(out.dtype).replace("torch.", ""),
                                    out.numel() * out.element_size(), counter.flops,
                                    counter.unsupported)
        else:
            n.meta[META] = NodeInfo(False, flops=counter.flops, unsupported=counter.unsupported)
        return out


def annotate(gm: fx.GraphModule, example: torch.Tensor, hint: Optional[str] = None):
    """Annotate ``gm`` with NodeInfo using ``example``; returns the model's output on it.

    ``hint`` replaces the advice given when a node fails on the example.
    """
    interp = Annotator(gm)
    if hint:
        interp.hint = hint
    interp.extra_traceback = False  # our ShapeError already names the node, on one line
    with torch.no_grad():
        return interp.run(example)
