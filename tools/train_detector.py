"""Train the demo detector: torchvision's RetinaNet on a tiny convolutional backbone with an FPN,
on scene streams of Fashion-MNIST items (``tools.scenes``), on the CPU in minutes.

    python -m tools.train_detector      # the demo's: --arch retinanet --steps 5000, into the asset
    python -m tools.train_detector --arch fcos|ssdlite|maskrcnn --out out/fam/ARCH.pt

Other families for checking the cache beyond the demo's RetinaNet: FCOS (the demo's detector
until 2026-12-06, 500 steps) and Mask R-CNN on the same tiny body and FPN, SSDlite on a
half-width MobileNetV3-Large (torchvision's recipe at 96 px).

Writes a state dict (``build_detector(**meta["build"])`` rebuilds the module) and a ``.json``
beside it with the architecture, training settings, mAP@0.5 on held-out scenes, the command
and the date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from tools.scenes import NUM_CLASSES, SceneConfig, make_stream

ASSET = Path(__file__).resolve().parent / "assets" / "demo_detector.pt"
# Grey frames in [0, 1]; the detector's own transform normalises them.
IMAGE_MEAN, IMAGE_STD = [0.25], [0.2]


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def tiny_body(widths=(8, 24, 32, 48, 64), in_channels: int = 1) -> nn.Sequential:
    """Five stride-2 stages: 96 px frames give 48, 24, 12, 6 and 3 px maps."""
    layers, cin = OrderedDict(), in_channels
    for i, w in enumerate(widths):
        layers["stem" if i == 0 else f"layer{i}"] = _block(cin, w, 2)
        cin = w
    return nn.Sequential(layers)


ARCHS = ("fcos", "retinanet", "ssdlite", "maskrcnn")


def build_detector(arch: str = "fcos", size: int = 96, widths=(8, 24, 32, 48, 64),
                   fpn_channels: int = 32, head_convs: int = 2, num_classes: int = NUM_CLASSES,
                   score_thresh: float = 0.3, in_channels: int = 1,
                   width_mult: float = 0.5) -> nn.Module:
    """A scene detector of family ``arch`` (one of ``ARCHS``) with random weights.

    fcos, retinanet, maskrcnn: the tiny body, its last three stages (strides 8, 16, 32) tapped by
    an FPN with a max-pooled level. ssdlite: torchvision's SSDlite over a MobileNetV3-Large
    (``width_mult``, reduced tail, first conv taking ``in_channels``) at ``size`` px; ``widths``
    and ``fpn_channels`` do not apply to it.
    """
    if arch == "ssdlite":
        return _ssdlite(size, num_classes, score_thresh, in_channels, width_mult)
    body = tiny_body(widths, in_channels)
    names = list(body._modules)
    backbone = BackboneWithFPN(body, {n: str(i) for i, n in enumerate(names[-3:])},
                               list(widths[-3:]), fpn_channels, extra_blocks=LastLevelMaxPool())
    common = dict(min_size=size, max_size=size, image_mean=IMAGE_MEAN[:1] * in_channels,
                  image_std=IMAGE_STD[:1] * in_channels)
    one_stage = dict(common, score_thresh=score_thresh, detections_per_img=20)
    if arch == "fcos":
        anchors = AnchorGenerator(((4,), (8,), (16,), (32,)), ((1.0,),) * 4)
        head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
        return FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **one_stage)
    if arch == "retinanet":
        anchors = AnchorGenerator(((16, 24), (32, 48), (64, 96), (128, 192)),
                                  ((0.5, 1.0, 2.0),) * 4)
        head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **one_stage)
    if arch == "maskrcnn":
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        c = fpn_channels
        return MaskRCNN(
            backbone, None, **common,
            rpn_anchor_generator=AnchorGenerator(((16,), (32,), (64,), (128,)),
                                                 ((0.5, 1.0, 2.0),) * 4),
            rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=50,
            box_head=TwoMLPHead(c * 7 * 7, 128), box_predictor=FastRCNNPredictor(128, num_classes),
            box_score_thresh=score_thresh, box_detections_per_img=20,
            box_batch_size_per_image=128,
            mask_head=MaskRCNNHeads(c, (c, c), 1),
            mask_predictor=MaskRCNNPredictor(c, c, num_classes))
    raise ValueError(f"unknown scene detector arch {arch!r}: one of {', '.join(ARCHS)}")


def _ssdlite(size: int, num_classes: int, score_thresh: float, in_channels: int,
             width_mult: float) -> nn.Module:
    """torchvision's SSDlite320 recipe (MobileNetV3-Large, reduced tail, six feature maps) at
    ``size`` px and ``width_mult``, as ``ssdlite320_mobilenet_v3_large`` builds it otherwise."""
    from functools import partial

    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssdlite import (SSDLiteFeatureExtractorMobileNet,
                                                      SSDLiteHead)
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    net = mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=True,
                             width_mult=width_mult)
    first = net.features[0][0]
    net.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 2, 1, bias=False)
    stages = [0] + [i for i, b in enumerate(net.features) if getattr(b, "_is_cn", False)] + \
        [len(net.features) - 1]
    backbone = SSDLiteFeatureExtractorMobileNet(net.features, stages[-2], norm, width_mult)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    backbone.eval()   # torchvision's retrieve_out_channels assumes 3-channel frames
    with torch.no_grad():
        channels = [f.shape[1] for f in backbone(torch.zeros(1, in_channels, size, size)).values()]
    backbone.train()
    return SSD(backbone, anchors, (size, size), num_classes,
               head=SSDLiteHead(channels, anchors.num_anchors_per_location(), num_classes, norm),
               image_mean=IMAGE_MEAN[:1] * in_channels, image_std=IMAGE_STD[:1] * in_channels,
               score_thresh=score_thresh, nms_thresh=0.55, detections_per_img=20,
               topk_candidates=100)


def _with_masks(targets: List[dict], size: int) -> List[dict]:
    """Mask R-CNN's training targets: each item's mask is its box, filled (the scenes carry
    boxes only; the masks are a by-product the exits never look at)."""
    out = []
    for t in targets:
        b = t["boxes"]
        m = torch.zeros((len(b), size, size), dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(b.round().long().tolist()):
            m[k, y0:y1, x0:x1] = 1
        out.append(dict(t, masks=m))
    return out


def _flip(frames: torch.Tensor, targets: List[dict], gen: torch.Generator):
    """Random horizontal flips of a batch, boxes flipped with their frames."""
    w = frames.shape[-1]
    flip = torch.rand(frames.shape[0], generator=gen) < 0.5
    frames = torch.where(flip[:, None, None, None], frames.flip(-1), frames)
    out = []
    for f, t in zip(flip.tolist(), targets):
        b = t["boxes"]
        if f and b.numel():
            b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
        out.append({"boxes": b, "labels": t["labels"]})
    return frames, out


@torch.no_grad()
def detect(model: nn.Module, frames: torch.Tensor, batch: int = 64) -> List[dict]:
    """The model's detections per frame (eval mode)."""
    model.eval()
    out = []
    for s in range(0, len(frames), batch):
        out += model(list(frames[s:s + batch]))
    return out


def map50(preds: List[dict], targets: List[dict]) -> float:
    """mAP@0.5 (COCO-style 101-point interpolation, classes averaged) via torchmetrics."""
    from torchmetrics.detection import MeanAveragePrecision
    m = MeanAveragePrecision(iou_thresholds=[0.5], box_format="xyxy")
    m.update([{k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in preds],
             [{k: t[k] for k in ("boxes", "labels")} for t in targets])
    return float(m.compute()["map"])


def train(arch: str = "fcos", steps: int = 400, batch_size: int = 24, lr: float = 3e-3,
          seed: int = 0, train_frames: int = 12000, eval_frames: int = 1000,
          max_minutes: Optional[float] = None, log=print, **build) -> tuple:
    """Train on training scenes for ``steps`` steps (seeded: the same steps give the same
    model), stopping early after ``max_minutes`` if given; returns (model, meta)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_detector(arch, **build)
    size = build.get("size", 96)
    data = make_stream(SceneConfig(frames=train_frames, size=size, empty_share=0.3, split="train",
                                   seed=1000 + seed))
    held = make_stream(SceneConfig(frames=eval_frames, size=size, empty_share=0.3, split="test",
                                   seed=2000 + seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    budget = float("inf") if max_minutes is None else max_minutes * 60.0
    t0, step, losses = time.time(), 0, []
    model.train()
    while step < steps:
        elapsed = time.time() - t0
        if elapsed >= budget:
            break
        frac = step / steps   # linear warm-up, then cosine decay to 0
        for g in opt.param_groups:
            g["lr"] = lr * (min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        frames, targets = _flip(data.frames[idx], [data.targets[i] for i in idx.tolist()], gen)
        if arch == "maskrcnn":
            targets = _with_masks(targets, size)
        loss_d = model(list(frames), targets)
        loss = sum(loss_d.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0 and log:
            log(f"step {step} ({elapsed:.0f} s): loss {sum(losses[-50:]) / 50:.3f}")
    train_s = time.time() - t0
    model.eval()
    t1 = time.time()
    score = map50(detect(model, held.frames), held.targets)
    import inspect
    full = {k: v.default for k, v in inspect.signature(build_detector).parameters.items()}
    full.update(build, arch=arch)
    full["widths"] = list(full["widths"])
    meta = {
        "arch": arch, "build": full, "steps": step, "batch_size": batch_size,
        "lr": lr, "seed": seed, "steps_asked": steps, "max_minutes": max_minutes,
        "train_seconds": round(train_s, 1),
        "train_scenes": {"frames": train_frames, "empty_share": 0.3, "split": "train",
                         "seed": 1000 + seed},
        "heldout_scenes": {"frames": eval_frames, "empty_share": 0.3, "split": "test",
                           "seed": 2000 + seed},
        "map50_heldout": round(score, 4), "eval_seconds": round(time.time() - t1, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "score_thresh": build.get("score_thresh", 0.3),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return model, meta


def load_demo_detector(path: Optional[str] = None) -> tuple:
    """(detector in eval mode, meta) from a state dict this tool wrote (default: the asset)."""
    path = Path(path or ASSET)
    meta = json.loads(Path(str(path) + ".json").read_text())
    model = build_detector(**meta["build"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train_detector",
                                description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="retinanet", choices=ARCHS,
                   help="detection family (default: the demo's, retinanet)")
    p.add_argument("--steps", type=int, default=5000,
                   help="optimiser steps (frames: x batch; default: the demo's, 5000)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this long")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-frames", type=int, default=12000, help="training scene frames")
    p.add_argument("--eval-frames", type=int, default=1000, help="held-out frames for mAP@0.5")
    p.add_argument("--out", default=str(ASSET))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, meta = train(args.arch, args.steps, args.batch_size, args.lr, args.seed,
                        args.train_frames, args.eval_frames, max_minutes=args.max_minutes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    meta["command"] = "python -m tools.train_detector " + " ".join(
        sys.argv[1:] if argv is None else argv)
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"mAP@0.5 on {meta['heldout_scenes']['frames']} held-out frames: "
          f"{meta['map50_heldout']:.3f}; {meta['steps']} steps in {meta['train_seconds']:.0f} s; "
          f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
