"""Tests for tools/baselines.py and tools/bench/: routing, oracle, calibration, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from compiler import exit_rule
from runtime.calibrate import INF, evaluate, wilson_lower, z_of
from tools import baselines as B
from tools.bench import provenance
from tools.bench.provenance import code_version, machine_info
from tools.bench.report import write_md
from tools.bench.results import RESULT_KEYS, BackboneResult
from tools.bench.run import bench_backbone
from tools.bench.settings import NO_GPU, Settings
from tools.bench.stats import spread
from tools.timing import time_variants


def _synthetic(E=4, n=3000, seed=0):
    """Confidences that predict agreement: deeper heads agree more often."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(E, n, generator=g, dtype=torch.float64)
    base = torch.linspace(0.6, 0.9, E, dtype=torch.float64)[:, None]
    p_agree = base + (1 - base) * conf ** 0.5
    agree = torch.rand(E, n, generator=g, dtype=torch.float64) < p_agree
    ref = torch.randint(0, 10, (n,), generator=g)
    pred = torch.where(agree, ref[None].expand(E, n), (ref[None] + 1) % 10)
    stage = torch.tensor([0.2, 0.25, 0.2, 0.15, 0.2], dtype=torch.float64)[:E + 1]
    stage = stage / stage.sum()
    head = torch.full((E,), 0.004, dtype=torch.float64)
    return conf, agree, pred, ref, stage, head


def _route(conf, t):
    """Each row's exit under thresholds ``t`` (``INF``: off), by the exit rule."""
    threshold, enabled = exit_rule.split_thresholds(t)
    return exit_rule.first_exit(conf, threshold, enabled), enabled


def test_route_and_score_match_runtime_evaluate():
    conf, agree, pred, ref, stage, head = _synthetic()
    for t in ([0.9, INF, 0.7, 0.5], [INF] * 4, [0.0, 0.0, 0.0, 0.0], [0.95, 0.9, 0.8, 0.6]):
        first, enabled = _route(conf, t)
        res = B.score(first, pred, ref, None, stage, head, enabled)
        saving, agreeing = evaluate(conf, agree, stage, head, t)
        assert res.flops_saved == pytest.approx(saving, abs=1e-9)
        assert res.agreement == pytest.approx(agreeing / conf.shape[1], abs=1e-9)
        assert sum(res.exit_share) == pytest.approx(1.0)
        assert res.accuracy is None                               # no labels given


def test_oracle_bounds_every_policy_that_agrees():
    """On the same rows, no policy whose exits all agree with the backbone saves more than the
    oracle; the oracle also never does worse than 0 nor better than the first stage allows."""
    conf, agree, pred, ref, stage, head = _synthetic()
    oracle = B.oracle_saving(pred, ref, stage, head)
    assert 0.0 < oracle < 1.0 - stage[0].item()
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        t = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        off = torch.rand(4, generator=g) < 0.3
        t = [INF if o else v for v, o in zip(t, off.tolist())]
        first, enabled = _route(conf, t)
        # Make the policy's answers agree where it exits (the best case for the policy).
        p2 = pred.clone()
        left = first < 4
        cols = torch.nonzero(left).flatten()
        p2[first[left], cols] = ref[cols]
        res = B.score(first, p2, ref, None, stage, head, enabled)
        assert res.agreement == 1.0
        assert B.oracle_saving(p2, ref, stage, head) >= res.flops_saved - 1e-12
    # The oracle only answers with agreeing heads, at the earliest one when heads are cheap...
    first = B.oracle_exits(pred, ref, stage, head)
    assert torch.equal(first, B.oracle_exits(pred, ref))
    hit = first < 4
    assert bool((pred[first[hit], torch.nonzero(hit).flatten()] == ref[hit]).all())
    # ...and never pays more than the backbone, however costly the heads.
    assert B.oracle_saving(pred, ref, stage, torch.full((4,), 2.0, dtype=torch.float64)) == 0.0


def test_global_threshold_meets_its_target_on_the_calibration_rows():
    conf, agree, pred, ref, stage, head = _synthetic()
    z = z_of(0.95)
    for budget in (0.95, 0.98, 0.99):
        plan = B.global_threshold(conf, agree, stage, head, budget, 0.95)
        assert len(set(plan.thresholds)) == 1                    # one threshold for every exit
        saving, agreeing = evaluate(conf, agree, stage, head, plan.thresholds)
        assert wilson_lower(agreeing, conf.shape[1], z) >= budget
        assert plan.lower_bound >= budget
        assert saving == pytest.approx(plan.saving)
        assert saving > 0
    # A stricter budget never saves more.
    s = [B.global_threshold(conf, agree, stage, head, b, 0.95).saving for b in (0.9, 0.95, 0.99)]
    assert s[0] >= s[1] >= s[2]
    # An impossible budget switches every exit off.
    plan = B.global_threshold(conf, agree, stage, head, 0.9999, 0.95)
    assert plan.thresholds == [INF] * 4 and plan.saving == 0.0


class _Cut:
    def __init__(self, name, pos, frac, shape, preferred=True):
        self.name, self.position, self.fraction, self.shape = name, pos, frac, shape
        self.preferred, self.flops_before = preferred, int(frac * 1000)


def test_placements():
    cuts = [_Cut("a", 0, 0.01, (-1, 16, 28, 28)), _Cut("b", 1, 0.13, (-1, 16, 28, 28)),
            _Cut("c", 2, 0.26, (-1, 16, 28, 28)), _Cut("d", 3, 0.36, (-1, 32, 14, 14)),
            _Cut("x", 4, 0.40, (-1, 32, 14, 14), preferred=False),
            _Cut("e", 5, 0.48, (-1, 32, 14, 14)), _Cut("f", 6, 0.71, (-1, 64, 7, 7)),
            _Cut("g", 7, 0.84, (-1, 128, 4, 4)), _Cut("h", 8, 1.0, (-1, 128, 4, 4))]
    ends = [c.name for c in B.stage_end_cuts(cuts)]
    assert ends == ["c", "e", "f"]                   # last cut at each size, not the deepest
    sdn = B.place(B.BASELINES["sdn"], cuts, [])
    assert len(sdn) == len({c.name for c in sdn}) == 6
    assert [c.position for c in sdn] == sorted(c.position for c in sdn)
    assert "x" not in {c.name for c in sdn} and "h" not in {c.name for c in sdn}
    every = B.place(B.BASELINES["apparate"], cuts, [])
    assert [c.name for c in every] == ["a", "b", "c", "d", "e", "f", "g"]


def test_head_flops_count_pooling_and_linear():
    head = nn.Sequential(B.AvgPool(), nn.Linear(32, 10))
    # Global average pooling is a reduction, counted as one FLOP per input element:
    # 32 * 7 * 7 = 1568. Linear(32, 10) is one addmm, 2 * 32 * 10 = 640 (multiply-add = 2; the
    # bias add is not counted, as in torch.utils.flop_counter). 1568 + 640 = 2208.
    assert B.module_flops(head, (-1, 32, 7, 7)) == 32 * 7 * 7 + 2 * 32 * 10 == 2208
    assert B.MixPool(4)(torch.zeros(2, 8, 14, 14)).shape == (2, 8 * 16 * 2)
    assert B.MixPool(4)(torch.zeros(2, 8, 2, 2)).shape == (2, 8 * 4 * 2)
    # a channels-last map [B, H, W, C] (Swin) pools as its [B, C, H, W] twin
    x = torch.randn(2, 8, 6, 5)
    hwc = x.permute(0, 2, 3, 1).contiguous()
    torch.testing.assert_close(B.MixPool(4, hwc=True)(hwc), B.MixPool(4)(x))
    torch.testing.assert_close(B.AvgPool(hwc=True)(hwc), B.AvgPool()(x))
    ent = B.confidence_of(torch.tensor([[0.0, 0.0], [10.0, -10.0]]), "entropy")
    assert ent[0].item() == pytest.approx(0.0, abs=1e-6) and ent[1].item() > 0.99


def test_spread_and_latency_timing():
    sp = spread([0.1, 0.3, None])
    assert sp["mean"] == pytest.approx(0.2) and sp["min"] == 0.1 and sp["max"] == 0.3
    calls = []
    times = time_variants({"a": lambda r: calls.append(("a", r)),
                              "b": lambda r: calls.append(("b", r))}, [1, 2, 3], reps=2,
                             warmup=1, device="cpu")
    assert set(times) == {"a", "b"} and all(len(v) == 3 for v in times.values())
    assert len(calls) == 2 * (1 + 3 * 2)


def _tiny_backbone(path: Path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    ep = torch.export.export(m, (torch.randn(2, 1, 28, 28),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    torch.export.save(ep, str(path))


def test_quick_mode_end_to_end_on_a_tiny_model(tmp_path: Path):
    """A tiny run of the quick pipeline returns and writes the documented keys, and the report
    renders with every GPU figure marked as not measured."""
    path = tmp_path / "tiny.pt2"
    _tiny_backbone(path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (400,), generator=g)
    s = Settings(seeds=(0, 1), budgets=(0.9,), sweep=(0.9,), lat_b1=6, lat_b64=1, reps=1,
                    warmup=1, imagenet=False, latency_budget=0.9, baseline_epochs=2,
                    rewrite_overrides=dict(head_budget=1.0),   # a 6k-parameter model: let heads fit
                    runtime_overrides=dict(train_every=48, min_train=48, min_calib=24,
                                           # a 400-row stream: hold-out blocks to scale
                                           holdout_block_rows=16, holdout_gap_rows=4))
    out = tmp_path / "bench"
    res = bench_backbone("tiny", path, x, y, s, out)
    on_disk = json.loads((out / "tiny.json").read_text())
    assert set(RESULT_KEYS) <= set(on_disk)
    assert on_disk == res.to_json()
    assert BackboneResult.from_json(on_disk) == res         # what --write-md reads back
    assert set(res.baselines) == {"sdn", "apparate", "paper", "branchynet"}
    runs = res.ours_runs(0.9)
    assert [r.seed for r in runs] == [0, 1]
    E = len(res.model.exits)
    for r in runs:
        assert r.rows == 400 and len(r.exit_share) == E + 1
        assert sum(r.exit_share) == pytest.approx(1.0)
        assert 0.0 <= r.agreement <= 1.0
        assert r.oracle_saving >= 0.0
        assert r.learning.rounds >= 1
    for name, bl in res.baselines.items():
        for sd in bl.seeds:
            assert sd.test_rows == 200 and sd.train_rows + sd.calib_rows == 200
            b = sd.budgets["0.9"]
            assert b.calib_lower_bound >= 0.9 or all(t is None for t in b.thresholds)
            assert sd.oracle_saving >= -1e-9
    lat = res.latency
    for bl_ in (lat.batch1, lat.batch64):
        assert {"backbone_eager", "cached_eager", "backbone_scripted", "cached_scripted",
                "runtime_predict"} <= set(bl_.table)
    assert lat.eager_matches_scripted
    assert lat.gpu == NO_GPU
    (out / "run.json").write_text(json.dumps({
        "command": "pytest", "mode": "quick", "backbones": ["tiny"], "imagenet": False,
        "wall_s": 1.0, "machine": machine_info(), "date": "today"}))
    md = write_md(out, tmp_path / "B.md", tmp_path / "figs")
    text = md.read_text()
    assert "not measured: no GPU lent" in text and "## tiny" in text
    assert len(list((tmp_path / "figs").glob("tiny_*.png"))) == 4


def test_code_version_names_uncommitted_files_whole(monkeypatch):
    import subprocess

    def fake_run(cmd, **kw):
        out = " M tools/demo.py\n?? runtime/new.py\n" if "status" in cmd else "abc1234\n"
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(provenance.subprocess, "run", fake_run)
    assert code_version() == {"commit": "abc1234",
                                 "uncommitted": ["tools/demo.py", "runtime/new.py"]}


@pytest.mark.parametrize("name,arch", [("vgg16_bn", "vgg16_bn"), ("mine", "ARCH")])
def test_a_missing_backbone_names_the_command_that_trains_it(tmp_path, capsys, name, arch):
    from tools.benchmark import main
    path = tmp_path / "backbones" / f"{name}.pt2"
    assert main(["--mode", "quick", "--backbone", str(path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"python -m tools.train --arch {arch} --out {path}" in err
