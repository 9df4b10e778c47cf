"""Full mode's backbones: trained by tools.train on first use, cached under OUT/backbones."""
from __future__ import annotations

from pathlib import Path

import torch

from tools.bench.settings import Settings, say


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
