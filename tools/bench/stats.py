"""Statistics over seeds, and the percentage formats the report and the plots share."""
from __future__ import annotations

from typing import Sequence

import torch


def spread(values: Sequence[float]) -> dict:
    """mean, min, max, std over seeds (None values skipped)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None, "std": None, "n": 0}
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": t.mean().item(), "min": t.min().item(), "max": t.max().item(),
            "std": t.std().item() if t.numel() > 1 else 0.0, "n": len(vals)}


def budget_keys(d):
    """Budget keys ("0.99", ...) in numeric order."""
    return sorted(d, key=float)


def pct(v, digits=1):
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def spread_pct(vals, digits=1):
    """mean (min-max) over seeds, as percentages."""
    sp = spread(vals)
    if sp["mean"] is None:
        return "n/a"
    if sp["n"] == 1:
        return pct(sp["mean"], digits)
    return (f"{100 * sp['mean']:.{digits}f}% ({100 * sp['min']:.{digits}f}-"
            f"{100 * sp['max']:.{digits}f})")


def signed(v):
    return "n/a" if v is None else f"{100 * v:+.1f}%"


def mean_int(vals):
    sp = spread(vals)
    return "n/a" if sp["mean"] is None else f"{sp['mean']:.1f}"
