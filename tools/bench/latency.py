"""The latency harness: backbone vs cached model per request, eager and scripted, batch 1, 64."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from tools.bench.settings import NO_GPU, Settings, say
from tools.records import Record
from tools.timing import quantiles, time_variants


@dataclass
class LatencyRow(Record):
    """One variant's timings over a set of requests (ms per request)."""

    p50: Optional[float]
    p99: Optional[float]
    mean: Optional[float]
    throughput_rows_s: float
    requests: int


def latency_table(times: Dict[str, List[float]], rows_per_request: int) -> Dict[str, LatencyRow]:
    """Per variant: quantiles of its request times and rows per second, one request at a time."""
    return {name: LatencyRow(**quantiles(ts),
                             throughput_rows_s=rows_per_request * len(ts) / (sum(ts) / 1e3),
                             requests=len(ts))
            for name, ts in times.items()}


@dataclass
class BatchLatency(Record):
    """Every variant at one batch size; reductions are 1 - cached / backbone in the same mode."""

    table: Dict[str, LatencyRow]
    times_ms: Dict[str, List[float]]
    p50_reduction_eager: float
    p99_reduction_eager: float
    throughput_gain_eager: float
    p50_reduction_scripted: float
    p99_reduction_scripted: float
    throughput_gain_scripted: float
    p50_reduction_runtime_vs_scripted: float
    # batch 1 only: which exit each request took, and the requests no exit took
    exit_of_request: Optional[List[int]] = None
    missed_every_exit: Optional[int] = None
    miss_slowdown_eager: Optional[float] = None
    miss_slowdown_scripted: Optional[float] = None
    miss_slowdown_runtime_vs_scripted: Optional[float] = None
    p50_by_exit_scripted: Optional[Dict[str, Optional[float]]] = None


@dataclass
class LatencyResult(Record):
    """The latency section of one backbone's result."""

    device: str
    budget: float
    reps: int
    warmup: int
    threads: int
    exit_names: List[str]
    eager_matches_scripted: bool = False
    batch1: Optional[BatchLatency] = None
    batch64: Optional[BatchLatency] = None
    gpu: str = field(default=NO_GPU)


def eager_cached(an, manifest, learned):
    """The learned cached model built from eager fx stages and eager heads (not scripted)."""
    from compiler.artifact import CachedModel, ExitBlock
    from compiler.heads import ExitHead, HeadSpec
    from compiler.split import split_stages

    stages = split_stages(an.gm, [e["name"] for e in manifest["exits"]])
    blocks = []
    for i, (st, e) in enumerate(zip(stages[:-1], manifest["exits"])):
        hs = e["head"]
        head = ExitHead(HeadSpec(hs["pool"], hs["feature_dim"], hs["hidden"], hs["num_classes"]))
        src = getattr(learned.blocks, str(i))
        head.classifier.load_state_dict({k: v for k, v in src.head.classifier.state_dict().items()})
        blk = ExitBlock(st, head)
        blk.threshold.copy_(src.threshold)
        blk.enabled.copy_(src.enabled)
        blocks.append(blk)
    return CachedModel(blocks, stages[-1]).eval()


def measure_latency(an, manifest, exported, cached_path, learned_path, x_req,
                    s: Settings) -> LatencyResult:
    """Per-request latency at batch 1 and 64: backbone and cached model, eager and scripted.

    ``exported`` is the backbone as loaded (ExportedProgram.module(), with its input guards and
    pytree handling); "backbone_eager" is the same graph as a plain fx GraphModule, the form the
    eager cached model's stages are cut from, so eager is compared with eager.
    """
    import runtime
    from compiler import artifact
    from compiler.analysis.trace import clean_exported

    dev = s.device
    backbone_s = artifact.load(cached_path, map_location=dev)[0]       # exits off
    cached_s = artifact.load(learned_path, map_location=dev)[0]        # learned exits on
    cached_e = eager_cached(an, manifest, artifact.load(learned_path)[0]).to(dev)
    exported = exported.to(dev)                 # ExportedProgram.module() refuses .eval()
    eager_backbone = clean_exported(copy.deepcopy(exported)) if an is not None and \
        isinstance(exported, torch.fx.GraphModule) else exported
    rt = runtime.load(learned_path, device=dev, background=False, seed=0,
                      agreement_budget=s.latency_budget, train_every=10 ** 12)
    E = len(manifest["exits"])
    variants = {
        "backbone_exported": lambda r: exported(r),
        "backbone_eager": lambda r: eager_backbone(r),
        "cached_eager": lambda r: cached_e.forward_with_exits(r),
        "backbone_scripted": lambda r: backbone_s(r),
        "cached_scripted": lambda r: cached_s.forward_with_exits(r),
        "runtime_predict": lambda r: rt.predict(r),
    }
    out = LatencyResult(device=dev, budget=s.latency_budget, reps=s.reps, warmup=s.warmup,
                        threads=torch.get_num_threads(),
                        exit_names=[e["name"] for e in manifest["exits"]] + ["backbone"])
    with torch.no_grad():
        probe = x_req[:64].to(dev)
        e1, x1 = cached_e.forward_with_exits(probe)
        e2, x2 = cached_s.forward_with_exits(probe)
        out.eager_matches_scripted = bool(torch.equal(x1.cpu(), x2.cpu()) and
                                          torch.allclose(e1.cpu(), e2.cpu(), atol=1e-4))
    for bs, count in ((1, s.lat_b1), (64, s.lat_b64)):
        reqs = [x_req[i * bs:(i + 1) * bs].to(dev) for i in range(min(count, len(x_req) // bs))]
        if not reqs:
            continue
        say(f"latency: {len(reqs)} requests of {bs} row(s), {s.reps} reps, {len(variants)} variants")
        times = time_variants(variants, reqs, s.reps, min(s.warmup, len(reqs)), dev)
        with torch.no_grad():
            exits = [cached_s.forward_with_exits(r)[1].cpu() for r in reqs]
        table = latency_table(times, bs)
        fig = {}
        for mode in ("eager", "scripted"):
            b, c = table[f"backbone_{mode}"], table[f"cached_{mode}"]
            fig[f"p50_reduction_{mode}"] = 1 - c.p50 / b.p50
            fig[f"p99_reduction_{mode}"] = 1 - c.p99 / b.p99
            fig[f"throughput_gain_{mode}"] = c.throughput_rows_s / b.throughput_rows_s - 1
        res = BatchLatency(table=table, times_ms=times, **fig,
                           p50_reduction_runtime_vs_scripted=1 - table["runtime_predict"].p50
                           / table["backbone_scripted"].p50)
        if bs == 1:
            ex = torch.cat(exits)
            res.exit_of_request = ex.tolist()
            miss = torch.nonzero(ex == E).flatten().tolist()
            res.missed_every_exit = len(miss)
            for mode in ("eager", "scripted"):
                if miss:
                    ratio = [times[f"cached_{mode}"][k] / times[f"backbone_{mode}"][k] for k in miss]
                    setattr(res, f"miss_slowdown_{mode}", float(torch.tensor(ratio).median()) - 1)
            if miss:
                ratio = [times["runtime_predict"][k] / times["backbone_scripted"][k] for k in miss]
                res.miss_slowdown_runtime_vs_scripted = float(torch.tensor(ratio).median()) - 1
            res.p50_by_exit_scripted = {
                str(e): quantiles([times["cached_scripted"][k] for k in range(len(reqs))
                                   if int(ex[k]) == e])["p50"] for e in range(E + 1)}
        setattr(out, f"batch{bs}", res)
    rt.close()
    out.gpu = NO_GPU if not (torch.device(dev).type == "cuda") else "measured (this table)"
    return out
