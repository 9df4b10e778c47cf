"""The online cache on the prequential stream, and the oracle of its own heads: one run per seed."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from tools import baselines as B
from tools.bench.settings import Settings
from tools.experiment import StreamSummary, Window, rolling, stream, summarise, window
from tools.records import Record
from tools.timing import quantiles, sync


class Probe:
    """Stands in for the runtime in tools.experiment.stream.

    Before a request is answered it runs the backbone stage by stage and records what every head,
    as it is at that moment, predicts for each row (the oracle needs that), and the backbone's
    answer, which :attr:`reference` then hands to the stream, so the backbone runs once per
    request, not twice. Outputs come back on the CPU. The latency of ``rt.predict`` alone is kept
    in :attr:`latency` (the stream's own timing would include this probe).

    It reads the runtime's stages, heads and learner (``rt.stages``, ``rt.heads``,
    ``rt.learner``), which no public call exposes: a head's answer on rows it did not take.
    """

    def __init__(self, rt):
        self.rt = rt
        self.num_exits = rt.num_exits
        self.stage_flops, self.head_flops = rt.stage_flops, rt.head_flops
        self.head_pred, self.enabled, self.latency = [], [], []
        self._last = None

    def stats(self):
        return self.rt.stats()

    @torch.no_grad()
    def predict(self, x, return_exits=False):
        rt, E = self.rt, self.num_exits
        xd = x.to(rt.device)
        h, preds = xd, []
        for e in range(E):
            h = rt.stages[e](h)
            if rt.learner.trained(e):
                preds.append(rt.learner.predict(e, rt.heads[e].features(h).cpu()).argmax(1))
            else:                                   # an untrained head agrees with nothing
                preds.append(torch.full((x.shape[0],), -1, dtype=torch.long))
        y = rt.stages[E](h).cpu()
        self.head_pred.append(torch.stack(preds))
        self._last = (x, y)
        self.enabled.append(sum(t is not None for t in rt.stats()["thresholds"]))
        sync(rt.device)
        t0 = time.perf_counter()
        out, exits = rt.predict(xd, return_exits=True)
        sync(rt.device)
        self.latency.append((time.perf_counter() - t0) * 1e3)
        out, exits = out.cpu(), exits.cpu()
        return (out, exits) if return_exits else out

    def reference(self, x):
        """The backbone's output for the request just served (computed by :meth:`predict`)."""
        assert self._last is not None and self._last[0] is x, "reference called out of order"
        return self._last[1]


@dataclass
class Learning(Record):
    """What the runtime spent learning over the stream."""

    rounds: int
    train_flops: float
    train_seconds: float
    rows_trained: int
    share_of_backbone_flops: float      # of the whole stream's backbone FLOPs
    share_of_served_flops: float        # of the FLOPs the stream actually cost


@dataclass
class StreamLatency(Record):
    """``rt.predict`` per request (ms) over the stream's second half."""

    batch: int
    p50: Optional[float]
    p99: Optional[float]
    mean: Optional[float]
    note: str = ""


@dataclass
class RunResult(Record):
    """One online run (one seed, one budget); figures on the stream's second half unless named."""

    seed: int
    budget: float
    rows: int
    requests: int
    wall_s: float
    flops_saved: float
    agreement: float
    accuracy_cached: float
    accuracy_backbone: float
    exit_share: List[float]
    oracle_saving: float
    oracle_fraction: Optional[float]        # flops_saved / oracle_saving
    oracle_exit_share: List[float]
    head_agreement: List[float]             # each head as it was when the row was served
    whole_stream: StreamSummary
    first_exit_row: Optional[int]           # first row an exit answered
    first5k: Window                         # rows 0-5000
    learning: Learning
    final_thresholds: List[Optional[float]]
    live_agreement: Optional[float]
    shadow_rows: int
    drift_events: int
    stream_latency_ms: StreamLatency
    rolling: List[Window]


def run_ours(cached_path, x, y, seed: int, budget: float, s: Settings,
             save_to=None) -> RunResult:
    """Stream the test set through a fresh runtime; figures on the second half."""
    import runtime

    rt = runtime.load(cached_path, device=s.device, background=False, seed=seed,
                      agreement_budget=budget, confidence=s.confidence, **s.runtime_overrides)
    probe = Probe(rt)
    t0 = time.perf_counter()
    rec = stream(probe, probe.reference, x, y, s.batch, seed, progress=False)
    wall = time.perf_counter() - t0
    n, E, total = len(rec), rt.num_exits, float(rt.manifest["total_flops"])
    h = slice(n // 2, n)
    second = summarise(rec, E, total)
    head_pred = torch.cat(probe.head_pred, 1)
    stage_cost, head_cost = rt.stage_flops / total, rt.head_flops / total
    oracle = B.oracle_saving(head_pred[:, h], rec.ref[h], stage_cost, head_cost)
    oracle_first = B.oracle_exits(head_pred[:, h], rec.ref[h], stage_cost, head_cost)
    st = rt.stats()
    hit = torch.nonzero(rec.exit < E).flatten()
    spent = rec.flops.sum().item()
    half_req = len(probe.latency) // 2
    if save_to:
        rt.save(save_to)
    rt.close()
    lrn = st["learning"]
    return RunResult(
        seed=seed, budget=budget, rows=n, requests=st["requests"], wall_s=wall,
        flops_saved=second.flops_saved, agreement=second.agreement,
        accuracy_cached=second.accuracy_cached, accuracy_backbone=second.accuracy_backbone,
        exit_share=second.exit_share,
        oracle_saving=oracle,
        oracle_fraction=second.flops_saved / oracle if oracle > 0 else None,
        oracle_exit_share=(torch.bincount(oracle_first, minlength=E + 1).double()
                           / max(len(oracle_first), 1)).tolist(),
        head_agreement=[((head_pred[e, h] == rec.ref[h]).double().mean().item())
                        for e in range(E)],
        whole_stream=summarise(rec, E, total, half=False),
        first_exit_row=int(hit[0]) if hit.numel() else None,
        first5k=window(rec, slice(0, min(5000, n)), total),
        learning=Learning(rounds=lrn["rounds"], train_flops=lrn["train_flops"],
                          train_seconds=lrn["train_seconds"], rows_trained=lrn["rows_trained"],
                          share_of_backbone_flops=lrn["train_flops"] / (n * total),
                          share_of_served_flops=lrn["train_flops"] / max(spent, 1.0)),
        final_thresholds=st["thresholds"],
        live_agreement=st["live_agreement"], shadow_rows=st["shadow_rows"],
        drift_events=st["drift_events"],
        stream_latency_ms=StreamLatency(batch=s.batch, **quantiles(probe.latency[half_req:]),
                                        note="rt.predict per request in the stream's second "
                                             "half; learning rounds run inline "
                                             "(background=False)"),
        rolling=rolling(rec, total))
