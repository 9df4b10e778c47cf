"""One backbone end to end: rewrite it, run the baselines and the online cache, time it."""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tools import baselines as B
from tools.bench.experiment import run_ours
from tools.bench.latency import measure_latency
from tools.bench.provenance import machine_info
from tools.bench.results import (BackboneResult, BaselineResult, ExitInfo, Meta, ModelInfo,
                                 OursRuns)
from tools.bench.settings import Settings, say


def bench_backbone(name: str, path, x, y, s: Settings, out_dir: Path) -> BackboneResult:
    """Everything BENCHMARKS.md reports for one backbone; also written to OUT/<name>.json."""
    from compiler import artifact
    from compiler.loading import load_model
    from compiler.rewrite import RewriteConfig, rewrite_module

    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if s.rows:
        x, y = x[:s.rows], y[:s.rows]
    loaded = load_model(str(path))
    t0 = time.perf_counter()
    module, manifest, an = rewrite_module(loaded.module, loaded.input_shape,
                                          RewriteConfig(**s.rewrite_overrides),
                                          exported=loaded.exported, loaded=loaded)
    cached_path = out_dir / f"{name}.cached.pt"
    artifact.save(module, manifest, cached_path)
    say(f"{name}: rewrote in {time.perf_counter() - t0:.1f} s, {len(manifest['exits'])} exits "
        f"at {[e['name'] for e in manifest['exits']]}")
    result = BackboneResult(
        backbone=name,
        meta=Meta(source=str(path), rows=len(x), batch=s.batch, seeds=list(s.seeds),
                  settings={k: list(v) if isinstance(v, tuple) else v  # as JSON has them
                            for k, v in asdict(s).items()}, machine=machine_info(s.device),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        model=ModelInfo(input_shape=manifest["input_shape"], total_flops=manifest["total_flops"],
                        params=manifest["backbone_params"], stage_flops=manifest["stage_flops"],
                        exits=[ExitInfo(e["name"], e["fraction"], e["head"]["flops"],
                                        e["head"]["params"], e["head"]["pool"],
                                        e["head"]["hidden"]) for e in manifest["exits"]],
                        unsupported_ops=manifest["unsupported_ops"]))

    # Baselines first: their feature pass also gives the backbone's accuracy on the whole set.
    our_names = [e["name"] for e in manifest["exits"]]
    specs = [B.BASELINES[b] if not s.baseline_epochs else
             replace(B.BASELINES[b], epochs=s.baseline_epochs) for b in s.baselines]
    head_budget = RewriteConfig(**s.rewrite_overrides).head_budget   # ours and branchynet alike
    sets = [B.build_exit_set(spec, an, our_names, head_budget) for spec in specs]
    for es in [es for es in sets if not es.exits]:   # e.g. no stage ends in a transformer
        say(f"{name}: baseline {es.spec.name} places no exit on this model; left out")
    sets = [es for es in sets if es.exits]
    t0 = time.perf_counter()
    feats, logits = B.extract(an.gm, an.cuts, sets, x, device=s.device)
    say(f"{name}: baseline features for {len(x)} rows in {time.perf_counter() - t0:.1f} s")
    result.backbone_accuracy = (logits.argmax(1) == y).double().mean().item()
    for es in sets:
        t0 = time.perf_counter()
        per_seed = []
        for seed in s.seeds:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
            per_seed.append(B.run_baseline(es, feats, logits, y, order,
                                           sorted(set(s.sweep) | set(s.budgets)),
                                           s.confidence, seed=seed))
        result.baselines[es.spec.name] = BaselineResult(
            title=es.spec.title, policy=es.spec.policy, labels=es.spec.labels,
            exits=es.describe(), epochs=es.spec.epochs, seeds=per_seed,
            wall_s=time.perf_counter() - t0)
        say(f"{name}: baseline {es.spec.name} ({len(es.exits)} exits) in "
            f"{time.perf_counter() - t0:.1f} s")
    del feats

    learned = {}
    for budget in s.budgets:
        runs = []
        for seed in s.seeds:
            save_to = None
            if seed == s.seeds[0]:
                save_to = out_dir / f"{name}.learned-{budget}.pt"
                learned[budget] = save_to
            r = run_ours(cached_path, x, y, seed, budget, s, save_to)
            runs.append(r)
            say(f"{name}: ours budget {budget} seed {seed}: saved {r.flops_saved:.1%} "
                f"(oracle {r.oracle_saving:.1%}), agreement {r.agreement:.2%}, "
                f"{r.wall_s:.0f} s")
        result.ours[str(budget)] = OursRuns(runs)

    lat_budget = s.latency_budget if s.latency_budget in learned else s.budgets[-1]
    s_lat = replace(s, latency_budget=lat_budget)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(s.seeds[0]))
    x_req = x[order[len(x) // 2:]]          # rows from the scored half of the first seed's stream
    eager = load_model(str(path)).module    # a fresh ExportedProgram.module()
    t0 = time.perf_counter()
    result.latency = measure_latency(an, manifest, eager, cached_path, learned[lat_budget],
                                     x_req, s_lat)
    say(f"{name}: latency in {time.perf_counter() - t0:.1f} s")
    result.meta.wall_s = time.perf_counter() - t_start
    (out_dir / f"{name}.json").write_text(json.dumps(result.to_json(), indent=1))
    return result
