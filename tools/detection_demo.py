"""The detection demo: rewrite the embedded scene detector, stream held-out camera-like scenes
through the runtime prequentially at two shares of empty frames, and report FLOPs saved, frames
per exit, agreement with the detector, mAP@0.5 cached vs detector, and latency.

    python -m tools.demo --task detection [--frames 16000] [--empty 0.3,0.7] [--out out/detection]
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
from typing import List, Optional, Tuple

import torch

from compiler import exit_rule
from runtime.config import THRESHOLD_RULES, CollectConfig
from tools.scenes import SceneConfig, make_stream

SECOND_HALF = "second half of the stream: every frame was answered before anything learned from it"


def agreement(answers: List[dict], reference: List[dict], min_score: float) -> torch.Tensor:
    """bool [n]: the answer equals the detector's at the service's score threshold."""
    ok = []
    for a, r in zip(answers, reference):
        ka, kr = a["scores"] >= min_score, r["scores"] >= min_score
        same = int(ka.sum()) == int(kr.sum()) and \
            torch.equal(a["labels"][ka], r["labels"][kr]) and \
            torch.allclose(a["boxes"][ka], r["boxes"][kr], atol=1e-3) and \
            torch.allclose(a["scores"][ka], r["scores"][kr], atol=1e-4)
        ok.append(same)
    return torch.tensor(ok, dtype=torch.bool)


def boxes_lost(answers: List[dict], reference: List[dict], min_score: float,
               targets: Optional[List[dict]] = None, iou: float = 0.5) -> Tuple[int, int]:
    """(boxes, items): detections at or above the threshold the detector returned and the answer
    did not (no answer box of its label overlaps it at IoU 0.9 or more), and how many of those
    cover a labelled item of ``targets`` (IoU >= ``iou``; 0 without targets): an item lost, not
    clutter the detector fired on."""
    from torchvision.ops import box_iou
    lost = items = 0
    for k, (a, r) in enumerate(zip(answers, reference)):
        ka, kr = a["scores"] >= min_score, r["scores"] >= min_score
        rb, rl = r["boxes"][kr], r["labels"][kr]
        if not len(rb):
            continue
        gone = torch.ones(len(rb), dtype=torch.bool)
        if int(ka.sum()):
            same = box_iou(rb, a["boxes"][ka]) >= 0.9
            gone = ~(same & (rl[:, None] == a["labels"][ka][None, :])).any(1)
        lost += int(gone.sum())
        gt = targets[k]["boxes"] if targets is not None else None
        if gt is not None and len(gt) and int(gone.sum()):
            items += int((box_iou(rb[gone], gt.to(rb.dtype)).amax(1) >= iou).sum())
    return lost, items


def run_stream(rt, reference, stream, batch: int, progress: bool = True) -> dict:
    """Serve ``stream`` in camera order, ``batch`` frames per request; per-frame records."""
    from tqdm import tqdm
    rec = {"exit": [], "answer": [], "reference": [], "flops": []}
    bar = tqdm(range(0, len(stream), batch), desc="serving", unit="req",
               disable=None if progress else True)   # None: off when not a terminal
    for s in bar:
        xb = stream.frames[s:s + batch]
        on = torch.tensor([t is not None for t in rt.stats()["thresholds"]], dtype=torch.bool)
        out, exits = rt.predict(xb, return_exits=True)
        with torch.no_grad():
            ref = reference(xb)
        rec["flops"].append(exit_rule.row_cost(exits, rt.stage_flops, rt.head_flops, on))
        rec["exit"].append(exits)
        rec["answer"] += out
        rec["reference"] += ref
    rec["exit"] = torch.cat(rec["exit"])
    rec["flops"] = torch.cat(rec["flops"])
    return rec


def summarise(rec: dict, stream, rt, total_flops: float) -> dict:
    """Figures over the second half of the stream."""
    from tools.train_detector import map50
    n = len(rec["exit"])
    h = slice(n // 2, n)
    answers, refs = rec["answer"][h], rec["reference"][h]
    targets = stream.targets[h]
    busy = [len(t["labels"]) > 0 for t in targets]
    min_score = rt.task.min_score
    ok = agreement(answers, refs, min_score)
    lost, items_lost = boxes_lost(*[[v for v, b in zip(col, busy) if b]
                                    for col in (answers, refs)], min_score,
                                  [t for t, b in zip(targets, busy) if b])
    shares = torch.bincount(rec["exit"][h], minlength=rt.num_exits + 1).double() / (n - n // 2)
    return {
        "frames": n - n // 2,
        "empty_share": 1 - sum(busy) / len(busy),
        "flops_saved": 1 - rec["flops"][h].sum().item() / ((n - n // 2) * total_flops),
        "agreement": ok.float().mean().item(),
        "disagreeing_frames": {"empty": int((~ok & ~torch.tensor(busy)).sum()),
                               "with_items": int((~ok & torch.tensor(busy)).sum())},
        "frames_per_exit": dict(zip([e["name"] for e in rt.exits] + ["detector"],
                                    shares.tolist())),
        "map50_cached": map50(answers, targets),
        "map50_detector": map50(refs, targets),
        "boxes_lost_on_busy_frames": lost,
        "items_lost": items_lost,
        "detector_boxes_on_busy_frames": sum(int((r["scores"] >= min_score).sum())
                                             for r, b in zip(refs, busy) if b),
    }


def _per_frame(sess, name: str, squeeze: bool):
    """A request of frames [N, C, H, W] through a one-frame onnxruntime session, frame by frame."""
    def run(x):
        for i in range(x.shape[0]):
            sess.run(None, {name: (x[i] if squeeze else x[i:i + 1]).numpy()})
    return run


def latency(cached, detector, frames: torch.Tensor, batch: int, reps: int = 3,
            served=None, cached_onnx: Optional[str] = None, requests: int = 300) -> dict:
    """ms per frame over ``requests`` requests spread over ``frames``, turns interleaved: the
    saved artifact (plain torch.jit.load) and its ONNX export in onnxruntime (``cached_onnx``),
    and ``served`` (the runtime on it, not learning) when given, against the detector in each
    CPU mode: eager, TorchScript, and onnxruntime through torchvision's own ONNX path (one frame
    per call, as it exports). ``<mode>``: the p50; ``<mode>_mean``: the mean (what throughput
    follows; a cache's p50 jumps between a hit and a miss when about half the frames leave)."""
    import io

    from tools.timing import median, ort_session
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(detector)
        f = io.BytesIO()
        torch.onnx.export(detector, ([frames[0]],), f, opset_version=18, dynamo=False)
    det_ort = ort_session(f.getvalue())
    modes = {"cached": lambda x: cached(x),
             "detector_eager": lambda x: detector(list(x)),
             "detector_scripted": lambda x: scripted(list(x)),
             "detector_onnxruntime": _per_frame(det_ort, det_ort.get_inputs()[0].name, True)}
    if cached_onnx is not None:
        modes["cached_onnxruntime"] = _per_frame(ort_session(cached_onnx), "image", False)
    if served is not None:
        modes["runtime_predict"] = lambda x: served.predict(x)
    # requests spread evenly over ``frames``: a camera's frames come in scenes, and the first
    # requests in a row would be one or two of them
    chunks = frames.shape[0] // batch
    reqs = [frames[k * batch:(k + 1) * batch]
            for k in torch.linspace(0, chunks - 1, min(requests, chunks)).long().tolist()]
    times = {k: [] for k in modes}
    with torch.no_grad():
        for fn in modes.values():
            for x in reqs[:5]:
                fn(x)
        for _ in range(reps):   # interleaved, so load on the shared machine hits every mode
            for x in reqs:
                for k, fn in modes.items():
                    t0 = time.perf_counter()
                    fn(x)
                    times[k].append((time.perf_counter() - t0) * 1e3 / x.shape[0])
    out = {k: median(v) for k, v in times.items()}
    out.update({f"{k}_mean": sum(v) / len(v) for k, v in times.items()})
    best = min((k for k in modes if k.startswith("detector_")), key=lambda k: out[k])
    out["detector_best"], out["detector_best_mean"] = out[best], out[f"{best}_mean"]
    out["detector_best_mode"] = best
    mine = min((k for k in modes if k.startswith("cached")), key=lambda k: out[k])
    out["cached_best"], out["cached_best_mean"] = out[mine], out[f"{mine}_mean"]
    out["cached_best_mode"] = mine
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo --task detection",
                                description=__doc__.splitlines()[0])
    p.add_argument("--detector", default=None, help="a state dict from tools.train_detector "
                                                    "(default: the embedded asset)")
    p.add_argument("--exits", default="",
                   help="comma-separated body cut points to place exits after (compiler.rewrite "
                        "--exits; default: the automatic choice)")
    p.add_argument("--out", default="out/detection")
    p.add_argument("--frames", type=int, default=16000, help="held-out frames per stream")
    p.add_argument("--empty", default="0.3,0.7", help="shares of empty frames, comma-separated")
    p.add_argument("--batch", type=int, default=8, help="frames per request")
    p.add_argument("--budget", type=float, default=0.99, help="agreement budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scene-seed", type=int, default=500, help="seed of the first scene stream")
    p.add_argument("--fragments", type=int, default=SceneConfig.fragments,
                   help="clutter fragments per background")
    p.add_argument("--max-items", type=int, default=SceneConfig.max_items)
    p.add_argument("--noise", type=float, default=SceneConfig.noise)
    p.add_argument("--train-every", type=int, default=1000,
                   help="frames between learning rounds (also the first round's minimum)")
    p.add_argument("--min-calib", type=int, default=400, help="held-out frames before exits")
    p.add_argument("--calib-fraction", type=float, default=CollectConfig.calib_fraction,
                   help="share of frames held out to calibrate before exits are on (default: "
                        "the runtime's; a camera's frames are correlated: the bound counts "
                        "frames / design effect)")
    p.add_argument("--threshold-rule", default="ltt", choices=THRESHOLD_RULES,
                   help="how held-out frames choose thresholds (runtime/calibrate.py; the "
                        "runtime's default, ltt, is the valid one)")
    p.add_argument("--backend", default="auto", choices=("auto", "torchscript", "onnxruntime"),
                   help="the runtime's serving backend (auto: onnxruntime on the CPU)")
    p.add_argument("--latency-weight", type=float, default=None,
                   help="the cost model's share of latency measured in the serving backend "
                        "(ServingConfig.latency_weight; default: FLOPs only, as synchronous "
                        "mode must not depend on the clock); e.g. 0.5 chooses exits by their "
                        "time in onnxruntime as well")
    p.add_argument("--runtime-settings", default="",
                   help="more runtime settings for the learning streams, e.g. "
                        "correlation_block_rows=64,shadow_rate=0.1 (they win over the flags)")
    p.add_argument("--no-latency", action="store_true",
                   help="skip the latency tables (sweeps over streams and rules: savings only)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if (os.cpu_count() or 1) <= 2:
        torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")   # libraries: warnings only
    logging.getLogger("layer_cache").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from compiler import artifact
    from compiler.detection import DetectionConfig, rewrite_detector
    from compiler.errors import CompilerError
    from runtime.detection import load as load_runtime
    from tools.train_detector import load_demo_detector

    from tools.experiment import checked_runtime_settings
    try:
        settings = checked_runtime_settings(args.runtime_settings)
    except ValueError as e:
        print(f"error: runtime settings: {e}", file=sys.stderr)
        return 2
    exits = [e for e in args.exits.split(",") if e]
    detector, meta = load_demo_detector(args.detector)
    size = meta["build"].get("size", 96)
    t0 = time.perf_counter()
    try:
        module, manifest, _ = rewrite_detector(
            detector, DetectionConfig(input_shape=(1, 1, size, size), exits=exits))
    except CompilerError as e:
        print(f"error: {e}", file=sys.stderr)   # names the cut points where --exits was wrong
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cached_path = out / "demo_detector.cached.pt"
    artifact.save(module, manifest, cached_path)
    print(f"rewrote the demo detector ({meta['arch']}, mAP@0.5 {meta['map50_heldout']:.3f} when "
          f"trained) in {time.perf_counter() - t0:.1f} s: exits after "
          f"{[e['name'] for e in manifest['exits']]} carrying "
          f"{[e['carries'] for e in manifest['exits']]}")
    reference = torch.jit.load(str(cached_path)).eval()   # exits off: the detector itself
    results = {}
    for k, share in enumerate(float(s) for s in args.empty.split(",")):
        stream = make_stream(SceneConfig(frames=args.frames, size=size, empty_share=share,
                                         split="test", seed=args.scene_seed + k,
                                         fragments=args.fragments, max_items=args.max_items,
                                         noise=args.noise))
        rt = load_runtime(cached_path, background=False, **{
            **dict(seed=args.seed, agreement_budget=args.budget, train_every=args.train_every,
                   min_train=args.train_every, min_calib=args.min_calib,
                   calib_fraction=args.calib_fraction, threshold_rule=args.threshold_rule,
                   backend=args.backend, latency_weight=args.latency_weight),
            **settings})   # --runtime-settings win over the flags
        t1 = time.perf_counter()
        rec = run_stream(rt, reference, stream, args.batch, progress=not args.quiet)
        summary = summarise(rec, stream, rt, float(manifest["total_flops"]))
        learned_path = out / f"demo_detector.learned.empty{int(round(share * 100))}.pt"
        rt.save(learned_path)
        summary["latency_ms_per_frame"] = {}
        if not args.no_latency:
            learned = torch.jit.load(str(learned_path)).eval()
            half = stream.frames[len(stream) // 2:]
            served = load_runtime(str(learned_path), background=False, train_every=10 ** 12,
                                  backend=args.backend)
            from compiler.export import export_onnx
            export_onnx(learned_path, learned_path.with_suffix(".onnx"))
            summary["latency_ms_per_frame"] = {
                str(b): latency(learned, detector, half, b, served=served,
                                cached_onnx=str(learned_path.with_suffix(".onnx")))
                for b in (1, 8)}
            served.close()
        st = rt.stats()
        summary["stream_seconds"] = time.perf_counter() - t1
        summary["runtime"] = {"live_agreement": st["live_agreement"],
                              "shadow_rows": st["shadow_rows"], "rounds": st["learning"]["rounds"],
                              "train_seconds": st["learning"]["train_seconds"],
                              "thresholds": st["thresholds"], "drift_events": st["drift_events"],
                              "drift_doubts": st["drift_doubts"]}
        results[f"{share:.2f}"] = summary
        print(f"\nheld-out stream, {share:.0%} empty frames ({args.frames} frames, "
              f"{args.batch} per "
              f"request); {SECOND_HALF}:")
        print(f"  FLOPs saved, heads counted:  {summary['flops_saved']:.1%}")
        print(f"  agreement with the detector: {summary['agreement']:.2%}   (budget "
              f"{100 * args.budget:g}%); boxes lost on busy frames: "
              f"{summary['boxes_lost_on_busy_frames']} of "
              f"{summary['detector_boxes_on_busy_frames']}, {summary['items_lost']} of them on "
              f"labelled items")
        print(f"  mAP@0.5 (labels, report only): cached {summary['map50_cached']:.4f}, detector "
              f"{summary['map50_detector']:.4f}")
        print("  frames per exit:             " + ", ".join(
            f"{n} {v:.1%}" for n, v in summary["frames_per_exit"].items()))
        for b, lat in summary["latency_ms_per_frame"].items():
            mode = {"cached": "TorchScript", "cached_onnxruntime": "its ONNX export"}
            print(f"  latency per frame, batch {b}, p50 / mean: cached "
                  f"{lat['cached_best']:.2f} / {lat['cached_best_mean']:.2f} ms "
                  f"({mode[lat['cached_best_mode']]}), detector {lat['detector_best']:.2f} / "
                  f"{lat['detector_best_mean']:.2f} ms ({lat['detector_best_mode'].split('_')[1]}, "
                  f"its best CPU mode; {lat['cached_best'] / lat['detector_best'] - 1:+.0%} / "
                  f"{lat['cached_best_mean'] / lat['detector_best_mean'] - 1:+.0%}); "
                  f"runtime.predict {lat['runtime_predict']:.2f} / "
                  f"{lat['runtime_predict_mean']:.2f} ms "
                  f"({lat['runtime_predict'] / lat['detector_best'] - 1:+.0%} / "
                  f"{lat['runtime_predict_mean'] / lat['detector_best_mean'] - 1:+.0%}; "
                  f"no rounds; it still shadows and teaches)")
        print(f"  learning: {st['learning']['rounds']} rounds, "
              f"{st['learning']['train_seconds']:.1f} s;"
              f" live agreement (shadow frames) "
              f"{'n/a' if st['live_agreement'] is None else format(st['live_agreement'], '.2%')}")
    target = results.get("0.70")
    if target:
        met = target["flops_saved"] >= 0.45 and target["agreement"] >= 0.99 and \
            target["map50_detector"] - target["map50_cached"] <= 0.005
        print(f"\ntarget (70% empty: >= 45% FLOPs saved at >= 99% agreement, cached mAP@0.5 within "
              f"0.5 point): {'met' if met else 'NOT met'}")
    summary = {
        "command": "python -m tools.demo --task detection " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU, torch threads "
                   f"{torch.get_num_threads()}",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "detector": meta, "manifest_exits": manifest["exits"],
        "total_flops": manifest["total_flops"], "streams": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
