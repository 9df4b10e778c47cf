"""Exit heads: a fixed pooling that makes a compact feature, then a small learnable classifier.

Pooling comes before any dense layer so a head costs a tiny fraction of the backbone (the seed
paper's heads flattened whole feature maps and outweighed the backbone ten times). The runtime
stores the pooled features, not the activations, and trains only ``classifier``.
"""
from dataclasses import asdict, dataclass
from typing import List

import torch
from torch import nn


@dataclass
class HeadSpec:
    """Shape of one head; stored in the manifest."""

    pool: str          # "avgmax<k>x<k>" (k = 2, 3, 4) | "avgmax" (global) | "tokens" | "flat"
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


def pool_grid(mode: str) -> int:
    """k of an ``avgmax<k>x<k>`` pooling, 0 for the others; an unknown mode is an error."""
    for k in POOL_GRIDS:
        if mode == f"avgmax{k}x{k}":
            return k
    if mode in ("avgmax", "tokens", "flat"):
        return 0
    raise ValueError(f"unknown head pooling {mode!r}")


class Pool(nn.Module):
    """Parameter-free reduction of an activation to a [B, feature_dim] vector."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.grid = pool_grid(mode)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.grid > 0:
            a = nn.functional.adaptive_avg_pool2d(h, self.grid)
            m = nn.functional.adaptive_max_pool2d(h, self.grid)
            return torch.cat([a.flatten(1), m.flatten(1)], 1)
        if self.mode == "avgmax":
            return torch.cat([h.mean(dim=[2, 3]), h.amax(dim=[2, 3])], 1)
        if self.mode == "tokens":  # [B, T, C]: mean and max over tokens
            return torch.cat([h.mean(dim=1), h.amax(dim=1)], 1)
        return h.flatten(1)


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


def plan_heads(shapes: List[tuple], num_classes: int, budget_params: int) -> List[HeadSpec]:
    """Size one head per cut so that all heads together hold at most ``budget_params``.

    Each head gets an equal share: the richest pooling whose MLP keeps at least MIN_HIDDEN
    hidden units or, failing that, whose single Linear fits; else global pooling and a Linear.
    """
    share = max(budget_params // max(len(shapes), 1), 1)
    specs = []
    for shape in shapes:
        specs.append(_plan_one(shape, num_classes, share))
    return specs


def _pool_options(shape):
    """(pooling, feature dim) candidates for an activation of ``shape``, richest first.

    Early layers have few channels and local features, so a finer grid there buys more
    agreement per parameter than a hidden layer does; grids only where they still pool.
    """
    if len(shape) == 4:
        c, hgt, wid = shape[1], shape[2], shape[3]
        grids = [(f"avgmax{k}x{k}", 2 * k * k * c) for k in POOL_GRIDS if k < min(hgt, wid)]
        return grids + [("avgmax", 2 * c)]
    if len(shape) == 3:
        return [("tokens", 2 * shape[2])]
    n = 1
    for d in shape[1:]:
        n *= d
    return [("flat", n)]


def _plan_one(shape, num_classes, share) -> HeadSpec:
    # Spatial detail matters more than depth for a small head: try each pooling, richest first,
    # with an MLP, then as a single Linear; the last pooling's Linear is the fallback.
    options = _pool_options(shape)
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
