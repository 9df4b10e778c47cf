"""Detectors: cut a torchvision detector's backbone body into stages, attach "nothing here" exits,
and emit one scripted artifact that plain ``torch.jit.load`` runs.

Accepted: torchvision's GeneralizedRCNN (Faster, Mask and Keypoint R-CNN), RetinaNet and FCOS
families, whose backbone is a ``BackboneWithFPN`` (an ``IntermediateLayerGetter`` body tapped by a
feature pyramid), and SSD / SSDlite with torchvision's VGG or MobileNet feature extractor (its
``features`` and ``extra`` blocks, each block's output tapped; SSD-VGG's first tap rescaled by an
L2 norm). The input transform, the FPN, the detection head and the post-processing (boxes, masks,
keypoints) stay the model's own; exits go into the body only.

The body, flattened (``body_steps``): a list of children run in order, each with the name its
output is tapped under (or none) and the module applied to it before tapping (``nn.Identity``,
or SSD-VGG's ``L2Rescale``). For an FPN backbone the children are the ``IntermediateLayerGetter``'s
and the FPN then reads the taps; for SSD they are the children of each ``features`` and ``extra``
block and the taps go to the head as they are (SSD has no FPN).

Cut points. The body runs its children in order and several are tapped, so after the first tap
the live state is several tensors: the taps so far and the newest output. A cut point after body
child ``k`` carries that set; its exit head reads the newest tensor, and resuming passes them all
on. ``DetectionCut.carries`` names them.

What an exit answers: "nothing here". Its head (pooling + a small classifier, two classes:
0 = nothing, 1 = something) predicts whether the detector would return any detection at or above
the service's score threshold; a row leaves when the head's confidence in class 0 reaches the
exit's threshold (``exit_rule.class_confidence``, the one rule the runtime and calibration read
too) and gets an empty result in the detector's format (``CachedDetector.empty``: the keys, order,
dtypes and per-detection shapes the detector returns, masks [0, 1, H, W] and keypoints [0, K, 3]
included, read from the detector's own output at compile time). The other rows get exactly what
the detector returns for them.

Generated ``forward`` of the artifact (images ``x`` [N, C, H, W] of one size)::

    tensors, sizes = self.prepare(x)                 # the detector's own transform
    h, taps = tensors, []
    for blk in self.blocks:                          # body children up to each exit
        h, taps = blk.stage(h, taps)                 # taps: the FPN's (head's) inputs so far
        if blk.enabled: rows confident of "nothing" get an empty result and leave
    h, taps = self.final(h, taps)                    # the rest of the body
    return self.finish(tensors, taps, sizes, ...)    # FPN, head, post-processing (the model's)
"""
import copy
import datetime
import os
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection.image_list import ImageList

from . import artifact, detection_onnx, exit_rule
from .analysis.flops import FlopCounter
from .errors import CompilerError, ModelLoadError, ShapeError
from .heads import ExitHead, HeadSpec

TASK = "detection"
NOTHING = 0              # the head's class for "the detector finds nothing here"
HEAD_CLASSES = 2
OUTPUT_KEYS = ("boxes", "scores", "labels")   # every detector returns these
EXTRA_KEYS = ("masks", "keypoints", "keypoints_scores")   # Mask / Keypoint R-CNN add these


@dataclass
class DetectionConfig:
    """How exits are placed in a detector.

    input_shape:     example input [1, C, H, W]; frames served must have this C, H, W.
    num_exits:       exits to place when ``exits`` is empty (spread over the body's cut points).
    exits:           body child names to cut after (see --report), instead of the automatic choice.
    max_fraction:    automatic exits only where at most this share of the detector's FLOPs ran.
    score_threshold: the service's score threshold: an exit predicts "no detection at or above
                     it"; None takes the detector's own post-processing threshold.
    hidden:          hidden units of each head's classifier (0: one Linear).
    seed:            seeds head initialisation and the example input.
    atol, rtol:      tolerance when checking the artifact against the detector.
    onnx_parts:      store the detector's frozen parts as ONNX in the artifact (batch 1, traced
                     by torchvision's own path; ``compiler/detection_onnx.py``), which
                     ``python -m compiler.export`` needs; costs the detector's weights once more
                     in the file. When they do not export the artifact is written all the same
                     and its manifest says why.
    """

    input_shape: Optional[Tuple[int, ...]] = None
    num_exits: int = 4
    exits: List[str] = field(default_factory=list)
    max_fraction: float = 0.6
    score_threshold: Optional[float] = None
    hidden: int = 32
    seed: int = 0
    atol: float = 1e-4
    rtol: float = 1e-4
    onnx_parts: bool = True


@dataclass
class DetectionCut:
    """A place in the body after child ``name``, and the live tensors it carries."""

    name: str
    position: int                      # index of the body child it follows
    carries: List[str]                 # live tensors: FPN taps so far, then the newest output
    shape: Tuple[int, ...]             # the newest tensor's shape (the head reads it)
    flops_before: int = 0              # per frame, transform included
    fraction: float = 0.0
    preferred: bool = True             # False: right before a norm/activation

    def to_dict(self):
        return asdict(self)


# ----- the scripted pieces ----------------------------------------------------------------------
class BodySegment(nn.Module):
    """Consecutive body children; the outputs that are tapped go to ``taps``, each through its
    tap module (``nn.Identity``, or SSD-VGG's ``L2Rescale``)."""

    def __init__(self, children: List[nn.Module], tapped: List[bool],
                 tap_fns: Optional[List[nn.Module]] = None):
        super().__init__()
        self.layers = nn.ModuleList(children)
        self.tapped = tapped
        self.tap_fns = nn.ModuleList(tap_fns if tap_fns is not None
                                     else [nn.Identity() for _ in children])

    def forward(self, h: torch.Tensor,
                taps: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        out = list(taps)
        i = 0
        for layer, tap_fn in zip(self.layers, self.tap_fns):
            h = layer(h)
            if self.tapped[i]:
                out.append(tap_fn(h))
            i += 1
        return h, out


class L2Rescale(nn.Module):
    """SSD-VGG's first feature map as its head reads it: ``scale_weight * F.normalize(x)``
    (``SSDFeatureExtractorVGG.forward``); the body goes on from ``x`` itself."""

    def __init__(self, scale_weight: nn.Parameter):
        super().__init__()
        self.scale_weight = scale_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)


class _PassFeatures(nn.Module):
    """SSD's "FPN": none; the head reads the taps as they are, in order."""

    def forward(self, feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return feats


class _NoBackbone(nn.Module):
    """Stands in for the detector's backbone, which the artifact runs itself (in stages)."""

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"0": x}


class SingleStageTail(nn.Module):
    """RetinaNet / FCOS after the FPN: the model's head, anchors and post-processing."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.det = detector

    def forward(self, tensors: torch.Tensor, image_sizes: List[Tuple[int, int]],
                features: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        images = ImageList(tensors, image_sizes)
        feats = list(features.values())
        head_outputs = self.det.head(feats)
        anchors = self.det.anchor_generator(images, feats)
        per_level = [x.size(2) * x.size(3) for x in feats]
        hw = 0
        for v in per_level:
            hw += v
        a = head_outputs["cls_logits"].size(1) // hw
        per_level = [v * a for v in per_level]
        split_outputs: Dict[str, List[torch.Tensor]] = {}
        for k in head_outputs:
            split_outputs[k] = list(head_outputs[k].split(per_level, dim=1))
        split_anchors = [list(x.split(per_level)) for x in anchors]
        return self.det.postprocess_detections(split_outputs, split_anchors, image_sizes)


class SSDTail(nn.Module):
    """SSD / SSDlite after the body: the model's head, default boxes and post-processing, as
    ``SSD.forward`` runs them in eval mode."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.det = detector

    def forward(self, tensors: torch.Tensor, image_sizes: List[Tuple[int, int]],
                features: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        images = ImageList(tensors, image_sizes)
        feats = list(features.values())
        head_outputs = self.det.head(feats)
        anchors = self.det.anchor_generator(images, feats)
        return self.det.postprocess_detections(head_outputs, anchors, image_sizes)


class TwoStageTail(nn.Module):
    """GeneralizedRCNN after the FPN: the model's RPN and ROI heads (boxes, and masks or
    keypoints where the model has those heads)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.det = detector

    def forward(self, tensors: torch.Tensor, image_sizes: List[Tuple[int, int]],
                features: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        images = ImageList(tensors, image_sizes)
        proposals, _ = self.det.rpn(images, features)
        detections, _ = self.det.roi_heads(features, proposals, image_sizes)
        return detections


class CachedDetector(nn.Module):
    """The detector, its body cut into stages with a "nothing here" exit after each but the last."""

    def __init__(self, transform: nn.Module, blocks: List[artifact.ExitBlock], final: BodySegment,
                 fpn: nn.Module, tail: nn.Module, tap_names: List[str], score_threshold: float,
                 output_keys: Optional[List[str]] = None, num_keypoints: int = 0):
        super().__init__()
        self.transform = transform
        self.blocks = nn.ModuleList(blocks)
        self.final = final
        self.fpn = fpn
        self.tail = tail
        self.tap_names = tap_names
        # The detector's answer format (``empty``): its keys in its order, and K of keypoints.
        self.output_keys = list(output_keys or OUTPUT_KEYS)
        self.num_keypoints = int(num_keypoints)
        self.register_buffer("score_threshold", torch.tensor(float(score_threshold)))
        # The detector's frozen parts as ONNX (``compiler/detection_onnx.py``), back to back.
        self.register_buffer("onnx_parts", torch.zeros([0], dtype=torch.uint8))
        self.register_buffer("onnx_part_sizes", torch.zeros([0], dtype=torch.long))

    def forward(self, x: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        return self.forward_with_exits(x)[0]

    @torch.jit.export
    def prepare(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """The detector's own input transform of a batch [N, C, H, W]: (batched tensor, sizes)."""
        images = [x[i] for i in range(x.size(0))]
        image_list, _ = self.transform(images, None)
        return image_list.tensors, image_list.image_sizes

    @torch.jit.export
    def finish(self, tensors: torch.Tensor, taps: List[torch.Tensor],
               image_sizes: List[Tuple[int, int]],
               original_sizes: List[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
        """FPN, head and post-processing (the model's own) on the rows that ran the whole body."""
        feats: Dict[str, torch.Tensor] = {}
        for name, t in zip(self.tap_names, taps):
            feats[name] = t
        features = self.fpn(feats)
        detections = self.tail(tensors, image_sizes, features)
        return self.transform.postprocess(detections, image_sizes, original_sizes)

    @torch.jit.export
    def empty(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """A frame of the batch ``x`` [N, C, H, W] with no detection, in the detector's format:
        its keys in its order; masks [0, 1, H, W], keypoints [0, K, 3], keypoints_scores [0, K]."""
        out: Dict[str, torch.Tensor] = {}
        for k in self.output_keys:
            if k == "boxes":
                out[k] = torch.zeros([0, 4], dtype=x.dtype, device=x.device)
            elif k == "labels":
                out[k] = torch.zeros([0], dtype=torch.long, device=x.device)
            elif k == "masks":
                out[k] = torch.zeros([0, 1, x.size(2), x.size(3)], dtype=x.dtype, device=x.device)
            elif k == "keypoints":
                out[k] = torch.zeros([0, self.num_keypoints, 3], dtype=x.dtype, device=x.device)
            elif k == "keypoints_scores":
                out[k] = torch.zeros([0, self.num_keypoints], dtype=x.dtype, device=x.device)
            else:   # "scores"; the compiler admits no other key
                out[k] = torch.zeros([0], dtype=x.dtype, device=x.device)
        return out

    @torch.jit.export
    def forward_with_exits(
            self, x: torch.Tensor) -> Tuple[List[Dict[str, torch.Tensor]], torch.Tensor]:
        """Per-frame detections in input order, and each frame's exit (``len(blocks)``: none)."""
        n = x.size(0)
        tensors, sizes = self.prepare(x)
        original = [(x.size(2), x.size(3)) for _ in range(n)]
        idx = torch.arange(n, device=x.device)
        exit_of = torch.full([n], len(self.blocks), dtype=torch.long, device=x.device)
        h = tensors
        taps: List[torch.Tensor] = []
        i = 0
        for blk in self.blocks:
            if h.size(0) > 0:
                h, taps = blk.stage(h, taps)
                if bool(blk.enabled):
                    logits = blk.head(h)
                    take = exit_rule.leaves(exit_rule.class_confidence(logits, 0),
                                            blk.threshold, True)
                    if bool(take.any()):
                        exit_of.index_fill_(0, idx[take], i)
                        keep = ~take
                        h = h[keep]
                        taps = [t[keep] for t in taps]
                        idx = idx[keep]
            i += 1
        out: List[Dict[str, torch.Tensor]] = [self.empty(x) for _ in range(n)]
        if h.size(0) > 0:
            h, taps = self.final(h, taps)
            rows: List[int] = idx.tolist()
            if len(rows) == n:
                return self.finish(tensors, taps, sizes, original), exit_of
            dets = self.finish(tensors[idx], taps, [sizes[r] for r in rows],
                               [original[r] for r in rows])
            for k in range(len(rows)):
                out[rows[k]] = dets[k]
        return out, exit_of


# ----- analysis ---------------------------------------------------------------------------------
def family(model: nn.Module) -> str:
    """'single_stage' (RetinaNet, FCOS), 'two_stage' (GeneralizedRCNN: Faster, Mask, Keypoint
    R-CNN), 'ssd' (SSD, SSDlite), or a CompilerError that says what is accepted."""
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.ssd import SSD, SSDFeatureExtractorVGG
    from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet
    if isinstance(model, SSD):
        if type(model.backbone) not in (SSDFeatureExtractorVGG, SSDLiteFeatureExtractorMobileNet):
            raise CompilerError(f"the backbone of this SSD is a {type(model.backbone).__name__}, "
                                f"not torchvision's SSDFeatureExtractorVGG or "
                                f"SSDLiteFeatureExtractorMobileNet, so its body cannot be cut; "
                                f"build the SSD with one of those (ssd300_vgg16, "
                                f"ssdlite320_mobilenet_v3_large)")
        return "ssd"
    if isinstance(model, (FCOS, RetinaNet)):
        kind = "single_stage"
    elif isinstance(model, GeneralizedRCNN):
        kind = "two_stage"
    else:
        raise CompilerError(f"{type(model).__name__} is not a torchvision detector this compiler "
                            f"knows (GeneralizedRCNN, RetinaNet, FCOS, SSD)")
    from torchvision.models._utils import IntermediateLayerGetter
    bb = getattr(model, "backbone", None)
    if not (hasattr(bb, "body") and hasattr(bb, "fpn")
            and isinstance(bb.body, IntermediateLayerGetter)):
        raise CompilerError(f"the backbone of this {type(model).__name__} is not a BackboneWithFPN "
                            f"(an IntermediateLayerGetter body and an FPN), so exits cannot be "
                            f"placed; build it with torchvision's resnet_fpn_backbone or "
                            f"mobilenet_backbone(fpn=True)")
    return kind


@dataclass
class BodyStep:
    """One child of the flattened body: its name (relative to ``model.backbone``), the module,
    the name its output is tapped under (None: not tapped) and what is applied before tapping."""

    name: str
    module: nn.Module
    tap: Optional[str]
    tap_fn: nn.Module


def body_steps(model: nn.Module, kind: str) -> List[BodyStep]:
    """The backbone body of ``model`` as a list of children run in order (see the module doc).
    Modules are ``model``'s own, so steps of a copy of the model hold the copy's modules."""
    bb = model.backbone
    if kind != "ssd":
        tap_of = dict(bb.body.return_layers)
        return [BodyStep(n, m, tap_of.get(n), nn.Identity()) for n, m in bb.body.named_children()]
    from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
    # (prefix, block, tap module): each block's output is tapped, in SSD's order "0", "1", ...
    if isinstance(bb, SSDFeatureExtractorVGG):
        blocks = [("features", bb.features, L2Rescale(bb.scale_weight))]
    else:
        blocks = [(f"features.{i}", b, nn.Identity()) for i, b in enumerate(bb.features)]
    blocks += [(f"extra.{i}", b, nn.Identity()) for i, b in enumerate(bb.extra)]
    steps = []
    for t, (prefix, block, tap_fn) in enumerate(blocks):
        kids = list(block.named_children()) if isinstance(block, nn.Sequential) and len(block) \
            else [("", block)]
        for j, (n, m) in enumerate(kids):
            last = j == len(kids) - 1
            steps.append(BodyStep(f"{prefix}.{n}" if n else prefix, m, str(t) if last else None,
                                  tap_fn if last else nn.Identity()))
    return steps


def _feature_stage(model: nn.Module, kind: str) -> nn.Module:
    """What reads the taps: the model's FPN, or nothing for SSD."""
    return _PassFeatures() if kind == "ssd" else model.backbone.fpn


def _tail(model: nn.Module, kind: str) -> nn.Module:
    if kind == "ssd":
        return SSDTail(model)
    return SingleStageTail(model) if kind == "single_stage" else TwoStageTail(model)


def is_detector(model) -> bool:
    """True for the torchvision detector families (supported or not: the caller gets its error)."""
    try:
        from torchvision.models.detection import FCOS, RetinaNet
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
        from torchvision.models.detection.ssd import SSD
    except ImportError:
        return False
    return isinstance(model, (FCOS, RetinaNet, GeneralizedRCNN, SSD))


def score_threshold_of(model: nn.Module) -> float:
    """The detector's own post-processing score threshold."""
    if hasattr(model, "score_thresh"):
        return float(model.score_thresh)
    return float(model.roi_heads.score_thresh)


def _flops(fn, *args) -> Tuple[int, dict, object]:
    """(FLOPs, ops without a FLOP rule, output) of one call (an estimate, as for classifiers)."""
    counter = FlopCounter()
    with torch.no_grad(), counter:
        out = fn(*args)
    return counter.flops, dict(counter.unsupported), out


def _norm_or_act(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU)) \
        or type(m).__name__ == "FrozenBatchNorm2d"


@dataclass
class DetectorAnalysis:
    """What the compiler learned about a detector, before any rewriting."""

    model: nn.Module
    kind: str
    example: torch.Tensor               # [1, C, H, W]
    names: List[str]                    # body children (``body_steps``), in order
    tap_of: Dict[str, str]              # body child -> the name its output is tapped under
    cuts: List[DetectionCut]
    flops_prepare: int
    flops_children: List[int]           # per child, its tap module included
    flops_finish: int
    total_flops: int
    params: int
    unsupported: dict
    score_threshold: float
    output_keys: List[str] = field(default_factory=lambda: list(OUTPUT_KEYS))  # in its order
    num_keypoints: int = 0              # K of keypoints [n, K, 3]; 0: no keypoints


def analyse_detector(model: nn.Module, config: DetectionConfig) -> DetectorAnalysis:
    """Cut points of the body, with what each carries, and FLOPs per child (one frame)."""
    kind = family(model)
    model = model.eval()
    if config.input_shape is None:
        raise ShapeError("no example input shape is known for this detector; pass --input-shape "
                         "e.g. 1,3,320,320 (the frames it will serve)")
    shape = tuple(config.input_shape)
    if len(shape) != 4:
        raise ShapeError(f"a detector takes images [N, C, H, W]; got --input-shape {list(shape)}")
    g = torch.Generator().manual_seed(config.seed)
    example = torch.rand((1,) + shape[1:], generator=g)
    steps = body_steps(model, kind)
    names = [st.name for st in steps]
    tap_of = {st.name: st.tap for st in steps if st.tap is not None}
    fl_prep, unsupported, (tensors, sizes) = _flops(lambda x: _prepare(model, x), example)
    flops_children, h, carried, cuts = [], tensors, [], []
    feats = OrderedDict()
    before = fl_prep
    for k, st in enumerate(steps):
        f, u, (h, tapped) = _flops(lambda t: _run_step(st, t), h)
        for op, c in u.items():
            unsupported[op] = unsupported.get(op, 0) + c
        flops_children.append(f)
        before += f
        if tapped is not None:
            feats[st.tap] = tapped
            carried.append(f"tap '{st.tap}' ({st.name}, {'x'.join(map(str, tapped.shape[1:]))})")
        if k < len(steps) - 1 and h.dim() == 4:
            live = list(carried)
            if tapped is None or tapped is not h:
                live.append(f"newest ({st.name}, {'x'.join(map(str, h.shape[1:]))})")
            cuts.append(DetectionCut(st.name, k, live, (-1,) + tuple(h.shape[1:]), before,
                                     preferred=not _norm_or_act(steps[k + 1].module)))
    fl_fin, u, dets = _flops(lambda: _finish_eager(model, kind, tensors, sizes, feats,
                                                  [tuple(example.shape[2:])]))
    for op, c in u.items():
        unsupported[op] = unsupported.get(op, 0) + c
    total = before + fl_fin
    for c in cuts:
        c.fraction = c.flops_before / total
    params = sum(p.numel() for p in model.parameters())
    thr = config.score_threshold
    if thr is None:
        thr = score_threshold_of(model)
    keys, num_keypoints = output_format(model, dets[0])
    return DetectorAnalysis(model, kind, example, names, tap_of, cuts, fl_prep, flops_children,
                            fl_fin, total, params, unsupported, float(thr), keys, num_keypoints)


def _run_step(st: BodyStep, h: torch.Tensor):
    """One body child in eager mode: (its output, what is tapped of it or None)."""
    h = st.module(h)
    return h, (st.tap_fn(h) if st.tap is not None else None)


def output_format(model: nn.Module, dets: Dict[str, torch.Tensor]) -> Tuple[List[str], int]:
    """(keys in order, K of keypoints or 0) of one frame's answer from the detector, so that an
    exit's empty answer has exactly its format; a CompilerError for keys no empty can be made of."""
    keys = list(dets)
    odd = [k for k in keys if k not in OUTPUT_KEYS + EXTRA_KEYS]
    if odd or not set(OUTPUT_KEYS) <= set(keys):
        raise CompilerError(f"{type(model).__name__} answers with keys {keys}; an exit's empty "
                            f"answer is known only for {list(OUTPUT_KEYS + EXTRA_KEYS)} (boxes, "
                            f"scores and labels always); return those from its post-processing")
    k = int(dets["keypoints"].shape[1]) if "keypoints" in dets else 0
    return keys, k


def _prepare(model, x):
    image_list, _ = model.transform(list(x), None)
    return image_list.tensors, image_list.image_sizes


def _finish_eager(model, kind, tensors, sizes, taps: "OrderedDict", original):
    features = _feature_stage(model, kind)(taps)
    dets = _tail(model, kind)(tensors, sizes, features)
    return model.transform.postprocess(dets, sizes, original)


def select_cuts(an: DetectorAnalysis, config: DetectionConfig) -> List[DetectionCut]:
    """Cuts named in ``config.exits``, else up to ``num_exits`` preferred ones spread evenly."""
    if not an.cuts:
        raise CompilerError("the detector's body has a single child: no cut point to place an "
                            "exit at")
    if config.exits:
        by_name = {c.name: c for c in an.cuts}
        unknown = [e for e in config.exits if e not in by_name]
        if unknown:
            raise CompilerError(f"not cut points of the body: {', '.join(unknown)}; use some of "
                                f"{', '.join(by_name)} (--report says what each carries)")
        return sorted((by_name[e] for e in set(config.exits)), key=lambda c: c.position)
    cands = [c for c in an.cuts if c.preferred and c.fraction <= config.max_fraction]
    if not cands:
        cands = [min(an.cuts, key=lambda c: c.fraction)]
    k = min(config.num_exits, len(cands))
    if k <= 0:
        return []
    if k == 1:
        return [cands[0]]
    picks = sorted({round(i * (len(cands) - 1) / (k - 1)) for i in range(k)})
    return [cands[i] for i in picks]


def head_spec(shape, hidden: int) -> HeadSpec:
    """Average + max pooling of the newest tensor (2x2 cells where the map is larger than 2x2),
    then a small classifier with two outputs (nothing / something)."""
    c, hgt, wid = shape[1], shape[2], shape[3]
    pool, dim = ("avgmax2x2", 8 * c) if min(hgt, wid) > 2 else ("avgmax", 2 * c)
    return HeadSpec(pool, dim, hidden, HEAD_CLASSES)


def _head_flops(spec: HeadSpec, shape) -> int:
    head = ExitHead(spec).eval()
    f, _, _ = _flops(head, torch.zeros((1,) + tuple(shape[1:])))
    return f


def _script(module: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(module)


def build_detector_artifact(an: DetectorAnalysis, cuts: List[DetectionCut],
                            config: DetectionConfig):
    """Script the cached detector. Returns (module, head specs, stage FLOPs)."""
    model = copy.deepcopy(an.model).eval()
    steps = body_steps(model, an.kind)
    fpn = _feature_stage(model, an.kind)
    transform = model.transform
    model.backbone = _NoBackbone()
    tail = _tail(model, an.kind)
    bounds = [c.position + 1 for c in cuts]
    spans = list(zip([0] + bounds, bounds + [len(an.names)]))
    segments = []
    for a, b in spans:
        part = steps[a:b]
        segments.append(BodySegment([st.module for st in part], [st.tap is not None for st in part],
                                    [st.tap_fn for st in part]))
    torch.manual_seed(config.seed)
    specs = [head_spec(c.shape, config.hidden) for c in cuts]
    blocks = [artifact.ExitBlock(seg, ExitHead(spec)) for seg, spec in zip(segments[:-1], specs)]
    tap_names = [st.tap for st in steps if st.tap is not None]
    cached = CachedDetector(transform, blocks, segments[-1], fpn, tail, tap_names,
                            an.score_threshold, an.output_keys, an.num_keypoints).eval()
    try:
        module = _script(cached)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompilerError(f"the cached {type(an.model).__name__} does not script with "
                            f"torch.jit.script ({msg}); report this model") from None
    stage_flops = []
    for s, (a, b) in enumerate(spans):
        f = sum(an.flops_children[a:b])
        if s == 0:
            f += an.flops_prepare
        if s == len(spans) - 1:
            f += an.flops_finish
        stage_flops.append(int(f))
    return module, specs, stage_flops


def check_equal(module, an: DetectorAnalysis, config: DetectionConfig):
    """With exits inactive, the artifact returns what the detector returns, at batch 1 and 3;
    and its empty answer has the detector's format (keys in order, dtypes, per-detection shapes)."""
    g = torch.Generator().manual_seed(config.seed + 1)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.rand((batch,) + tuple(an.example.shape[1:]), generator=g)
            want = an.model(list(x))
            got = module(x)
            if not outputs_equal(got, want, config.atol, config.rtol):
                raise CompilerError(f"the cached detector does not reproduce the original at "
                                    f"batch size {batch}; report this model")
            if not same_format(module.empty(x), want[0]):
                raise CompilerError(f"the cached detector's empty answer does not have the "
                                    f"format of {type(an.model).__name__}'s (keys "
                                    f"{list(want[0])}); report this model")


def same_format(empty: Dict[str, torch.Tensor], like: Dict[str, torch.Tensor]) -> bool:
    """``empty`` has no detection and ``like``'s keys in its order, dtypes and per-detection
    shapes (all but the first dimension)."""
    if list(empty) != list(like):
        return False
    return all(empty[k].shape[0] == 0 and empty[k].dtype == like[k].dtype
               and empty[k].shape[1:] == like[k].shape[1:] for k in like)


def outputs_equal(got: List[dict], want: List[dict], atol=1e-4, rtol=1e-4) -> bool:
    """Per frame: the same keys, dtypes, shapes and values (within tolerance): boxes, scores,
    labels, and masks or keypoints where the detector returns them."""
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if set(a) != set(b):
            return False
        for k in b:
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape:
                return False
            if a[k].is_floating_point():
                if not torch.allclose(a[k], b[k], atol=atol, rtol=rtol):
                    return False
            elif not torch.equal(a[k], b[k]):
                return False
    return True


def make_manifest(an: DetectorAnalysis, cuts, specs, stage_flops, source: dict,
                  config: DetectionConfig) -> dict:
    exits = []
    for c, s in zip(cuts, specs):
        exits.append({"name": c.name, "flops_before": c.flops_before, "fraction": c.fraction,
                      "shape": list(c.shape), "carries": c.carries,
                      "head": dict(s.to_dict(), params=s.params(), flops=_head_flops(s, c.shape))})
    return {
        "format_version": artifact.FORMAT_VERSION,
        "task": TASK,
        "detector": type(an.model).__name__,
        "family": an.kind,
        "source_sha256": source.get("sha256"),
        "source_kind": source.get("kind", "module"),
        "input_shape": [-1] + list(an.example.shape[1:]),
        "input_dtype": "float32",
        "num_classes": HEAD_CLASSES,          # the exit heads' classes: nothing / something
        "head_classes": ["nothing", "something"],
        "score_threshold": an.score_threshold,
        "output_keys": list(an.output_keys),
        "total_flops": int(an.total_flops),
        "backbone_params": an.params,
        "stage_flops": stage_flops,
        "flops_parts": {"transform": an.flops_prepare, "body": sum(an.flops_children),
                        "fpn_head_postprocess": an.flops_finish},
        "exits": exits,
        "flops_note": "estimate; multiply-add = 2 FLOPs; ops in unsupported_ops counted as 0",
        "unsupported_ops": dict(an.unsupported),
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "head_params": sum(s.params() for s in specs),
        "config": {"num_exits": config.num_exits, "hidden": config.hidden,
                   "max_fraction": config.max_fraction},
    }


def rewrite_detector(model: nn.Module, config: Optional[DetectionConfig] = None,
                     source: Optional[dict] = None):
    """Library entry: returns (scripted artifact module, manifest, analysis)."""
    config = config or DetectionConfig()
    an = analyse_detector(model, config)
    cuts = select_cuts(an, config)
    module, specs, stage_flops = build_detector_artifact(an, cuts, config)
    check_equal(module, an, config)
    manifest = make_manifest(an, cuts, specs, stage_flops, source or {}, config)
    if config.onnx_parts:
        detection_onnx.attach(module, manifest, an, cuts)
    return module, manifest, an


def format_report(an: DetectorAnalysis, chosen: List[str]) -> str:
    """The cut point table --report prints for a detector."""
    lines = [f"detector {type(an.model).__name__}: {an.total_flops / 1e6:.2f} MFLOPs per frame "
             f"(estimate; transform {an.flops_prepare / 1e6:.2f}, body "
             f"{sum(an.flops_children) / 1e6:.2f}, "
             f"{'head' if an.kind == 'ssd' else 'FPN + head'} + post-processing "
             f"{an.flops_finish / 1e6:.2f}), {an.params / 1e6:.3f} M params, score threshold "
             f"{an.score_threshold:g}"]
    if an.unsupported:
        lines.append("ops without a FLOP rule (counted as 0): " +
                     ", ".join(f"{k} x{v}" for k, v in sorted(an.unsupported.items())))
    lines.append(f"{'':2}{'cut point (after)':20}{'MFLOPs before':>14}{'frac':>7}  carries")
    for c in an.cuts:
        mark = "*" if c.name in chosen else (" " if c.preferred else "-")
        lines.append(f"{mark:2}{c.name[:20]:20}{c.flops_before / 1e6:14.2f}{c.fraction:7.3f}  "
                     f"{_short_carries(c.carries)}")
    lines.append("* chosen exit   - right before a norm/activation (not chosen by default)")
    return "\n".join(lines)


def _short_carries(carries: List[str]) -> str:
    """The live set as --report prints it: with more than three taps (SSD), all but the last as
    a range of names, then the last tap and the newest output in full."""
    taps = [c for c in carries if c.startswith("tap '")]
    if len(taps) <= 3:
        return "; ".join(carries)
    names = [t.split("'")[1] for t in taps[:-1]]
    rest = [c for c in carries if not c.startswith("tap '")]
    return "; ".join([f"taps '{names[0]}'..'{names[-1]}'", taps[-1]] + rest)


# ----- loading and the CLI hook -----------------------------------------------------------------
def detector_archs() -> List[str]:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models.detection))


def is_detector_arch(arch: Optional[str]) -> bool:
    return bool(arch) and arch in detector_archs()


def default_input_shape(arch: str) -> Tuple[int, ...]:
    """The frame size ``arch`` is built for: 300 (SSD300), 320 (the *_320 models), else 512."""
    size = 300 if "300" in arch else 320 if "320" in arch else 512
    return (1, 3, size, size)


def load_detector(path: str, arch: str, num_classes: Optional[int]):
    """A torchvision detector ``arch`` (built with no weights: nothing is downloaded) holding the
    state dict at ``path``. Returns compiler.loading.LoadedModel."""
    import torchvision

    from .loading import LoadedModel, sha256_of
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file '{path}' does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"'{path}' is not a state dict torch can read ({msg}); a detector "
                             f"given with --arch must be a state dict") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"'{path}' holds a {type(sd).__name__}, not a state dict")
    if num_classes is None:
        num_classes = _classes_in(sd)
    extra = {}
    kps = sd.get("roi_heads.keypoint_predictor.kps_score_lowres.weight")
    if kps is not None and arch.startswith("keypointrcnn"):
        extra["num_keypoints"] = int(kps.shape[1])     # ConvTranspose2d weight: [in, K, k, k]
    try:
        model = torchvision.models.get_model(arch, weights=None, weights_backbone=None,
                                             num_classes=num_classes, **extra)
        model.load_state_dict(sd)
    except (RuntimeError, ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"the state dict does not fit --arch {arch} with {num_classes} "
                             f"classes ({msg}); check --arch and --num-classes") from None
    return LoadedModel(model.eval(), False, default_input_shape(arch), sha256_of(path),
                       "state_dict")


def _classes_in(sd: dict) -> int:
    """Classes of a detector state dict, from its classification layer's output size (divided by
    the anchors per location, read from the box regression layer beside it)."""
    key = "roi_heads.box_predictor.cls_score.weight"
    if key in sd:
        return int(sd[key].shape[0])
    # (classification layer, regression layer): RetinaNet / FCOS, SSD, SSDlite (first level)
    for cls, reg in (("head.classification_head.cls_logits.weight",
                      "head.regression_head.bbox_reg.weight"),
                     ("head.classification_head.module_list.0.weight",
                      "head.regression_head.module_list.0.weight"),
                     ("head.classification_head.module_list.0.1.weight",
                      "head.regression_head.module_list.0.1.weight")):
        if cls in sd:
            a = sd[reg].shape[0] // 4 if reg in sd else 1
            return int(sd[cls].shape[0] // max(a, 1))
    return 91


def compile_cli(loaded, args, out_path: str) -> int:
    """``python -m compiler.rewrite`` for a detector: analyse, report, build, check, save."""
    import json
    import sys

    from .config import RewriteConfig
    exits = args.exits or []
    if isinstance(exits, str):
        exits = exits.split(",")
    # --num-exits left at the classifier default: the detector default (a body has few cuts)
    num_exits = DetectionConfig.num_exits if args.num_exits == RewriteConfig.num_exits \
        else args.num_exits
    config = DetectionConfig(
        input_shape=args.input_shape or loaded.input_shape, num_exits=num_exits,
        exits=[e.strip() for e in exits if e.strip()],
        score_threshold=getattr(args, "score_threshold", None))
    an = analyse_detector(loaded.module, config)
    cuts = select_cuts(an, config)
    if args.report or args.dry_run:
        print(format_report(an, [c.name for c in cuts]))
    manifest = None
    if not args.dry_run:
        module, specs, stage_flops = build_detector_artifact(an, cuts, config)
        check_equal(module, an, config)
        manifest = make_manifest(an, cuts, specs, stage_flops,
                                 {"sha256": loaded.sha256, "kind": loaded.source}, config)
        detection_onnx.attach(module, manifest, an, cuts)
        artifact.save(module, manifest, out_path)
        print(f"wrote {out_path}: {len(cuts)} 'nothing here' exits after "
              f"{', '.join(f'{c.name} ({c.fraction:.0%})' for c in cuts)}; score threshold "
              f"{an.score_threshold:g}; exits start inactive")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"total_flops": an.total_flops, "params": an.params,
                       "unsupported_ops": an.unsupported,
                       "cut_points": [c.to_dict() for c in an.cuts],
                       "chosen": [c.name for c in cuts], "manifest": manifest}, f, indent=1)
    sys.stdout.flush()
    return 0
