"""Train a backbone on Fashion-MNIST and export it as a torch.export ExportedProgram."""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from tools.backbones import ARCHS, build
from tools.data import CLASSES, MEAN, STD, load_fashion_mnist

# Upper bound of the exported dynamic batch dimension.
MAX_BATCH = 4096


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip + random crop with ``pad`` pixels of background padding.

    Vectorised over the batch (one gather instead of a Python loop per image) and
    driven by ``gen`` so a run is reproducible from its seed.
    """
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    # Pad with the normalised value of a black pixel, i.e. the image background.
    xp = F.pad(x, (pad, pad, pad, pad), value=(0.0 - MEAN) / STD)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
    bidx = torch.arange(b)[:, None, None, None]
    cidx = torch.arange(c)[None, :, None, None]
    return xp[bidx, cidx, rows, cols]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512, device: str = "cpu"
) -> float:
    """Top-1 accuracy of ``model`` (an nn.Module or a loaded ExportedProgram module) on (x, y)."""
    try:
        model.eval()
    except NotImplementedError:
        # torch.export.load(...).module() refuses eval(); it was exported in eval mode anyway.
        pass
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == y[i : i + batch_size]).sum().item()
    return correct / len(x)


def train(
    arch: str,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    size: Optional[int] = None,
    channels: Optional[int] = None,
    limit: Optional[int] = None,
    device: str = "cpu",
    log: Optional[Callable[[str], None]] = print,
    weight_decay: float = 5e-4,
    progress: bool = True,
) -> tuple[nn.Module, float]:
    """Train ``arch`` on Fashion-MNIST; return (model in eval mode on CPU, test accuracy)."""
    spec = ARCHS[arch]
    size = spec.size if size is None else size
    channels = spec.channels if channels is None else channels
    say = log or (lambda _msg: None)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # shuffling + augmentation

    x_train, y_train = load_fashion_mnist("train", size=size, channels=channels)
    x_test, y_test = load_fashion_mnist("test", size=size, channels=channels)
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]

    model = build(arch, num_classes=len(CLASSES), in_channels=channels).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{arch}: {n_params / 1e6:.3f}M params, input {channels}x{size}x{size}, "
        f"{len(x_train)} train / {len(x_test)} test images, {epochs} epochs on {device}")

    # No weight decay on BN / bias parameters: decaying them only hurts short runs.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    # OneCycle: warm-up then anneal to ~0, which gets most of the accuracy in few epochs.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=max(epochs, 1), steps_per_epoch=steps_per_epoch, pct_start=0.2
    )

    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total_loss, seen, correct = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            xb = _augment(x_train[idx], gen).to(device)
            yb = y_train[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()
        acc = evaluate(model, x_test, y_test, device=device)
        say(f"epoch {epoch + 1}/{epochs}: train loss {total_loss / seen:.4f} "
            f"train acc {correct / seen:.4f} test acc {acc:.4f}")

    acc = evaluate(model, x_test, y_test, device=device)
    return model.cpu().eval(), acc


def export(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike) -> None:
    """Save ``model`` as an ExportedProgram with a dynamic batch dim and verify the reload."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    example = example_input.detach().cpu()
    if example.shape[0] < 2:
        # torch.export specialises size-0/1 dims to constants, which would make
        # the batch dim static; trace with batch 2 instead.
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))

    loaded = torch.export.load(str(path)).module()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (1, 5):
            x = torch.randn(n, *example.shape[1:], generator=gen)
            want, got = model(x), loaded(x)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
                raise RuntimeError(
                    f"exported program {path} disagrees with the model at batch {n} "
                    f"(shape {tuple(got.shape)} vs {tuple(want.shape)}, max abs diff {diff})"
                )


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="demo_resnet", choices=sorted(ARCHS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (OneCycle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="default: 28 for demo_resnet, else 32")
    p.add_argument("--channels", type=int, default=None, help="default: 1 for demo_resnet, else 3")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="output .pt2 (default: out/<arch>.pt2)")
    p.add_argument("--state-dict", nargs="?", const="", default=None, metavar="PATH",
                   help="also save a plain state dict (default path: <out stem>.state_dict.pt)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"out/{args.arch}.pt2")
    spec = ARCHS[args.arch]
    size = args.size or spec.size
    channels = args.channels or spec.channels

    t0 = time.time()
    model, acc = train(
        args.arch, args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        size=size, channels=channels, limit=args.limit, device=args.device,
    )
    train_s = time.time() - t0
    print(f"test accuracy: {acc:.4f} ({train_s:.0f}s)")

    export(model, torch.zeros(2, channels, size, size), out)
    print(f"exported {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if args.state_dict is not None:
        sd_path = Path(args.state_dict) if args.state_dict else out.with_suffix(".state_dict.pt")
        sd_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), sd_path)
        print(f"saved state dict {sd_path}")

    meta = {
        "arch": args.arch,
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "limit": args.limit,
        "test_accuracy": round(acc, 4),
        "input_shape": [channels, size, size],
        "dynamic_batch": [1, MAX_BATCH],
        "normalize": {"mean": MEAN, "std": STD},
        "classes": CLASSES,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_s, 1),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta_path = Path(str(out) + ".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {meta_path}")


if __name__ == "__main__":
    main()
