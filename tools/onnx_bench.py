"""ONNX parity and onnxruntime CPU latency of a learned artifact against the backbone's own export.

    python -m tools.onnx_bench ARTIFACT [--out out/onnx_bench]
    python -m tools.onnx_bench --zoo [--archs swin_t,...]   # ONNX parity of the zoo's models

Exports ARTIFACT (its learned exits) and the same artifact with every exit off (the plain
backbone, in the same staged ONNX form) to ONNX, then on the Fashion-MNIST test set: compares
onnxruntime with the TorchScript artifact row by row (class, exit, logits), and times both ONNX
models in onnxruntime (CPUExecutionProvider, warm-up, median and p99 of per-request times).
"""
import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def _times(sess, batches, reps=1):
    """Per-request wall times (ms) of an onnxruntime session over ``batches``."""
    for b in batches[:10]:
        sess.run(None, {"input": b})
    out = []
    for _ in range(reps):
        for b in batches:
            t0 = time.perf_counter()
            sess.run(None, {"input": b})
            out.append((time.perf_counter() - t0) * 1e3)
    return out


ZOO = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_large",
       "efficientnet_b0", "densenet121", "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t")


def torchvision_models() -> set:
    """The names ``torchvision.models.get_model`` builds as classifiers."""
    import torchvision
    return set(torchvision.models.list_models(module=torchvision.models))


def zoo_parity(rows: int, out: Path, archs=ZOO) -> int:
    """Every zoo model (random weights, 10 classes): rewrite, enable every exit with thresholds
    that let ~30% of the remaining Fashion-MNIST rows leave, export, and compare onnxruntime with
    the artifact row by row on ``rows`` Fashion-MNIST test images (upsampled, 3 channels)."""
    import onnxruntime as ort
    import torchvision

    from compiler import artifact, exit_rule
    from compiler.errors import CompilerError
    from compiler.export import export_onnx
    from compiler.rewrite import RewriteConfig, rewrite_module
    from tools.data import load_fashion_mnist

    x28, _ = load_fashion_mnist("test")
    results = {}
    for arch in archs:
        size = 224 if arch.startswith("vit") else 64
        x = torch.nn.functional.interpolate(x28[:rows], size=size, mode="bilinear").repeat(1, 3, 1, 1)
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
        module, manifest, _ = rewrite_module(model, (1, 3, size, size), RewriteConfig())
        h = x[:256]
        with torch.no_grad():
            for i in range(len(manifest["exits"])):
                blk = getattr(module.blocks, str(i))
                h = blk.stage(h)
                conf = exit_rule.confidence(blk.head(h))
                thr = float(conf.quantile(0.7)) + 1e-6 if len(conf) else 2.0
                blk.enabled.fill_(True)
                blk.threshold.fill_(thr)
                h = h[~exit_rule.leaves(conf, blk.threshold, True)]
        path, onnx_path = out / f"{arch}.cached.pt", out / f"{arch}.onnx"
        artifact.save(module, manifest, path)
        try:
            export_onnx(str(path), str(onnx_path))
        except CompilerError as e:
            results[arch] = {"exported": False, "why": str(e)}
            print(f"{arch:20s} not exportable: {e}")
            continue
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        same_class = same_exit = 0
        exits = torch.zeros(len(manifest["exits"]) + 1, dtype=torch.long)
        with torch.no_grad():
            for s in range(0, rows, 64):
                want, want_exit = module.forward_with_exits(x[s:s + 64])
                got, got_exit = sess.run(None, {"input": x[s:s + 64].numpy()})
                same_class += int((torch.from_numpy(got).argmax(1) == want.argmax(1)).sum())
                same_exit += int((torch.from_numpy(got_exit) == want_exit).sum())
                exits += torch.bincount(want_exit, minlength=len(exits))
        results[arch] = {"exported": True, "same_class": same_class / rows,
                         "same_exit": same_exit / rows, "rows_per_exit": exits.tolist()}
        print(f"{arch:20s} class {same_class / rows:.2%}  exit {same_exit / rows:.2%}  "
              f"rows per exit {exits.tolist()}", flush=True)
        path.unlink()
        onnx_path.unlink()
    (out / "zoo_parity.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("same_exit", 1) == 1 and r.get("same_class", 1) == 1
                    for r in results.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.onnx_bench", description=__doc__.splitlines()[0])
    p.add_argument("artifact", nargs="?", help="a learned artifact (not needed with --zoo)")
    p.add_argument("--zoo", action="store_true",
                   help="instead: ONNX parity of every zoo model on Fashion-MNIST rows")
    p.add_argument("--archs", default=",".join(ZOO),
                   help="with --zoo: comma-separated torchvision architectures (default: the zoo)")
    p.add_argument("--out", default="out/onnx_bench")
    p.add_argument("--rows", type=int, default=10000)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import onnxruntime as ort

    from compiler import artifact
    from compiler.export import export_onnx
    from tools.data import load_fashion_mnist

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.zoo:
        archs = [a for a in args.archs.split(",") if a]
        unknown = [a for a in archs if a not in torchvision_models()]
        if unknown:
            p.error(f"not torchvision classification models: {', '.join(unknown)}; see "
                    f"torchvision.models.list_models()")
        return zoo_parity(min(args.rows, 1024), out, archs)
    if not args.artifact:
        p.error("give an ARTIFACT, or --zoo")
    module, manifest = artifact.load(args.artifact)
    plain = out / "backbone.cached.pt"
    off, _ = artifact.load(args.artifact)
    for i in range(len(manifest["exits"])):
        getattr(off.blocks, str(i)).enabled.fill_(False)
    artifact.save(off, manifest, plain)
    cached_onnx, plain_onnx = out / "cached.onnx", out / "backbone.onnx"
    export_onnx(args.artifact, str(cached_onnx))
    export_onnx(str(plain), str(plain_onnx))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    cached = ort.InferenceSession(str(cached_onnx), opts, providers=["CPUExecutionProvider"])
    backbone = ort.InferenceSession(str(plain_onnx), opts, providers=["CPUExecutionProvider"])

    x, _ = load_fashion_mnist("test")
    x = x[:args.rows]
    # Parity, all rows, in requests of 256.
    same_class = same_exit = 0
    max_diff = 0.0
    with torch.no_grad():
        for s in range(0, len(x), 256):
            xb = x[s:s + 256]
            want, want_exit = module.forward_with_exits(xb)
            got, got_exit = cached.run(None, {"input": xb.numpy()})
            same_class += int((torch.from_numpy(got).argmax(1) == want.argmax(1)).sum())
            same_exit += int((torch.from_numpy(got_exit) == want_exit).sum())
            max_diff = max(max_diff, float((torch.from_numpy(got) - want).abs().max()))
    result = {"command": "python -m tools.onnx_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU, 1 onnxruntime thread",
              "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
              "date": time.strftime("%Y-%m-%d"), "rows": len(x),
              "parity": {"same_class": same_class / len(x), "same_exit": same_exit / len(x),
                         "max_logit_diff": max_diff},
              "latency_ms": {}}
    print(f"parity on {len(x)} rows: class {same_class / len(x):.4%}, exit {same_exit / len(x):.4%}, "
          f"max logit diff {max_diff:.2e}")
    for batch in (1, 16, 64):
        n = min(len(x), {1: 1000, 16: 2000, 64: 4096}[batch])
        batches = [x[s:s + batch].numpy() for s in range(0, n - batch + 1, batch)]
        tc, tb = _times(cached, batches), _times(backbone, batches)
        row = {"cached_p50": float(np.median(tc)), "cached_p99": float(np.percentile(tc, 99)),
               "backbone_p50": float(np.median(tb)), "backbone_p99": float(np.percentile(tb, 99))}
        result["latency_ms"][str(batch)] = row
        print(f"batch {batch:3d}: cached p50 {row['cached_p50']:.3f} ms (p99 {row['cached_p99']:.3f}), "
              f"backbone p50 {row['backbone_p50']:.3f} ms (p99 {row['backbone_p99']:.3f}): "
              f"{row['cached_p50'] / row['backbone_p50'] - 1:+.1%}")
    (out / "onnx_bench.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
