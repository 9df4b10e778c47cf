"""docs/backbones.md (issue 14): the quick benchmark on backbones trained by tools.train.

    python -m tools.bench.backbones_report out/bench_mobilenet_v2 out/bench_vgg16_bn \
        --md docs/backbones.md

Each folder is the --out of one ``python -m tools.benchmark --mode quick --backbone X.pt2`` run
(its run.json and <name>.json); the training record is the ``X.pt2.json`` that tools.train wrote
beside the backbone (found through the run's meta.source). Every figure on the page comes from
those JSON files; nothing is typed by hand, except a notes block (between the markers NOTES
and END_NOTES below) that is kept from the existing page when it is regenerated.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import List, Optional

from tools.bench.results import BackboneResult, RunInfo
from tools.bench.stats import budget_keys

# Issue 14's target: ours as a share of the oracle of its own heads (minimum over seeds).
TARGET_SHARE = {"0.99": 0.85, "0.995": 0.90}
NOTES, END_NOTES = "<!-- notes -->", "<!-- /notes -->"


def _p(v: Optional[float], digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def mmm(vals, digits: int = 1) -> str:
    """min / median / max over seeds, as percentages."""
    vs = [v for v in vals if v is not None]
    if not vs:
        return "n/a"
    return " / ".join(_p(v, digits) for v in (min(vs), statistics.median(vs), max(vs)))


def train_command(meta: dict, out: str, threads: Optional[int]) -> str:
    cmd = f"python -m tools.train --arch {meta['arch']} --epochs {meta['epochs']}"
    if meta.get("limit"):
        cmd += f" --limit {meta['limit']}"
    cmd += f" --batch-size {meta['batch_size']} --lr {meta['lr']} --seed {meta['seed']}"
    if threads:
        cmd += f" --threads {threads}"
    return cmd + f" --out {out}"


def section(res: BackboneResult, run: RunInfo, out_dir: Path, threads: Optional[int]):
    """The page's lines for one backbone, and a verdict per budget."""
    src = Path(res.meta.source)
    meta_path = Path(str(src) + ".json")
    tmeta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    m = res.model
    L = [f"## {res.backbone}", ""]
    if tmeta:
        L += [f"Trained with `{train_command(tmeta, str(src), threads)}` "
              f"({tmeta['params'] / 1e6:.3f} M parameters, {tmeta['train_seconds'] / 60:.1f} min "
              f"on this machine, torch {tmeta['torch_version']}, {tmeta['date']}): **test accuracy "
              f"{_p(tmeta['test_accuracy'], 2)}** on the 10,000 Fashion-MNIST test images "
              f"(`{meta_path}`).", ""]
    else:
        L += [f"No training record beside `{src}`.", ""]
    n_second = res.meta.rows - res.meta.rows // 2
    L += [f"Benchmark: `{run.command}` -> `{out_dir / (res.backbone + '.json')}` "
          f"({run.wall_s / 60:.1f} min wall time, commit {run.code.get('commit')}"
          + (f"; uncommitted changes in the tree at the time: "
             f"{', '.join(run.code['uncommitted'])}" if run.code.get("uncommitted") else "")
          + f"; {run.date}).", "",
          f"Backbone: {m.total_flops / 1e6:.1f} MFLOPs per row (multiply-add = 2), "
          f"{m.params / 1e6:.3f} M parameters, accuracy {_p(res.backbone_accuracy, 2)} on the "
          f"{res.meta.rows} streamed rows; {len(m.exits)} exits placed at "
          f"{', '.join(format(e.fraction, '.0%') for e in m.exits)} of its FLOPs (heads "
          f"{sum(e.head_params for e in m.exits) / m.params:.1%} of its parameters). Stream of "
          f"{res.meta.rows} rows, {res.meta.batch} per request, seeds {res.meta.seeds}; figures "
          f"on the second half ({n_second} rows per seed).", ""]
    verdicts = {}
    for b in budget_keys(res.ours):
        runs = res.ours_runs(b)
        share = [r.oracle_fraction for r in runs]
        ours_fs = [r.flops_saved for r in runs]
        L += [f"### Budget {b}", "",
              "min / median / max over the seeds. FLOPs saved counts every head a row passes; "
              "agreement = same class as the backbone; accuracy uses the labels (report only). "
              "Oracle = the method's own heads, each row at its earliest agreeing exit.", "",
              "| method | FLOPs saved | agreement | accuracy | oracle saving | share of oracle "
              "| ours beats it (per seed) |",
              "|---|---|---|---|---|---|---|"]
        L.append(f"| **ours (online)** | **{mmm(ours_fs)}** | {mmm([r.agreement for r in runs], 2)}"
                 f" | {mmm([r.accuracy_cached for r in runs], 2)} | "
                 f"{mmm([r.oracle_saving for r in runs])} | {mmm(share, 0)} | - |")
        beats = {}
        ours_by_seed = {r.seed: r.flops_saved for r in runs}
        for bname, bl in res.baselines.items():
            rs = res.baseline_scores(bname, b)
            seeds = [s_.seed for s_ in bl.seeds if b in s_.budgets]
            orc = [s_.oracle_saving for s_ in bl.seeds if b in s_.budgets]
            wins = [ours_by_seed.get(sd, -1.0) > r.flops_saved for sd, r in zip(seeds, rs)]
            beats[bname] = (sum(wins), len(wins),
                            statistics.median([r.flops_saved for r in rs]) if rs else None)
            L.append(f"| {bname}{' (labels)' if bl.labels else ''} | "
                     f"{mmm([r.flops_saved for r in rs])} | {mmm([r.agreement for r in rs], 2)} | "
                     f"{mmm([r.accuracy for r in rs], 2)} | {mmm(orc)} | "
                     f"{mmm([r.flops_saved / o if o > 0 else None for r, o in zip(rs, orc)], 0)} | "
                     f"{sum(wins)}/{len(wins)} |")
        acc_b = [r.accuracy_backbone for r in runs]
        L += [f"| backbone alone | 0% | 100% | {mmm(acc_b, 2)} | - | - | - |", ""]
        target = TARGET_SHARE.get(b)
        min_share = min((v for v in share if v is not None), default=None)
        share_ok = target is not None and min_share is not None and min_share >= target
        agr_ok = all(r.agreement >= float(b) for r in runs)
        all_beat = all(w == n and n > 0 for w, n, _ in beats.values())
        def _bl_agr(k):
            rs = res.baseline_scores(k, b)
            ok = sum(r.agreement >= float(b) for r in rs)
            return (f"its agreement {mmm([r.agreement for r in rs], 2)}, >= {b} on {ok}/{len(rs)}"
                    f" seeds")
        lost = [f"{k} (ours ahead on {w}/{n} seeds; its median {_p(med)} vs ours "
                f"{_p(statistics.median(ours_fs))}; {_bl_agr(k)})"
                for k, (w, n, med) in beats.items() if w < n]
        L.append(f"- Share of the oracle, minimum over seeds: **{_p(min_share, 1)}** "
                 + (f"(target >= {target:.0%}): **{'met' if share_ok else 'missed'}**."
                    if target is not None else "(no target at this budget)."))
        L.append(f"- Agreement on the scored rows >= {b} on every seed: "
                 f"{'yes' if agr_ok else '**no**'} (min {_p(min(r.agreement for r in runs), 2)}).")
        L.append("- Ours saves more FLOPs than every offline baseline on every seed: "
                 + ("**yes**." if all_beat else f"**no**: not ahead of {'; '.join(lost)}."))
        L.append("- Online learning, per seed: first row an exit answered "
                 f"{', '.join(str(r.first_exit_row) for r in runs)}; learning rounds "
                 f"{', '.join(str(r.learning.rounds) for r in runs)}; exits with a threshold at "
                 "the end of the stream "
                 f"{', '.join(str(sum(t is not None for t in r.final_thresholds)) for r in runs)}"
                 f" of {len(m.exits)}; drift events "
                 f"{', '.join(str(r.drift_events) for r in runs)}; first exit's head agreement "
                 f"(as served) {mmm([r.head_agreement[0] for r in runs], 1)}.")
        honest = {k: v for k, v in beats.items()
                  if all(r.agreement >= float(b) for r in res.baseline_scores(k, b))}
        beat_honest = all(w == n for w, n, _ in honest.values())
        L.append("- ... than every baseline that keeps agreement >= the budget on every seed ("
                 + (", ".join(honest) or "none") + "): "
                 + ("**yes**." if beat_honest else "**no**."))
        L.append("")
        verdicts[b] = dict(share_ok=share_ok, min_share=min_share, agr_ok=agr_ok,
                           all_beat=all_beat, beat_honest=beat_honest, target=target)
    return L, verdicts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outs", nargs="+", help="benchmark --out folders, one per backbone")
    p.add_argument("--md", default="docs/backbones.md")
    p.add_argument("--train-threads", type=int, default=1,
                   help="--threads the backbones were trained with (tools.train does not record it)")
    args = p.parse_args(argv)
    body, summary, runs = [], [], []
    for o in args.outs:
        out = Path(o)
        run = RunInfo.from_json(json.loads((out / "run.json").read_text()))
        runs.append(run)
        for name in run.backbones:
            res = BackboneResult.from_json(json.loads((out / f"{name}.json").read_text()))
            lines, verdicts = section(res, run, out, args.train_threads)
            body += lines
            for b, v in verdicts.items():
                summary.append(
                    f"| {name} | {b} | {_p(v['min_share'])} (target {_p(v['target'], 0)}): "
                    f"{'met' if v['share_ok'] else '**missed**'} | "
                    f"{'yes' if v['agr_ok'] else '**no**'} | "
                    f"{'yes' if v['all_beat'] else '**no**'} | "
                    f"{'yes' if v['beat_honest'] else '**no**'} |")
    mach = runs[0].machine
    L = ["# Savings on backbones of other families (issue 14)", "",
         "Generated by `python -m tools.bench.backbones_report "
         + " ".join(args.outs) + f" --md {args.md}` from the benchmark's JSON; every figure "
         "comes from those files.", "",
         "| | |", "|---|---|",
         f"| machine | {mach.get('cpu')}, {mach['cpu_count']} cores shared with other jobs "
         f"(load average often 5-9), CPU only; {mach['platform']} |",
         f"| versions | python {mach['python']}, torch {mach['torch']}, torchvision "
         f"{mach.get('torchvision')}, numpy {mach.get('numpy')}; benchmark torch threads "
         f"{mach.get('torch_threads')} |",
         f"| commits | {', '.join(sorted({str(r.code.get('commit')) for r in runs}))} |",
         f"| dates (UTC) | {', '.join(r.date for r in runs)} |", ""]
    # Hand-written notes between NOTES and END_NOTES survive a regeneration.
    md = Path(args.md)
    old = md.read_text() if md.is_file() else ""
    if NOTES in old and END_NOTES in old:
        L += [old[old.index(NOTES):old.index(END_NOTES) + len(END_NOTES)], ""]
    L += ["## Targets", "",
          "Issue 14: ours >= 90% of the oracle at budget 0.995 and >= 85% at 0.99 (minimum over "
          ">= 3 seeds), and ahead of every offline baseline.", "",
          "| backbone | budget | share of oracle, min over seeds | agreement >= budget, every "
          "seed | ahead of every baseline, every seed | ahead of every baseline that meets the budget "
          "on every seed |", "|---|---|---|---|---|---|", *summary, ""]
    md.write_text("\n".join(L + body).rstrip() + "\n")
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
