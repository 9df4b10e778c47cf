"""The prequential stream experiment: serve a test set request by request, record every row, sum up.

Shared by ``tools.demo`` and ``tools.benchmark``. Each request is answered before anything learns
from it (``predict`` answers, then buffers), so every figure over the stream is out-of-sample.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import torch
from tqdm import tqdm

from compiler import exit_rule
from tools.records import Record
from tools.timing import time_backbone


@dataclass
class StreamRows:
    """What happened to each row of a stream, in serving order (tensors [n]), and each
    request's latency (ms; ``ref_lat``: the reference's, best of one)."""

    exit: torch.Tensor      # exit taken (E: the backbone)
    pred: torch.Tensor      # class answered
    ref: torch.Tensor       # the backbone's class
    label: torch.Tensor     # the true label (reports only)
    flops: torch.Tensor     # FLOPs the row cost, heads counted (float64)
    lat: List[float]
    ref_lat: List[float]

    def __len__(self) -> int:
        return len(self.exit)


@dataclass
class StreamSummary(Record):
    """Figures over a span of the stream (by default its second half)."""

    rows: int
    flops_saved: float          # heads counted
    agreement: float            # same class as the backbone
    accuracy_cached: float
    accuracy_backbone: float
    exit_share: List[float]     # share of rows per exit, the backbone last


@dataclass
class Window(Record):
    """FLOPs saved and agreement over a window of rows; ``row``: its middle (rolling windows)."""

    rows: int
    flops_saved: float
    agreement: float
    row: Optional[int] = None


def runtime_settings(text: str) -> dict:
    """Runtime settings from a command line ('max_miss_overhead=0.05,train_every=500'):
    numbers or None, for ``runtime.load``; the tools' ``--*-settings`` flags read it."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        value = value.strip()
        out[key.strip()] = None if value == "None" else \
            int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def checked_runtime_settings(text: str) -> dict:
    """``runtime_settings``, checked against ``RuntimeConfig`` before anything is built: a bad
    name or value raises ``ValueError`` (``ConfigError`` is one) whose one line names the fix."""
    from runtime.config import RuntimeConfig
    settings = runtime_settings(text)
    RuntimeConfig().with_overrides(**dict(settings))
    return settings


def artifact_missing(path: str) -> bool:
    """True, after one line on stderr that names the fix, when artifact ``path`` is not a file
    (the probes' and benchmarks' default is the demo's)."""
    import sys
    from pathlib import Path
    if Path(path).is_file():
        return False
    print(f"error: artifact '{path}' does not exist; run python -m tools.demo first",
          file=sys.stderr)
    return True


def demo_artifact(path: str) -> Optional[str]:
    """Compile the embedded demo backbone into ``path`` (exits off); None if that failed (the
    compiler printed why)."""
    from pathlib import Path
    from compiler.rewrite import main as rewrite
    asset = Path(__file__).resolve().parent / "assets" / "demo_backbone.pt2"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return str(path) if rewrite([str(asset), "-o", str(path)]) == 0 else None


def stream(rt, reference, x, y, batch, seed, progress=True) -> StreamRows:
    """Serve ``x`` in a seeded order, ``batch`` rows per request; returns per-row records.

    ``rt`` is a runtime (or a stand-in with ``predict``, ``stats``, ``num_exits``,
    ``stage_flops`` and ``head_flops``); ``reference`` (the artifact with exits off) gives the
    backbone's answer for agreement. A row's cost follows ``compiler.exit_rule`` with the exits
    that were on when it was served.
    """
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    E = rt.num_exits
    rec = {"exit": [], "pred": [], "ref": [], "label": [], "flops": [], "lat": [], "ref_lat": []}
    bar = tqdm(range(0, len(x), batch), desc="serving", unit="req",
               disable=None if progress else True)   # None: off when not a terminal
    for s in bar:
        xb = x[s:s + batch]
        on = torch.tensor([t is not None for t in rt.stats()["thresholds"]], dtype=torch.bool)
        t0 = time.perf_counter()
        out, exits = rt.predict(xb, return_exits=True)
        rec["lat"].append((time.perf_counter() - t0) * 1e3)
        rec["ref_lat"].append(time_backbone(reference, xb, reps=1))
        with torch.no_grad():
            ref = reference(xb)
        rec["flops"].append(exit_rule.row_cost(exits, rt.stage_flops, rt.head_flops, on))
        rec["exit"].append(exits)
        rec["pred"].append(out.argmax(1))
        rec["ref"].append(ref.argmax(1))
        rec["label"].append(y[s:s + batch])
        if progress and len(rec["exit"]) % 20 == 0:
            done = torch.cat(rec["exit"])
            bar.set_postfix(exit_rate=f"{(done < E).float().mean():.2f}")
    return StreamRows(*(torch.cat(rec[k]) for k in ("exit", "pred", "ref", "label", "flops")),
                      rec["lat"], rec["ref_lat"])


def summarise(rec: StreamRows, num_exits: int, total_flops: float,
              half: bool = True) -> StreamSummary:
    """Figures over the second half of the stream (prequential: every answer came first), or
    over all of it."""
    n = len(rec)
    rows = n - (n // 2 if half else 0)
    h = slice(n // 2, n) if half else slice(0, n)
    return StreamSummary(
        rows=rows,
        flops_saved=1 - rec.flops[h].sum().item() / (rows * total_flops),
        agreement=(rec.pred[h] == rec.ref[h]).float().mean().item(),
        accuracy_cached=(rec.pred[h] == rec.label[h]).float().mean().item(),
        accuracy_backbone=(rec.ref[h] == rec.label[h]).float().mean().item(),
        exit_share=(torch.bincount(rec.exit[h], minlength=num_exits + 1).double()
                    / max(rows, 1)).tolist())


def window(rec: StreamRows, sl: slice, total_flops: float) -> Window:
    """FLOPs saved and agreement over rows ``sl`` (a slice inside the stream)."""
    m = sl.stop - sl.start
    return Window(rows=m, flops_saved=1 - rec.flops[sl].sum().item() / (m * total_flops),
                  agreement=(rec.pred[sl] == rec.ref[sl]).double().mean().item())


def rolling(rec: StreamRows, total_flops: float, size: int = 500) -> List[Window]:
    """Windows of ``size`` rows every ``size // 2`` rows along the stream (one if it is shorter)."""
    n = len(rec)
    pts = []
    for s in range(0, max(n - size + 1, 1), max(size // 2, 1)):
        w = window(rec, slice(s, min(s + size, n)), total_flops)
        w.row = s + w.rows // 2
        pts.append(w)
    return pts


def serve_loaded(path, reference, frames, rows: int, seed: int, batch: int,
                 settings: Optional[dict] = None) -> dict:
    """A runtime that loads the saved artifact at ``path`` (synchronous, as production loads
    it) serves ``rows`` rows in order, ``batch`` per request, ``frames(i, j)`` giving rows i..j-1:
    agreement with ``reference`` (the backbone) overall and over the first 1,000 rows, the row
    after which the first drift alarm came (None: none), alarms, doubts, FLOPs saved, and
    whether exits were on at the load and at the end."""
    import runtime
    rt = runtime.load(str(path), background=False, seed=seed, **(settings or {}))
    on0 = rt.state.any_enabled
    agree, first = [], None
    with torch.no_grad():
        for i in range(0, rows, batch):
            x = frames(i, min(i + batch, rows))
            agree.append(rt.predict(x).argmax(1) == reference(x).argmax(1))
            if first is None and rt.drift.events:
                first = i + len(x)
    s = rt.stats()
    rt.close()
    agree = torch.cat(agree).double()
    return {"rows": rows, "exits_on_at_load": on0, "agreement": float(agree.mean()),
            "agreement_first_1000": float(agree[:1000].mean()), "first_alarm_row": first,
            "drift_events": s["drift_events"], "drift_doubts": s["drift_doubts"],
            "flops_saved": s["flops_saved"], "exits_on_at_end": any(s["enabled"])}
