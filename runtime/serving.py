"""Run one request against the immutable serving state: split the batch at confident exits."""
from dataclasses import dataclass
from functools import cached_property
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from compiler import exit_rule

INF = float("inf")


@dataclass(frozen=True)
class ServingState:
    """What ``predict`` reads. Swapped whole, never edited, so a reader needs no lock.

    classifiers:  per exit, reads the pooled raw features.
    thresholds:   per exit; ``inf``: off.
    version:      bumped by every publish.
    generation:   the drift generation the state was learned in (drift bumps it).
    fast:         the same exits as one scripted model (CPU), or None.
    exit_shares:  share of rows calibration expects at each exit (last: the backbone), for the
                  drift monitor; None when no exit is on.
    plan:         the calibration plan behind the thresholds (None: not chosen by a round).
    compiled:     the same exits compiled for the onnxruntime backend (``backends.Plan``), or
                  None (TorchScript, or no exit on); ``whole`` set with ``fast``.
    """

    classifiers: tuple
    thresholds: tuple
    version: int = 0
    generation: int = 0
    fast: Optional[torch.jit.ScriptModule] = None
    exit_shares: Optional[tuple] = None
    plan: object = None
    compiled: object = None

    @property
    def servable_whole(self) -> bool:
        """The heads were learned on ``fast_after`` rows: requests need no longer all teach
        (``Collector.decide``), and those with nothing to check or learn from run the cached
        model whole."""
        return self.fast is not None or (self.compiled is not None and self.compiled.whole)

    # Read several times per request, so computed once per state (the state never changes)
    @cached_property
    def any_enabled(self) -> bool:
        return any(t != INF for t in self.thresholds)

    @cached_property
    def enabled_key(self) -> tuple:
        """Per exit, on or off, as a tuple (cheap to hash: the cost model's cache key)."""
        return tuple(t != INF for t in self.thresholds)

    @property
    def enabled(self) -> torch.Tensor:
        return torch.tensor([t != INF for t in self.thresholds])

    def exits_off(self, generation: int) -> "ServingState":
        """The same heads with every exit off (what drift leaves behind)."""
        return ServingState(self.classifiers, (INF,) * len(self.thresholds), self.version + 1,
                            generation)


@dataclass
class Served:
    """One request's answer and what it taught.

    out, exit_of: the answer per row, in input order (the task's: logits [n, K] or a list of
                  per-frame detections), and the exit each row left at.
    features:     per exit, pooled features of the rows that ran the whole backbone (None
                  when the request was not collected).
    teacher:      the backbone's output for those rows.
    shadow_ok:    for a shadow request, per row: would the exits' answer have agreed.
    shadow_exit:  for a shadow request, per row: the exit it would have left at.
    """

    out: Union[torch.Tensor, list]
    exit_of: torch.Tensor
    features: Optional[List[torch.Tensor]] = None
    teacher: Optional[torch.Tensor] = None
    shadow_ok: Optional[torch.Tensor] = None
    shadow_exit: Optional[torch.Tensor] = None


def serve_fast(state: ServingState, x: torch.Tensor) -> Served:
    """The scripted model runs the request whole (nothing to learn from it)."""
    out, exit_of = state.fast.forward_with_exits(x)
    return Served(out, exit_of)


def serve_staged(stages: Sequence, heads: Sequence, state: ServingState, x: torch.Tensor,
                 shadow: bool, collect: bool) -> Served:
    """Stage by stage in Python: exits take their confident rows (``exit_rule``); a ``shadow``
    request runs every row to the end and records where each would have left."""
    n, E = x.shape[0], len(heads)
    dev = x.device
    idx = torch.arange(n, device=dev)
    exit_of = torch.full((n,), E, dtype=torch.long, device=dev)
    would = torch.full((n,), E, dtype=torch.long, device=dev)
    would_pred = torch.full((n,), -1, dtype=torch.long, device=dev)
    out, feats, h = None, [], x
    for e in range(E):
        h = stages[e](h)
        f = heads[e].features(h) if (collect or state.thresholds[e] != INF) else None
        feats.append(f)
        if state.thresholds[e] == INF:
            continue
        logits = state.classifiers[e](f)
        hit = exit_rule.leaves(exit_rule.confidence(logits),
                               torch.tensor(state.thresholds[e], device=dev), True)
        if shadow:  # record where each row would have left; every row goes on
            newly = hit & (would == E)
            would[newly] = e
            would_pred[newly] = logits.argmax(1)[newly]
            continue
        if bool(hit.any()):
            if out is None:
                out = torch.empty((n,) + tuple(logits.shape[1:]), device=dev)
            out[idx[hit]] = logits[hit].to(out.dtype)
            exit_of[idx[hit]] = e
            keep = ~hit
            h, idx = h[keep], idx[keep]
            feats = [g[keep] if g is not None else None for g in feats]
            if h.shape[0] == 0:
                break
    y = None
    if h.shape[0] > 0:
        y = stages[E](h)
        if out is None:
            out = y
        else:
            out[idx] = y.to(out.dtype)
    served = Served(out, exit_of)
    if shadow:
        judge_shadow(served, would, would_pred, E)
    if collect and y is not None and len(feats) == E and all(f is not None for f in feats):
        served.features, served.teacher = feats, y
    return served


def judge_shadow(served: Served, would: torch.Tensor, would_pred: torch.Tensor, E: int):
    """A shadow request's verdicts, per row: the exit it would have left at (``E``: none) and
    whether that exit's answer agrees with the backbone's, which answered (a row that would
    have left nowhere agrees)."""
    served.shadow_exit = would
    served.shadow_ok = (would == E) | (would_pred == served.out.argmax(1))


def serve_plan(state: ServingState, x: torch.Tensor) -> Served:
    """The onnxruntime plan runs the request whole (nothing to learn from it)."""
    out, exit_of = state.compiled.run(x.numpy())
    return Served(torch.from_numpy(out), torch.from_numpy(exit_of))


def serve_backbone(backend, x: torch.Tensor) -> Served:
    """No exit on and nothing to learn from the request: the onnxruntime backbone session."""
    out = torch.from_numpy(backend.run_backbone(x.numpy()))
    return Served(out, torch.from_numpy(np.full(x.shape[0], backend.num_exits, dtype=np.int64)))


def serve_collected(backend, state: ServingState, x: torch.Tensor, shadow: bool,
                    collect: bool) -> Served:
    """The onnxruntime backend's path for requests that teach or are shadowed.

    With a compiled plan: the plan's collecting segments, as ``serve_staged`` does (rows leave
    at exits, and the rows that reach the end bring every exit's features; shadowed, every row
    runs them all, ``Plan.run_shadow``). Else every row runs the whole backbone with every
    exit's pooled features (one session), then the exits route the rows (``exit_rule``) on
    those features."""
    if state.compiled is not None and not shadow:
        out, exit_of, feats, y = state.compiled.run_collect(x.numpy())
        served = Served(torch.from_numpy(out), torch.from_numpy(exit_of))
        if collect and y is not None:
            served.features = [torch.from_numpy(f) for f in feats]
            served.teacher = torch.from_numpy(y)
        return served
    if state.compiled is not None:   # shadowed: the plan's own heads judge, in numpy
        y, would, would_pred, feats = state.compiled.run_shadow(x.numpy())
        served = Served(torch.from_numpy(y), torch.from_numpy(
            np.full(x.shape[0], state.compiled.num_exits, dtype=np.int64)))
        judge_shadow(served, torch.from_numpy(would), torch.from_numpy(would_pred),
                     state.compiled.num_exits)
        if collect:
            served.features = [torch.from_numpy(f) for f in feats]
            served.teacher = served.out
        return served
    y, feats = backend.run_collect(x.numpy())
    y = torch.from_numpy(y)
    feats = [torch.from_numpy(f) for f in feats]
    n, E = x.shape[0], len(feats)
    exit_of = torch.full((n,), E, dtype=torch.long)
    out = y
    would = torch.full((n,), E, dtype=torch.long) if shadow else None
    would_pred = torch.full((n,), -1, dtype=torch.long) if shadow else None
    if state.any_enabled:
        left = torch.zeros(n, dtype=torch.bool)
        for e in range(E):
            if state.thresholds[e] == INF:
                continue
            logits = state.classifiers[e](feats[e])
            hit = exit_rule.leaves(exit_rule.confidence(logits),
                                   torch.tensor(state.thresholds[e]), True) & ~left
            left |= hit
            if shadow:
                would[hit] = e
                would_pred[hit] = logits.argmax(1)[hit]
            elif bool(hit.any()):
                if out is y:
                    out = y.clone()
                out[hit] = logits[hit].to(out.dtype)
                exit_of[hit] = e
    served = Served(out, exit_of)
    if shadow:
        judge_shadow(served, would, would_pred, E)
    if collect:
        rest = exit_of == E
        if bool(rest.any()):
            if bool(rest.all()):
                served.features, served.teacher = feats, y
            else:
                served.features, served.teacher = [f[rest] for f in feats], y[rest]
    return served
