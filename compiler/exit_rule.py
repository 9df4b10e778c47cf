"""The exit rule, defined once: a head's confidence, which exit a row leaves at, what a row costs.

A row leaves at the first *enabled* exit whose confidence (the head's largest softmax
probability) reaches that exit's threshold; a row that no exit takes runs the whole backbone.
A row's cost is the stages it ran plus every enabled head it passed, its own exit's included.

Everything that routes or prices rows reads these functions: the scripted artifact (they are
TorchScript-compatible, so ``torch.jit.script`` compiles them into the artifact file and plain
``torch.jit.load`` needs no project code), the runtime's staged serving path, threshold
calibration, the offline baselines and the reports. The ONNX builder (``compiler/export.py``)
cannot call Python; ``tests/test_exit_rule.py`` holds it to the same rule.

Off exits are written two ways: the artifact keeps an ``enabled`` flag next to a threshold;
calibration writes ``inf`` as the threshold of an exit that is off. ``split_thresholds`` turns
the second into the first.
"""
from typing import Tuple

import torch

DISABLED_THRESHOLD = 2.0  # above any softmax confidence: what the artifact stores for an off exit


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """A head's confidence in each row's answer: its largest softmax probability, [n]."""
    return torch.softmax(logits, 1).amax(1)


def class_confidence(logits: torch.Tensor, cls: int) -> torch.Tensor:
    """The confidence of an exit that may answer only class ``cls``, [n]: that class's softmax
    probability. Detection's "nothing here" exits (``compiler/detection.py``) read it with
    ``cls`` = 0: a frame leaves when it reaches the threshold, and its answer is then "nothing"."""
    return torch.softmax(logits, 1)[:, cls]


def leaves(conf: torch.Tensor, threshold: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Rows (bool [n]) that leave at one exit, given their confidence there."""
    if not enabled:
        return torch.zeros(conf.shape, dtype=torch.bool, device=conf.device)
    return conf >= threshold


def leaves_np(conf, threshold):
    """``leaves`` for numpy (the onnxruntime backend, ``runtime/backends.py``): rows (bool [n])
    whose float32 confidence reaches the threshold rounded to float32, as torch compares them."""
    import numpy as np
    return np.asarray(conf, dtype=np.float32) >= np.float32(threshold)


def split_thresholds(thresholds) -> Tuple[torch.Tensor, torch.Tensor]:
    """(threshold, enabled) per exit from thresholds where ``inf`` means off."""
    t = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
    enabled = torch.isfinite(t)
    return torch.where(enabled, t, torch.full_like(t, DISABLED_THRESHOLD)), enabled


def first_exit(conf: torch.Tensor, threshold: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
    """Each row's exit (long [n]; ``E`` = the backbone) from all heads' confidences [E, n].

    The same rule as applying ``leaves`` exit after exit to the rows still in the batch.
    ``threshold`` and ``enabled`` may carry leading dimensions ([..., E]) to route the same
    rows under many settings at once; the result is then [..., n].
    """
    E, n = conf.shape[0], conf.shape[1]
    hit = (conf >= threshold.to(conf.dtype).unsqueeze(-1)) & enabled.to(torch.bool).unsqueeze(-1)
    first = hit.to(torch.int32).argmax(-2).to(torch.long)
    return torch.where(hit.any(-2), first, torch.full_like(first, E))


def exit_costs(stage_cost: torch.Tensor, head_cost: torch.Tensor,
               enabled: torch.Tensor) -> torch.Tensor:
    """Cost of a row leaving at each exit, [E + 1] (last: it ran the whole backbone).

    ``stage_cost`` [E + 1] and ``head_cost`` [E] in any unit (FLOPs, a share, milliseconds);
    ``enabled`` [..., E] gives [..., E + 1].
    """
    heads = torch.cumsum(head_cost.to(torch.float64) * enabled.to(torch.float64), -1)
    if heads.shape[-1] > 0:
        passed = torch.cat([heads, heads[..., -1:]], -1)
    else:
        passed = torch.zeros(heads.shape[:-1] + (1,), dtype=torch.float64)
    return torch.cumsum(stage_cost.to(torch.float64), 0) + passed


def row_cost(exit_of: torch.Tensor, stage_cost: torch.Tensor, head_cost: torch.Tensor,
             enabled: torch.Tensor) -> torch.Tensor:
    """Cost of each row (float64 [..., n]) given the exit it left at ([..., n])."""
    costs = exit_costs(stage_cost, head_cost, enabled).to(exit_of.device)
    if costs.dim() == 1:
        return costs[exit_of]
    return torch.gather(costs, -1, exit_of)
