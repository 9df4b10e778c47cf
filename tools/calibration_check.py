"""Is the calibration's guarantee honest, and what does it cost? Threshold rules compared on many draws.

Heads are learned online on the first ``--learn-rows`` rows of the Fashion-MNIST test stream
(the demo's backbone and runtime, synchronous, seeded). The rest of the stream is a pool: each
draw takes ``--calib-rows`` of it at random to choose thresholds with each rule, then measures
agreement and FLOPs saved on the pool rows it did not take. A rule is honest when agreement falls
below the budget in at most ``1 - confidence`` of the draws (binomial noise of the measurement
aside: the pool is finite). Usage::

    python -m tools.calibration_check --draws 200 --calib-rows 600,1500,3000
"""
import argparse
import json
import time
from pathlib import Path

import torch

from runtime import calibrate as C

RULES = {
    "wilson+crossfit": lambda conf, agree, sc, hc, b, c, seed: C.choose_thresholds_corrected(
        conf, agree, sc, hc, b, c, seed),
    "ltt": lambda conf, agree, sc, hc, b, c, seed: C.choose_thresholds_ltt(
        conf, agree, sc, hc, b, c, seed),
    "ltt-fitted": lambda conf, agree, sc, hc, b, c, seed: C.choose_thresholds_ltt(
        conf, agree, sc, hc, b, c, seed, family=C.LTT_FAMILY["ltt-fitted"]),
}


def pool_logits(artifact: str, learn_rows: int, seed: int):
    """(each head's logits [n, K] per exit, the backbone's [n, K], stage_cost, head_cost) of
    heads learned online on the first ``learn_rows`` test rows, on the rest of the rows."""
    import runtime
    from tools.data import load_fashion_mnist
    x, _ = load_fashion_mnist("test", size=28, channels=1)
    gen = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(len(x), generator=gen)]
    rt = runtime.load(artifact, background=False, seed=seed, latency_weight=0.0,
                      backend="torchscript")
    for i in range(0, learn_rows, 16):
        rt.predict(x[i:i + 16])
    pool = x[learn_rows:]
    feats, teach = [[] for _ in range(rt.num_exits)], []
    with torch.no_grad():
        for i in range(0, len(pool), 256):
            h = pool[i:i + 256]
            for e in range(rt.num_exits):
                h = rt.stages[e](h)
                feats[e].append(rt.heads[e].features(h))
            teach.append(rt.stages[-1](h))
        logits = [rt.learner.predict(e, torch.cat(f)).float() for e, f in enumerate(feats)]
    rt.close()
    return logits, torch.cat(teach), rt.costs.stage_cost, rt.costs.head_cost


def pool_scores(logits, teacher):
    """(conf, agree) [E, n] by the exit rule's confidence."""
    from runtime.tasks import ClassificationTask, head_confidences
    return head_confidences(ClassificationTask(), lambda e, f: logits[e], logits, teacher)


def other_scores(logits, teacher, fit):
    """Alternative confidences [E, n] a head could exit on, to see whether any ranks rows
    better than the exit rule's: the softmax margin; a log-probability ensemble with the
    earlier exits (decay 0.5; its answer replaces the head's); and a learned agreement score
    (logistic regression, fitted on the rows ``fit``, on each exit's and the earlier exits'
    top probability, margin, entropy, agreement with this exit and softmax)."""
    target = teacher.argmax(1)
    P = [torch.softmax(z, 1) for z in logits]
    top2 = [p.topk(2, 1).values for p in P]
    out = {"margin": (torch.stack([t[:, 0] - t[:, 1] for t in top2]), None)}
    acc, ens = torch.zeros_like(logits[0]), []
    for z in logits:
        acc = 0.5 * acc + torch.log_softmax(z, 1)
        ens.append(torch.softmax(acc, 1))
    out["ensemble"] = (torch.stack([q.amax(1) for q in ens]),
                       torch.stack([q.argmax(1) == target for q in ens]))
    learned = []
    for k in range(len(P)):
        cols = []
        for j in range(k + 1):
            ent = -(P[j] * P[j].clamp_min(1e-12).log()).sum(1)
            cols += [top2[j][:, 0], top2[j][:, 0] - top2[j][:, 1], ent,
                     (P[j].argmax(1) == P[k].argmax(1)).float()]
        X = torch.cat([torch.stack(cols, 1), P[k]], 1)
        X = (X - X[fit].mean(0)) / (X[fit].std(0) + 1e-6)
        y = (P[k].argmax(1) == target).float()
        w = torch.zeros(X.shape[1] + 1, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200)

        def loss():
            opt.zero_grad()
            v = torch.nn.functional.binary_cross_entropy_with_logits(X[fit] @ w[1:] + w[0], y[fit]) \
                + 1e-3 * (w[1:] ** 2).sum()
            v.backward()
            return v
        opt.step(loss)
        learned.append(torch.sigmoid(X @ w[1:] + w[0]).detach())
    out["learned agreement"] = (torch.stack(learned), None)
    return out


def ceilings_of(conf, agree, sc, hc, budgets):
    """What no threshold rule can beat on this pool: the oracle of these heads (each row at
    the cheapest exit whose head agrees) and the best threshold setting chosen in hindsight on
    the pool itself with the point estimate (per exit or global, whichever saves more)."""
    from tools.baselines import _oracle_costs
    E, n = conf.shape
    cost = _oracle_costs(sc, hc)
    per = torch.where(agree, cost[:E, None], torch.full((E, n), float("inf"), dtype=cost.dtype))
    oracle = 1 - float(torch.cat([per, cost[E:].expand(1, n)]).min(0).values.mean())
    out = {}
    for b in budgets:   # confidence 0.5: z = 0, the bound is the point estimate
        p = C.choose_thresholds(conf, agree, sc, hc, b, 0.5)
        g = C.choose_global_threshold(conf, agree, sc, hc, b, 0.5)
        out[b] = {"oracle": oracle, "hindsight": max(p.saving, g.saving)}
    return out


def run(conf, agree, sc, hc, budgets, confidence, calib_rows, draws, seed):
    E, n = conf.shape
    out = []
    for budget in budgets:
        for m in calib_rows:
            per_rule = {r: {"agreement": [], "saving": [], "seconds": []} for r in RULES}
            for d in range(draws):
                gen = torch.Generator().manual_seed(seed * 100003 + d)
                perm = torch.randperm(n, generator=gen)
                cal, held = perm[:m], perm[m:]
                for name, rule in RULES.items():
                    t0 = time.perf_counter()
                    plan = rule(conf[:, cal], agree[:, cal], sc, hc, budget, confidence, d)
                    per_rule[name]["seconds"].append(time.perf_counter() - t0)
                    s, a = C.evaluate(conf[:, held], agree[:, held], sc, hc, plan.thresholds)
                    per_rule[name]["agreement"].append(a / len(held))
                    per_rule[name]["saving"].append(s)
            for name, r in per_rule.items():
                ag = torch.tensor(r["agreement"])
                sv = torch.tensor(r["saving"])
                out.append({"rule": name, "budget": budget, "calib_rows": m, "draws": draws,
                            "violations": int((ag < budget).sum()),
                            "violation_rate": float((ag < budget).double().mean()),
                            "agreement_median": float(ag.median()),
                            "saving_median": float(sv.median()), "saving_mean": float(sv.mean()),
                            "seconds_median": float(torch.tensor(r["seconds"]).median())})
                print(f"{name:16s} budget {budget} calib {m:5d}: saving median {100 * out[-1]['saving_median']:.1f}% "
                      f"agreement median {100 * out[-1]['agreement_median']:.2f}%  below budget in "
                      f"{out[-1]['violations']}/{draws} draws  ({out[-1]['seconds_median']:.2f} s/choice)",
                      flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default=None, help="compiled artifact (default: the demo's)")
    ap.add_argument("--learn-rows", type=int, default=3000)
    ap.add_argument("--calib-rows", default="600,1500,3000")
    ap.add_argument("--budgets", default="0.99,0.995")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/calibration_check.json")
    ap.add_argument("--scores", action="store_true",
                    help="also the hindsight ceilings of other confidences a head could exit on "
                         "(margin, an ensemble with earlier exits, a learned agreement score)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    artifact = args.artifact
    if artifact is None:
        from tools.experiment import demo_artifact
        artifact = demo_artifact("out/calibration_check/demo.cached.pt")
        if artifact is None:
            return 2
    logits, teacher, sc, hc = pool_logits(artifact, args.learn_rows, args.seed)
    conf, agree = pool_scores(logits, teacher)
    print(f"pool: {conf.shape[1]} rows, {conf.shape[0]} exits; head agreement "
          f"{[round(float(a), 3) for a in agree.double().mean(1)]}", flush=True)
    budgets = [float(b) for b in args.budgets.split(",")]
    ceilings = ceilings_of(conf, agree, sc, hc, budgets)
    for b, c in ceilings.items():
        print(f"ceilings at {b}: oracle of these heads {100 * c['oracle']:.1f}%, best threshold "
              f"setting chosen in hindsight on the whole pool (no bound) {100 * c['hindsight']:.1f}%",
              flush=True)
    scores = {}
    if args.scores:   # fitted on the first half of the pool, ceilings on the second
        n = conf.shape[1]
        fit, rest = torch.arange(n) < n // 2, torch.arange(n) >= n // 2
        alt = {"max softmax (the exit rule)": (conf, agree)}
        alt.update({k: (c.double(), agree if a is None else a)
                    for k, (c, a) in other_scores(logits, teacher, fit).items()})
        for name, (c, a) in alt.items():
            scores[name] = ceilings_of(c[:, rest], a[:, rest], sc, hc, budgets)
            print(f"score {name:28s} hindsight (second half): " + ", ".join(
                f"{100 * v['hindsight']:.1f}% at {b}" for b, v in scores[name].items())
                + f"; oracle {100 * next(iter(scores[name].values()))['oracle']:.1f}%", flush=True)
    res = run(conf, agree, sc, hc, [float(b) for b in args.budgets.split(",")], args.confidence,
              [int(m) for m in args.calib_rows.split(",")], args.draws, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "args": vars(args),
                                          "ceilings": ceilings, "scores": scores,
                                          "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
