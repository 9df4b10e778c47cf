"""Reproduce every figure in BENCHMARKS.md.

    python -m tools.benchmark --mode quick            # CPU, about 15 min on 2 cores
    python -m tools.benchmark --mode full             # GPU machine: trains/caches 5 backbones
    python -m tools.benchmark --write-md              # BENCHMARKS.md + docs/bench/*.png from JSON

quick: the embedded demo backbone (tools/assets/demo_backbone.pt2), 3 seeds over the 10k
Fashion-MNIST test stream at 16 rows per request, offline baselines on the same rows, CPU latency
at batch 1 and 64, and the ImageNet MobileNetV2 (224 px) for FLOPs and latency when its weights
are installed. full: the same for resnet18, resnet50, vgg16_bn, mobilenet_v2 and efficientnet_b0
trained by tools.train on Fashion-MNIST (cached under OUT/backbones), on CUDA when available.

Protocol (tools.experiment.stream): a seeded order; each request is answered before anything learns
from it; figures are taken on the second half of the stream. The oracle uses the heads exactly as
they were when each row was served. Baselines train offline on the first half's backbone outputs
(tools.baselines). Every JSON result (OUT/<backbone>.json) is a
tools.bench.results.BackboneResult; the jobs live in tools/bench/ (this module is the CLI).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

from tools.bench.backbones import ensure_backbone
from tools.bench.imagenet import bench_imagenet
from tools.bench.provenance import code_version, machine_info
from tools.bench.report import write_md
from tools.bench.results import RunInfo
from tools.bench.run import bench_backbone
from tools.bench.settings import FULL, FULL_ARCHS, NO_GPU, QUICK, ROOT, say
from tools.demo import ASSET


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
            path = Path(args.backbone) if args.backbone else ASSET
            if not path.is_file():
                from tools.backbones import ARCHS
                arch = path.stem if path.stem in ARCHS else "ARCH"   # out/backbones/ARCH.pt2
                print(f"error: backbone {path} not found (train it with python -m tools.train "
                      f"--arch {arch} --out {path}, or pass another --backbone)", file=sys.stderr)
                return 2
            todo = [("demo_resnet" if not args.backbone else Path(args.backbone).stem, path)]
        else:
            archs = args.archs.split(",") if args.archs else ["demo_resnet", *FULL_ARCHS]
            todo = [(a, ASSET if a == "demo_resnet" else ensure_backbone(a, out / "backbones", s))
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
        run = RunInfo(command="python -m tools.benchmark " + " ".join(
                          argv if argv is not None else sys.argv[1:]),
                      mode=args.mode, backbones=names, imagenet=s.imagenet,
                      wall_s=time.perf_counter() - t0, machine=machine_info(s.device),
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                          timespec="seconds"),
                      code=code_version())
        (out / "run.json").write_text(json.dumps(run.to_json(), indent=1))
        say(f"done in {run.wall_s / 60:.1f} min; results in {out}")
    if args.write_md:
        path = write_md(out, Path(args.md), Path(args.figures))
        say(f"wrote {path} and figures in {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
