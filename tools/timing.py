"""Wall-clock timing of requests: best-of and interleaved medians, and their summary tables."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def sync(device) -> None:
    """Wait for queued CUDA work, so a timer around it measures the work itself."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(xs: Sequence[float]) -> float:
    """Median of ``xs`` (nan when empty)."""
    return float(torch.tensor(xs, dtype=torch.float64).median()) if xs else float("nan")


def quantiles(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """p50, p99 and mean of ``values`` (None when empty)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if t.numel() == 0:
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": t.quantile(0.5).item(), "p99": t.quantile(0.99).item(), "mean": t.mean().item()}


@torch.no_grad()
def time_backbone(model, x, reps=3):
    """Best-of-``reps`` wall time of one forward, in ms."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@torch.no_grad()
def time_variants(variants: Dict[str, Callable], requests: List[torch.Tensor], reps: int,
                  warmup: int, device) -> Dict[str, List[float]]:
    """Median over ``reps`` of each request's wall time (ms) under each variant.

    The variants take turns request by request (in a rotating order), so background load on a
    shared machine hits them alike; each variant is warmed up first.
    """
    names = list(variants)
    for name in names:
        for r in requests[:warmup]:
            variants[name](r)
    sync(device)
    times = {n: [[] for _ in requests] for n in names}
    for _ in range(reps):
        for k, r in enumerate(requests):
            for j in range(len(names)):
                name = names[(k + j) % len(names)]
                sync(device)
                t0 = time.perf_counter()
                variants[name](r)
                sync(device)
                times[name][k].append((time.perf_counter() - t0) * 1e3)
    return {n: [float(torch.tensor(ts).median()) for ts in times[n]] for n in names}
