"""Shared fixtures: a small Fashion-MNIST teacher, exported with a dynamic batch, and its artifact.

The teacher is a tiny CNN trained for a few seconds on 5k Fashion-MNIST training images
downsampled to 14x14 (about 85% test accuracy): good enough that easy rows (trousers, bags,
sneakers...) are recognisable early, so learned exits have something to find.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project is not pip-installed in the venv
    sys.path.insert(0, str(ROOT))

from tools import data  # noqa: E402

# On a machine with two or fewer cores shared with other jobs, intra-op threads spin against each
# other and small ops get ~100x slower; one thread keeps the suite fast. LAYER_CACHE_TEST_THREADS
# overrides (0: leave torch's default).
_default_threads = "1" if (os.cpu_count() or 1) <= 2 else "0"
_threads = int(os.environ.get("LAYER_CACHE_TEST_THREADS", _default_threads))
if _threads > 0:
    torch.set_num_threads(_threads)

def wait_for(cond, seconds: float, step: float = 0.02) -> bool:
    """Poll ``cond`` until it is true or ``seconds`` have passed; its last value."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def live_threads(name: str) -> list:
    """The live threads called ``name`` (the runtime's learner, teacher...)."""
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


SIZE = 14  # Fashion-MNIST downsampled 28 -> 14 by 2x2 average pooling
TEACHER_TRAIN_ROWS = 5000


def fashion_available() -> bool:
    root = Path(os.environ.get("FASHION_MNIST_DIR", str(data.FASHION_MNIST_DIR)))
    return (root / "train-images-idx3-ubyte.gz").is_file() and \
        (root / "t10k-images-idx3-ubyte.gz").is_file()


class TinyCNN(nn.Module):
    """A small sequential CNN for 1x14x14 input (fx- and export-friendly)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32),
                                    nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64),
                                    nn.ReLU())
        self.block4 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_small(split: str):
    """Fashion-MNIST ``split`` at 14x14 (normalised as tools.data does), labels."""
    x, y = data.load_fashion_mnist(split, size=28, channels=1)
    return F.avg_pool2d(x, 2).contiguous(), y


@pytest.fixture(scope="session")
def fashion_small():
    """(train_x, train_y, test_x, test_y) at 14x14; skips when the dataset is not installed."""
    if not fashion_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    xtr, ytr = load_small("train")
    xte, yte = load_small("test")
    return xtr, ytr, xte, yte


@pytest.fixture(scope="session")
def teacher(fashion_small):
    """The trained TinyCNN in eval mode (seeded, deterministic)."""
    xtr, ytr, _, _ = fashion_small
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyCNN()
    x, y = xtr[:TEACHER_TRAIN_ROWS], ytr[:TEACHER_TRAIN_ROWS]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 128):
            b = perm[s:s + 128]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def teacher_pt2(teacher, tmp_path_factory):
    """The teacher as a torch.export program with a dynamic batch dimension."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt2"
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(teacher, (torch.zeros(2, 1, SIZE, SIZE),),
                             dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return path


@pytest.fixture(scope="session")
def teacher_artifact(teacher_pt2):
    """The compiled artifact of the teacher (exits inactive), written by the CLI."""
    from compiler.rewrite import main

    out = teacher_pt2.with_name("teacher.cached.pt")
    rc = main([str(teacher_pt2), "-o", str(out)])
    assert rc == 0, "compiling the teacher failed"
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds on a small CPU; still part of "
                                       "the default run (deselect with -m 'not slow')")
