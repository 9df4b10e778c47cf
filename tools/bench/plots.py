"""The benchmark's figures (docs/bench/*.png), one set per backbone, from its typed result."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from tools.bench.results import BackboneResult
from tools.bench.settings import ROOT
from tools.bench.stats import budget_keys, spread

LAT_TITLES = {"backbone_exported": "backbone, ExportedProgram.module() (eager + guards)",
              "backbone_eager": "backbone, eager fx GraphModule",
              "cached_eager": "cached, eager (fx stages + heads)",
              "backbone_scripted": "backbone, scripted (artifact, exits off)",
              "cached_scripted": "cached, scripted (learned artifact)",
              "runtime_predict": "cached, runtime.predict (serving path)"}


def plots(res: BackboneResult, fig_dir: Path) -> Dict[str, str]:
    """The backbone's PNGs; returns {kind: path relative to the repository}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    name, paths = res.backbone, {}

    def save(fig, kind: str, suffix: str):
        """Write ``fig`` as <backbone>_<suffix>.png; record its path (repository-relative)."""
        fig.tight_layout()
        p = fig_dir / f"{name}_{suffix}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        try:
            paths[kind] = str(p.resolve().relative_to(ROOT))
        except ValueError:
            paths[kind] = str(p)

    # 1. FLOPs saved and achieved agreement against the agreement budget
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for bname, bl in res.baselines.items():
        budgets = budget_keys(bl.seeds[0].budgets)
        for ax, key in ((a, "flops_saved"), (b, "agreement")):
            sp = [spread([getattr(r.budgets[k], key) for r in bl.seeds]) for k in budgets]
            xs = [float(k) for k in budgets]
            ax.errorbar(xs, [v["mean"] for v in sp], yerr=[[v["mean"] - v["min"] for v in sp],
                                                             [v["max"] - v["mean"] for v in sp]],
                        marker="o", ms=3, capsize=2, label=bname)
    ob = budget_keys(res.ours)
    for ax, key in ((a, "flops_saved"), (b, "agreement")):
        sp = [spread([getattr(r, key) for r in res.ours_runs(k)]) for k in ob]
        ax.errorbar([float(k) for k in ob], [v["mean"] for v in sp],
                    yerr=[[v["mean"] - v["min"] for v in sp], [v["max"] - v["mean"] for v in sp]],
                    marker="s", ms=6, lw=2, c="k", capsize=3, label="ours (online)")
    orc = spread([r.oracle_saving for k in ob for r in res.ours_runs(k)])["mean"]
    a.axhline(orc, ls="--", c="gray", lw=1, label="oracle of our heads")
    a.set_xlabel("agreement budget (Wilson lower bound, 95%)")
    a.set_ylabel("FLOPs saved, heads counted (2nd half)")
    a.legend(fontsize=7)
    a.set_title(f"{name}: FLOPs saved vs budget")
    lo = min(float(k) for k in ob + budget_keys(next(iter(res.baselines.values())).seeds[0]
                                                 .budgets)) if res.baselines else 0.97
    b.plot([lo, 1.0], [lo, 1.0], ls=":", c="gray", lw=1, label="achieved = budget")
    b.set_xlabel("agreement budget")
    b.set_ylabel("agreement achieved (2nd half)")
    b.set_title("agreement achieved on unseen rows")
    b.legend(fontsize=7)
    save(fig, "savings", "savings_vs_budget")

    # 2. exit distribution: ours vs oracle per exit; cumulative share answered vs FLOPs spent
    budget = res.latency.budget
    runs = res.ours_runs(budget)
    exits = res.model.exits
    labels = [f"{e.name}\n{e.fraction:.0%}" for e in exits] + ["backbone\n100%"]
    ours_share = torch.tensor([r.exit_share for r in runs]).mean(0).tolist()
    orc_share = torch.tensor([r.oracle_exit_share for r in runs]).mean(0).tolist()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = torch.arange(len(labels)).float()
    a.bar((xs - 0.2).tolist(), ours_share, 0.4, label=f"ours (budget {budget})")
    a.bar((xs + 0.2).tolist(), orc_share, 0.4, label="oracle")
    a.set_xticks(xs.tolist(), labels, fontsize=7)
    a.set_ylabel("share of rows (2nd half, mean over seeds)")
    a.set_title(f"{name}: where rows exit")
    a.legend(fontsize=8)

    def cumulative(fracs, share):
        pts, acc = [(0.0, 0.0)], 0.0
        for f, s_ in zip(list(fracs) + [1.0], share):
            acc += s_
            pts.append((f, acc))
        return [p_[0] for p_ in pts], [p_[1] for p_ in pts]

    fr = [e.fraction for e in exits]
    b.step(*cumulative(fr, ours_share), where="post", c="k", lw=2, label="ours")
    b.step(*cumulative(fr, orc_share), where="post", c="gray", ls="--", label="oracle")
    for bname, bl in res.baselines.items():
        rs = res.baseline_scores(bname, budget)
        if rs:
            sh = torch.tensor([r.exit_share for r in rs]).mean(0).tolist()
            b.step(*cumulative([e.fraction for e in bl.exits], sh), where="post",
                   label=bname, alpha=0.8)
    b.set_xlabel("backbone FLOPs fraction at the exit")
    b.set_ylabel("share of rows answered by then")
    b.set_title(f"cumulative exits at budget {budget}")
    b.legend(fontsize=7)
    save(fig, "exits", "exits")

    # 3. latency CDFs
    lat = res.latency
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key in zip(axes, ("batch1", "batch64")):
        if getattr(lat, key) is None:
            continue
        for v, ts in getattr(lat, key).times_ms.items():
            t = sorted(ts)
            ax.step(t, [(i + 1) / len(t) for i in range(len(t))], where="post",
                    label=LAT_TITLES.get(v, v), lw=2 if v.startswith("cached") else 1)
        ax.set_xscale("log")
        ax.set_xlabel("ms per request (median of reps)")
        ax.set_ylabel("CDF over requests")
        ax.set_title(f"{name}: latency, {key.replace('batch', 'batch ')}, {lat.device} "
                     f"({lat.threads} thread(s))")
        ax.legend(fontsize=6, loc="lower right")
    save(fig, "latency", "latency_cdf")

    # 4. learning along the stream
    fig, ax = plt.subplots(figsize=(8, 4))
    for k in ob:
        for r in res.ours_runs(k):
            xs_ = [q.row for q in r.rolling]
            ax.plot(xs_, [q.flops_saved for q in r.rolling], lw=1,
                    c="C0" if k == ob[0] else "C1",
                    label=f"FLOPs saved, budget {k}" if r.seed == res.meta.seeds[0]
                    else None)
            ax.plot(xs_, [q.agreement for q in r.rolling], lw=1, ls=":",
                    c="C0" if k == ob[0] else "C1",
                    label=f"agreement, budget {k}" if r.seed == res.meta.seeds[0]
                    else None)
    ax.axvline(5000, c="gray", lw=0.8, ls="--")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("row of the stream (window 500; one line per seed)")
    ax.set_title(f"{name}: online learning along the stream")
    ax.legend(fontsize=7, loc="lower right")
    save(fig, "learning", "learning")
    return paths

