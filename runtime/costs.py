"""The cost model: what each stage and head costs, in FLOPs and as the share calibration optimises."""
import time

import torch

from compiler import exit_rule

from .calibrate import INF


def default_latency_weight(background: bool, onnxruntime: bool) -> float:
    """``ServingConfig.latency_weight`` when unset: 0 in synchronous mode (which must not depend
    on the clock); with background learning, 1.0 where requests run in onnxruntime, whose heads
    are priced at what a passing row pays (measured at load), and 0.5 elsewhere (TorchScript;
    CUDA, never measured here). On the CPU 1.0 saved as many FLOPs as 0.5 and less time
    (docs/latency.md, "Time alone chooses the exits")."""
    if not background:
        return 0.0
    return 1.0 if onnxruntime else 0.5


class CostModel:
    """Stage and head FLOPs from the manifest, optionally mixed with latency measured here.

    ``stage_cost`` / ``head_cost`` (shares of the backbone) are what calibration minimises;
    FLOPs saved, the figure users read, always comes from FLOPs (``flops_of``).
    """

    def __init__(self, manifest: dict, latency_weight: float = 0.0, latency_ms=None,
                 miss_share=None):
        exits = manifest["exits"]
        self.total_flops = float(manifest["total_flops"])
        self.stage_flops = torch.tensor(manifest["stage_flops"], dtype=torch.float64)
        self.head_flops = torch.tensor([e["head"]["flops"] for e in exits], dtype=torch.float64)
        w = self.latency_weight = latency_weight   # the share of latency in stage/head_cost
        self.stage_cost = self.stage_flops / self.total_flops
        self.head_cost = self.head_flops / self.total_flops
        self.stage_latency_ms, self.head_latency_ms = None, None
        # per exit, a missing row's extra time as a share of the backbone's (measured at batch 1
        # in the onnxruntime backend, ``backends.miss_profile``); None: read from latency_ms
        self.miss_share = None if miss_share is None else [float(v) for v in miss_share]
        if latency_ms is not None:
            lat_stage, lat_head = latency_ms
            self.stage_latency_ms, self.head_latency_ms = lat_stage.tolist(), lat_head.tolist()
            if w:
                ref = lat_stage.sum()
                # A head's time is what a row that passes it pays: where measured, its branch
                # included (at batch 1, where it weighs most; on a real model the boundary,
                # not the head's own ops, is most of it: docs/latency.md), else its own ops.
                head = lat_head / ref if self.miss_share is None else \
                    torch.tensor(self.miss_share, dtype=torch.float64)
                self.stage_cost = (1 - w) * self.stage_cost + w * lat_stage / ref
                self.head_cost = (1 - w) * self.head_cost + w * head
        self._flops_cache = {}

    def miss_overhead(self, enabled) -> float:
        """Time a row that misses every enabled exit pays on top of the backbone, as a share of
        the backbone's: the sum of each enabled exit's ``miss_share`` (measured at batch 1,
        where a head weighs most; the sum overstates a little, as exits share boundaries), or
        without it the heads' profiled latency over the stages' (0 when nothing was measured).
        ``tools.latency_bench`` measures the real figure."""
        if self.miss_share is not None:
            return sum(v for v, on in zip(self.miss_share, enabled) if on)
        if self.head_latency_ms is None:
            return 0.0
        heads = sum(ms for ms, on in zip(self.head_latency_ms, enabled) if on)
        return heads / max(sum(self.stage_latency_ms), 1e-9)

    def within_miss_cap(self, cap):
        """The ``allowed`` test of ``runtime/calibrate.py`` for ``ServingConfig.max_miss_overhead``
        (None: no cap, every set of exits allowed)."""
        if cap is None:
            return None
        return lambda enabled: self.miss_overhead(enabled) <= cap

    def cheapest_prefix(self, thresholds, shares):
        """(thresholds, shares) of the prefix of ``thresholds`` (its first k enabled exits on,
        the rest off: ``calibrate.prefixes``) that costs least under ``stage_cost`` and
        ``head_cost``, given ``shares``, the share of rows leaving at each exit (last: the
        backbone) under ``thresholds`` itself. A prefix's rows leave where ``thresholds`` let
        them or reach the backbone, so it keeps any agreement bound ``thresholds`` had. With no
        latency mixed in (``latency_weight`` 0), or no shares, ``thresholds`` as they are: FLOPs
        were what chose them. Ties keep more exits."""
        E = len(thresholds)
        if not self.latency_weight or shares is None or len(shares) != E + 1:
            return tuple(thresholds), shares
        on = [e for e, t in enumerate(thresholds) if t != INF]
        best, best_cost = (tuple(thresholds), tuple(shares)), None
        for k in range(len(on), -1, -1):
            t = tuple(x if e in on[:k] else INF for e, x in enumerate(thresholds))
            if k == len(on):
                s = list(shares)
            else:
                s = [shares[e] if e in on[:k] else 0.0 for e in range(E)]
                s.append(1.0 - sum(s))
            costs = exit_rule.exit_costs(self.stage_cost, self.head_cost,
                                         torch.tensor([x != INF for x in t])).tolist()
            cost = sum(c * w for c, w in zip(costs, s))
            if best_cost is None or cost < best_cost - 1e-12:
                best, best_cost = (t, tuple(s)), cost
        return best

    def exit_flops(self, enabled: torch.Tensor) -> torch.Tensor:
        """FLOPs of a row leaving at each exit (last: the backbone), enabled heads it passed included."""
        key = enabled if isinstance(enabled, tuple) else tuple(bool(b) for b in enabled)
        if key not in self._flops_cache:
            costs = exit_rule.exit_costs(self.stage_flops, self.head_flops,
                                         torch.tensor(key, dtype=torch.bool))
            self._flops_cache[key] = (costs, costs.tolist())
        return self._flops_cache[key][0]

    def flops_of(self, counts, enabled) -> float:
        """FLOPs spent on rows given how many left at each exit; ``enabled``: a bool tensor or
        a tuple of bools (the serving path passes ``ServingState.enabled_key``: no tensor)."""
        key = enabled if isinstance(enabled, tuple) else tuple(bool(b) for b in enabled)
        self.exit_flops(key)
        return float(sum(c * f for c, f in zip(counts, self._flops_cache[key][1])))


@torch.no_grad()
def profile(stages, heads, classifiers, input_shape, device, batch: int = 8, reps: int = 7,
            backend=None):
    """Latency (ms) of each stage and each head with its decision, on this device, in the
    serving backend (``backend.profile``; None: the TorchScript stages and heads).

    The minimum over repetitions after a warm-up: the least disturbed by other load.
    """
    if backend is not None:
        return backend.profile(classifiers, batch, reps)
    def timed(fn, arg):
        times = []
        fn(arg)
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = fn(arg)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return out, min(times) * 1e3

    h = torch.randn((batch,) + tuple(input_shape), device=device)
    stage_ms, head_ms = [], []
    for i, stage in enumerate(stages):
        h, ms = timed(stage, h)
        stage_ms.append(ms)
        if i < len(heads):
            _, ms = timed(lambda a, i=i: bool(exit_rule.confidence(
                classifiers[i](heads[i].features(a))).ge(0.5).any()), h)
            head_ms.append(ms)
    return torch.tensor(stage_ms, dtype=torch.float64), torch.tensor(head_ms, dtype=torch.float64)
