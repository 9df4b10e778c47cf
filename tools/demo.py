"""The main job: rewrite the embedded Fashion-MNIST backbone, stream the test set through the
runtime prequentially, and report savings, agreement, accuracy and latency (plus a PNG plot).

    python -m tools.demo [--backbone tools/assets/demo_backbone.pt2] [--out out/demo]
    python -m tools.demo --task detection      (the detector demo: tools/detection_demo.py)
"""
import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from tools.experiment import StreamRows, stream, summarise
from tools.timing import median, time_variants

ASSET = Path(__file__).resolve().parent / "assets" / "demo_backbone.pt2"


def plot(rec: StreamRows, rt, budget: float, path, window=500):
    """Exit shares and rolling FLOPs saved / agreement along the stream."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E, total = rt.num_exits, float(rt.manifest["total_flops"])
    n = len(rec)
    xs, shares, saved, agree = [], [], [], []
    for s in range(0, n - window + 1, window // 2):
        sl = slice(s, s + window)
        xs.append(s + window // 2)
        shares.append((torch.bincount(rec.exit[sl], minlength=E + 1).double() / window).tolist())
        saved.append(1 - rec.flops[sl].sum().item() / (window * total))
        agree.append((rec.pred[sl] == rec.ref[sl]).float().mean().item())
    names = [e["name"] for e in rt.exits] + ["backbone"]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    a.stackplot(xs, list(zip(*shares)), labels=names)
    a.set_ylabel(f"share of rows (window {window})")
    a.legend(loc="upper left", fontsize=7, ncol=2)
    a.set_title("Where requests exit, along the stream")
    b.plot(xs, saved, label="FLOPs saved (heads counted)")
    b.plot(xs, agree, label="agreement with backbone")
    b.axhline(budget, ls="--", c="gray", lw=0.8, label="agreement budget")
    b.set_ylim(0, 1.02)
    b.set_xlabel("request row")
    b.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CACHE_MODES = {"cached": "TorchScript", "cached onnx": "its ONNX export in onnxruntime"}
BACKBONE_MODES = {"backbone": "TorchScript", "backbone frozen": "frozen TorchScript",
                  "backbone onnx": "onnxruntime"}


def best_modes(backbone: str, learned_path: Path, shape, out: Path) -> dict:
    """The learned cache's ONNX export and the backbone's fastest CPU modes (frozen TorchScript,
    onnxruntime on a plain export), as callables on a batch, for timing beside the TorchScript
    files; {} with a line saying why when they cannot be built (e.g. no onnxruntime)."""
    try:
        from compiler.export import export_onnx
        from compiler.loading import load_model
        from tools.timing import backbone_modes, ort_session
        export_onnx(str(learned_path), str(out / "demo_backbone.learned.onnx"))
        cached = ort_session(str(out / "demo_backbone.learned.onnx"))
        frozen, plain = backbone_modes(load_model(backbone).module,
                                       torch.zeros((1,) + tuple(shape[1:])),
                                       out / "demo_backbone.plain.onnx")
    except Exception as e:   # export and session errors come in many types: report, go on
        print(f"  (the best CPU modes are not timed: {str(e).splitlines()[0][:200]})")
        return {}
    return {"cached onnx": lambda t: cached.run(None, {"input": t.numpy()}),
            "backbone frozen": frozen,
            "backbone onnx": lambda t: plain.run(None, {"input": t.numpy()})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=str(ASSET), help="a .pt2 backbone (default: embedded)")
    p.add_argument("--out", default="out/demo", help="folder for the artifact, summary and plot")
    p.add_argument("--batch", type=int, default=16, help="rows per request")
    p.add_argument("--rows", type=int, default=0, help="stream only this many test rows (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=0.99, help="agreement budget")
    p.add_argument("--head-budget", type=float, default=None,
                   help="heads' share of the backbone's parameters (default: the compiler's)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--task", choices=("classification", "detection"), default="classification",
                   help="detection: the scene-detector demo (tools/detection_demo.py, its own "
                        "options)")
    argv = list(sys.argv[1:] if argv is None else argv)
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", default="classification")
    known, rest = task.parse_known_args(argv)
    if known.task == "detection":
        from tools.detection_demo import main as detection_main
        return detection_main(rest)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if (os.cpu_count() or 1) <= 2:
        torch.set_num_threads(1)  # a second thread on a shared 2-core machine makes timings erratic
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")   # libraries: warnings only
    logging.getLogger("layer_cache").setLevel(logging.WARNING if args.quiet else logging.INFO)
    torch.manual_seed(args.seed)

    from compiler import artifact
    from compiler.errors import CompilerError
    from compiler.loading import load_model
    from compiler.rewrite import RewriteConfig, rewrite_module
    import runtime
    from tools.data import load_fashion_mnist

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        loaded = load_model(args.backbone)
        shape = tuple(loaded.input_shape or ())
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(f"the demo streams square Fashion-MNIST images; this backbone takes "
                             f"input {list(shape)}")
        # Fashion-MNIST as the backbone takes it (tools.train: 1x28x28 or CIFAR-style 3x32x32).
        x, y = load_fashion_mnist("test", size=shape[2], channels=shape[1])
        t0 = time.perf_counter()
        rewrite = RewriteConfig() if args.head_budget is None else \
            RewriteConfig(head_budget=args.head_budget)
        module, manifest, _ = rewrite_module(loaded.module, loaded.input_shape, rewrite,
                                             exported=True, loaded=loaded)
        cached_path = out / "demo_backbone.cached.pt"
        artifact.save(module, manifest, cached_path)
    except (CompilerError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rewrote {args.backbone} in {time.perf_counter() - t0:.1f} s: "
          f"{len(manifest['exits'])} exits at {[e['name'] for e in manifest['exits']]}")
    if args.rows:
        x, y = x[:args.rows], y[:args.rows]
    rt = runtime.load(cached_path, background=False, seed=args.seed, agreement_budget=args.budget)
    reference = artifact.load(cached_path)[0]  # exits off: the backbone itself
    rec = stream(rt, reference, x, y, args.batch, args.seed, progress=not args.quiet)
    learned_path = out / "demo_backbone.learned.pt"
    rt.save(learned_path)
    # What production gets from the saved artifact (plain torch.jit.load, no runtime): timed on
    # the second half's requests, at the demo's batch size and at batch 1.
    learned = artifact.load(learned_path)[0]
    xs = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))][len(x) // 2:]
    variants = {"cached": learned, "backbone": reference}
    best = best_modes(args.backbone, learned_path, shape, out)   # {} where they do not build
    variants.update(best)
    saved_lat, best_lat = {}, {}
    for bs in sorted({args.batch, 1}):
        t = time_variants(variants, list(xs[:200 * bs].split(bs)), reps=3, warmup=10,
                          device="cpu")
        saved_lat[bs] = (median(t["cached"]), median(t["backbone"]))
        best_lat[bs] = {name: median(t[name]) for name in variants}
    total = float(rt.manifest["total_flops"])
    second = summarise(rec, rt.num_exits, total)
    st = rt.stats()
    lat, ref_lat = median(rec.lat), median(rec.ref_lat)
    half = len(rec.lat) // 2
    lat2, ref2 = median(rec.lat[half:]), median(rec.ref_lat[half:])
    summary = {
        "command": "python -m tools.demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, CPU",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "requests": st["requests"], "rows": st["rows"], "batch": args.batch,
        "exit_names": st["exit_names"], "second_half": second.to_json(),
        "whole_stream": summarise(rec, rt.num_exits, total, half=False).to_json(),
        "latency_ms_per_request": {"cached_p50": lat, "backbone_p50": ref_lat,
                                   "cached_p50_second_half": lat2,
                                   "backbone_p50_second_half": ref2,
                                   "saved_artifact_p50_by_batch": {
                                       str(bs): {"cached": c, "backbone": r}
                                       for bs, (c, r) in saved_lat.items()},
                                   "every_mode_p50_by_batch": {str(bs): v
                                                               for bs, v in best_lat.items()}},
        "runtime_stats": st,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(rec, rt, args.budget, out / "demo.png")
    print()
    print(f"requests {st['requests']} ({st['rows']} rows, {args.batch} per request); "
          f"exits: {', '.join(f'{n} {s:.1%}' for n, s in zip(st['exit_names'], second.exit_share))}"
          f" (second half)")
    print(f"second half (rows {second.rows}, answered before any learning from them):")
    print(f"  FLOPs saved, heads counted:   {second.flops_saved:.1%}")
    print(f"  agreement with the backbone:  {second.agreement:.2%}   (budget {args.budget:.1%})")
    print(f"  accuracy (labels, report only): cached {second.accuracy_cached:.2%}, "
          f"backbone {second.accuracy_backbone:.2%}")
    print(f"  latency p50 per request:      cached {lat2:.2f} ms, backbone {ref2:.2f} ms "
          f"({lat2 / ref2 - 1:+.0%}; CPU, batch {args.batch}, runtime.predict while learning)")
    for bs, (c, r) in saved_lat.items():
        print(f"  saved artifact, batch {bs:<3}:    cached {c:.2f} ms, backbone {r:.2f} ms "
              f"({c / r - 1:+.0%}; plain torch.jit.load, what production loads)")
    for bs, modes in best_lat.items():
        if len(modes) > 2:
            cache = min((n for n in modes if n in CACHE_MODES), key=modes.get)
            back = min((n for n in modes if n not in CACHE_MODES), key=modes.get)
            print(f"  best CPU modes, batch {bs:<3}:    cache {modes[cache]:.2f} ms "
                  f"({CACHE_MODES[cache]}), backbone {modes[back]:.2f} ms "
                  f"({BACKBONE_MODES[back]}): {modes[cache] / modes[back] - 1:+.0%}")
    print(f"  live agreement (shadow rows): {st['live_agreement'] if st['live_agreement'] is None else format(st['live_agreement'], '.2%')} "
          f"over {st['shadow_rows']} rows; drift events {st['drift_events']}")
    print(f"learning: {st['learning']['rounds']} rounds, {st['learning']['train_flops'] / 1e9:.2f} GFLOPs, "
          f"{st['learning']['train_seconds']:.1f} s")
    ok = second.flops_saved >= 0.60 and second.agreement >= 0.99
    print(f"target (>= 60% FLOPs saved at >= 99% agreement, second half): {'met' if ok else 'NOT met'}")
    print(f"wrote {out / 'summary.json'}, {out / 'demo.png'}, {learned_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
