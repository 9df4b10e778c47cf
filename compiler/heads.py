"""Exit heads: a fixed pooling that makes a compact feature, then a small learnable classifier.

Pooling comes before any dense layer so a head costs a tiny fraction of the backbone (the seed
paper's heads flattened whole feature maps and outweighed the backbone ten times). The runtime
stores the pooled features, not the activations, and trains only ``classifier``.
"""
import math
from dataclasses import asdict, dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn


@dataclass
class HeadSpec:
    """Shape of one head; stored in the manifest."""

    pool: str          # "avgmax<k>x<k>" (k = 2, 3, 4) | "avgmax" (global) | "clstokens" |
                       # "tokens" (what artifacts before 2026-12-07 have for [B, T, C]) | "flat";
                       # "avgmax..._hwc": the same on a channels-last map [B, H, W, C] (Swin)
    feature_dim: int
    hidden: int        # 0: a single Linear
    num_classes: int

    def params(self) -> int:
        if self.hidden:
            return (self.feature_dim + 1) * self.hidden + (self.hidden + 1) * self.num_classes
        return (self.feature_dim + 1) * self.num_classes

    def to_dict(self):
        return asdict(self)


POOL_GRIDS = (4, 3, 2)   # avg + max pooling to k x k cells, richest first
CHANNELS_LAST = "_hwc"   # suffix of a pooling that reads [B, H, W, C]


def layout(mode: str) -> Tuple[str, bool]:
    """(the pooling as it reads a [B, C, H, W] map, whether ``mode`` reads [B, H, W, C])."""
    if mode.startswith("avgmax") and mode.endswith(CHANNELS_LAST):
        return mode[:-len(CHANNELS_LAST)], True
    return mode, False


def pool_grid(mode: str) -> int:
    """k of an ``avgmax<k>x<k>`` pooling, 0 for the others; an unknown mode is an error."""
    mode = layout(mode)[0]
    for k in POOL_GRIDS:
        if mode == f"avgmax{k}x{k}":
            return k
    if mode in ("avgmax", "clstokens", "tokens", "flat"):
        return 0
    raise ValueError(f"unknown head pooling {mode!r}")


class Pool(nn.Module):
    """Parameter-free reduction of an activation to a [B, feature_dim] vector."""

    def __init__(self, mode: str):
        super().__init__()
        self.grid = pool_grid(mode)
        self.mode, self.hwc = layout(mode)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.hwc:
            h = h.permute(0, 3, 1, 2)
        if self.grid > 0:
            a = nn.functional.adaptive_avg_pool2d(h, self.grid)
            m = nn.functional.adaptive_max_pool2d(h, self.grid)
            return torch.cat([a.flatten(1), m.flatten(1)], 1)
        if self.mode == "avgmax":
            return torch.cat([h.mean(dim=[2, 3]), h.amax(dim=[2, 3])], 1)
        if self.mode == "clstokens":  # [B, T, C]: the first token, mean and max over tokens
            return torch.cat([h[:, 0], h.mean(dim=1), h.amax(dim=1)], 1)
        if self.mode == "tokens":  # [B, T, C]: mean and max over tokens
            return torch.cat([h.mean(dim=1), h.amax(dim=1)], 1)
        return h.flatten(1)


def _windows(n: int, k: int) -> List[Tuple[int, int]]:
    """Adaptive pooling's bins along one axis: [floor(i n / k), ceil((i + 1) n / k))."""
    return [(i * n // k, -(-(i + 1) * n // k)) for i in range(k)]


def _strided(n: int, k: int):
    """(kernel, stride, gather indices or None) reproducing adaptive pooling's bins along one
    axis of size ``n`` into ``k``; None when the bins differ in size (no single kernel)."""
    w = _windows(n, k)
    sizes = {b - a for a, b in w}
    if len(sizes) != 1:
        return None
    starts = [a for a, _ in w]
    diffs = [b - a for a, b in zip(starts, starts[1:])]
    if not diffs or (len(set(diffs)) == 1 and diffs[0] > 0):
        return sizes.pop(), (diffs[0] if diffs else 1), None
    g = 0
    for d in diffs:
        g = math.gcd(g, d)
    g = max(g, 1)   # repeated bins (k > n): pool with stride 1, gather each bin's start
    return sizes.pop(), g, [s // g for s in starts]


def _axis_plan(n: int, k: int):
    """(blocks, kernel, stride, gather or None) for one axis, or None (bins of unequal size).

    Bins that are not evenly spaced often repeat block by block: 14 -> 4 has bins [0, 4),
    [3, 7), [7, 11), [10, 14), i.e. twice 7 -> 2 (kernel 4, stride 3). Cutting the axis into
    such blocks pools exactly the bins; the fallback (kernel 4, stride 1, then a Gather of
    rows 0, 3, 7, 10) computes every window in between and was ~10x slower at batch 64.
    """
    w = _windows(n, k)
    for m in range(1, math.gcd(n, k) + 1):
        if n % m or k % m:
            continue
        inner = _strided(n // m, k // m)
        tiled = [(b * (n // m) + a, b * (n // m) + z) for b in range(m)
                 for a, z in _windows(n // m, k // m)]
        if inner is not None and inner[2] is None and tiled == w:
            return (m,) + inner
    one = _strided(n, k)
    return None if one is None else (1,) + one


class StridedPool(nn.Module):
    """A head's pooling (``Pool``) written with fixed-kernel pooling ops: the form exported to
    ONNX (``compiler.export``, the onnxruntime serving backend ``runtime/backends.py``), where
    adaptive pooling whose size does not divide the input cannot be exported and one slice per
    window is slow. Artifacts keep ``Pool``: their heads learned on its features.

    ``avgmax<k>x<k>`` on [B, C, H, W] becomes AveragePool and MaxPool with adaptive pooling's
    kernel and stride (its bins are equal-sized for all but odd shapes); where the bins' starts
    are not evenly spaced (14 -> 4: 0, 3, 7, 10) the map is first cut into blocks in which they
    are (two 7 -> 2 blocks, pooled rows then columns), else pooled densely and gathered; bins of unequal size fall back
    to one slice per bin. Max is exact; the average sums the same elements, so it matches
    adaptive pooling to the last bit or two of float32.
    """

    def __init__(self, mode: str, shape: Sequence[int]):
        super().__init__()
        self.k = pool_grid(mode)
        self.mode, self.hwc = layout(mode)
        if self.hwc:
            shape = (shape[0], shape[3], shape[1], shape[2])
        self.plan = None
        self.windows = []
        if self.k:
            hgt, wid = int(shape[-2]), int(shape[-1])
            self.chw = (int(shape[-3]), hgt, wid)
            ph, pw = _axis_plan(hgt, self.k), _axis_plan(wid, self.k)
            if ph is not None and pw is not None:
                self.plan = (ph, pw)
            else:
                self.windows = [(r0, r1, c0, c1) for r0, r1 in _windows(hgt, self.k)
                                for c0, c1 in _windows(wid, self.k)]

    def _pool(self, h, fn):
        (mh, kh, sh, ih), (mw, kw, sw, iw) = self.plan
        if mh == 1 and mw == 1:
            p = fn(h, (kh, kw), (sh, sw))
            if ih is not None:
                p = p.index_select(2, torch.tensor(ih))
            if iw is not None:
                p = p.index_select(3, torch.tensor(iw))
            return p.flatten(1)
        # Blocks: rows, then columns, each a 1-D pooling over blocks cut by a reshape (no copy,
        # no transpose): [B, C * mh, H / mh, W] -> [B, C, k, W] -> [B, C * k, mw, W / mw].
        c, hgt, wid = self.chw
        p = fn(h.reshape(-1, c * mh, hgt // mh, wid), (kh, 1), (sh, 1))
        if ih is not None:
            p = p.index_select(2, torch.tensor(ih))
        p = fn(p.reshape(-1, c * self.k, mw, wid // mw), (1, kw), (1, sw))
        if iw is not None:
            p = p.index_select(3, torch.tensor(iw))
        return p.flatten(1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.hwc:
            h = h.permute(0, 3, 1, 2)
        if self.plan is not None:
            return torch.cat([self._pool(h, nn.functional.avg_pool2d),
                              self._pool(h, nn.functional.max_pool2d)], 1).float()
        if self.windows:
            parts = [h[:, :, r0:r1, c0:c1] for r0, r1, c0, c1 in self.windows]
            avg = torch.stack([p.mean(dim=(2, 3)) for p in parts], 2).flatten(1)
            mx = torch.stack([p.amax(dim=(2, 3)) for p in parts], 2).flatten(1)
            return torch.cat([avg, mx], 1).float()
        if self.mode == "avgmax":
            return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1).float()
        if self.mode == "clstokens":
            return torch.cat([h[:, 0], h.mean(dim=1), h.amax(dim=1)], 1).float()
        if self.mode == "tokens":
            return torch.cat([h.mean(dim=1), h.amax(dim=1)], 1).float()
        return h.flatten(1).float()


class ExitHead(nn.Module):
    """pool -> classifier; ``features`` and ``classify`` let the runtime use the halves apart."""

    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.pool = Pool(spec.pool)
        if spec.hidden:
            self.classifier = nn.Sequential(nn.Linear(spec.feature_dim, spec.hidden), nn.ReLU(),
                                            nn.Linear(spec.hidden, spec.num_classes))
        else:
            self.classifier = nn.Sequential(nn.Linear(spec.feature_dim, spec.num_classes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(h).float())

    @torch.jit.export
    def features(self, h: torch.Tensor) -> torch.Tensor:
        return self.pool(h).float()

    @torch.jit.export
    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(f)


MIN_HIDDEN, MAX_HIDDEN = 16, 256
MIN_BOTTLENECK = 8  # narrower ReLU bottlenecks are often dead at init


def plan_heads(shapes: List[tuple], num_classes: int, budget_params: int,
               max_feature_dim: int = 0, hwc: Sequence[bool] = ()) -> List[HeadSpec]:
    """Size one head per cut so that all heads together hold at most ``budget_params``.

    Each head gets an equal share: the richest pooling whose MLP keeps at least MIN_HIDDEN
    hidden units or, failing that, whose single Linear fits; else global pooling and a Linear.
    ``max_feature_dim`` (0: none) rules out poolings with more values (global pooling stays).
    ``hwc[i]``: the i-th map is channels-last [B, H, W, C] (``CutPoint.channels_last``).
    """
    share = max(budget_params // max(len(shapes), 1), 1)
    specs = []
    for i, shape in enumerate(shapes):
        specs.append(_plan_one(shape, num_classes, share, max_feature_dim,
                               bool(hwc[i]) if i < len(hwc) else False))
    return specs


def _pool_options(shape, max_dim: int = 0, hwc: bool = False):
    """(pooling, feature dim) candidates for an activation of ``shape``, richest first, none
    over ``max_dim`` values but global pooling (0: no cap).

    Early layers have few channels and local features, so a finer grid there buys more
    agreement per parameter than a hidden layer does; grids only where they still pool.
    """
    if len(shape) == 4:
        c, hgt, wid = (shape[3], shape[1], shape[2]) if hwc else (shape[1], shape[2], shape[3])
        tail = CHANNELS_LAST if hwc else ""
        grids = [(f"avgmax{k}x{k}{tail}", 2 * k * k * c) for k in POOL_GRIDS
                 if k < min(hgt, wid) and not 0 < max_dim < 2 * k * k * c]
        return grids + [("avgmax" + tail, 2 * c)]
    if len(shape) == 3:
        # A transformer's first token is its class token where it has one (ViT): what its own
        # classifier reads. With it, a vit_tiny's exits saved 56-58% at 0.99, without 40-44%.
        return [("clstokens", 3 * shape[2])]
    n = 1
    for d in shape[1:]:
        n *= d
    return [("flat", n)]


def _plan_one(shape, num_classes, share, max_dim=0, hwc=False) -> HeadSpec:
    # Spatial detail matters more than depth for a small head: try each pooling, richest first,
    # with an MLP, then as a single Linear; the last pooling's Linear is the fallback.
    options = _pool_options(shape, max_dim, hwc)
    for pool, dim in options:
        hidden = (share - num_classes) // (dim + 1 + num_classes)
        if hidden >= MIN_HIDDEN:
            return HeadSpec(pool, dim, min(hidden, MAX_HIDDEN), num_classes)
        if (dim + 1) * num_classes <= share:
            return HeadSpec(pool, dim, 0, num_classes)
    # Last resort: the cheapest pooling and a narrow bottleneck (many classes, small budget).
    pool, dim = options[-1]
    hidden = (share - num_classes) // (dim + 1 + num_classes)
    if hidden >= MIN_BOTTLENECK:
        return HeadSpec(pool, dim, hidden, num_classes)
    # Nothing fits (a tiny model): a single Linear on the cheapest pooling; the caller
    # reports the overrun.
    return HeadSpec(pool, dim, 0, num_classes)
