"""Load test of the inference server (issue 11, "Figures"): the learned artifact against the plain
backbone, both served by ``python -m runtime.server`` on loopback, driven by locust.

    python -m tools.load_test [--clients 1,8,32] [--seconds 20] [--reps 2] [--requests-max N]
                              [--out out/load] [--write-md]

1. Artifacts: ``out/demo/demo_backbone.learned.pt`` (learned exits) and
   ``out/demo/demo_backbone.cached.pt`` (exits off: the plain backbone), from ``tools.demo``
   (run here when missing).
2. Backends: when ``RuntimeConfig`` has ``serving.backend``, each server kind is started in every
   available backend (torchscript, onnxruntime), measured at the largest client count, and the
   fastest kept (the backbone in its best CPU mode, the cached server in its best).
3. Turns, interleaved: for each repetition, for each client count, cached then backbone; closed
   loop (each locust user sends its next request when the last is answered), one Fashion-MNIST
   test row per request as a pre-encoded OIP binary tensor; the dynamic batcher gathers them.
4. Overload: open-ish loop at twice the cached server's measured capacity (many locust users,
   each at a constant rate, short client timeout): share of 503 (with Retry-After), p99 of the
   accepted requests, max server RSS (``/proc/PID/status``), and the server alive afterwards.

Both servers run with learning paused (POST .../learning/pause once ready): shadow rows and
collection go on as in production, learning rounds do not, so the figures are of serving.
Locust runs in a child process (its gevent monkey-patching stays out of this one) through its
library API; every request's latency and status is recorded exactly (locust's own percentiles are
rounded), and locust's request count is kept to cross-check. Bounded: ``--seconds`` per turn and
``--requests-max`` requests per turn; servers are killed at exit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BODIES = 512           # distinct pre-encoded requests, cycled
WARMUP_FRACTION = 0.1  # requests completing in the first 10% of a turn (at most 2 s) are not counted


# ----- request bodies ---------------------------------------------------------------------------
def encode_bodies(rows) -> list:
    """One OIP binary-extension request per row: (body bytes, JSON header length). Outputs come
    back binary too, so neither side spends time on JSON floats."""
    rows = np.ascontiguousarray(np.asarray(rows, dtype="<f4"))
    out = []
    for r in rows:
        raw = r[None].tobytes()
        header = json.dumps({
            "inputs": [{"name": "input", "shape": [1, *r.shape], "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}},
                        {"name": "exit", "parameters": {"binary_data": True}}],
        }, separators=(",", ":")).encode()
        out.append((header + raw, len(header)))
    return out


def fashion_rows(n: int = BODIES, size: int = 28, channels: int = 1):
    """The first ``n`` Fashion-MNIST test images, normalised as the demo backbone expects."""
    from tools.data import load_fashion_mnist
    x, _ = load_fashion_mnist("test", size=size, channels=channels)
    return x[:n].numpy()


# ----- the locust driver (runs in a child process) ----------------------------------------------
def _worker(spec_path: str) -> int:
    """Child process: run locust's LocalRunner per ``spec`` and pickle every request's record."""
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    import resource

    import gevent
    from locust import FastHttpUser, constant, constant_throughput, task
    from locust.env import Environment

    bodies = spec["bodies"]
    path = f"/v2/models/{spec['model']}/infer"
    counter = [0]

    class OIPUser(FastHttpUser):
        host = spec["url"]
        wait_time = constant_throughput(spec["user_rate"]) if spec.get("user_rate") else constant(0)
        network_timeout = spec["timeout"]
        connection_timeout = spec["timeout"]
        max_retries = 0

        @task
        def infer(self):
            i = counter[0]
            if i >= spec["requests_max"]:   # the bound: send no more, wait for the turn to end
                gevent.sleep(0.05)
                return
            counter[0] += 1
            body, hlen = bodies[i % len(bodies)]
            self.client.post(path, data=body, name="infer", headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(hlen)})

    env = Environment(user_classes=[OIPUser])
    t_done, lat_ms, status, retry_after = [], [], [], []
    t0 = [0.0]

    def on_request(response_time=None, response=None, exception=None, **_):
        t_done.append(time.monotonic() - t0[0])
        lat_ms.append(float(response_time))
        code = getattr(response, "status_code", 0) or 0
        status.append(int(code))
        if code == 503:
            headers = getattr(response, "headers", None) or {}
            retry_after.append(headers.get("Retry-After") is not None)

    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    # Start together with the other locust processes of this turn: say ready, wait for "go"
    # (a time.monotonic() instant: one clock for every process on Linux).
    Path(spec["result"] + ".ready").touch()
    while not os.path.exists(spec["go"]):
        time.sleep(0.005)
    start_at = float(Path(spec["go"]).read_text())
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0[0] = start_at
    runner.start(spec["users"], spawn_rate=max(spec["users"], 1))
    deadline = t0[0] + spec["seconds"]
    while time.monotonic() < deadline and len(status) < spec["requests_max"]:
        gevent.sleep(0.02)
    t_stop = time.monotonic() - t0[0]
    runner.stop()       # users are killed: requests in flight are not counted
    runner.quit()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    total = env.stats.total
    rec = {"t_done": t_done, "lat_ms": lat_ms, "status": status, "retry_after": retry_after,
           "t_stop": t_stop, "sent": counter[0],
           "client_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
           "locust": {"num_requests": total.num_requests, "num_failures": total.num_failures,
                      "p50_ms": total.get_response_time_percentile(0.5),
                      "p99_ms": total.get_response_time_percentile(0.99)}}
    with open(spec["result"], "wb") as f:
        pickle.dump(rec, f)
    return 0


def drive(url: str, model: str, bodies: list, users: int, seconds: float, requests_max: int,
          user_rate: float | None = None, timeout: float = 60.0, server_pid: int | None = None,
          procs: int = 1):
    """One turn: ``users`` locust users against ``url`` for ``seconds`` (or ``requests_max``
    requests), spread over ``procs`` locust processes (one gevent thread each: on a busy machine
    one process gets one thread's share of the CPU, and the load generator, not the server,
    would set the pace) started together; returns the summary of ``summarise`` (plus server CPU
    / RSS if ``server_pid``)."""
    k = max(1, min(procs, users))
    share = lambda total, i: total // k + (1 if i < total % k else 0)   # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        specs = []
        for i in range(k):
            spec = {"url": url, "model": model, "bodies": bodies[i::k] or bodies,
                    "users": share(users, i), "seconds": seconds,
                    "requests_max": share(requests_max, i), "user_rate": user_rate,
                    "timeout": timeout, "result": os.path.join(tmp, f"result-{i}.pkl"),
                    "go": os.path.join(tmp, "go")}
            spec_path = os.path.join(tmp, f"spec-{i}.pkl")
            with open(spec_path, "wb") as f:
                pickle.dump(spec, f)
            specs.append((spec, spec_path))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        workers = [subprocess.Popen([sys.executable, "-m", "tools.load_test", "--_worker", path],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _, path in specs]
        try:
            ready_by = time.monotonic() + 120
            while not all(os.path.exists(sp["result"] + ".ready") for sp, _ in specs):
                dead = [w for w in workers if w.poll() is not None]
                if dead or time.monotonic() > ready_by:
                    raise RuntimeError("locust worker did not start: " +
                                       (dead[0].stderr.read()[-3000:] if dead else "timeout"))
                time.sleep(0.02)
            sampler = RssSampler(server_pid) if server_pid else None
            cpu0 = proc_cpu_s(server_pid) if server_pid else None
            go = specs[0][0]["go"]
            Path(go + ".tmp").write_text(repr(time.monotonic() + 0.2))
            os.replace(go + ".tmp", go)   # whole or absent: a worker never reads it half-written
            errs = [w.communicate(timeout=seconds + 120)[1] for w in workers]
            cpu1 = proc_cpu_s(server_pid) if server_pid else None
            if sampler:
                sampler.stop()
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        for w, err in zip(workers, errs):
            if w.returncode != 0:
                raise RuntimeError(f"locust worker failed (exit {w.returncode}):\n{err[-3000:]}")
        recs = []
        for spec, _ in specs:
            with open(spec["result"], "rb") as f:
                recs.append(pickle.load(f))
    rec = merge_records(recs)
    out = summarise(rec, seconds)
    out.update(users=users, locust_procs=k)
    if server_pid:
        out["server_cpu_cores"] = round((cpu1 - cpu0) / rec["t_stop"], 2)
        out["server_rss_max_mb"] = sampler.max_mb
    return out


def merge_records(recs: list) -> dict:
    """One turn's record from its locust processes' (same clock, same start)."""
    if len(recs) == 1:
        return recs[0]
    rec = {key: [v for r in recs for v in r[key]] for key in ("t_done", "lat_ms", "status",
                                                                "retry_after")}
    rec.update(t_stop=max(r["t_stop"] for r in recs), sent=sum(r["sent"] for r in recs),
               client_cpu_s=sum(r["client_cpu_s"] for r in recs))
    # locust's own figures, kept to cross-check the count: its percentiles are rounded and per
    # process, so the largest of them
    rec["locust"] = {"num_requests": sum(r["locust"]["num_requests"] for r in recs),
                     "num_failures": sum(r["locust"]["num_failures"] for r in recs),
                     "p50_ms": max(r["locust"]["p50_ms"] or 0 for r in recs),
                     "p99_ms": max(r["locust"]["p99_ms"] or 0 for r in recs)}
    return rec


def summarise(rec: dict, seconds: float) -> dict:
    """Throughput and latency of the requests that completed after the warm-up, errors by status
    over the whole turn, and the raw counts (for consistency checks)."""
    warm = min(WARMUP_FRACTION * seconds, 2.0, 0.5 * rec["t_stop"])
    t = np.asarray(rec["t_done"], dtype=float)
    lat = np.asarray(rec["lat_ms"], dtype=float)
    st = np.asarray(rec["status"], dtype=int)
    win = t >= warm
    ok = win & (st == 200)
    span = max(rec["t_stop"] - warm, 1e-9)
    by_status = {str(k): int(v) for k, v in zip(*np.unique(st, return_counts=True))}
    n503 = int((st == 503).sum())
    pct = (lambda q: round(float(np.percentile(lat[ok], q)), 2) if ok.any() else None)
    return {
        "rows_per_s": round(int(ok.sum()) / span, 1),
        "offered_per_s": round(int(win.sum()) / span, 1),
        "p50_ms": pct(50), "p99_ms": pct(99), "mean_ms": round(float(lat[ok].mean()), 2) if ok.any() else None,
        "requests": int(len(st)), "ok": int((st == 200).sum()), "measured_ok": int(ok.sum()),
        "latencies": int(len(lat)), "by_status": by_status,
        "errors": {k: v for k, v in by_status.items() if k != "200"},
        "share_503": round(n503 / max(len(st), 1), 4),
        "retry_after_on_503": (sum(rec["retry_after"]) / n503) if n503 else None,
        "seconds": round(rec["t_stop"], 2), "warmup_s": round(warm, 2), "sent": rec["sent"],
        "client_cpu_cores": round(rec["client_cpu_s"] / rec["t_stop"], 2),
        "locust": rec["locust"],
    }


# ----- servers ----------------------------------------------------------------------------------
def proc_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Max RSS of a process, sampled every ``every`` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every, self.max_mb, self.samples = pid, every, 0.0, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            mb = proc_rss_mb(self.pid)
            if mb is not None:
                self.max_mb = max(self.max_mb, round(mb, 1))
                self.samples.append(mb)
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._t.join()


class Server:
    """``python -m runtime.server`` in a child process on a free loopback port."""

    def __init__(self, artifact, label: str, options: dict, log_dir: Path, pause_learning=True,
                 extra=()):
        import httpx
        self.label, self.options = label, dict(options)
        self.log_path = Path(log_dir) / f"server-{label}.log"
        cmd = [sys.executable, "-m", "runtime.server", str(artifact), "--host", "127.0.0.1",
               "--port", "0", "--model-name", "model", *extra]
        for k, v in options.items():
            cmd += ["--runtime-option", f"{k}={v}"]
        self.cmd = cmd
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.pid, self.model = self.proc.pid, "model"
        deadline = time.time() + 180
        port = None
        while port is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {label} exited {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log_path.read_text())
            if m:
                port = int(m.group(1))
            elif time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server {label} did not start: {self.log_path.read_text()[-2000:]}")
            else:
                time.sleep(0.2)
        self.url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"server {label} not ready: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        if pause_learning:
            r = httpx.post(f"{self.url}/v2/models/{self.model}/learning/pause", timeout=10)
            r.raise_for_status()

    def stats(self) -> dict:
        import httpx
        return httpx.get(f"{self.url}/v2/models/{self.model}/stats", timeout=10).json()

    def check(self, row) -> dict:
        """One JSON request: the server answers with one row of logits and its exit."""
        import httpx
        body = {"inputs": [{"name": "input", "shape": [1, *row.shape], "datatype": "FP32",
                            "data": np.asarray(row, dtype=np.float32).ravel().tolist()}]}
        r = httpx.post(f"{self.url}/v2/models/{self.model}/infer", json=body, timeout=30)
        r.raise_for_status()
        outs = {o["name"]: o for o in r.json()["outputs"]}
        assert outs["output"]["shape"][0] == 1 and "exit" in outs, r.text
        return outs

    def ready(self) -> bool:
        import httpx
        try:
            return httpx.get(self.url + "/v2/health/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def ensure_artifacts(demo_dir: Path):
    cached, learned = demo_dir / "demo_backbone.cached.pt", demo_dir / "demo_backbone.learned.pt"
    if not (cached.is_file() and learned.is_file()):
        from tools.demo import main as demo_main
        rc = demo_main(["--out", str(demo_dir), "--quiet"])
        if rc != 0 or not (cached.is_file() and learned.is_file()):
            raise SystemExit(f"tools.demo failed (exit {rc}); no artifacts in {demo_dir}")
    return cached, learned


def available_backends() -> list:
    """The serving backends this checkout and machine offer ([] when there is no setting)."""
    from dataclasses import fields

    from runtime.config import ServingConfig
    if "backend" not in {f.name for f in fields(ServingConfig)}:
        return []
    out = ["torchscript"]
    try:
        import onnxruntime  # noqa: F401
        out.append("onnxruntime")
    except ImportError:
        pass
    return out


# ----- the whole test ---------------------------------------------------------------------------
def median_spread(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return round(statistics.median(vals), 2), round(max(vals) - min(vals), 2)


def aggregate(turns: list) -> dict:
    """Per configuration: medians over repetitions, with the spread (max - min)."""
    out = {}
    for key in sorted({(t["kind"], t["users"]) for t in turns}, key=lambda k: (k[1], k[0])):
        ts = [t for t in turns if (t["kind"], t["users"]) == key]
        row = {"kind": key[0], "users": key[1], "reps": len(ts)}
        for m in ("rows_per_s", "p50_ms", "p99_ms", "server_cpu_cores", "client_cpu_cores"):
            row[m], row[m + "_spread"] = median_spread([t.get(m) for t in ts])
        errs = {}
        for t in ts:
            for k, v in t["errors"].items():
                errs[k] = errs.get(k, 0) + v
        row["errors"] = errs
        out[f"{key[0]}@{key[1]}"] = row
    return out


def machine() -> dict:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version
    vers = {}
    for mod in ("torch", "onnxruntime", "fastapi", "uvicorn", "locust"):
        try:    # not imported: importing locust monkey-patches this process (gevent)
            vers[mod] = version(mod)
        except PackageNotFoundError:
            vers[mod] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "runtime", "tools/load_test.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    return {"cpu": model, "cores": os.cpu_count(), "versions": vers,
            "commit": commit + ("+uncommitted" if dirty else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_start": open("/proc/loadavg").read().split()[:3]}


def run(args) -> dict:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in args.clients.split(",")]
    cached_art, learned_art = ensure_artifacts(Path(args.demo_dir))
    bodies = encode_bodies(fashion_rows())
    rows = fashion_rows(2)
    info = machine()
    base_opts = {}   # learning paused over HTTP; everything else as in production (background)
    backends = available_backends()
    say = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)
    kinds = {"cached": learned_art, "backbone": cached_art}
    servers, selection = {}, []
    try:
        # -- backend selection: each kind in each backend, at the largest client count
        if backends:
            cands = {}
            for kind, art in kinds.items():
                for b in backends:
                    try:
                        s = Server(art, f"{kind}-{b}", {**base_opts, "backend": b}, out_dir)
                        s.check(rows[0])
                        cands[(kind, b)] = s
                    except Exception as e:   # noqa: BLE001 - a backend that cannot serve is skipped
                        selection.append({"kind": kind, "backend": b, "error": str(e)[-500:]})
                        say(f"  {kind} in {b}: cannot serve ({str(e).splitlines()[0][:120]})")
            for rep in range(args.select_reps):
                for (kind, b), s in cands.items():
                    r = drive(s.url, s.model, bodies, max(clients), args.select_seconds,
                              args.requests_max, server_pid=s.pid, procs=args.locust_procs)
                    selection.append({"kind": kind, "backend": b, "rep": rep, **r})
                    say(f"  select {kind:8s} {b:11s} {max(clients):3d} clients: "
                        f"{r['rows_per_s']:8.1f} rows/s  p99 {r['p99_ms']} ms")
            for kind in kinds:
                mine = [(b, statistics.median([t["rows_per_s"] for t in selection
                                               if t.get("backend") == b and t["kind"] == kind
                                               and "rows_per_s" in t]))
                        for (k, b) in cands if k == kind]
                if not mine:
                    raise SystemExit(f"no backend could serve the {kind} artifact")
                best = max(mine, key=lambda m: m[1])[0]
                servers[kind] = cands.pop((kind, best))
            for s in cands.values():
                s.stop()
        else:
            say("  no serving backend setting in RuntimeConfig: TorchScript for both")
            for kind, art in kinds.items():
                servers[kind] = Server(art, kind, base_opts, out_dir)
                servers[kind].check(rows[0])
        chosen = {k: s.options.get("backend", "torchscript") for k, s in servers.items()}
        say(f"  serving: cached in {chosen['cached']}, backbone in {chosen['backbone']}")

        # -- interleaved turns
        turns = []
        for rep in range(args.reps):
            for n in clients:
                for kind in ("cached", "backbone"):
                    s = servers[kind]
                    r = drive(s.url, s.model, bodies, n, args.seconds, args.requests_max,
                              server_pid=s.pid, procs=args.locust_procs)
                    turns.append({"kind": kind, "rep": rep, **r})
                    say(f"  rep {rep} {kind:8s} {n:3d} clients: {r['rows_per_s']:8.1f} rows/s  "
                        f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  errors {r['errors']}")
        agg = aggregate(turns)
        stats_after = {k: _brief_stats(s) for k, s in servers.items()}

        # -- overload at twice the cached server's capacity
        cap = max(agg[f"cached@{n}"]["rows_per_s"] for n in clients)
        rate = args.overload_factor * cap
        s = servers["cached"]
        rss_before = proc_rss_mb(s.pid)
        r = drive(s.url, s.model, bodies, args.overload_users, args.overload_seconds,
                  args.requests_max * 4, user_rate=rate / args.overload_users,
                  timeout=args.overload_timeout, server_pid=s.pid, procs=args.locust_procs)
        time.sleep(1.0)
        alive = s.proc.poll() is None and s.ready()
        if alive:
            s.check(rows[0])
        overload = {"capacity_rows_per_s": cap, "target_rate_per_s": round(rate, 1),
                    "users": args.overload_users, "client_timeout_s": args.overload_timeout,
                    "rss_before_mb": round(rss_before or 0, 1), "alive_after": alive, **r}
        say(f"  overload {rate:.0f}/s target ({r['offered_per_s']}/s offered): "
            f"503 share {r['share_503']:.1%}, p99 accepted {r['p99_ms']} ms, "
            f"max RSS {r['server_rss_max_mb']} MB (before {overload['rss_before_mb']}), "
            f"alive {alive}")
    finally:
        for s in servers.values():
            s.stop()

    result = {"command": "python -m tools.load_test " + " ".join(args.argv), "machine": info,
              "settings": {"clients": clients, "seconds": args.seconds, "reps": args.reps,
                           "requests_max": args.requests_max, "learning": "paused",
                           "torch_threads": 1, "request": "1 row, OIP binary tensor",
                           "load_tool": "locust (library API, FastHttpUser, closed loop)",
                           "locust_procs": args.locust_procs},
              "backends": chosen, "selection": selection, "turns": turns, "summary": agg,
              "overload": overload, "server_stats_after": stats_after}
    c32, b32 = agg[f"cached@{max(clients)}"], agg[f"backbone@{max(clients)}"]
    ratio = c32["rows_per_s"] / b32["rows_per_s"] if b32["rows_per_s"] else float("inf")
    result["target"] = {"clients": max(clients), "throughput_ratio": round(ratio, 2),
                        "p99_cached_ms": c32["p99_ms"], "p99_backbone_ms": b32["p99_ms"],
                        "met": bool(ratio >= 1.5 and c32["p99_ms"] <= b32["p99_ms"])}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"run-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {path}")
    if args.write_md:
        write_md(out_dir, Path(args.md))
        print(f"wrote {args.md}")
    return result


def _brief_stats(s: Server) -> dict:
    try:
        st = s.stats()
    except Exception as e:   # noqa: BLE001 - stats are informative only
        return {"error": str(e)}
    keep = ("exit_shares", "flops_saved", "agreement", "live_agreement", "enabled", "backend",
            "learning_paused", "rows", "requests")
    return {k: v for k, v in st.items() if k in keep or not isinstance(v, (dict, list))}


def table(result: dict) -> str:
    lines = ["| clients | server | backend | rows/s (spread) | p50 ms (spread) | p99 ms (spread) | errors |",
             "|---:|---|---|---:|---:|---:|---|"]
    for row in result["summary"].values():
        lines.append(
            f"| {row['users']} | {row['kind']} | {result['backends'][row['kind']]} | "
            f"{row['rows_per_s']:.0f} ({row['rows_per_s_spread']:.0f}) | "
            f"{row['p50_ms']} ({row['p50_ms_spread']}) | {row['p99_ms']} ({row['p99_ms_spread']}) | "
            f"{row['errors'] or 'none'} |")
    o, t = result["overload"], result["target"]
    lines.append("")
    lines.append(f"overload at {o['target_rate_per_s']:.0f} req/s target (2x {o['capacity_rows_per_s']:.0f}), "
                 f"{o['offered_per_s']:.0f} req/s offered, {o['users']} users, "
                 f"{o['client_timeout_s']} s client timeout: {o['share_503']:.1%} 503 "
                 f"(Retry-After on {0 if o['retry_after_on_503'] is None else o['retry_after_on_503']:.0%}), "
                 f"accepted {o['rows_per_s']:.0f} rows/s, p99 accepted {o['p99_ms']} ms, "
                 f"statuses {o['by_status']}, max RSS {o['server_rss_max_mb']} MB "
                 f"(before {o['rss_before_mb']} MB), alive after: {o['alive_after']}")
    lines.append(f"target at {t['clients']} clients: {t['throughput_ratio']}x throughput "
                 f"(>= 1.5x), p99 {t['p99_cached_ms']} vs {t['p99_backbone_ms']} ms: "
                 f"{'MET' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def write_md(out_dir: Path, md: Path):
    """docs/load_test.md from every run-*.json in ``out_dir``, newest first, after the runs the
    file already holds whose JSON is not in ``out_dir`` (kept as written, with their numbers)."""
    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("run-*.json"), reverse=True)]
    text = md.read_text() if md.is_file() else ""
    body, notes = (text.split(NOTES, 1) + [None])[:2] if NOTES in text else (text, None)
    have = {f"{r['machine']['date']}, commit {r['machine']['commit']}" for r in runs}
    kept = [(int(m.group(1)), m.group(0).rstrip() + "\n")
            for m in re.finditer(r"^## Run (\d+): (.*?)$.*?(?=^## Run \d+: |\Z)", body, re.M | re.S)
            if m.group(2).strip() not in have]
    first = max((n for n, _ in kept), default=0) + 1
    parts = [MD_HEAD]
    for i, r in enumerate(runs):
        m = r["machine"]
        v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
        sel = [f"{t['kind']}/{t['backend']} {t['rows_per_s']:.0f}" for t in r["selection"]
               if "rows_per_s" in t]
        procs = r["settings"].get("locust_procs", 1)
        parts.append(
            f"## Run {first + len(runs) - 1 - i}: {m['date']}, commit {m['commit']}\n\n"
            f"`{r['command']}`\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores (shared; load average at start "
            f"{' '.join(m['loadavg_start'])}). Versions: {v}. Load: locust in {procs} "
            f"process{'es' if procs > 1 else ''}.\n\n"
            f"Backends chosen (fastest at {max(r['settings']['clients'])} clients): cached in "
            f"**{r['backends']['cached']}**, backbone in **{r['backends']['backbone']}** "
            f"(selection turns, rows/s: {', '.join(sel) or 'no backend setting'}).\n\n"
            + table(r) + "\n\n"
            + _reps_line(r) + "\n\n"
            + _cpu_line(r) + "\n")
    parts += [section for _, section in sorted(kept, reverse=True)]
    md.write_text("\n".join(parts) + ("\n" + NOTES + notes if notes is not None else ""))


def _reps_line(r) -> str:
    """Each repetition at the largest client count: the figures the medians come from."""
    n = max(r["settings"]["clients"])
    by = {}
    for t in r["turns"]:
        if t["users"] == n:
            by.setdefault(t["rep"], {})[t["kind"]] = t
    bits = []
    for rep in sorted(by):
        c, b = by[rep].get("cached"), by[rep].get("backbone")
        if c and b:
            bits.append(f"rep {rep + 1}: cached {c['rows_per_s']:.0f} rows/s (p50 {c['p50_ms']}, "
                        f"p99 {c['p99_ms']} ms), backbone {b['rows_per_s']:.0f} rows/s (p50 "
                        f"{b['p50_ms']}, p99 {b['p99_ms']} ms), "
                        f"{c['rows_per_s'] / max(b['rows_per_s'], 1e-9):.2f}x")
    return f"Repetitions at {n} clients: " + "; ".join(bits) + "."


NOTES = "<!-- notes: kept by --write-md -->"


def _cpu_line(r) -> str:
    s = r["summary"]
    bits = [f"{row['kind']}@{row['users']}: server {row['server_cpu_cores']}, locust "
            f"{row['client_cpu_cores']}" for row in s.values()]
    per_row = [f"{row['kind']}@{row['users']} "
               f"{row['server_cpu_cores'] / row['rows_per_s'] * 1e6:.0f}"
               for row in s.values() if row.get("server_cpu_cores") and row.get("rows_per_s")]
    return ("CPU cores used (median): " + "; ".join(bits) + ".\n\nServer CPU per row (us, from "
            "the medians; what the server costs whatever share of the cores it got): " +
            ", ".join(per_row) + ".")


MD_HEAD = """# Load test of the inference server (issue 11, "Figures")

`python -m tools.load_test --write-md` starts two `python -m runtime.server` processes on free
loopback ports, the **cached** one serving `out/demo/demo_backbone.learned.pt` (learned exits) and
the **backbone** one serving `out/demo/demo_backbone.cached.pt` (exits off: every row runs the
whole backbone), and drives them with [locust](https://locust.io) (library API, `FastHttpUser`,
in child processes: `--locust-procs`, 2 by default, started together). Each request is one real
Fashion-MNIST test image as an OIP binary tensor (pre-encoded; 512 distinct rows cycled); the
server's dynamic batcher (`--max-batch 32`, `--max-wait-ms 5`, `--max-queue 256`, defaults)
gathers them.

How it is measured:

- **Backends**: the runtime's `serving.backend` setting exists, so each server is started in
  `torchscript` and in `onnxruntime`, measured at the largest client count, and the fastest kept:
  the backbone in its best CPU mode against the cached server in its best.
- **Learning paused** on both (`POST .../learning/pause` once ready) so the figures are of serving:
  shadow rows (5%) and collection (10% of the cached server's batches) go on as in production;
  background learning rounds do not. The backbone server, with no exit on, still collects
  features from every batch (what the runtime costs before it has learned anything).
- **Turns interleaved**: for each repetition, for each client count, cached then backbone; closed
  loop (a client sends its next request when its last one is answered). Figures are medians over
  the repetitions, spread = max - min; requests completing in the first 10% of a turn (at most 2 s)
  are warm-up and not counted. Latency is client-side, per request, exact (locust's own
  percentiles are rounded; its request count is kept as a cross-check).
- **Overload**: the cached server at twice its measured capacity: many locust users, each at a
  constant rate (`constant_throughput`), short client timeout. The server answers the excess
  with 503 + Retry-After at once (past 256 queued requests, or 320 in flight before their body
  is read); a request the client gave up on (no answer within the timeout) is status 0. RSS is
  sampled from `/proc/PID/status` every 0.1 s.
- **One torch thread per server** (the server's default `--threads 1`). The machine has 2 shared
  cores: the load generator (locust) competes with the server for them, and other engineers'
  jobs may run at the same time, so the figures are noisy and a lower bound of what the server
  does on a machine of its own. The CPU lines under each table say how many cores the server
  and locust used, and what the server spent per row: that figure does not depend on the share
  of the cores a turn happened to get.

Target (issue 11): at 32 clients the cached server carries >= 1.5x the backbone server's
throughput at no worse p99.
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        return _worker(argv[1])
    p = argparse.ArgumentParser(prog="python -m tools.load_test", description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,8,32", help="concurrent clients per turn, comma-separated")
    p.add_argument("--seconds", type=float, default=20.0, help="length of one turn")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the interleaved turns")
    p.add_argument("--requests-max", type=int, default=200_000, help="requests per turn at most")
    p.add_argument("--select-seconds", type=float, default=8.0, help="length of a backend-selection turn")
    p.add_argument("--select-reps", type=int, default=1)
    p.add_argument("--overload-factor", type=float, default=2.0)
    p.add_argument("--overload-users", type=int, default=512)
    p.add_argument("--overload-seconds", type=float, default=20.0)
    p.add_argument("--overload-timeout", type=float, default=2.0, help="client timeout (s) in overload")
    p.add_argument("--locust-procs", type=int, default=2,
                   help="locust processes per turn (users split among them; at most one per user)")
    p.add_argument("--demo-dir", default="out/demo")
    p.add_argument("--out", default="out/load")
    p.add_argument("--write-md", action="store_true", help="write docs/load_test.md from the runs in --out")
    p.add_argument("--md", default=str(ROOT / "docs" / "load_test.md"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
