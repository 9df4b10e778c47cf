"""Deterministic camera-like scene streams of real Fashion-MNIST items, with boxes and labels.

A stream is what a fixed camera sees: a cluttered background that changes now and then (a new
scene), and busy spells in which 1..``max_items`` items enter, stay a while (drifting slowly),
and leave, separated by spells with nothing in view. ``empty_share`` of the frames hold no item
(exactly, up to rounding). Training streams take items from Fashion-MNIST's train split,
held-out streams from its test split, so no item of a held-out frame was seen in training.

Frames are grey, one channel, values in [0, 1]; targets follow torchvision's detection format:
``boxes`` float [k, 4] (x1, y1, x2, y2, pixels), ``labels`` int64 [k] = Fashion-MNIST class + 1
(0 is the background, as torchvision detectors expect).

    python -m tools.scenes --frames 400 --empty-share 0.7 --png out/scenes.png
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from tools.data import CLASSES, MEAN, STD, load_fashion_mnist

NUM_CLASSES = len(CLASSES) + 1   # with the background class 0


@dataclass
class SceneConfig:
    """How a stream looks; every field is part of what makes it reproducible."""

    frames: int = 2000
    size: int = 96                 # square frames, pixels
    empty_share: float = 0.5       # share of frames with no item
    max_items: int = 4             # items in view at once, at most
    min_side: int = 22             # an item's side when pasted, pixels
    max_side: int = 40
    min_stay: int = 6              # length of a busy spell, frames
    max_stay: int = 30
    scene_frames: Tuple[int, int] = (60, 240)   # a background lasts this many frames
    fragments: int = 6             # clipped low-contrast item fragments in each background
    noise: float = 0.03            # per-frame sensor noise (std, in [0, 1] units)
    max_speed: float = 1.2         # pixels per frame an item drifts
    split: str = "test"            # Fashion-MNIST split the items come from
    seed: int = 0

    def validate(self):
        if not 0.0 <= self.empty_share <= 1.0:
            raise ValueError(f"empty_share must lie in [0, 1], got {self.empty_share}")
        if self.frames < 1 or self.size < 48:
            raise ValueError(f"need frames >= 1 and size >= 48, got {self.frames}, {self.size}")
        if not 1 <= self.max_items <= 8:
            raise ValueError(f"max_items must lie in 1..8, got {self.max_items}")
        if not 8 <= self.min_side <= self.max_side <= self.size // 2:
            raise ValueError(f"need 8 <= min_side <= max_side <= size/2, got {self.min_side}, "
                             f"{self.max_side}")


@dataclass
class SceneStream:
    """Frames [N, 1, S, S] in [0, 1], per-frame targets, and per-frame item counts."""

    frames: torch.Tensor
    targets: List[Dict[str, torch.Tensor]]
    config: SceneConfig

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def empty(self) -> torch.Tensor:
        """bool [N]: frames with no item."""
        return torch.tensor([t["boxes"].shape[0] == 0 for t in self.targets])


_ITEMS: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}


def items(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST items of ``split`` as float32 [N, 28, 28] in [0, 1] and labels [N]."""
    if split not in _ITEMS:
        x, y = load_fashion_mnist(split)
        _ITEMS[split] = ((x[:, 0] * STD + MEAN).clamp(0, 1).numpy(), y.numpy())
    return _ITEMS[split]


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(img)[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()


def _background(rng: np.random.Generator, cfg: SceneConfig, pool: np.ndarray) -> np.ndarray:
    """A smooth texture with a gradient, stripes and clipped, faint item fragments."""
    s = cfg.size
    coarse = rng.uniform(0.0, 1.0, (1, 1, 6, 6)).astype(np.float32)
    tex = F.interpolate(torch.from_numpy(coarse), size=(s, s), mode="bicubic",
                        align_corners=False)[0, 0].numpy()
    base = rng.uniform(0.05, 0.3)
    bg = base + 0.15 * tex
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    angle = rng.uniform(0, np.pi)
    bg += 0.04 * np.sin(2 * np.pi * rng.uniform(2, 6) * (np.cos(angle) * xx + np.sin(angle) * yy))
    for _ in range(cfg.fragments):
        # A corner of some item, cut small and faint: clutter that is not an object.
        it = pool[rng.integers(len(pool))]
        side = int(rng.integers(cfg.min_side, cfg.max_side + 1))
        img = _resize(it, side)
        w = int(rng.integers(5, max(6, side // 3)))
        h = int(rng.integers(5, max(6, side // 3)))
        oy, ox = int(rng.integers(0, side - h)), int(rng.integers(0, side - w))
        frag = img[oy:oy + h, ox:ox + w] * rng.uniform(0.3, 0.6)
        py, px = int(rng.integers(0, s - h)), int(rng.integers(0, s - w))
        bg[py:py + h, px:px + w] = np.maximum(bg[py:py + h, px:px + w], frag)
    return np.clip(bg, 0, 1).astype(np.float32)


def _schedule(rng: np.random.Generator, cfg: SceneConfig) -> List[Tuple[int, int]]:
    """Busy spells (start, end) so that ``empty_share`` of the frames are empty."""
    n = cfg.frames
    busy_total = n - int(round(cfg.empty_share * n))
    spells = []
    left = busy_total
    while left > 0:
        ln = int(min(left, rng.integers(cfg.min_stay, cfg.max_stay + 1)))
        spells.append(ln)
        left -= ln
    gaps_total = n - busy_total
    # Empty frames spread over the len(spells) + 1 gaps at random (a Dirichlet split).
    w = rng.dirichlet(np.ones(len(spells) + 1)) if spells else np.ones(1)
    gaps = np.floor(w * gaps_total).astype(int)
    gaps[-1] += gaps_total - gaps.sum()
    out, t = [], int(gaps[0])
    for ln, g in zip(spells, gaps[1:]):
        out.append((t, t + ln))
        t += ln + int(g)
    return out


def _place(rng, cfg: SceneConfig, side: int, others: List[Tuple[float, float, int]]):
    """A start position for a new item that does not overlap others much."""
    s = cfg.size
    for _ in range(20):
        x, y = rng.uniform(0, s - side), rng.uniform(0, s - side)
        if all(abs(x - ox) > 0.6 * max(side, os_) or abs(y - oy) > 0.6 * max(side, os_)
               for ox, oy, os_ in others):
            return x, y
    return x, y


def make_stream(cfg: Optional[SceneConfig] = None, **overrides) -> SceneStream:
    """Build a stream; the same config always gives the same frames and targets."""
    cfg = cfg or SceneConfig()
    if overrides:
        cfg = SceneConfig(**{**asdict(cfg), **overrides})
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    pool, labels = items(cfg.split)
    s, n = cfg.size, cfg.frames
    frames = np.zeros((n, s, s), dtype=np.float32)
    boxes: List[List[List[float]]] = [[] for _ in range(n)]
    labs: List[List[int]] = [[] for _ in range(n)]

    # Backgrounds: scene after scene, each held for a while.
    t = 0
    while t < n:
        ln = int(rng.integers(cfg.scene_frames[0], cfg.scene_frames[1] + 1))
        frames[t:t + ln] = _background(rng, cfg, pool)
        t += ln

    for start, end in _schedule(rng, cfg):
        m = int(rng.integers(1, cfg.max_items + 1))
        placed: List[Tuple[float, float, int]] = []
        for k in range(m):
            # The first item spans the whole spell (so every frame of it is busy); the others
            # enter and leave inside it.
            if k == 0 or end - start < 4:
                a, b = start, end
            else:
                a = int(rng.integers(start, end - 2))
                b = int(rng.integers(a + 2, end + 1))
            i = int(rng.integers(len(pool)))
            side = int(rng.integers(cfg.min_side, cfg.max_side + 1))
            raw = _resize(pool[i], side)
            mask = raw > 0.08
            # The item covers the background where it has ink (alpha from its own pixels), so
            # dark garments show as dark shapes instead of vanishing into a bright background.
            alpha = np.clip(raw / 0.08, 0, 1)
            img = raw * rng.uniform(0.7, 1.0)
            if not mask.any():
                continue
            rows, cols = np.nonzero(mask)
            y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            x, y = _place(rng, cfg, side, placed)
            placed.append((x, y, side))
            vx, vy = rng.uniform(-cfg.max_speed, cfg.max_speed, 2)
            for f in range(a, b):
                px = int(round(np.clip(x + vx * (f - a), 0, s - side)))
                py = int(round(np.clip(y + vy * (f - a), 0, s - side)))
                region = frames[f, py:py + side, px:px + side]
                region *= 1 - alpha
                region += alpha * img
                boxes[f].append([px + x0, py + y0, px + x1, py + y1])
                labs[f].append(int(labels[i]) + 1)
    frames += rng.normal(0, cfg.noise, frames.shape).astype(np.float32)
    np.clip(frames, 0, 1, out=frames)
    targets = [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(lb, dtype=torch.int64)} for b, lb in zip(boxes, labs)]
    return SceneStream(torch.from_numpy(frames).unsqueeze(1), targets, cfg)


def save_png(stream: SceneStream, path: str, count: int = 16):
    """A contact sheet of ``count`` frames spread over the stream, with their boxes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    idx = np.linspace(0, len(stream) - 1, min(count, len(stream))).astype(int).tolist()
    cols = 8
    fig, axes = plt.subplots((len(idx) + cols - 1) // cols, cols,
                             figsize=(2 * cols, 2 * len(idx) / cols + 1))
    for ax, i in zip(np.ravel(axes), idx):
        ax.imshow(stream.frames[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        for b, lb in zip(stream.targets[i]["boxes"].tolist(), stream.targets[i]["labels"].tolist()):
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="r"))
            ax.text(b[0], b[1], CLASSES[lb - 1][:7], color="y", fontsize=6)
        ax.set_title(f"frame {i}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.scenes", description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--empty-share", type=float, default=0.5)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", help="write a contact sheet of frames spread over the stream")
    args = p.parse_args(argv)
    st = make_stream(frames=args.frames, empty_share=args.empty_share, split=args.split,
                     seed=args.seed)
    counts = torch.tensor([len(t["labels"]) for t in st.targets])
    print(f"{len(st)} frames, {st.empty.float().mean():.1%} empty, items per busy frame "
          f"{counts[counts > 0].float().mean():.2f}, boxes {int(counts.sum())}")
    if args.png:
        save_png(st, args.png, 32)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
