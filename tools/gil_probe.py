"""How long building a round's onnxruntime plan keeps the GIL from a thread that waits for it.

    python -m tools.gil_probe [ARTIFACT] [--builds 6] [--out out/gil_probe]

A background runtime builds each published state's plan (``OnnxRuntimeBackend.compile``) on its
learner thread while requests are served. Whatever of that build runs in C++ without releasing
the GIL (protobuf copies and serialisation, parts of onnxruntime's session construction) holds
every request up for as long. This builds ARTIFACT's plan (its learned heads and thresholds,
default the demo's) ``--builds`` times while a second thread does nothing but take and release
the GIL, and reports per build its wall time, the longest wait of that thread and the total
time of its waits over 1 ms (medians over builds). The interpreter's switch interval is set to
0.5 ms, as a background runtime sets it. Writes ``OUT/gil_probe.json`` with machine, versions,
date and commit.
"""
import argparse
import json
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gil_probe",
                                description=__doc__.splitlines()[0])
    p.add_argument("artifact", nargs="?", default="out/demo/demo_backbone.learned.pt")
    p.add_argument("--builds", type=int, default=6)
    p.add_argument("--out", default="out/gil_probe")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from tools.experiment import artifact_missing
    if artifact_missing(args.artifact):
        return 2
    if args.builds < 1:
        print("error: --builds must be at least 1", file=sys.stderr)
        return 2
    import runtime
    from tools.bench.provenance import code_version, machine_info
    rt = runtime.load(args.artifact, background=False, backend="onnxruntime")
    st = rt.state
    if not st.any_enabled:
        print(f"error: '{args.artifact}' has no exit on, so it has no plan to build; give a "
              f"learned artifact", file=sys.stderr)
        return 2
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    waits, stop = [], threading.Event()

    def spin():   # takes and releases the GIL as often as it can: a request's Python, at worst
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            waits.append(now - last)
            last = now
            time.sleep(0)

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    builds = []
    try:
        rt.backend.compile(st.classifiers, st.thresholds, True)   # warm-up
        for _ in range(args.builds):
            waits.clear()
            t0 = time.perf_counter()
            rt.backend.compile(st.classifiers, st.thresholds, True)
            wall = time.perf_counter() - t0
            w = np.array(waits)
            builds.append({"build_ms": 1e3 * wall, "longest_wait_ms": 1e3 * float(w.max()),
                           "waits_over_1ms_ms": 1e3 * float(w[w > 0.001].sum())})
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(before)
        rt.close()
    med = {k: float(np.median([b[k] for b in builds])) for k in builds[0]}
    print(f"{args.artifact}: {sum(st.enabled_key)} exit(s) on; over {args.builds} plan builds "
          f"(medians): build {med['build_ms']:.1f} ms, longest GIL wait of another thread "
          f"{med['longest_wait_ms']:.2f} ms, its waits over 1 ms {med['waits_over_1ms_ms']:.1f} ms "
          f"in all")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python -m tools.gil_probe " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
              "code": code_version(), "artifact": args.artifact, "median": med,
              "builds": builds}
    (out / "gil_probe.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'gil_probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
