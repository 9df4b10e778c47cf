"""The benchmark's settings, in one documented dataclass, and its quick and full presets."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FULL_ARCHS = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "efficientnet_b0")
IMAGENET_FILE = "mobilenet_v2-b0353104.pth"
NO_GPU = "not measured: no GPU lent"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    """What one benchmark run measures, and how hard it tries.

    mode:             "quick" (the embedded demo backbone, CPU) or "full" (five trained backbones).
    device:           where the runtime, the baselines' feature pass and the timings run.
    seeds:            stream orders; every method is run once per seed.
    batch:            rows per request in the stream.
    rows:             stream only the first N test rows (0: the whole 10k test stream).
    budgets:          agreement budgets the online runtime is run at.
    sweep:            budgets the (cheap, offline) baselines are swept at, besides ``budgets``.
    latency_budget:   the learned artifact timed is this budget's, first seed.
    confidence:       the Wilson bound's confidence for every method's thresholds.
    baselines:        names in ``tools.baselines.BASELINES`` to run.
    lat_b1, lat_b64:  requests timed at batch 1 and at batch 64.
    reps, warmup:     timed repetitions per request (median kept) and warm-up requests.
    imagenet:         also time MobileNetV2 at 224 px, when its weights are installed.
    imagenet_b1, imagenet_b64, imagenet_reps: the same for MobileNetV2.
    train_epochs:     full mode: ``tools.train`` epochs per backbone.
    threads:          torch intra-op threads (0: torch's default).
    baseline_epochs:  0: each baseline's own epochs (``tools.baselines.BASELINES``).
    rewrite_overrides: ``compiler.config.RewriteConfig`` fields (default: none).
    runtime_overrides: ``runtime.load`` settings passed on to every online run.
    """

    mode: str = "quick"
    device: str = "cpu"
    seeds: tuple = (0, 1, 2)
    batch: int = 16
    rows: int = 0
    budgets: tuple = (0.99, 0.995)
    sweep: tuple = (0.97, 0.98, 0.99, 0.995, 0.999)
    latency_budget: float = 0.995
    confidence: float = 0.95
    baselines: tuple = ("sdn", "apparate", "paper", "branchynet")
    lat_b1: int = 300
    lat_b64: int = 16
    reps: int = 3
    warmup: int = 10
    imagenet: bool = True
    imagenet_b1: int = 30
    imagenet_b64: int = 3
    imagenet_reps: int = 3
    train_epochs: int = 8
    threads: int = 1
    baseline_epochs: int = 0
    rewrite_overrides: dict = field(default_factory=dict)
    runtime_overrides: dict = field(default_factory=dict)


QUICK = Settings()
FULL = Settings(mode="full", device="cuda", lat_b1=1000, lat_b64=100, reps=5, warmup=50,
                imagenet_b1=500, imagenet_b64=50, imagenet_reps=5, threads=0)


def say(msg: str):
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
