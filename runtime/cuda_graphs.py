"""CUDA graphs per stage for bucketed batch sizes: small batches are bound by kernel launches.

A batch of n rows runs in the graph captured for the smallest bucket >= n (rows are padded;
eval-mode stages treat rows independently, so padding never changes real rows). Batches
above the largest bucket, CPU tensors, and stages whose capture fails run eagerly.
"""
import logging
import threading

import torch

log = logging.getLogger("layer_cache.runtime")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class GraphedStage:
    """Wraps a stage (tensor -> tensor); captures one CUDA graph per bucket on first use."""

    def __init__(self, fn, buckets=BUCKETS, warmup: int = 3):
        self.fn = fn
        self.buckets = tuple(sorted(buckets))
        self.warmup = warmup
        self.graphs = {}
        self.failed = False
        self.lock = threading.Lock()  # static buffers are shared: one replay at a time

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        if self.failed or not h.is_cuda or n > self.buckets[-1]:
            return self.fn(h)
        b = next(b for b in self.buckets if b >= n)
        key = (b, tuple(h.shape[1:]), h.dtype, h.device)
        with self.lock:
            entry = self.graphs.get(key)
            if entry is None:
                entry = self._capture(b, h)
                if entry is None:
                    return self.fn(h)
                self.graphs[key] = entry
            static_in, static_out, graph = entry
            static_in[:n].copy_(h)
            graph.replay()
            return static_out[:n].clone()

    def _capture(self, b, h):
        try:
            static_in = torch.zeros((b,) + tuple(h.shape[1:]), device=h.device, dtype=h.dtype)
            side = torch.cuda.Stream(device=h.device)
            side.wait_stream(torch.cuda.current_stream(h.device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(self.warmup):  # also lets TorchScript's profiling executor settle
                    self.fn(static_in)
            torch.cuda.current_stream(h.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_out = self.fn(static_in)
            return static_in, static_out, graph
        except Exception as e:  # fall back to eager for good; say why once
            self.failed = True
            log.warning("CUDA graph capture failed (%s); this stage runs eagerly",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
