"""Does the guarantee stay honest over many streams? The demo stream at many seeds, one threshold rule.

Each seed shuffles the Fashion-MNIST test set differently (at the artifact's input size and
channels) and serves it through a fresh runtime
(synchronous, seeded, 16 rows per request), as ``tools.demo`` does. On the second half of each
stream (rows never used for calibration before they were answered) it records agreement with
the backbone and FLOPs saved. With a 95% confidence the budget may fail in about 5% of the
streams (the measurement on 5,000 rows adds its own binomial noise). Usage::

    python -m tools.honesty_check --seeds 0-19 --budget 0.99 --rule crossfit
    python -m tools.honesty_check --artifact out/bench15B/vgg16_bn/vgg16_bn.cached.pt --seeds 0-9
"""
import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from runtime.config import THRESHOLD_RULES


def seeds_of(text: str):
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0-19", help="e.g. 0-19 or 0,3,5")
    ap.add_argument("--budget", type=float, default=0.99)
    ap.add_argument("--rule", choices=THRESHOLD_RULES, default="ltt",
                    help="the threshold rule (default: the runtime's, ltt)")
    ap.add_argument("--runtime-settings", default="",
                    help="more runtime settings, e.g. fast_after=2000,shadow_rate=0.1")
    ap.add_argument("--artifact", default=None, help="compiled artifact (default: the demo's)")
    ap.add_argument("--out", default=None, help="JSON file (default: out/honesty/RULE-BUDGET.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import runtime
    from tools.data import load_fashion_mnist
    from tools.experiment import stream, summarise
    artifact = args.artifact
    if artifact is None:
        from tools.experiment import demo_artifact
        artifact = demo_artifact("out/honesty/demo.cached.pt")
        if artifact is None:
            return 2
    from tools.experiment import runtime_settings
    settings = runtime_settings(args.runtime_settings)
    from compiler.artifact import read_manifest
    _, channels, size = read_manifest(artifact)["input_shape"][:3]   # the backbone's input
    x, y = load_fashion_mnist("test", size=size, channels=channels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torch.jit.load(artifact).eval()
    runs = []
    for seed in seeds_of(args.seeds):
        rt = runtime.load(artifact, background=False, seed=seed, agreement_budget=args.budget,
                          threshold_rule=args.rule, **settings)
        rec = stream(rt, reference, x, y, 16, seed, progress=False)
        s = summarise(rec, rt.num_exits, rt.total_flops)
        runs.append({"seed": seed, "flops_saved": s.flops_saved, "agreement": s.agreement,
                     "drift_events": rt.stats()["drift_events"]})
        rt.close()
        print(f"seed {seed:3d}: saved {100 * s.flops_saved:5.1f}%  agreement {100 * s.agreement:6.2f}%"
              f"{'  BELOW BUDGET' if s.agreement < args.budget else ''}", flush=True)
    saved = torch.tensor([r["flops_saved"] for r in runs])
    below = sum(r["agreement"] < args.budget for r in runs)
    summary = {"rule": args.rule, "budget": args.budget, "settings": settings, "runs": len(runs),
               "below_budget": below,
               "saved_min": float(saved.min()), "saved_median": float(saved.median()),
               "saved_max": float(saved.max()),
               "agreement_min": min(r["agreement"] for r in runs),
               "date": time.strftime("%Y-%m-%d"), "per_seed": runs}
    print(f"{args.rule} at {args.budget}: below the budget in {below} of {len(runs)} streams; "
          f"FLOPs saved min {100 * summary['saved_min']:.1f}% median "
          f"{100 * summary['saved_median']:.1f}% max {100 * summary['saved_max']:.1f}%")
    out = Path(args.out or f"out/honesty/{args.rule}-{args.budget}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
