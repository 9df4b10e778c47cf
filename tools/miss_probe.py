"""Where a row that misses an exit spends its time in onnxruntime, exit by exit, at batch 1.

    python -m tools.miss_probe ARTIFACT [--reps 200] [--out out/miss_probe]

For each exit of ARTIFACT (its heads as they are; nothing exits: the threshold is above any
confidence), one turn-by-turn run at batch 1 of seeded noise times, against the backbone session
of the runtime's onnxruntime backend (``runtime/backends.py``):

- ``if``: the one-row graph that serves batch 1 (``Plan.composed("one")``) with that exit alone on:
  the head, its decision, and an If whose other branch holds the rest of the backbone;
- ``inline``: the same head computed inside the backbone graph with no branch (its confidence
  an extra output): what the head's own ops cost;
- ``sessions``: two sessions, the stages up to the exit with its head, then the rest, with the
  decision in numpy between them (the runtime's teaching path);

then all exits on in the one-row graph, and the backbone and that graph with onnxruntime's
layout optimisations off (``ORT_ENABLE_EXTENDED``), since an If or a session boundary is where
the NCHWc layout the convolutions run in must be undone and redone; and the TorchScript artifact
with exits off, the backbone as TorchScript serves it. Medians; one torch thread
and one onnxruntime thread. Writes ``OUT/miss_probe.json`` with machine, versions, date and
commit, and prints the table.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

NEVER = 1.5   # above any softmax confidence: nothing exits


def _session(model, extended: bool = False):
    from runtime.backends import _session as session
    return session(model, layout=not extended)


def _inline(backend, classifiers, k: int):
    """The backbone with head ``k`` computed inside it, no branch: outputs y and conf."""
    from onnx import helper

    from compiler.export import confidence_nodes
    from runtime.backends import OPSET, _classifier_nodes
    c = backend._Composer(OPSET)
    nodes, h, conf = [], "x", None
    for s, m in enumerate(backend.stage_models):
        h = c.inline(nodes, m, f"s{s}/", h, f"stage{s}_out")
        if s == k:
            pooled = c.inline(nodes, backend.pool_models[s], f"p{s}/", h, f"pool{s}")
            logits = _classifier_nodes(c, nodes, pooled, classifiers[k], f"head{k}")
            conf = confidence_nodes(c, nodes, logits, f"head{k}")
    nodes.append(helper.make_node("Identity", [h], ["y"], name=c.name("Id")))
    nodes.append(helper.make_node("Identity", [conf], ["conf"], name=c.name("Id")))
    return backend._finish(c, nodes, ["y", "conf"])


def _two_sessions(backend, classifiers, k: int):
    from compiler import exit_rule
    first = _session(backend._segment(0, k, k, classifiers[k]))
    rest = _session(backend._segment(k + 1, backend.num_exits, None))

    def run(x):
        h, logits, conf = first.run(None, {"x": x})
        if exit_rule.leaves_np(conf, NEVER).any():
            return logits
        return rest.run(None, {"x": h})[0]
    return run


def probe(artifact_path: str, reps: int) -> dict:
    from compiler import artifact
    from runtime.backends import OnnxRuntimeBackend
    from runtime.base import classifier_from

    module, manifest = artifact.load(artifact_path)
    E = len(manifest["exits"])
    blocks = [getattr(module.blocks, str(i)) for i in range(E)]
    classifiers = [classifier_from(e["head"], b.head.classifier)
                   for e, b in zip(manifest["exits"], blocks)]
    backend = OnnxRuntimeBackend([b.stage for b in blocks] + [module.final], manifest["exits"],
                                 manifest["input_shape"][1:], int(manifest["num_classes"]))
    x = np.random.default_rng(0).standard_normal(
        (1,) + tuple(manifest["input_shape"][1:])).astype(np.float32)
    inf = float("inf")

    def feed(sess, name):
        return lambda a: sess.run(None, {name: a})

    def one_row(on, extended=False):
        return feed(_session(backend.composed(classifiers, [NEVER if j in on else inf
                                                            for j in range(E)], True),
                             extended), "input")

    variants = {"backbone": feed(backend.backbone, "x")}
    for k in range(E):
        variants[f"exit {k}: if"] = one_row({k})
        variants[f"exit {k}: inline"] = feed(_session(_inline(backend, classifiers, k)), "x")
        variants[f"exit {k}: sessions"] = _two_sessions(backend, classifiers, k)
    variants["all exits: if"] = one_row(set(range(E)))
    variants["backbone, layout optimisation off"] = feed(
        _session(backend._chain(features=False), extended=True), "x")
    variants["all exits: if, layout optimisation off"] = one_row(set(range(E)), extended=True)
    off = artifact.load(artifact_path)[0]      # the TorchScript file a user would load, exits off
    for k in range(E):
        getattr(off.blocks, str(k)).enabled.fill_(False)
    variants["backbone, TorchScript artifact"] = lambda a: off(torch.from_numpy(a))
    times = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(reps + 3):          # the first passes warm up
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v[3:])) * 1e3 for k, v in times.items()}
    base = med["backbone"]
    return {"artifact": artifact_path, "exits": [e["name"] for e in manifest["exits"]],
            "reps": reps, "p50_ms": med,
            "vs_backbone": {k: v / base - 1 for k, v in med.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.miss_probe", description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", default="out/miss_probe")
    args = p.parse_args(argv)
    if not Path(args.artifact).is_file():
        print(f"error: artifact '{args.artifact}' does not exist; run python -m tools.demo, or "
              f"python -m compiler.rewrite MODEL, first", file=sys.stderr)
        return 2
    if args.reps < 1:
        print(f"error: --reps must be at least 1, got {args.reps}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import onnxruntime as ort

    from tools.bench.provenance import code_version, machine_info
    res = probe(args.artifact, args.reps)
    res.update({"command": "python -m tools.miss_probe " + " ".join(
                    argv if argv is not None else sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
                "onnxruntime": ort.__version__, "code": code_version()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "miss_probe.json").write_text(json.dumps(res, indent=1))
    print(f"{'variant':42s} {'p50 ms':>8s}  vs backbone")
    for k, v in res["p50_ms"].items():
        print(f"{k:42s} {v:8.3f}  {res['vs_backbone'][k]:+7.1%}")
    print(f"wrote {out / 'miss_probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
