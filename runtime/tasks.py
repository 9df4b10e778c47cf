"""The task interface: what differs between classification and detection, and nothing else.

A task says what the backbone's output is and what a head learns from it (``teacher``), how
confident an exit is (``confidence``, always a ``compiler.exit_rule`` function), when an exit's
answer agrees with the backbone's (``agrees``), how a request's answer is put together from
the rows that left at exits and the rows that ran the whole model (``assemble``), and which
class each row of it answers (``answers``, for the design effect). The budget, calibration and
its bound, shadow checks, drift and the cost model read only these, so they are the same code
for both tasks (``head_confidences`` below is what calibration consumes; ``task_for`` the task
of a manifest).
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from compiler import exit_rule


class Task:
    """The interface; ``ClassificationTask`` and ``DetectionTask`` implement it."""

    name = "task"

    def teacher(self, output) -> torch.Tensor:
        """What the heads learn from, [n, head classes] logits, given the backbone's output for
        n rows."""
        raise NotImplementedError

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """An exit's confidence per row, [n] (a row leaves when it reaches the threshold)."""
        raise NotImplementedError

    def agrees(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """bool [n]: would an exit whose head gave ``logits`` answer what the backbone did."""
        raise NotImplementedError

    def answers(self, output) -> torch.Tensor:
        """[n, head classes]: each row's answer as the argmax of its row (what the design effect
        counts), given the answer ``assemble`` put together."""
        raise NotImplementedError

    def assemble(self, n: int, exited: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                 rest: torch.Tensor, backbone_out, like: torch.Tensor,
                 empty: Optional[Callable[[torch.Tensor], object]] = None):
        """The answer for n rows in input order: ``exited`` holds (rows, head logits) per exit
        that took rows, ``rest`` the rows that ran the whole model and ``backbone_out`` its
        output for them (in that order); ``like``: the request's input (device, dtype, size).
        ``empty(like)``: the artifact's own answer for a row that left with nothing to say (a
        task whose exits answer from their logits ignores it)."""
        raise NotImplementedError


class ClassificationTask(Task):
    """The backbone returns logits [n, K]; an exit answers a class; it agrees on the same class."""

    name = "classification"

    def teacher(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        return exit_rule.confidence(logits)

    def agrees(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == teacher.argmax(1)

    def answers(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def assemble(self, n, exited, rest, backbone_out, like, empty=None):
        k = backbone_out.shape[1] if backbone_out is not None else exited[0][1].shape[1]
        out = torch.empty((n, k), dtype=like.dtype, device=like.device)
        for rows, logits in exited:
            out[rows] = logits.to(out.dtype)
        if backbone_out is not None and rest.numel():
            out[rest] = backbone_out.to(out.dtype)
        return out


class DetectionTask(Task):
    """The backbone (a detector) returns one dict per frame: boxes, labels and scores, and masks
    or keypoints where the detector has those heads.

    A head has two classes, 0 = nothing here, 1 = something; it learns whether the detector
    returns any detection scoring at least ``min_score`` (the service's score threshold). An
    exit answers only "nothing" (``exit_rule.class_confidence`` of class 0), so it agrees
    exactly when the detector found nothing at or above ``min_score``; a frame that leaves gets
    an empty result in the detector's format, which the artifact itself makes (its ``empty``
    method, given to ``assemble``), so the format lives in one place.
    """

    name = "detection"
    NOTHING = 0
    MARGIN_CAP = 6.0      # |teacher logit| at most (p = 0.9975): no frame is infinitely sure

    def __init__(self, min_score: float):
        self.min_score = float(min_score)

    def found(self, dets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """bool [n]: frames where the detector returned a detection scoring >= min_score."""
        return torch.tensor(self._found(dets), dtype=torch.bool)

    def _found(self, dets) -> List[bool]:
        return [d["scores"].numel() > 0 and float(d["scores"].max()) >= self.min_score
                for d in dets]

    def teacher(self, dets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """[n, 2] logits (nothing, something), soft targets for distillation: the sign says
        which, the size how far the best score lies from the threshold, as a share of the way
        to 1 (something) or to 0 (nothing), times ``MARGIN_CAP`` and at least 0.5.

        A frame where nothing scored at all (most empty frames: a detector drops what falls
        below its own threshold) is as sure as a target gets, p(nothing) = 0.9975. Scaled by
        the score instead (10 per unit, capped at 4), every such frame taught p = 0.95, below
        the thresholds a 1% budget needs, and on some streams no threshold was certified:
        docs/detection.md, "The teacher's scale"."""
        best = torch.tensor([float(d["scores"].max()) if d["scores"].numel() else 0.0
                             for d in dets], dtype=torch.float32)
        lo, cap = self.min_score, self.MARGIN_CAP
        above = (best - lo) / max(1.0 - lo, 1e-6)
        below = (lo - best) / max(lo, 1e-6)
        z = torch.where(self.found(dets), (cap * above).clamp(0.5, cap),
                        -(cap * below).clamp(0.5, cap))
        return torch.stack([torch.zeros_like(z), z], 1)

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        return exit_rule.class_confidence(logits, self.NOTHING)

    def agrees(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return teacher.argmax(1) == self.NOTHING

    def answers(self, dets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        return torch.tensor([[0, 1] if hit else [1, 0] for hit in self._found(dets)])

    def assemble(self, n, exited, rest, backbone_out, like, empty=None):
        """Frames that ran the detector get its dicts; the others ``empty(like)`` each (a fresh
        dict per frame: the artifact's ``CachedDetector.empty``)."""
        if empty is None and len(rest) < n:
            raise ValueError("DetectionTask.assemble needs the artifact's empty(like) for frames "
                             "that left at an exit")
        out = [None] * n
        for r, d in zip(rest.tolist(), backbone_out or []):
            out[r] = d
        return [d if d is not None else empty(like) for d in out]


def task_for(manifest: dict) -> Task:
    """The task a checked manifest declares, with its settings."""
    if manifest.get("task") == DetectionTask.name:
        return DetectionTask(manifest["score_threshold"])
    return ClassificationTask()


def task_of_artifact(path) -> str:
    """The task an artifact file serves ("classification" or "detection"), read cheaply from its
    manifest without checking it; anything unreadable reads as "classification", whose loader
    then says what is wrong with the file."""
    import json
    import zipfile

    from compiler import artifact
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist()
                         if n.endswith("/extra/" + artifact.MANIFEST_FILE)), None)
            manifest = json.loads(z.read(name)) if name else {}
        task = manifest.get("task", "classification") if isinstance(manifest, dict) else None
        return task if task in ("classification", "detection") else "classification"
    except Exception:  # a missing or damaged file: the classification loader reports it
        return "classification"


def head_confidences(task: Task, head_logits, feats: List[torch.Tensor], teacher: torch.Tensor):
    """(confidence, agrees) [E, n] of each head on held-out rows, as calibration consumes them."""
    confs, agrees = [], []
    with torch.no_grad():
        for e, f in enumerate(feats):
            logits = head_logits(e, f).float().cpu()
            confs.append(task.confidence(logits))
            agrees.append(task.agrees(logits, teacher))
    return torch.stack(confs).double(), torch.stack(agrees)
