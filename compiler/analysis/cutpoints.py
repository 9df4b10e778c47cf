"""Find and score cut points: nodes whose output alone carries all the state forward.

A node at position p is a cut point when it is the only non-constant value produced at or
before p that anything after p reads. The model can then be split there and resumed from
that one tensor. Parameters (get_attr) are constants and never block a cut; the graph input
does, so a skip connection spanning the whole network leaves no cut at all.
"""
import math
from dataclasses import asdict, dataclass
from typing import List

import torch.fx as fx
from torch import nn

from .trace import info

# Cutting right before one of these wastes the head on a half-finished layer.
_PRE_OPS = ("norm", "relu", "gelu", "silu", "hardswish", "sigmoid", "activation", "act")


@dataclass
class CutPoint:
    """One place the model can be split, with its costs and benefit score."""

    name: str                # fx node name
    position: int            # index in graph order
    flops_before: int
    fraction: float          # flops_before / total
    shape: tuple
    bytes: int               # activation bytes at the example batch size
    score: float = 0.0
    preferred: bool = True   # False: right before a norm/activation (listed, not chosen by default)
    head_params: int = 0
    head_flops: int = 0
    channels_last: bool = False   # a [B, H, W, C] map (Swin): its head pools over H and W

    def to_dict(self):
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__.lower()
    if node.op in ("call_function", "call_method"):
        return str(getattr(node.target, "__name__", node.target)).lower()
    return ""


def _op(user: fx.Node, gm: fx.GraphModule) -> str:
    """The op's own name, without an aten overload (``layer_norm.default`` -> ``layer_norm``)."""
    return _target_name(user, gm).split(".")[0]


def _reads_last_dim(user: fx.Node, gm: fx.GraphModule, size: int) -> bool:
    """Whether ``user`` takes its input's last dim, of ``size``, as features: a LayerNorm over
    it or a Linear."""
    if user.op == "call_module":
        m = gm.get_submodule(user.target)
        if isinstance(m, nn.LayerNorm):
            return tuple(m.normalized_shape) == (size,)
        return isinstance(m, nn.Linear) and m.in_features == size
    if user.op != "call_function":
        return False
    op = _op(user, gm)
    if op in ("layer_norm", "native_layer_norm"):
        shape = user.args[1] if len(user.args) > 1 else user.kwargs.get("normalized_shape")
        return isinstance(shape, (list, tuple)) and list(shape) == [size]
    return op == "linear"


def _layout_of_input(user: fx.Node, gm: fx.GraphModule, size: int):
    """What ``user`` says of its 4-d input (last dim ``size``): True channels-last (it reads the
    last dim as features, or permutes it to [B, C, H, W]), False channels-first (it convolves,
    or permutes it to [B, H, W, C]), None (it does not say)."""
    op = _op(user, gm)
    if user.op == "call_module":
        if isinstance(gm.get_submodule(user.target), nn.modules.conv._ConvNd):
            return False
    elif op.startswith("conv") or op in ("convolution", "_convolution"):
        return False
    if op == "permute" and user.op != "call_module":
        dims = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) \
            else user.args[1:]
        dims = list(user.kwargs.get("dims", dims))
        return True if dims == [0, 3, 1, 2] else False if dims == [0, 2, 3, 1] else None
    return True if _reads_last_dim(user, gm, size) else None


def is_channels_last(node: fx.Node, gm: fx.GraphModule, depth: int = 6) -> bool:
    """Whether the 4-d map ``node`` makes is [B, H, W, C] (Swin's blocks; a ConvNeXt's
    LayerNorm2d inside): the first of its 4-d descendants, up to ``depth`` ops on, that says
    which dim holds the features (``_layout_of_input``) decides; channels-first if none does."""
    shape = info(node).shape
    if not shape or len(shape) != 4:
        return False
    frontier, seen = [node], {node}
    for _ in range(depth):
        after = []
        for v in frontier:
            for u in v.users:
                verdict = _layout_of_input(u, gm, info(v).shape[-1])
                if verdict is not None:
                    return verdict
                s = info(u).shape if u.op != "output" else None
                if u not in seen and s and len(s) == 4:
                    seen.add(u)
                    after.append(u)
        frontier = after
    return False


def find_cut_points(gm: fx.GraphModule, batch: int) -> List[CutPoint]:
    """All cut points of an annotated ``gm`` with a tensor of leading dim ``batch`` (graph order)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=-1) for n in nodes}
    total = sum(info(n).flops for n in nodes if n.op != "output") or 1
    output_pos = pos[next(n for n in nodes if n.op == "output")]
    live, done, cuts = set(), 0, []
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        done += info(n).flops
        for arg in n.all_input_nodes:
            if last_use[arg] == i:
                live.discard(arg)
        if n.op != "get_attr" and last_use[n] > i:
            live.add(n)
        if live != {n} or n.op == "placeholder":
            continue
        ni = info(n)
        # The node feeding the output directly saves nothing; neither does a cut after all FLOPs.
        if not ni.is_tensor or not ni.shape or ni.shape[0] != batch or done >= total:
            continue
        if last_use[n] == output_pos and len(n.users) == 1:
            continue
        users = list(n.users)
        preferred = not (len(users) == 1 and any(k in _target_name(users[0], gm) for k in _PRE_OPS))
        cuts.append(CutPoint(n.name, i, done, done / total, ni.shape, ni.bytes, preferred=preferred,
                             channels_last=is_channels_last(n, gm)))
    return cuts


def score(cut: CutPoint, total_flops: int) -> float:
    """Expected benefit of an exit, as a fraction of the model's FLOPs (a heuristic prior).

    A row exiting here saves (1 - f) of the model; the chance that an exit is confident grows
    with depth, modelled as sqrt(f). Every row that reaches the cut pays for the head.
    """
    f = cut.fraction
    return (1.0 - f) * math.sqrt(f) - cut.head_flops / max(total_flops, 1)


def choose_exits(cuts: List[CutPoint], count: int, lo: float, hi: float) -> List[CutPoint]:
    """Spread ``count`` exits over the FLOPs range [lo, hi]: the best-scoring preferred cut per bin."""
    pool = [c for c in cuts if lo <= c.fraction <= hi and c.preferred] or \
        [c for c in cuts if lo <= c.fraction <= hi] or list(cuts)
    if count <= 0 or not pool:
        return []
    edges = [lo + (hi - lo) * k / count for k in range(count + 1)]
    chosen = []
    for a, b in zip(edges, edges[1:]):
        in_bin = [c for c in pool if a <= c.fraction <= b and c not in chosen]
        if in_bin:
            chosen.append(max(in_bin, key=lambda c: c.score))
    # Fill empty bins with the best remaining cuts that are not crowded next to a chosen one.
    gap = (hi - lo) / (3 * count)
    for c in sorted((c for c in pool if c not in chosen), key=lambda c: -c.score):
        if len(chosen) >= count:
            break
        if all(abs(c.fraction - o.fraction) >= gap for o in chosen):
            chosen.append(c)
    return sorted(chosen, key=lambda c: c.position)
