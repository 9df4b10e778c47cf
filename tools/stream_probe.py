"""Where a learning stream's request time goes: each runtime.predict, labelled by what it did.

    python -m tools.stream_probe [ARTIFACT] [--rows 10000] [--batch 1]
                                 [--inputs fashion|photos|snapshots] [--settings K=V,...]
                                 [--out out/stream_probe]

Serves ARTIFACT (default: the demo's compiled backbone, exits off, heads untrained) in
background mode. The stream is Fashion-MNIST test rows, or with ``--inputs`` the photo
camera's frames for ImageNet MobileNetV2. Each request is timed turn by turn with the
backbone's onnxruntime session (``compiler.export`` of ARTIFACT with every exit off) on the
same rows.

Each request gets labels for what it did:
- shadowed, taught, or plain (the collector's decision for it, read through a hook);
- whether its rows all left at exits, some did, or none;
- whether a learning round was running.

Reported per phase (before any exit was on; once one was): per label the requests, both sides'
mean time, and what the label's requests add to the phase's mean request time over the
backbone's (their excess, divided by all the phase's requests). A diagnostic that reads
runtime internals; the benchmark is ``tools.latency_bench``. Writes ``OUT/stream_probe.json``
with machine, versions, date and commit.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


class StreamError(ValueError):
    """The chosen stream cannot feed this artifact; the message says what to use."""


def _requests(args, shape: tuple):
    """The stream for an artifact whose rows have ``shape``: a sequence of batches of
    ``args.batch`` rows. Fashion-MNIST is read at the artifact's size (average-pooled below 28
    px, as the tests' small teacher reads it)."""
    if args.inputs == "fashion":
        from torch.nn import functional as F

        from tools.data import load_fashion_mnist
        if len(shape) != 3 or shape[0] not in (1, 3) or shape[1] != shape[2] or \
                (shape[1] < 28 and 28 % shape[1]):
            raise StreamError(f"the fashion stream makes square images of 1 or 3 channels, 28 px "
                              f"or more or a divisor of 28; this artifact takes {list(shape)}: "
                              f"give --inputs photos for a 3x224x224 model")
        x, _ = load_fashion_mnist("test", size=max(shape[1], 28), channels=shape[0])
        if shape[1] < 28:
            x = F.avg_pool2d(x, 28 // shape[1]).contiguous()
        x = x[:args.rows]
        return [x[i:i + args.batch] for i in range(0, len(x) - args.batch + 1, args.batch)]
    if tuple(shape) != (3, 224, 224):
        raise StreamError(f"the photo streams make 3x224x224 frames; this artifact takes "
                          f"{list(shape)}: give --inputs fashion")
    from tools.latency_bench import PhotoRequests
    return PhotoRequests(args.rows, args.batch, snapshots=args.inputs == "snapshots")


def probe(artifact: str, backbone, reqs, settings: dict) -> list:
    """Per request: (phase, kind, outcome, round running, predict ms, backbone ms)."""
    import runtime
    rt = runtime.load(artifact, background=True, seed=0, **settings)
    last = {}
    decide = rt.collector.decide

    def labelled(*a, **k):          # the collector's decision for the request being served
        last["d"] = out = decide(*a, **k)
        return out

    rt.collector.decide = labelled
    E, rows = rt.num_exits, []
    try:
        with torch.no_grad():
            for k in range(len(reqs)):
                x = reqs[k]
                phase = "exits on" if rt.state.any_enabled else "before any exit"
                running = rt._learn_lock.locked()
                t = {}
                for side in ((0, 1) if k % 2 == 0 else (1, 0)):
                    t0 = time.perf_counter()
                    if side == 0:
                        _, ex = rt.predict(x, return_exits=True)
                    else:
                        backbone(x)
                    t[side] = 1e3 * (time.perf_counter() - t0)
                shadow, collect, _ = last.pop("d", (False, False, False))
                kind = "shadowed" if shadow else "taught" if collect else "plain"
                left = int((ex < E).sum())
                outcome = "all exited" if left == len(ex) else "none exited" if left == 0 \
                    else "some exited"
                rows.append((phase, kind, outcome, running or rt._learn_lock.locked(),
                             t[0], t[1]))
    finally:
        rt.close()
    return rows


def summarise(rows: list) -> dict:
    """Per phase: its totals, and per label the requests, mean times and what they add to the
    phase's mean."""
    out = {}
    for phase in ("before any exit", "exits on"):
        sel = [r for r in rows if r[0] == phase]
        if not sel:
            continue
        p, b = np.array([r[4] for r in sel]), np.array([r[5] for r in sel])
        excess = float(p.sum() - b.sum())
        labels = {}
        for name, pick in (
                [(f"kind: {k}", lambda r, k=k: r[1] == k) for k in ("plain", "taught", "shadowed")]
                + [(f"rows: {o}", lambda r, o=o: r[2] == o)
                   for o in ("all exited", "some exited", "none exited")]
                + [(f"{k}, {o}", lambda r, k=k, o=o: r[1] == k and r[2] == o)
                   for k in ("plain", "taught") for o in ("all exited", "none exited")]
                + [("round running", lambda r: r[3]), ("no round", lambda r: not r[3])]):
            idx = [i for i, r in enumerate(sel) if pick(r)]
            if not idx:
                continue
            lp, lb = p[idx], b[idx]
            labels[name] = {"requests": len(idx), "predict_mean_ms": float(lp.mean()),
                            "backbone_mean_ms": float(lb.mean()),
                            "mean_vs_backbone": float(lp.mean() / lb.mean() - 1),
                            "excess_ms": float(lp.sum() - lb.sum()),
                            # what the label's requests add to the phase's mean request time
                            "adds_to_mean_us": float(1e3 * (lp.sum() - lb.sum()) / len(sel))}
        out[phase] = {"requests": len(sel), "predict_mean_ms": float(p.mean()),
                      "backbone_mean_ms": float(b.mean()),
                      "mean_vs_backbone": float(p.mean() / b.mean() - 1),
                      "excess_ms": excess, "labels": labels}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.stream_probe",
                                description=__doc__.splitlines()[0])
    p.add_argument("artifact", nargs="?", default="out/demo/demo_backbone.cached.pt")
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--inputs", choices=("fashion", "photos", "snapshots"), default="fashion")
    p.add_argument("--settings", default="", help="runtime settings, e.g. shadow_rate=0.02")
    p.add_argument("--out", default="out/stream_probe")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from tools.experiment import artifact_missing, checked_runtime_settings
    if artifact_missing(args.artifact):
        return 2
    if args.batch < 1 or args.rows < args.batch:
        print(f"error: --rows ({args.rows}) must be at least --batch ({args.batch}), and "
              f"--batch at least 1", file=sys.stderr)
        return 2
    try:
        settings = checked_runtime_settings(args.settings)
    except ValueError as e:
        print(f"error: runtime settings: {e}", file=sys.stderr)
        return 2
    from compiler import artifact
    from compiler.export import export_onnx
    from tools.bench.provenance import code_version, machine_info
    from tools.latency_bench import _with_thresholds
    from tools.timing import ort_session
    try:
        reqs = _requests(args, tuple(artifact.load(args.artifact)[1]["input_shape"][1:]))
    except StreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    off = _with_thresholds(args.artifact, out / "exits_off.cached.pt", float("inf"))
    export_onnx(off, str(out / "backbone.onnx"))
    sess = ort_session(out / "backbone.onnx")
    name = sess.get_inputs()[0].name
    rows = probe(args.artifact, lambda x: sess.run(None, {name: x.numpy()}), reqs, settings)
    summary = summarise(rows)
    print(f"{args.artifact}, {args.inputs} rows, batch {args.batch}: runtime.predict (background "
          f"learning) against the backbone's onnxruntime session, turns interleaved")
    for phase, s in summary.items():
        print(f"\n{phase}: {s['requests']} requests, mean {s['predict_mean_ms']:.3f} ms against "
              f"{s['backbone_mean_ms']:.3f} ms ({s['mean_vs_backbone']:+.1%})")
        for label, v in s["labels"].items():
            print(f"  {label:24s} {v['requests']:6d} requests, {v['predict_mean_ms']:.3f} ms "
                  f"against {v['backbone_mean_ms']:.3f} ms ({v['mean_vs_backbone']:+6.1%}); "
                  f"adds {v['adds_to_mean_us']:+6.1f} us to the phase's mean")
    result = {"command": "python -m tools.stream_probe " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
              "code": code_version(), "artifact": args.artifact, "inputs": args.inputs,
              "batch": args.batch, "settings": settings, "phases": summary}
    (out / "stream_probe.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'stream_probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
