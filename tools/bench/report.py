"""BENCHMARKS.md, written from the JSON a run left in OUT (typed records read back)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import torch

from tools.bench.imagenet import ImagenetResult
from tools.bench.plots import LAT_TITLES, plots
from tools.bench.results import BackboneResult, RunInfo
from tools.bench.settings import NO_GPU
from tools.bench.stats import budget_keys, mean_int, pct, signed, spread, spread_pct


def _md_backbone(res: BackboneResult, run: RunInfo, fig_dir: Path) -> List[str]:
    name, m = res.backbone, res.model
    figs = plots(res, fig_dir)
    cmd = run.command
    src = f"_Source: `{cmd}` -> `{Path(run.out or 'out/bench') / (name + '.json')}`._"
    seeds = res.meta.seeds
    n_second = res.meta.rows - res.meta.rows // 2
    L = [f"## {name} (Fashion-MNIST test stream, input {'x'.join(map(str, m.input_shape[1:]))})",
         "", src, "",
         f"Backbone: {m.total_flops / 1e6:.1f} MFLOPs per row (multiply-add = 2), "
         f"{m.params / 1e6:.3f} M parameters, accuracy {pct(res.backbone_accuracy, 2)} on "
         f"all {res.meta.rows} test rows. The compiler placed {len(m.exits)} exits:", "",
         "| exit | cut point | FLOPs before it | head | head params | head FLOPs (% of backbone) |",
         "|---|---|---|---|---|---|"]
    for i, e in enumerate(m.exits):
        L.append(f"| {i} | `{e.name}` | {e.fraction:.1%} | {e.pool}"
                 f"{', MLP ' + str(e.hidden) if e.hidden else ', Linear'} | {e.head_params} | "
                 f"{e.head_flops / 1e3:.1f} k ({e.head_flops / m.total_flops:.2%}) |")
    L += ["", f"### Savings, agreement, accuracy ({len(seeds)} seeds: {seeds}; {n_second} scored "
          f"rows per seed; mean (min-max) over seeds)", "",
          "FLOPs saved counts every head a row passes. Agreement = same class as the backbone. "
          "Accuracy uses the labels, for the report only. \"Oracle\" is each method's own heads "
          "with each row sent to its earliest agreeing exit (cost: the stages before it plus that "
          "one head; never more than the backbone); \"share of oracle\" = saved / oracle.", "",
          "| method | budget | FLOPs saved | agreement | accuracy | oracle saving | share of oracle |",
          "|---|---|---|---|---|---|---|"]
    budgets = budget_keys(res.ours)
    for b in budgets:
        runs = res.ours_runs(b)
        L.append(f"| **ours (online)** | {b} | **{spread_pct([r.flops_saved for r in runs])}** | "
                 f"{spread_pct([r.agreement for r in runs], 2)} | "
                 f"{spread_pct([r.accuracy_cached for r in runs], 2)} | "
                 f"{spread_pct([r.oracle_saving for r in runs])} | "
                 f"{spread_pct([r.oracle_fraction for r in runs], 0)} |")
        for bname, bl in res.baselines.items():
            rs = res.baseline_scores(bname, b)
            orc = [s_.oracle_saving for s_ in bl.seeds]
            frac = [r.flops_saved / o if o > 0 else None for r, o in zip(rs, orc)]
            L.append(f"| {bname}{' (labels)' if bl.labels else ''} | {b} | "
                     f"{spread_pct([r.flops_saved for r in rs])} | "
                     f"{spread_pct([r.agreement for r in rs], 2)} | "
                     f"{spread_pct([r.accuracy for r in rs], 2)} | "
                     f"{spread_pct(orc)} | {spread_pct(frac, 0)} |")
    acc_b = [r.accuracy_backbone for b in budgets for r in res.ours_runs(b)]
    L.append(f"| backbone alone | - | 0% | 100% | {spread_pct(acc_b, 2)} | - | - |")
    L.append("")
    for b in budgets:
        ours_m = spread([r.flops_saved for r in res.ours_runs(b)])["mean"]
        means = {bn: (spread([r.flops_saved for r in res.baseline_scores(bn, b)])["mean"],
                      spread([r.agreement for r in res.baseline_scores(bn, b)])["mean"])
                 for bn in res.baselines}
        if means:
            best = max(means, key=lambda k: means[k][0])
            verdict = "ahead of" if ours_m > means[best][0] else "behind"
            L.append(f"At budget {b} ours saves {pct(ours_m)}, {verdict} the best baseline "
                     f"by FLOPs saved, {best} ({pct(means[best][0])} at "
                     f"{pct(means[best][1], 2)} agreement).  ")
    L += ["", "Baselines (offline heads, same backbone, same calibration rule):", ""]
    for bname, bl in res.baselines.items():
        ex = bl.exits
        hp = sum(e.head_params for e in ex)
        hf = sum(e.head_flops for e in ex)
        L.append(f"- **{bname}**: {bl.title}; {len(ex)} exits at "
                 f"{', '.join(format(e.fraction, '.0%') for e in ex)} of the FLOPs; heads "
                 f"{hp / 1e3:.1f} k params ({hp / m.params:.1%} of the backbone), all heads "
                 f"{hf / m.total_flops:.1%} of the backbone's FLOPs; {bl.epochs} epochs; "
                 f"per-head agreement on the scored rows "
                 f"{', '.join(f'{v:.3f}' for v in torch.tensor([s_.head_agreement for s_ in bl.seeds]).mean(0).tolist())}.")
    L += ["", f"![FLOPs saved vs agreement budget]({figs['savings']})", "",
          "Baselines are swept over budgets (cheap offline); the online runtime was run at "
          f"{', '.join(budgets)} only.", ""]

    lb = str(res.latency.budget)
    runs = res.ours_runs(lb)
    names = [e.name for e in m.exits] + ["backbone"]
    L += [f"### Rows per exit (ours at budget {lb}, 2nd half, mean over seeds)", "", src, "",
          "| exit | FLOPs fraction | ours | oracle | per-head agreement (served heads) |",
          "|---|---|---|---|---|"]
    ours_sh = torch.tensor([r.exit_share for r in runs]).mean(0).tolist()
    orc_sh = torch.tensor([r.oracle_exit_share for r in runs]).mean(0).tolist()
    hagree = torch.tensor([r.head_agreement for r in runs]).mean(0).tolist() + [None]
    fracs = [e.fraction for e in m.exits] + [1.0]
    for i, nm in enumerate(names):
        L.append(f"| {i} `{nm}` | {fracs[i]:.1%} | {ours_sh[i]:.1%} | {orc_sh[i]:.1%} | "
                 f"{'-' if hagree[i] is None else f'{hagree[i]:.3f}'} |")
    thr = runs[0].final_thresholds if runs else []
    L += ["", f"Final thresholds of seed {runs[0].seed if runs else '-'}: "
          f"{', '.join('off' if t is None else f'{t:.3f}' for t in thr)}.", "",
          f"![exit distribution]({figs['exits']})", ""]

    L += ["### Online learning: compute spent and time to useful heads", "", src, "",
          "| budget | rounds | training FLOPs (share of the stream's backbone FLOPs) | training "
          "time | first row answered by an exit | FLOPs saved, rows 0-5000 | agreement, rows "
          "0-5000 | FLOPs saved, 2nd half | drift alarms (exits switched off) per seed | stream "
          "wall time per seed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        rs = res.ours_runs(b)
        L.append(f"| {b} | {mean_int([r.learning.rounds for r in rs])} | "
                 f"{spread([r.learning.train_flops for r in rs])['mean'] / 1e9:.2f} GFLOPs "
                 f"({spread_pct([r.learning.share_of_backbone_flops for r in rs], 2)}) | "
                 f"{spread([r.learning.train_seconds for r in rs])['mean']:.1f} s | "
                 f"{', '.join(str(r.first_exit_row) for r in rs)} | "
                 f"{spread_pct([r.first5k.flops_saved for r in rs])} | "
                 f"{spread_pct([r.first5k.agreement for r in rs], 2)} | "
                 f"{spread_pct([r.flops_saved for r in rs])} | "
                 f"{', '.join(str(r.drift_events) for r in rs)} | "
                 f"{spread([r.wall_s for r in rs])['mean']:.0f} s |")
    L += ["", "Baselines' heads, for comparison, were trained offline on "
          f"{res.baselines[next(iter(res.baselines))].seeds[0].train_rows if res.baselines else '-'}"
          " rows: " + ", ".join(
              f"{b_} {spread([s_.train_flops for s_ in bl.seeds])['mean'] / 1e9:.2f} GFLOPs"
              for b_, bl in res.baselines.items()) + ".", "",
          f"![learning along the stream]({figs['learning']})", ""]

    lat = res.latency
    L += [f"### Latency per request ({lat.device.upper()}, {lat.threads} thread(s); "
          f"learned artifact of seed {seeds[0]} at budget {lb})", "", src, "",
          f"Each request timed {lat.reps} times (median kept) after {lat.warmup} warm-up "
          "requests, the variants taking turns request by request; requests are rows of the "
          "scored half of the stream. Throughput = rows / total time, one request at a time.", ""]
    for key in ("batch1", "batch64"):
        r = getattr(lat, key)
        if r is None:
            continue
        t = r.table
        L += [f"**{key.replace('batch', 'batch ')}** ({t['backbone_scripted'].requests} requests)",
              "", "| variant | p50 ms | p99 ms | throughput rows/s | GPU |", "|---|---|---|---|---|"]
        for v, q in t.items():
            L.append(f"| {LAT_TITLES.get(v, v)} | {q.p50:.2f} | {q.p99:.2f} | "
                     f"{q.throughput_rows_s:.0f} | {NO_GPU if lat.device == 'cpu' else 'this table (CUDA)'} |")
        L += ["", f"Cached vs backbone in the same mode: p50 {signed(-r.p50_reduction_eager)} "
              f"eager, {signed(-r.p50_reduction_scripted)} scripted; p99 "
              f"{signed(-r.p99_reduction_eager)} eager, {signed(-r.p99_reduction_scripted)} "
              f"scripted; throughput {signed(r.throughput_gain_eager)} eager, "
              f"{signed(r.throughput_gain_scripted)} scripted. runtime.predict vs scripted "
              f"backbone: p50 {signed(-r.p50_reduction_runtime_vs_scripted)}.", ""]
    b1 = lat.batch1
    if b1:
        L += ["**Requests that miss every exit** (batch 1: rows no enabled exit took, "
              f"{b1.missed_every_exit} of {len(b1.exit_of_request)} requests): median "
              f"slow-down against the backbone on the same requests "
              f"{signed(b1.miss_slowdown_scripted)} scripted, "
              f"{signed(b1.miss_slowdown_eager)} eager, "
              f"{signed(b1.miss_slowdown_runtime_vs_scripted)} runtime.predict vs scripted "
              "backbone. Scripted p50 by exit taken: " + ", ".join(
                  f"{names[int(e)]} {v:.2f} ms" for e, v in b1.p50_by_exit_scripted.items()
                  if v is not None) + ".", ""]
    L += [f"![latency CDF]({figs['latency']})", "",
          f"Eager cached model and scripted artifact give the same exits and outputs: "
          f"{lat.eager_matches_scripted}.", ""]
    return L


def _md_imagenet(im: ImagenetResult, run: RunInfo) -> List[str]:
    src = f"_Source: `{run.command}` -> `{Path(run.out or 'out/bench') / 'imagenet_mobilenet_v2.json'}`._"
    if im.skipped:
        return ["## ImageNet MobileNetV2 at 224 px", "", f"Skipped: {im.skipped}.", ""]
    L = ["## ImageNet MobileNetV2 at 224 px (torchvision weights; FLOPs and latency only)", "", src,
         "", f"{im.total_flops / 1e6:.0f} MFLOPs per image, {im.params / 1e6:.2f} M "
         f"parameters; {len(im.exits)} exits; all heads together "
         f"{im.all_heads_flops_share:.2%} of the backbone's FLOPs. No ImageNet data ship "
         "here, so no agreement or savings: inputs are seeded noise and each exit is forced "
         "(threshold 0 at that exit only); \"every head on, none exits\" is the worst case of a "
         "request that misses every exit.", "",
         "| exit | cut point | FLOPs before it | head params | head FLOPs |", "|---|---|---|---|---|"]
    for i, e in enumerate(im.exits):
        L.append(f"| {i} | `{e.name}` | {e.fraction:.1%} | {e.head_params} | "
                 f"{e.head_flops / 1e3:.1f} k |")
    for key in ("batch1", "batch64"):
        ib = getattr(im, key)
        if ib is None:
            continue
        t = ib.table
        L += ["", f"**{key.replace('batch', 'batch ')}** ({im.device.upper()})", "",
              "| variant | p50 ms | p99 ms | throughput img/s | GPU |", "|---|---|---|---|---|"]
        for v, q in t.items():
            label = {"backbone_eager": "backbone, eager (torchvision module)",
                     "backbone_scripted": "backbone, scripted (artifact, exits off)",
                     "miss_all_scripted": "every head on, none exits (scripted)"}.get(
                         v, v.replace("exit_", "forced out at exit ").replace("_scripted",
                                                                              " (scripted)"))
            L.append(f"| {label} | {q.p50:.1f} | {q.p99:.1f} | "
                     f"{q.throughput_rows_s:.1f} | {NO_GPU if im.device == 'cpu' else 'this table (CUDA)'} |")
        n_req = t["backbone_scripted"].requests
        L += ["", f"Miss-every-exit slow-down (p50, scripted): "
              f"{signed(ib.miss_slowdown_scripted)}"
              + (f" ({n_req} requests: within the noise of this shared CPU)." if n_req < 10
                 else ".")]
    return L + [""]


def _targets(results: List[BackboneResult], run: RunInfo) -> List[str]:
    L = ["## Targets (issue 4) and where we fall short", "",
         "| target | measured | met? |", "|---|---|---|"]
    for res in results:
        nm = res.backbone
        runs = res.ours_runs(0.995)
        if runs:
            frac = spread([r.oracle_fraction for r in runs])
            agr = spread([r.agreement for r in runs])
            met = frac["mean"] is not None and frac["mean"] >= 0.9 and agr["min"] >= 0.995
            L.append(f"| {nm}: >= 90% of the oracle's FLOPs saving at 99.5% agreement | "
                     f"{spread_pct([r.oracle_fraction for r in runs], 0)} of the oracle "
                     f"({spread_pct([r.flops_saved for r in runs])} vs "
                     f"{spread_pct([r.oracle_saving for r in runs])}), agreement "
                     f"{spread_pct([r.agreement for r in runs], 2)} | "
                     f"{'yes' if met else '**no**'} |")
        lat = res.latency.batch1
        red = lat.p50_reduction_scripted if lat else None
        L.append(f"| {nm}: >= 55% lower p50 latency at batch 1 (GPU) | {NO_GPU}. CPU for "
                 f"reference: {signed(-red) if red is not None else 'n/a'} p50 scripted, "
                 f"{signed(-lat.p50_reduction_eager) if lat else 'n/a'} eager | "
                 f"not measured |")
        ms, me = (lat.miss_slowdown_scripted, lat.miss_slowdown_eager) if lat else (None, None)
        ok = ms is not None and ms <= 0.05
        L.append(f"| {nm}: requests that miss every exit <= 5% slower | CPU batch 1: "
                 f"{signed(ms)} scripted, {signed(me)} eager, "
                 f"{signed(lat.miss_slowdown_runtime_vs_scripted if lat else None)} through "
                 f"runtime.predict (vs the scripted backbone); GPU: {NO_GPU} | "
                 f"{('yes' if ok else '**no**') + ' (CPU)'} |")
        for b in budget_keys(res.ours):
            rs = res.ours_runs(b)
            first = [r.first_exit_row for r in rs]
            ok = all(f is not None and f < 5000 for f in first) and \
                spread([r.first5k.flops_saved for r in rs])["mean"] > 0
            L.append(f"| {nm}: heads useful within the first 5,000 requests (budget {b}) | first "
                     f"exit at row {', '.join(map(str, first))}; "
                     f"{spread_pct([r.first5k.flops_saved for r in rs])} FLOPs saved over "
                     f"rows 0-5000 (read as rows, the stricter reading) | "
                     f"{'yes' if ok else '**no**'} |")
    return L + [""]


def _md_onnx(r: dict) -> list:
    """The ONNX section, from tools.onnx_bench's JSON."""
    p = r["parity"]
    L = ["## ONNX (onnxruntime, CPU)", "",
         f"_Source: `{r['command']}` -> `out/onnx_bench/onnx_bench.json`; {r['machine']}; "
         f"torch {r['versions']['torch']}, onnxruntime {r['versions']['onnxruntime']}; "
         f"{r['date']}._", "",
         "The learned demo artifact (written by `python -m tools.demo`, run first) exported "
         "with `python -m compiler.export` (exits applied per "
         "row inside the graph) against the same artifact with every exit off, exported the same "
         "way: the backbone's own ops, staged. Opset 18, CPUExecutionProvider, one thread.", "",
         f"Parity with the TorchScript artifact on {r['rows']} Fashion-MNIST test rows: same class "
         f"{p['same_class']:.2%}, same exit {p['same_exit']:.2%}, max logit difference "
         f"{p['max_logit_diff']:.1e}.", "",
         "| batch | cached p50 ms | cached p99 ms | backbone p50 ms | backbone p99 ms | p50 change |",
         "|---|---|---|---|---|---|"]
    for b, q in r["latency_ms"].items():
        L.append(f"| {b} | {q['cached_p50']:.3f} | {q['cached_p99']:.3f} | {q['backbone_p50']:.3f} "
                 f"| {q['backbone_p99']:.3f} | {q['cached_p50'] / q['backbone_p50'] - 1:+.1%} |")
    return L + [""]



def write_md(out_dir: Path, md_path: Path, fig_dir: Path) -> Path:
    """BENCHMARKS.md and docs/bench/*.png from OUT/run.json and the JSON it lists."""
    run = RunInfo.from_json(json.loads((out_dir / "run.json").read_text()))
    run.out = run.out or str(out_dir)
    results = [BackboneResult.from_json(json.loads((out_dir / f"{n}.json").read_text()))
               for n in run.backbones]
    mach = run.machine
    L = ["# Benchmarks", "",
         "Generated by `python -m tools.benchmark --write-md` from the JSON that the command "
         "below wrote; every figure on this page comes from that command (the source JSON is "
         "named under each section). Re-run it to reproduce them.", "",
         "| | |", "|---|---|",
         f"| command | `{run.command}` ({run.mode} mode) |",
         f"| machine | {mach.get('cpu')}, {mach['cpu_count']} cores shared with other jobs; "
         f"{mach['platform']} |",
         f"| GPU | {mach['gpu'] or NO_GPU} |",
         f"| torch threads | {results[0].latency.threads if results else '-'} |",
         f"| versions | python {mach['python']}, torch {mach['torch']}, torchvision "
         f"{mach.get('torchvision')}, numpy {mach.get('numpy')} |",
         f"| date (UTC) | {run.date} |",
         f"| code | commit {run.code.get('commit')}"
         + (f" + uncommitted changes in {', '.join(run.code['uncommitted'])}"
            if run.code.get('uncommitted') else "") + " |",
         f"| wall time | {run.wall_s / 60:.1f} min |", "",
         "**Timings are noisy.** The CPU is shared with other jobs; we run one intra-op thread "
         "(with two, one descheduled thread stalled single ops by up to 100x) and keep medians, "
         "but differences of a few percent in latency are within the noise. FLOPs, agreement "
         "and accuracy do not depend on timing (FLOPs are counted by the compiler's estimator, "
         "multiply-add = 2).", "",
         ("**GPU:** every GPU figure reads \"" + NO_GPU + "\". `python -m tools.benchmark "
          "--mode full` (CUDA, the five CIFAR-style backbones trained by `tools.train` and cached "
          "under `out/bench/backbones/`, plus ImageNet MobileNetV2 at 224 px) is written but has "
          "not been run." if not mach['gpu'] else
          f"**GPU:** {mach['gpu']}; latency tables below are CUDA timings, synchronised."), "",
         "## Protocol", "",
         "- **Stream.** The 10,000 Fashion-MNIST test images in a seeded random order (one order "
         "per seed), 16 rows per request (`tools.experiment.stream`). Each request is answered "
         "before anything learns from it; the runtime learns inline (`background=False`), where "
         "its cost model is FLOPs only, so order, shadow sampling, calibration split, training and "
         "thresholds all follow from the seed. Figures are taken on the **second half** of the "
         "stream: rows that were all answered before any head saw them.",
         "- **Ours.** `runtime.load(artifact, background=False, seed=s, agreement_budget=b)` on "
         "the artifact `compiler.rewrite` made with default settings; heads distilled online "
         "from the backbone's outputs (no labels), thresholds chosen by `runtime.calibrate`'s "
         "Learn-then-Test rule (one threshold for every exit, down a grid fixed in advance, "
         "each setting tested on every held-out row by an exact binomial test at 95% "
         "confidence, rows counted as the independent rows they are worth); 5% of requests "
         "shadowed (answered by the "
         "backbone, so they count towards the budget and the exits are held to the rest of it).",
         "- **Oracle.** The heads exactly as they were when each row was served; each row exits "
         "at the earliest exit whose head agrees with the backbone, paying the stages before it "
         "and that head only; rows that no head agrees with run the backbone (if a head costs "
         "more than the stages it would skip, the oracle takes the cheaper of the two, which "
         "matters only for the seed paper's flattened heads). This is the ceiling of any cache "
         "that never answers against the backbone with these exits.",
         "- **Baselines** (`tools/baselines.py`), same backbone, same label-free budget: heads "
         "trained offline on the first half of the same seed's order minus its last 30% "
         "(features of the backbone's stage outputs, targets = the backbone's logits; "
         "BranchyNet-style alone uses the true labels), thresholds chosen on that held-out 30% "
         "so that the Wilson lower bound (95%) of agreement meets the budget, then frozen and "
         "scored on the second half: the same rows as ours. Head FLOPs are counted for every "
         "method. They see 3,500 training rows up front; ours learns as the stream goes.",
         "- **Latency.** `time.perf_counter` around each request (CUDA would be synchronised), "
         "warm-up first, median of repeated timings per request; p50/p99 over requests. The "
         "cached model is compared with the backbone in the same mode: eager (fx stages vs the "
         "fx GraphModule) and scripted (learned artifact vs the artifact with exits off).", ""]
    L += _targets(results, run)
    for res in results:
        L += _md_backbone(res, run, fig_dir)
    im_path = out_dir / "imagenet_mobilenet_v2.json"
    if run.imagenet and im_path.is_file():
        L += _md_imagenet(ImagenetResult.from_json(json.loads(im_path.read_text())), run)
    onnx_path = Path("out/onnx_bench/onnx_bench.json")
    if onnx_path.is_file():
        L += _md_onnx(json.loads(onnx_path.read_text()))
    md_path.write_text("\n".join(L) + "\n")
    return md_path

