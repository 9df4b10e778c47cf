"""Fashion-MNIST loader that reads the raw idx.gz files with gzip + numpy."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

# Debian's dataset-fashion-mnist installs here; the env var lets CI or users
# point at a copy elsewhere without code changes.
FASHION_MNIST_DIR = Path(
    os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# Per-pixel statistics of the Fashion-MNIST training set (values in [0, 1]).
MEAN = 0.2860
STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: bad idx magic {magic:#x}, expected {expected_magic:#x}")
    # The low byte of the magic is the number of dimensions; each dim is a
    # big-endian uint32 following the magic.
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


def load_fashion_mnist(
    split: str = "test", size: int = 28, channels: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N, channels, size, size] float32 normalised, labels [N] int64)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size < 28:
        raise ValueError(f"size must be >= 28, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")

    # Re-read the env var at call time so tests / callers can override it late.
    root = Path(os.environ.get("FASHION_MNIST_DIR", str(FASHION_MNIST_DIR)))
    img_path, lbl_path = (root / name for name in _FILES[split])
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p} not found: run `apt-get install dataset-fashion-mnist` "
                f"or set FASHION_MNIST_DIR"
            )

    images = _read_idx(img_path, 0x00000803)
    labels = _read_idx(lbl_path, 0x00000801)

    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # [N, 1, 28, 28]
    if size > 28:
        # Zero-pad in raw pixel space (black = background) before normalising,
        # CIFAR-style 28 -> 32, so the border looks like the image background.
        total = size - 28
        lo, hi = total // 2, total - total // 2
        x = torch.nn.functional.pad(x, (lo, hi, lo, hi), value=0.0)
    x = (x - MEAN) / STD
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x.contiguous(), y
