"""Figures of the Ray Serve scale-out (issue 12) on this machine: learning along the stream with 1 and
2 replicas fed the same total traffic, publish-to-every-replica delay, faults, throughput.

``python -m tools.scaleout_bench [--rows 10000] [--out out/scaleout_bench]``: compiles the demo
backbone, streams Fashion-MNIST test rows over HTTP (OIP JSON, 4 client threads, 16 rows per
request) through a local Ray cluster, writes ``summary.json`` and
``docs/bench/scaleout_learning.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

BATCH, CLIENTS, WINDOW = 16, 4, 1000


def compile_demo(out: Path) -> Path:
    from compiler import artifact
    from compiler.loading import load_model
    from compiler.rewrite import RewriteConfig, rewrite_module
    from tools.demo import ASSET
    path = out / "demo_backbone.cached.pt"
    if not path.exists():
        loaded = load_model(str(ASSET))
        module, manifest, _ = rewrite_module(loaded.module, loaded.input_shape, RewriteConfig(),
                                             exported=True, loaded=loaded)
        artifact.save(module, manifest, path)
    return path


def post_all(url, model, x, failed=None):
    """Stream x from CLIENTS threads; (answers [n, K] with NaN for lost rows, exits, seconds)."""
    import httpx
    n = len(x)
    chunks = list(range(0, n, BATCH))
    out = np.full((n, 10), np.nan, dtype=np.float32)
    exits = np.full(n, -1)
    failed = [] if failed is None else failed

    def work(k):
        with httpx.Client(timeout=60) as c:
            for j in chunks[k::CLIENTS]:
                xb = x[j:j + BATCH]
                body = {"inputs": [{"name": "input", "shape": list(xb.shape), "datatype": "FP32",
                                    "data": xb.reshape(-1).tolist()}]}
                try:
                    r = c.post(f"{url}/v2/models/{model}/infer", json=body)
                except Exception as e:  # noqa: BLE001 - connection reset by a dying replica
                    failed.append((j, type(e).__name__))
                    continue
                if r.status_code != 200:
                    failed.append((j, r.status_code))
                    continue
                o = {t["name"]: t for t in r.json()["outputs"]}
                out[j:j + len(xb)] = np.array(o["output"]["data"]).reshape(o["output"]["shape"])
                exits[j:j + len(xb)] = o["exit"]["data"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(CLIENTS)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out, exits, time.perf_counter() - t0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_rows(deployed, rows, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        s = deployed.learner_stats()
        if s["pooled"]["rows"] >= rows or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def run(artifact, x, back, replicas, state_dir, faults):
    import ray
    from ray import serve
    from runtime.scaleout.deploy import ScaleoutConfig, deploy
    from runtime.scaleout.learner import NAMESPACE
    from runtime.server import ServerConfig
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             configure_logging=False, log_to_driver=False)
    cfg = ScaleoutConfig(server=ServerConfig(artifact=str(artifact), model_name="demo"),
                         replicas=replicas, replica_cpus=0.5, learner_cpus=0.5,
                         health_check_period_s=1.0, state_dir=str(state_dir))
    d = deploy(cfg, http_port=free_port())
    rec = {"replicas": replicas, "windows": []}
    try:
        spent0 = rows0 = 0
        total = None
        for w in range(0, len(x), WINDOW):
            xb = x[w:w + WINDOW]
            out, exits, secs = post_all(d.url, "demo", xb)
            s = wait_rows(d, w + len(xb))
            total = s["total_flops"]
            p = s["pooled"]
            saved = 1 - (p["flops_spent"] - spent0) / ((p["rows"] - rows0) * total)
            spent0, rows0 = p["flops_spent"], p["rows"]
            ok = ~np.isnan(out[:, 0])
            rec["windows"].append({"rows_end": w + len(xb), "flops_saved": saved,
                                   "agreement": float((out[ok].argmax(1) == back[w:w + len(xb)][ok]).mean()),
                                   "exit_rate": float((exits[ok] < len(s["enabled"])).mean()),
                                   "rows_per_s": len(xb) / secs, "version": s["version"],
                                   "rounds": s["rounds"]})
            print(f"  {replicas} replica(s), rows {w + len(xb):>6}: saved {saved:6.1%}, agreement "
                  f"{rec['windows'][-1]['agreement']:.4f}, {len(xb) / secs:6.0f} rows/s, "
                  f"version {s['version']}, rounds {s['rounds']}", flush=True)
        s = d.learner_stats()
        delays = [max(p["acks"].values()) for p in s["publishes"][1:]
                  if len(p["acks"]) >= replicas]
        half = rec["windows"][len(rec["windows"]) // 2:]
        rec.update({"publish_delay_s": {"median": float(np.median(delays)) if delays else None,
                                        "max": max(delays) if delays else None,
                                        "publishes": len(delays)},
                    "second_half": {"flops_saved": float(np.mean([h["flops_saved"] for h in half])),
                                    "agreement": float(np.mean([h["agreement"] for h in half])),
                                    "rows_per_s": float(np.median([h["rows_per_s"] for h in half]))},
                    "rows_received": s["rows_received"],
                    "rows_dropped_at_replicas": s["rows_dropped_at_replicas"],
                    "rounds": s["rounds"], "learning_seconds": s["learning"]["train_seconds"]})
        if faults:
            rec["faults"] = fault_figures(d, x, back, ray, NAMESPACE)
    finally:
        d.shutdown()
        serve.shutdown()
        ray.shutdown()
    return rec


def fault_figures(d, x, back, ray, namespace):
    res = {}
    # A replica dies mid-stream.
    before = d.learner_stats()
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and "#replica#" in a["name"]]
    failed = []
    t = threading.Thread(target=lambda: post_all(d.url, "demo", x[:2000], failed))
    t.start()
    time.sleep(1.0)
    t_kill = time.time()
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    t.join()
    back_at = None
    while time.time() - t_kill < 120:
        s = d.learner_stats()
        fresh = [k for k, r in s["replicas"].items() if k not in before["replicas"] and r["live"]
                 and r["version"] == s["version"]]
        if fresh:
            back_at = time.time() - t_kill
            break
        time.sleep(0.1)
    res["replica_kill"] = {"requests_lost": len(failed), "requests_sent": 2000 // BATCH,
                           "new_replica_on_current_version_s": back_at,
                           "version_kept": s["version"] >= before["version"]}
    # The learner dies mid-stream.
    learner = ray.get_actor(d.learner_name, namespace=namespace)
    before = d.learner_stats()
    pid = ray.get(learner.pid.remote())
    failed = []
    t = threading.Thread(target=lambda: post_all(d.url, "demo", x[2000:4000], failed))
    t.start()
    time.sleep(1.0)
    t_kill = time.time()
    ray.kill(learner, no_restart=False)
    up = None
    while time.time() - t_kill < 120:
        try:
            h = ray.get_actor(d.learner_name, namespace=namespace)
            if ray.get(h.pid.remote(), timeout=5) != pid:
                up = time.time() - t_kill
                break
        except Exception:  # noqa: BLE001 - restarting
            pass
        time.sleep(0.1)
    t.join()
    after = d.learner_stats()
    res["learner_kill"] = {"requests_lost": len(failed), "restart_s": up,
                           "version_before": before["version"], "version_after": after["version"],
                           "thresholds_kept": after["thresholds"] == before["thresholds"]
                           or after["version"] > before["version"],
                           "restored_from": after["restored_from"]}
    return res


def plot(recs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in recs:
        xs = [w["rows_end"] for w in r["windows"]]
        ax[0].plot(xs, [100 * w["flops_saved"] for w in r["windows"]], marker="o",
                   label=f"{r['replicas']} replica(s)")
        ax[1].plot(xs, [100 * w["agreement"] for w in r["windows"]], marker="o",
                   label=f"{r['replicas']} replica(s)")
    ax[0].set(xlabel="total requests' rows served (all replicas)", ylabel="FLOPs saved per 1,000 rows (%)")
    ax[1].set(xlabel="total rows served (all replicas)", ylabel="agreement with the backbone (%)")
    ax[1].axhline(99, color="grey", ls="--", lw=0.8)
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("One learner on Ray Serve: demo backbone, Fashion-MNIST test stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.scaleout_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10000, help="test rows streamed per setting")
    p.add_argument("--out", default="out/scaleout_bench")
    p.add_argument("--plot", default="docs/bench/scaleout_learning.png")
    p.add_argument("--replicas", default="1,2", help="settings to run, e.g. 1,2")
    args = p.parse_args(argv)
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print("error: Ray Serve is not installed; pip install -e '.[ray]'", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from tools.data import load_fashion_mnist
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifact = compile_demo(out)
    x, _ = load_fashion_mnist("test")
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))][:args.rows]
    with torch.no_grad():
        back = torch.jit.load(str(artifact))(x).argmax(1).numpy()
    recs = []
    for r in [int(v) for v in args.replicas.split(",")]:
        state = out / f"state-{r}"
        for f in state.glob("*"):
            f.unlink()
        recs.append(run(artifact, x, back, r, state, faults=r >= 2))
    import ray
    summary = {"command": "python -m tools.scaleout_bench " + " ".join(argv or sys.argv[1:]),
               "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU",
               "torch": torch.__version__, "ray": ray.__version__,
               "date": time.strftime("%Y-%m-%d"), "batch": BATCH, "clients": CLIENTS,
               "runs": recs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(recs, args.plot)
    print(json.dumps({r["replicas"]: {k: r.get(k) for k in ("second_half", "publish_delay_s",
                                                            "faults", "rounds",
                                                            "rows_dropped_at_replicas")}
                      for r in recs}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
