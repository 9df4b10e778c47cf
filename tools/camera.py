"""Deterministic camera-like classification streams: one scene held for many frames, small motion.

Real traffic is not shuffled: a camera shows one scene for many frames and a request often holds
frames of one scene, so rows are far from independent. Two seeded, stationary generators:

- ``fashion_stream``: Fashion-MNIST items (normalised as ``tools.data`` does), each shown for a
  run of frames (geometric or uniform run length, mean ``mean_run``), with a slow random-walk
  camera shift (sub-pixel, at most ``max_shift`` px), a slight slow zoom, per-frame brightness
  flicker and a little sensor noise. Items are drawn uniformly at random, with replacement, so
  the class mix is the same all along the stream (stationary) while neighbouring frames are
  near-copies.
- ``photo_stream``: the real photos foolbox ships (20 ImageNet JPEGs, 20 CIFAR-10 and 20
  CIFAR-100 PNGs; the folder is read, foolbox is not imported), each upscaled to a short side of
  256 px and held for a run of frames while a crop window pans and zooms smoothly across it; the
  crops are resized to 224 px (``torchvision.ops.roi_align``: sub-pixel windows) and normalised
  with ImageNet's mean and std (``torchvision.transforms.Normalize``). The 60 photos are cycled,
  each cycle in a fresh seeded order. Frames are rendered on demand (``frames(start, stop)``), so a
  long 224 px stream does not sit in memory.

A stream is served in order, ``batch`` consecutive frames per request (``requests``).

    python -m tools.camera --kind fashion --frames 2000 --png out/camera/fashion.png
"""
from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from tools.data import MEAN, STD, load_fashion_mnist

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHOTO_PREFIXES = ("imagenet_", "cifar10_", "cifar100_")
RUNS = ("geometric", "uniform")


def run_lengths(rng: np.random.Generator, frames: int, mean_run: float, run: str) -> List[int]:
    """Scene lengths (frames) summing to ``frames``: geometric (support 1, 2, ...) or uniform on
    1 .. 2 * mean - 1, both with mean ``mean_run``; the last run is cut to fit."""
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    if mean_run < 1:
        raise ValueError(f"mean_run must be >= 1, got {mean_run}")
    out, total = [], 0
    while total < frames:
        if run == "geometric":
            n = int(rng.geometric(1.0 / mean_run))
        else:
            n = int(rng.integers(1, max(int(round(2 * mean_run)) - 1, 1) + 1))
        n = min(n, frames - total)
        out.append(n)
        total += n
    return out


@dataclass
class CameraStream:
    """Frames in serving order. ``x`` [N, C, H, W] normalised; ``y`` the item's label (reports
    only); ``scene`` the scene index of each frame; ``item`` the source item (Fashion-MNIST index
    or photo number)."""

    x: torch.Tensor
    y: torch.Tensor
    scene: torch.Tensor
    item: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def frames(self, start: int, stop: int) -> torch.Tensor:
        return self.x[start:stop]

    def requests(self, batch: int) -> Iterator[Tuple[int, torch.Tensor]]:
        """(first row, frames) of each request of ``batch`` consecutive frames, in order."""
        for s in range(0, len(self), batch):
            yield s, self.frames(s, min(s + batch, len(self)))


# ----- Fashion-MNIST --------------------------------------------------------------------------
@dataclass
class FashionCameraConfig:
    """How a Fashion-MNIST camera stream looks; every field is part of what makes it reproducible."""

    frames: int = 12000
    mean_run: float = 24.0        # frames a scene (one item) lasts, on average
    run: str = "geometric"        # or "uniform"
    max_shift: float = 2.0        # camera offset bound, pixels
    step: float = 0.35            # random-walk step of the offset per frame (std), pixels
    zoom: float = 0.06            # scale stays within 1 +- zoom
    zoom_step: float = 0.01       # random-walk step of the scale per frame (std)
    flicker: float = 0.06         # brightness gain within 1 +- flicker, fresh each frame
    noise: float = 0.01           # sensor noise (std, pixel values in [0, 1])
    split: str = "test"
    seed: int = 0


def _walk(rng, n: int, bound: float, step: float, dims: int) -> np.ndarray:
    """A random walk of ``n`` steps started uniformly in [-bound / 2, bound / 2] and kept within
    [-bound, bound] by reflection: slow, smooth camera motion."""
    pos = np.empty((n, dims))
    p = rng.uniform(-bound / 2, bound / 2, size=dims)
    for t in range(n):
        pos[t] = p
        p = p + rng.normal(0.0, step, size=dims)
        p = np.where(p > bound, 2 * bound - p, p)
        p = np.where(p < -bound, -2 * bound - p, p)
    return pos


def fashion_stream(cfg: Optional[FashionCameraConfig] = None, data=None,
                   **overrides) -> CameraStream:
    """A stationary camera-like stream of Fashion-MNIST frames [N, 1, 28, 28], normalised.

    ``data``: (x, y) to draw items from (default: ``tools.data.load_fashion_mnist(cfg.split)``,
    normalised by (p - MEAN) / STD); the motion happens in pixel space with a black border.
    """
    cfg = cfg or FashionCameraConfig()
    if overrides:
        cfg = FashionCameraConfig(**{**cfg.__dict__, **overrides})
    if cfg.frames < 1:
        raise ValueError(f"frames must be >= 1, got {cfg.frames}")
    xs, ys = data if data is not None else load_fashion_mnist(cfg.split, size=28, channels=1)
    rng = np.random.default_rng(cfg.seed)
    runs = run_lengths(rng, cfg.frames, cfg.mean_run, cfg.run)
    items = rng.integers(0, len(xs), size=len(runs))
    shift = np.concatenate([_walk(rng, n, cfg.max_shift, cfg.step, 2) for n in runs])
    scale = 1.0 + np.concatenate([_walk(rng, n, cfg.zoom, cfg.zoom_step, 1) for n in runs])[:, 0]
    gain = 1.0 + rng.uniform(-cfg.flicker, cfg.flicker, size=cfg.frames)
    scene = np.repeat(np.arange(len(runs)), runs)
    item = items[scene]
    noise_seed = int(rng.integers(0, 2 ** 31 - 1))

    H, W = xs.shape[-2:]
    theta = np.zeros((cfg.frames, 2, 3))
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale          # > 1 zooms in
    theta[:, 0, 2] = -2.0 * shift[:, 0] / W                  # image moves right by shift px
    theta[:, 1, 2] = -2.0 * shift[:, 1] / H
    theta = torch.from_numpy(theta).float()
    gen = torch.Generator().manual_seed(noise_seed)
    out = torch.empty((cfg.frames,) + tuple(xs.shape[1:]))
    item_t = torch.from_numpy(item)
    for s in range(0, cfg.frames, 4096):
        e = min(s + 4096, cfg.frames)
        p = xs[item_t[s:e]] * STD + MEAN                     # pixels in [0, 1]
        grid = F.affine_grid(theta[s:e], list(p.shape), align_corners=False)
        p = F.grid_sample(p, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        p = p * torch.from_numpy(gain[s:e]).float().view(-1, 1, 1, 1)
        p = p + cfg.noise * torch.randn(p.shape, generator=gen)
        out[s:e] = (p.clamp(0.0, 1.0) - MEAN) / STD
    return CameraStream(out.contiguous(), ys[item_t].clone(), torch.from_numpy(scene), item_t)


# ----- photos at 224 px -----------------------------------------------------------------------
def photo_folder() -> Optional[Path]:
    """foolbox's ``data/`` folder in site-packages (found without importing foolbox), or None."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data"
    return p if p.is_dir() else None


@dataclass
class Photo:
    name: str          # file name
    source: str        # imagenet, cifar10 or cifar100
    label: int         # the label in the file name (that data set's own class numbering)
    image: torch.Tensor  # [3, H, W] in [0, 1], short side ``short_side``


def load_photos(folder: Optional[Path] = None, short_side: int = 256) -> List[Photo]:
    """The ImageNet, CIFAR-10 and CIFAR-100 photos of ``folder`` (default: foolbox's), sorted by
    name, each resized (bilinear, antialiased) to a short side of ``short_side`` px."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    folder = folder or photo_folder()
    if folder is None:
        raise FileNotFoundError("foolbox's data folder was not found: pip install foolbox "
                                "(only its data/ folder is read)")
    photos = []
    for f in sorted(Path(folder).iterdir()):
        if not f.name.startswith(PHOTO_PREFIXES) or f.suffix.lower() not in (".png", ".jpg"):
            continue
        source, _, label = f.stem.split("_")
        with Image.open(f) as im:
            img = TF.to_tensor(im.convert("RGB"))
        img = TF.resize(img, short_side, antialias=True).clamp(0.0, 1.0)
        photos.append(Photo(f.name, source, int(label), img))
    if not photos:
        raise FileNotFoundError(f"no ImageNet or CIFAR photos in {folder}")
    return photos


@dataclass
class PhotoCameraConfig:
    """How a photo camera stream looks; every field is part of what makes it reproducible."""

    frames: int = 4000
    mean_run: float = 48.0        # frames a photo is held, on average
    run: str = "uniform"          # or "geometric"
    size: int = 224               # output side, pixels
    short_side: int = 256         # photos are upscaled (or downscaled) to this short side first
    min_crop: float = 0.6         # crop side as a share of the short side: zoom range
    max_crop: float = 1.0
    flicker: float = 0.04         # brightness gain within 1 +- flicker, fresh each frame
    noise: float = 0.01           # sensor noise (std, pixel values in [0, 1])
    flip: bool = False            # mirror half the frames (drawn per frame)
    color_jitter: float = 0.0     # per-channel gains within 1 +- color_jitter, fresh each frame
    seed: int = 0


# Not a camera: every frame its own random resized crop (35-100% of the short side) of a random
# photo, mirrored half the time, with its own colour cast and more noise. A stream built the way
# training pipelines augment images, unlike the pans and zooms above (issue 14's hidden streams).
SNAPSHOTS = dict(mean_run=1.0, min_crop=0.35, flip=True, color_jitter=0.2, noise=0.03)


class PhotoStream:
    """A camera panning and zooming slowly over photos; frames rendered on demand.

    The plan (which photo, which crop window, which gain per frame) is fixed at construction;
    ``frames(start, stop)`` renders those frames, normalised for ImageNet models.
    """

    def __init__(self, cfg: Optional[PhotoCameraConfig] = None, photos: Optional[List[Photo]] = None,
                 **overrides):
        from torchvision import transforms
        cfg = cfg or PhotoCameraConfig()
        if overrides:
            cfg = PhotoCameraConfig(**{**cfg.__dict__, **overrides})
        if not 0.0 < cfg.min_crop <= cfg.max_crop <= 1.0:
            raise ValueError(f"need 0 < min_crop <= max_crop <= 1, got {cfg.min_crop}, "
                             f"{cfg.max_crop}")
        if cfg.frames < 1:
            raise ValueError(f"frames must be >= 1, got {cfg.frames}")
        self.cfg = cfg
        self.photos = photos if photos is not None else load_photos(short_side=cfg.short_side)
        self.normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        rng = np.random.default_rng(cfg.seed)
        runs = run_lengths(rng, cfg.frames, cfg.mean_run, cfg.run)
        order: List[int] = []
        while len(order) < len(runs):               # cycles, each in a fresh seeded order
            order.extend(rng.permutation(len(self.photos)).tolist())
        items = np.array(order[:len(runs)])
        boxes = []
        for i, n in zip(items, runs):
            _, H, W = self.photos[i].image.shape
            short = min(H, W)
            ends = []
            for _ in range(2):                      # the window's start and end: pan and zoom
                side = rng.uniform(cfg.min_crop, cfg.max_crop) * short
                ends.append((rng.uniform(0, W - side), rng.uniform(0, H - side), side))
            (x0, y0, s0), (x1, y1, s1) = ends
            t = np.arange(n) / max(n - 1, 1)
            t = t * t * (3 - 2 * t)                 # smoothstep: the camera eases in and out
            x, y, s = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, s0 + (s1 - s0) * t
            boxes.append(np.stack([x, y, x + s, y + s], 1))
        self.scene = torch.from_numpy(np.repeat(np.arange(len(runs)), runs))
        self.item = torch.from_numpy(items[self.scene.numpy()])
        self.boxes = torch.from_numpy(np.concatenate(boxes)).float()
        self.gain = torch.from_numpy(1.0 + rng.uniform(-cfg.flicker, cfg.flicker,
                                                       size=cfg.frames)).float()
        self._noise_seed = int(rng.integers(0, 2 ** 31 - 1))
        self.y = torch.tensor([self.photos[i].label for i in self.item.tolist()])
        # drawn last, and only when asked for: the streams without them stay as they were
        self.flip = torch.from_numpy(rng.random(cfg.frames) < 0.5) if cfg.flip else None
        self.tint = torch.from_numpy(1.0 + rng.uniform(-cfg.color_jitter, cfg.color_jitter,
                                                       size=(cfg.frames, 3))).float() \
            if cfg.color_jitter else None

    def __len__(self) -> int:
        return self.cfg.frames

    @property
    def sources(self) -> List[str]:
        return [self.photos[i].source for i in self.item.tolist()]

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """Frames ``start .. stop - 1`` [n, 3, size, size], ImageNet-normalised; the same frames
        every call (each frame's noise is seeded by its index)."""
        start, stop = max(start, 0), min(stop, len(self))
        return self.frames_at(torch.arange(start, stop))

    def frames_at(self, idx: torch.Tensor) -> torch.Tensor:
        """Frames ``idx`` (any order), as ``frames`` renders them."""
        from torchvision.ops import roi_align
        S = self.cfg.size
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = torch.empty((len(idx), 3, S, S))
        items = self.item[idx]
        for i in items.unique().tolist():
            pos = (items == i).nonzero()[:, 0]
            boxes = torch.cat([torch.zeros(len(pos), 1), self.boxes[idx[pos]]], 1)
            out[pos] = roi_align(self.photos[i].image[None], boxes, (S, S),
                                 spatial_scale=1.0, sampling_ratio=2, aligned=True)
        out *= self.gain[idx].view(-1, 1, 1, 1)
        if self.tint is not None:
            out *= self.tint[idx].view(-1, 3, 1, 1)
        if self.flip is not None:
            mirrored = self.flip[idx]
            out[mirrored] = out[mirrored].flip(-1)
        for k, f in enumerate(idx.tolist()):
            g = torch.Generator().manual_seed(self._noise_seed + f)
            out[k] += self.cfg.noise * torch.randn(out[k].shape, generator=g)
        return self.normalize(out.clamp_(0.0, 1.0))

    def requests(self, batch: int) -> Iterator[Tuple[int, torch.Tensor]]:
        """(first row, frames) of each request of ``batch`` consecutive frames, in order."""
        for s in range(0, len(self), batch):
            yield s, self.frames(s, s + batch)


# ----- a look at a stream ---------------------------------------------------------------------
def save_png(frames: torch.Tensor, path: str, mean, std, cols: int = 16):
    """A grid of frames (normalised with ``mean``/``std``) as a PNG."""
    from torchvision.utils import save_image
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image((frames * s + m).clamp(0, 1), path, nrow=cols)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.camera", description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("fashion", "photo"), default="fashion")
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None, help="write the first 64 frames as a grid")
    args = p.parse_args(argv)
    if args.kind == "fashion":
        s = fashion_stream(frames=args.frames, seed=args.seed)
        first, mean, std = s.x[:64], (MEAN,), (STD,)
    else:
        s = PhotoStream(frames=args.frames, seed=args.seed)
        first, mean, std = s.frames(0, 64), IMAGENET_MEAN, IMAGENET_STD
    print(f"{args.kind}: {len(s)} frames, {int(s.scene[-1]) + 1} scenes "
          f"(mean run {len(s) / (int(s.scene[-1]) + 1):.1f} frames)")
    if args.png:
        save_png(first, args.png, mean, std)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
