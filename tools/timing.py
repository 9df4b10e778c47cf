"""Wall-clock timing of requests: interleaved medians, their summaries, and the backbone's
fastest CPU modes (frozen TorchScript, onnxruntime) to time a cache against."""
from __future__ import annotations

import time
from pathlib import Path
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


def ort_session(path_or_bytes):
    """An onnxruntime CPU session as the runtime builds its own: one thread, every graph
    optimisation (``runtime.backends._session``)."""
    from runtime.backends import _session
    return _session(str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes)


def _same_at(module, eager: torch.nn.Module, x: torch.Tensor) -> bool:
    """``module`` runs ``x`` and answers as ``eager`` does."""
    try:
        with torch.no_grad():
            return torch.allclose(module(x), eager(x), atol=1e-4, rtol=1e-4)
    except Exception:   # a size fixed at another batch fails in many ways
        return False


def backbone_modes(eager: torch.nn.Module, example: torch.Tensor, onnx_path):
    """The backbone as a CPU user would serve it at its fastest: (frozen TorchScript module,
    onnxruntime session of a plain ``torch.onnx`` export with a dynamic batch, input "input").
    ``example``: one row [1, ...]; the export is written to ``onnx_path``."""
    import copy
    import warnings
    from compiler.export import _quiet
    freeze = lambda m: torch.jit.optimize_for_inference(torch.jit.freeze(m.eval()))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = torch.jit.trace(eager, example, check_trace=False)
        frozen = freeze(script)
        two = example.repeat(2, *[1] * (example.dim() - 1))
        if not _same_at(frozen, eager, two):
            # tracing fixed a torch.export program's batch (its sizes are plain ints then):
            # script the program's graph as the compiler does its stages
            from compiler.analysis.trace import clean_exported
            script = torch.jit.script(clean_exported(copy.deepcopy(eager)))
            frozen = freeze(script)
        with _quiet():
            try:
                torch.onnx.export(script, (two,), str(onnx_path), input_names=["input"],
                                  output_names=["y"], dynamo=False, opset_version=18,
                                  dynamic_axes={"input": {0: "b"}, "y": {0: "b"}})
            except Exception:
                # the TorchScript exporter cannot take every graph (a torch.export program's
                # attention unflattens to a rank it loses): the torch.export-based exporter
                prog = torch.onnx.export(eager, (two,), input_names=["input"], output_names=["y"],
                                         dynamo=True, opset_version=18, external_data=False,
                                         dynamic_shapes=({0: torch.export.Dim("b")},))
                prog.save(str(onnx_path))
    return frozen, ort_session(str(onnx_path))
