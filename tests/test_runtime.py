"""Runtime: serving an artifact, learning its exits online, stats, persistence, bad input, drift.

Everything runs in synchronous mode (``background=False``) so each test is reproducible. The
teacher is the small Fashion-MNIST CNN of conftest.py, compiled with exits inactive.
"""
from __future__ import annotations

import os
import random
import time
import warnings

import pytest
import torch

import runtime
from compiler import artifact
from compiler.errors import ArtifactError, ArtifactVersionError
from runtime.calibrate import INF

STREAM_ROWS = 4000  # rows streamed before exits are expected to be on
BATCH = 100

# The default cost model mixes measured stage latency into the thresholds' choice, which makes
# them depend on machine load (see test_synchronous_mode_does_not_depend_on_the_clock); tests that
# need exits on pin the FLOPs-only cost model so that they are reproducible.
STABLE = {"latency_weight": 0.0}

# Stats that depend on wall-clock time; everything else must be reproducible.
TIMING_KEYS = {"latency_ms", "latency_while_learning_ms", "stage_latency_ms", "head_latency_ms"}


def jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).eval()


def stream(rt, x, batch=BATCH):
    """Serve ``x`` in batches; returns (outputs, exits) concatenated in input order."""
    outs, exits = [], []
    for i in range(0, len(x), batch):
        o, e = rt.predict(x[i:i + batch], return_exits=True)
        outs.append(o)
        exits.append(e)
    return torch.cat(outs), torch.cat(exits)


def untimed(stats: dict) -> dict:
    s = {k: v for k, v in stats.items() if k not in TIMING_KEYS}
    s["learning"] = {k: v for k, v in s["learning"].items() if k != "train_seconds" and not k.startswith("round_seconds")}
    return s


def head_weights(rt):
    return [{k: v.clone() for k, v in c.state_dict().items()} for c in rt._state.classifiers] + \
        [{k: v.clone() for k, v in m.state_dict().items()} for m in rt.learner.models]


@pytest.fixture(scope="module")
def traffic(fashion_small):
    """Training rows the teacher never saw (the stream) and test rows (held out)."""
    xtr, _, xte, _ = fashion_small
    return xtr[5000:5000 + STREAM_ROWS], xte[:2000]


@pytest.fixture(scope="module")
def reference(teacher_artifact):
    """The compiled artifact as plain TorchScript, exits off: the backbone's own answer."""
    return jit_load(teacher_artifact)


@pytest.fixture(scope="module")
def learned(teacher_artifact, traffic, tmp_path_factory):
    """A runtime that has streamed the traffic (shadow_rate=0) and an artifact it saved."""
    rt = runtime.load(teacher_artifact, background=False, shadow_rate=0.0, **STABLE)
    stream(rt, traffic[0])
    assert any(rt.stats()["enabled"]), "exits never switched on; the other tests need them"
    path = tmp_path_factory.mktemp("learned") / "learned.cached.pt"
    rt.save(path)
    return rt, path


def test_teacher_is_a_real_classifier(teacher, fashion_small):
    """Precondition of everything below: the backbone has learned something."""
    _, _, xte, yte = fashion_small
    with torch.no_grad():
        acc = (teacher(xte[:2000]).argmax(1) == yte[:2000]).float().mean().item()
    assert acc >= 0.75


# ----- serving before learning ----------------------------------------------------------------

def test_predict_matches_artifact_before_learning(teacher_artifact, reference, traffic):
    rt = runtime.load(teacher_artifact, background=False)
    x = traffic[1][:257]
    out, exits = rt.predict(x, return_exits=True)
    with torch.no_grad():
        want, want_exits = reference.forward_with_exits(x)
    assert out.shape == want.shape == (257, 10)
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)  # rows in input order
    assert (exits == rt.num_exits).all() and (want_exits == rt.num_exits).all()
    # A permuted batch comes back permuted the same way.
    perm = torch.randperm(257, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rt.predict(x[perm]), want[perm], atol=1e-5, rtol=1e-5)
    # Single rows and float64 input are served too.
    torch.testing.assert_close(rt.predict(x[:1]), want[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rt.predict(x[:3].double()), want[:3], atol=1e-5, rtol=1e-5)


def test_no_row_exits_before_learning(teacher_artifact, traffic):
    rt = runtime.load(teacher_artifact, background=False)
    _, exits = stream(rt, traffic[0][:900])  # fewer than min_train rows: no round yet
    s = rt.stats()
    assert (exits == rt.num_exits).all()
    assert s["enabled"] == [False] * rt.num_exits
    assert s["rows_per_exit"] == [0] * rt.num_exits + [900]
    assert s["learning"]["rounds"] == 0
    assert s["flops_saved"] == 0.0
    assert s["exit_rate"] == 0.0


# ----- learning -------------------------------------------------------------------------------

class FakeClock:
    """A stand-in for time.perf_counter: every reading advances by a seeded random step."""

    def __init__(self, seed):
        self.t = 0.0
        self.gen = random.Random(seed)

    def __call__(self):
        self.t += self.gen.uniform(1e-4, 1e-2)
        return self.t


def _two_runs(teacher_artifact, traffic, monkeypatch, clocks=(None, None), **overrides):
    runs = []
    for clock in clocks:
        if clock is not None:
            monkeypatch.setattr(time, "perf_counter", clock)
        rt = runtime.load(teacher_artifact, background=False, seed=3, **overrides)
        out, exits = stream(rt, traffic[0])
        monkeypatch.undo()
        runs.append((out, exits, untimed(rt.stats())))
    return runs


def test_synchronous_mode_is_deterministic(teacher_artifact, traffic, monkeypatch):
    """Same seed, same traffic: same exits, outputs and stats (the cost model on FLOPs only)."""
    (o1, e1, s1), (o2, e2, s2) = _two_runs(teacher_artifact, traffic, monkeypatch,
                                           latency_weight=0.0)
    assert torch.equal(e1, e2)
    assert torch.equal(o1, o2)
    assert s1 == s2
    assert s1["learning"]["rounds"] >= 1 and any(s1["enabled"])


def test_synchronous_mode_is_deterministic_given_the_same_timings(teacher_artifact, traffic,
                                                                   monkeypatch):
    """Default config: with identical latency readings everything else repeats exactly."""
    (o1, e1, s1), (o2, e2, s2) = _two_runs(teacher_artifact, traffic, monkeypatch,
                                           clocks=(FakeClock(1), FakeClock(1)))
    assert torch.equal(e1, e2)
    assert torch.equal(o1, o2)
    assert s1 == s2


def test_synchronous_mode_does_not_depend_on_the_clock(teacher_artifact, traffic, monkeypatch):
    (o1, e1, s1), (o2, e2, s2) = _two_runs(teacher_artifact, traffic, monkeypatch,
                                           clocks=(FakeClock(1), FakeClock(2)))
    assert torch.equal(e1, e2)
    assert s1["thresholds"] == s2["thresholds"]


def test_exits_switch_on_and_agree_with_backbone(teacher_artifact, reference, traffic):
    rt = runtime.load(teacher_artifact, background=False, **STABLE)
    _, exits = stream(rt, traffic[0])
    s = rt.stats()
    assert any(s["enabled"]), s
    assert (exits < rt.num_exits).any()
    # Agreement measured independently on held-out rows, against the artifact's full forward.
    held = traffic[1]
    out, held_exits = stream(rt, held)
    with torch.no_grad():
        want = reference(held)
    exited = held_exits < rt.num_exits
    assert exited.float().mean() > 0.1, "hardly any held-out row exits"
    agreement = (out.argmax(1) == want.argmax(1)).float().mean().item()
    assert agreement >= 0.97
    # Rows that ran the backbone return its output exactly.
    torch.testing.assert_close(out[~exited], want[~exited], atol=1e-5, rtol=1e-5)


def test_stats_are_consistent_with_traffic(teacher_artifact, traffic):
    rt = runtime.load(teacher_artifact, background=False, shadow_rate=0.2, **STABLE)
    sizes = [BATCH] * (STREAM_ROWS // BATCH) + [1, 7, 33]
    x = torch.cat([traffic[0], traffic[1][:41]])
    exits, start = [], 0
    for n in sizes:
        exits.append(rt.predict(x[start:start + n], return_exits=True)[1])
        start += n
    exits = torch.cat(exits)
    s = rt.stats()
    E = rt.num_exits
    assert set(s) >= {"requests", "rows", "rows_per_exit", "exit_rate", "live_agreement",
                      "shadow_rows", "flops_saved", "latency_ms", "learning", "thresholds",
                      "enabled", "drift_events", "exit_names"}
    assert s["requests"] == len(sizes)
    assert s["rows"] == sum(sizes) == start
    assert s["rows_per_exit"] == torch.bincount(exits, minlength=E + 1).tolist()
    assert sum(s["rows_per_exit"]) == s["rows"]
    assert s["exit_rate"] == pytest.approx(1 - s["rows_per_exit"][E] / s["rows"])
    assert len(s["exit_names"]) == E + 1 and s["exit_names"][-1] == "backbone"
    assert s["exit_rate"] > 0
    assert 0 < s["flops_saved"] < 1
    assert s["enabled"] == [t is not None for t in s["thresholds"]]
    assert s["shadow_rows"] > 0  # exits are on, so 20% of the requests are shadowed
    assert 0.0 <= s["live_agreement"] <= 1.0
    lat = s["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"]
    learning = s["learning"]
    assert learning["rounds"] >= 1 and learning["rows_trained"] > 0 and learning["train_flops"] > 0
    # exits are on, so the held-out evidence passed what any exit needs
    from runtime.buffer import CALIB
    from runtime.calibrate import independent_rows_needed
    assert learning["held_out_rows"] == rt.buffer.count(CALIB) > 0
    assert learning["held_out_independent_rows"] == pytest.approx(
        learning["held_out_rows"] / max(1.0, s["design_effect"]))
    assert learning["independent_rows_needed"] == independent_rows_needed(
        rt.config.guarantee.plan_budget, rt.config.guarantee.confidence)
    assert learning["held_out_independent_rows"] >= learning["independent_rows_needed"]
    assert s["drift_events"] == 0, "stable traffic must raise no drift alarm"
    if True:  # the buffer holds only rows that ran the whole backbone
        # (requests without a shadow row, once exits are on, run scripted and are not buffered)
        assert 0 < learning["buffer_rows"] <= s["rows_per_exit"][E]
    assert learning["buffer_rows"] <= learning["buffer_capacity"]


def test_flops_saved_matches_the_exits_taken(learned, traffic):
    """With thresholds frozen (no learning, no shadow rows) flops_saved is exactly recomputable."""
    _, path = learned
    rt = runtime.load(path, background=False, shadow_rate=0.0, train_every=10 ** 9)
    _, exits = stream(rt, traffic[1])
    s = rt.stats()
    m = rt.manifest
    E = rt.num_exits
    on = torch.tensor(s["enabled"], dtype=torch.float64)
    head = torch.tensor([e["head"]["flops"] for e in m["exits"]], dtype=torch.float64) * on
    cum_stage = torch.cumsum(torch.tensor(m["stage_flops"], dtype=torch.float64), 0)
    cum_head = torch.cat([torch.cumsum(head, 0), head.sum()[None]])
    spent = (cum_stage[exits] + cum_head[exits]).sum().item()
    assert s["flops_saved"] == pytest.approx(1 - spent / (len(exits) * m["total_flops"]), rel=1e-9)
    assert s["learning"]["rounds"] == 0
    assert (exits < E).any()


# ----- persistence ----------------------------------------------------------------------------

def test_saved_artifact_applies_learned_exits(learned, traffic):
    rt, path = learned
    state = rt._state
    module = jit_load(path)
    x = traffic[1][:1000]
    with torch.no_grad():
        got, got_exits = module.forward_with_exits(x)
    # One call reads one serving state, the saved one (a learning round this call may trigger
    # runs after the rows are answered).
    out, exits = rt.predict(x, return_exits=True)
    assert (got_exits < rt.num_exits).any(), "the saved artifact takes no exit"
    assert torch.equal(got_exits, exits)
    assert torch.equal(got.argmax(1), out.argmax(1))
    torch.testing.assert_close(got, out, atol=1e-4, rtol=1e-4)
    # The flags and thresholds are state inside the file.
    for e in range(rt.num_exits):
        blk = getattr(module.blocks, str(e))
        on = state.thresholds[e] != INF
        assert bool(blk.enabled) == on
        if on:
            assert float(blk.threshold) == pytest.approx(state.thresholds[e], rel=1e-6)
    manifest = artifact.read_manifest(path)
    assert manifest["runtime"]["learned"] is True
    # The runtime reopens it with the learned exits on.
    again = runtime.load(path, background=False, shadow_rate=0.0, train_every=10 ** 9)
    assert again.stats()["enabled"] == [t != INF for t in state.thresholds]
    out2, exits2 = again.predict(x, return_exits=True)
    assert torch.equal(exits2, got_exits)
    torch.testing.assert_close(out2, got, atol=1e-4, rtol=1e-4)


def test_reopened_artifact_saved_before_any_round_keeps_its_exits(learned, tmp_path):
    """Thresholds read from a learned artifact were already held to the full budget by the save
    that wrote them; saving again before this process chose any must not switch them off."""
    _, path = learned
    saved = [float(getattr(jit_load(path).blocks, str(e)).threshold)
             for e in range(len(artifact.read_manifest(path)["exits"]))]
    again = runtime.load(path, background=False, train_every=10 ** 9)   # shadow rows on
    assert any(again.stats()["enabled"])
    again.save(tmp_path / "again.pt")
    module = jit_load(tmp_path / "again.pt")
    assert [float(getattr(module.blocks, str(e)).threshold) for e in range(len(saved))] == saved
    assert [bool(getattr(module.blocks, str(e)).enabled) for e in range(len(saved))] == \
        again.stats()["enabled"]


def test_shadow_rows_count_towards_the_budget():
    from runtime.config import GuaranteeConfig
    cfg = GuaranteeConfig(agreement_budget=0.99, shadow_rate=0.05)
    # 5% of the answers come from the backbone itself: 0.05 + 0.95 * 0.98947 = 0.99.
    assert cfg.shadow_rate + (1 - cfg.shadow_rate) * cfg.plan_budget == pytest.approx(0.99)
    assert GuaranteeConfig(agreement_budget=0.99, shadow_rate=0.0).plan_budget == 0.99
    assert GuaranteeConfig(agreement_budget=0.5, shadow_rate=0.6).plan_budget == 0.0


def test_settings_are_set_by_name_and_checked():
    cfg = runtime.RuntimeConfig().with_overrides(agreement_budget=0.995, epochs=2, seed=3)
    assert (cfg.guarantee.agreement_budget, cfg.learning.epochs, cfg.seed) == (0.995, 2, 3)
    with pytest.raises(runtime.ConfigError, match="unknown runtime setting.*'epoch'.*epochs"):
        runtime.RuntimeConfig().with_overrides(epoch=2)
    with pytest.raises(runtime.ConfigError, match="agreement_budget must be in"):
        runtime.RuntimeConfig().with_overrides(agreement_budget=1.5)
    for bad in (0, -0.1, float("nan"), float("inf"), "5%"):
        with pytest.raises(runtime.ConfigError, match="max_miss_overhead must be None"):
            runtime.RuntimeConfig().with_overrides(max_miss_overhead=bad)
    for bad in (0, -16, 16.5, "64"):
        with pytest.raises(runtime.ConfigError, match="correlation_block_rows must be a whole"):
            runtime.RuntimeConfig().with_overrides(correlation_block_rows=bad)
    for bad in (0, -8, 2.5, "8"):
        with pytest.raises(runtime.ConfigError, match="doubt_looks must be a whole"):
            runtime.RuntimeConfig().with_overrides(doubt_looks=bad)
    for bad in (0, 1.5, "2"):
        with pytest.raises(runtime.ConfigError, match="doubt_windows must be a whole"):
            runtime.RuntimeConfig().with_overrides(doubt_windows=bad)
    for bad in (-0.01, 1.5, float("nan")):
        with pytest.raises(runtime.ConfigError, match=r"doubt_alarm_p must be in \[0, 1\]"):
            runtime.RuntimeConfig().with_overrides(doubt_alarm_p=bad)
    for bad in (-1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(runtime.ConfigError, match="watch_threshold must be 0"):
            runtime.RuntimeConfig().with_overrides(watch_threshold=bad)
    for bad in (1.0, 0.5, float("nan"), "2"):
        with pytest.raises(runtime.ConfigError, match="watch_factor must be above 1"):
            runtime.RuntimeConfig().with_overrides(watch_factor=bad)
    assert runtime.RuntimeConfig().with_overrides(watch_threshold=0).drift.watch_threshold == 0


def test_a_miss_overhead_cap_holds_for_every_state_served(teacher_artifact, traffic, monkeypatch):
    """With ``max_miss_overhead`` the enabled heads never cost a row that misses them all more
    than the cap. Latency is pinned (every stage 1 ms, every head 0.04 of the backbone), so a
    5% cap allows exactly one exit on at a time."""
    import runtime.core

    def pinned(stages, heads, *args, **kwargs):
        return (torch.ones(len(stages), dtype=torch.float64),
                torch.full((len(heads),), 0.04 * len(stages), dtype=torch.float64))
    monkeypatch.setattr(runtime.core, "profile", pinned)
    rt = runtime.load(teacher_artifact, background=False, max_miss_overhead=0.05,
                      backend="torchscript", **STABLE)
    assert rt.costs.miss_share is None   # measured per exit only in the onnxruntime backend
    seen = set()
    for i in range(0, len(traffic[0]), BATCH):
        rt.predict(traffic[0][i:i + BATCH])
        seen.add(rt.state.enabled_key)
    assert {sum(key) for key in seen} == {0, 1}
    assert all(rt.costs.miss_overhead(key) <= 0.05 for key in seen)
    rt.close()
    pytest.importorskip("onnxruntime")
    measured = runtime.load(teacher_artifact, background=False, max_miss_overhead=0.05,
                            backend="onnxruntime", **STABLE)
    assert len(measured.costs.miss_share) == measured.num_exits
    measured.close()
    uncapped = runtime.load(teacher_artifact, background=False, backend="onnxruntime", **STABLE)
    assert uncapped.costs.miss_share is None   # no cap, FLOPs only: nothing extra measured
    uncapped.close()
    weighted = runtime.load(teacher_artifact, background=False, backend="onnxruntime",
                            latency_weight=1.0)   # heads priced at what rows pay
    assert len(weighted.costs.miss_share) == weighted.num_exits
    assert torch.allclose(weighted.costs.head_cost,
                          torch.tensor(weighted.costs.miss_share, dtype=torch.float64))
    weighted.close()


def test_unset_latency_weight_follows_the_mode_and_the_backend(teacher_artifact):
    """Unset, time weighs fully in background mode on onnxruntime (heads priced at what a
    passing row pays), half on TorchScript, not at all in synchronous mode (deterministic);
    a weight that is set wins everywhere."""
    pytest.importorskip("onnxruntime")
    for background, backend, setting, want in ((False, "onnxruntime", None, 0.0),
                                               (True, "onnxruntime", None, 1.0),
                                               (True, "torchscript", None, 0.5),
                                               (True, "onnxruntime", 0.25, 0.25)):
        rt = runtime.load(teacher_artifact, background=background, backend=backend,
                          latency_weight=setting)
        try:
            assert rt.costs.latency_weight == want, (background, backend, setting)
        finally:
            rt.close()


def test_saved_artifact_meets_the_full_budget_without_shadow_rows(teacher_artifact, traffic,
                                                                   tmp_path, monkeypatch):
    """Served live, exits may agree a little less than the budget (shadow rows make up the rest);
    a saved artifact has no shadow rows, so its thresholds are re-chosen for the full budget."""
    from runtime.buffer import CALIB
    from runtime.calibrate import evaluate

    rt = runtime.load(teacher_artifact, background=False, shadow_rate=0.2, **STABLE)
    stream(rt, traffic[0])
    assert any(rt.stats()["enabled"])
    rt.save(tmp_path / "s.pt")
    module = jit_load(tmp_path / "s.pt")
    saved = [float(getattr(module.blocks, str(e)).threshold) if
             bool(getattr(module.blocks, str(e)).enabled) else INF for e in range(rt.num_exits)]
    recorded = artifact.read_manifest(tmp_path / "s.pt")["runtime"]["thresholds"]
    assert [INF if t is None else pytest.approx(t) for t in recorded] == saved

    feats, teacher = rt.buffer.snapshot(CALIB)
    target = teacher.argmax(1)
    with torch.no_grad():
        probs = [torch.softmax(rt._state.classifiers[e](feats[e]), 1) for e in range(rt.num_exits)]
    conf = torch.stack([p.amax(1) for p in probs]).double()
    agree = torch.stack([p.argmax(1) == target for p in probs])
    n = teacher.shape[0]
    _, ok_saved = evaluate(conf, agree, rt.stage_cost, rt.head_cost, saved)
    _, ok_live = evaluate(conf, agree, rt.stage_cost, rt.head_cost, rt._state.thresholds)
    # Whatever the rule (its own bound is on its own split of these rows), the saved exits keep
    # the full budget on them, the live ones the shadow-adjusted one.
    assert ok_saved / n >= rt.config.guarantee.agreement_budget
    assert ok_live / n >= rt.config.guarantee.plan_budget
    assert rt.config.guarantee.plan_budget < rt.config.guarantee.agreement_budget
    # exits that at the full budget would save no more than min_saving are saved off
    from runtime.learning import LearningLoop
    monkeypatch.setattr(LearningLoop, "min_saving", property(lambda self: 0.99))
    rt.save(tmp_path / "off.pt")
    assert artifact.read_manifest(tmp_path / "off.pt")["runtime"]["thresholds"] == \
        [None] * rt.num_exits


def test_save_is_atomic(learned, tmp_path, monkeypatch):
    rt, _ = learned
    path = tmp_path / "model.cached.pt"
    path.write_bytes(b"the old artifact")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        rt.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == b"the old artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.cached.pt"]
    rt.save(path)  # and without the failure it is replaced
    assert artifact.read_manifest(path)["runtime"]["learned"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.cached.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_save_gives_the_file_the_users_mode_and_syncs_the_folder(learned, tmp_path, monkeypatch,
                                                                   umask):
    rt, _ = learned
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") or
                      os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    old = os.umask(umask)
    try:
        rt.save(tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert synced.count(True) >= 1 and synced.count(False) >= 1  # the file, then the folder


# ----- bad input ------------------------------------------------------------------------------

BAD_INPUTS = {
    "wrong_shape": (lambda x: x[:, :, :13, :13], "shape"),
    "no_batch_dim": (lambda x: x[0], "shape"),
    "int_dtype": (lambda x: (x * 10).long(), "floating"),
    "empty_batch": (lambda x: x[:0], "empty"),
    "nan": (lambda x: x.clone().index_fill_(0, torch.tensor([2]), float("nan")), "NaN"),
    "inf": (lambda x: torch.cat([x[:1], x[1:2] * float("inf")]), "Inf"),
    "neg_inf_one_pixel": (lambda x: x.clone().index_put_((torch.tensor([1]), torch.tensor([0]),
                                                          torch.tensor([3]), torch.tensor([3])),
                                                         torch.tensor(float("-inf"))), "Inf"),
    "list": (lambda x: x.tolist(), "Tensor"),
    "numpy": (lambda x: x.numpy(), "Tensor"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_refused_without_poisoning(learned, traffic, kind):
    _, path = learned
    rt = runtime.load(path, background=False, train_every=1)  # would learn on any buffered row
    make, words = BAD_INPUTS[kind]
    before = (rt.buffer.size, rt.buffer.added, rt._state.thresholds, head_weights(rt),
              untimed(rt.stats()))
    with pytest.raises(runtime.InputError) as info:
        rt.predict(make(traffic[1][:5].clone()))
    msg = str(info.value)
    assert words in msg and "\n" not in msg
    after = (rt.buffer.size, rt.buffer.added, rt._state.thresholds, head_weights(rt),
             untimed(rt.stats()))
    assert before[:3] == after[:3]
    for a, b in zip(before[3], after[3]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert before[4] == after[4]
    # Still serves good input afterwards.
    assert rt.predict(traffic[1][:4]).shape == (4, 10)


# ----- drift ----------------------------------------------------------------------------------

def test_drift_switches_exits_off(teacher_artifact, traffic):
    rt = runtime.load(teacher_artifact, background=False, shadow_rate=0.5, **STABLE)
    normal = traffic[0]
    for i in range(0, len(normal), BATCH):  # in-distribution traffic until the exits are on
        rt.predict(normal[i:i + BATCH])
        if any(rt.stats()["enabled"]):
            break
    s = rt.stats()
    assert any(s["enabled"]), "exits must be on before the traffic changes"
    events = s["drift_events"]
    drifted = -traffic[1]  # inverted images: the heads are confidently wrong about them
    clear, cleared = rt.buffer.clear, []

    def clear_seen_by_rounds():   # a round reading the new generation must find no old rows
        cleared.append((rt._lock.locked(), rt._generation))
        clear()
    rt.buffer.clear = clear_seen_by_rounds
    for i in range(0, len(drifted), BATCH):
        rt.predict(drifted[i:i + BATCH])
        s = rt.stats()
        if s["drift_events"] > events:
            break
    else:
        pytest.fail(f"no drift detected; live agreement {s['live_agreement']}")
    assert cleared == [(True, 1)], "old rows dropped in the same step as the generation bump"
    assert s["enabled"] == [False] * rt.num_exits  # switched off right then
    assert s["thresholds"] == [None] * rt.num_exits
    assert s["learning"]["buffer_rows"] == 0  # old traffic forgotten
    assert s["design_effect"] == 1.0 and not rt.design._window   # read afresh
    _, exits = rt.predict(drifted[:BATCH], return_exits=True)
    assert (exits == rt.num_exits).all()
    # Relearning on the new traffic: rounds go on, on features standardised afresh.
    rounds = s["learning"]["rounds"]
    again = torch.cat([drifted, drifted.flip(0)])  # enough new rows for a round to train
    for i in range(0, len(again), BATCH):
        rt.predict(again[i:i + BATCH])
    after = rt.stats()["learning"]
    assert after["rounds"] > rounds
    assert after["buffer_rows"] > 0


# ----- loading errors -------------------------------------------------------------------------

def test_other_format_version_is_refused(teacher_artifact, tmp_path):
    module, manifest = artifact.load(teacher_artifact)
    manifest["format_version"] = 999
    path = tmp_path / "future.cached.pt"
    artifact.save(module, manifest, path)
    with pytest.raises(ArtifactVersionError) as info:
        runtime.load(path, background=False)
    msg = str(info.value)
    assert "999" in msg and str(artifact.FORMAT_VERSION) in msg and "compiler.rewrite" in msg


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        runtime.load(tmp_path / "nope.cached.pt", background=False)


def test_not_an_artifact(tmp_path):
    path = tmp_path / "junk.cached.pt"
    path.write_bytes(b"\x00junk" * 100)
    with pytest.raises(ArtifactError, match="corrupt|not a layer-cache artifact"):
        runtime.load(path, background=False)
    plain = tmp_path / "plain.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    with pytest.raises(ArtifactError, match="not a layer-cache artifact"):
        runtime.load(plain, background=False)


def test_scripted_fast_path_serves_like_the_staged_path(teacher_artifact, traffic):
    import dataclasses

    rt = runtime.load(teacher_artifact, background=False, shadow_rate=0.0, fast_after=0,
                      collect_rate=0.0, backend="torchscript", **STABLE)
    stream(rt, traffic[0])
    state = rt._state
    assert any(t != float("inf") for t in state.thresholds), "exits must be on"
    assert state.fast is not None  # shadow-free requests now run the scripted model whole
    held = traffic[1][:300]
    fast_out, fast_exits = rt.predict(held, return_exits=True)
    rt._state = dataclasses.replace(state, fast=None)  # the staged Python path, same exits
    slow_out, slow_exits = rt.predict(held, return_exits=True)
    assert torch.equal(fast_exits, slow_exits)
    assert (fast_exits < rt.num_exits).any()
    torch.testing.assert_close(fast_out, slow_out, atol=1e-5, rtol=1e-5)


def test_a_state_an_onnxruntime_plan_serves_whole_is_not_also_scripted(teacher_artifact,
                                                                       traffic):
    """``_whole_paths``: where the onnxruntime plan serves a state whole, the scripted whole
    model (which would never run, and whose build holds the GIL) is not built; where no plan
    is built, it is."""
    pytest.importorskip("onnxruntime")
    rt = runtime.load(teacher_artifact, background=False, fast_after=0, backend="onnxruntime",
                      **STABLE)
    stream(rt, traffic[0])
    state = rt._state
    assert any(t != float("inf") for t in state.thresholds), "exits must be on"
    assert state.fast is None and state.compiled is not None and state.compiled.whole
    assert state.servable_whole
    rt._compile = lambda *args: None            # no plan: the scripted model serves whole
    fast, compiled = rt._whole_paths(state.classifiers, state.thresholds, True)
    assert compiled is None and fast is not None
    assert rt._whole_paths(state.classifiers, state.thresholds, False) == (None, None)
    rt.close()


@pytest.mark.parametrize("collect_rate", [0.0, 1.0])
def test_heads_keep_learning_once_the_fast_path_is_on(teacher_artifact, traffic, collect_rate):
    """With collect_rate > 0 rows reaching the backbone keep being buffered for training."""
    from runtime.buffer import TRAIN

    rt = runtime.load(teacher_artifact, background=False, shadow_rate=0.0, fast_after=0,
                      collect_rate=collect_rate, train_every=10 ** 9, **STABLE)
    stream(rt, traffic[0][:3000])  # 600+ held-out rows after the warm-up and hold-out gaps
    rt.learn()
    assert rt._state.servable_whole, "exits and the whole-model path must be on"
    before = rt.buffer.snapshot(TRAIN)[1].shape[0]
    _, exits = stream(rt, traffic[1][:1000])
    after = rt.buffer.snapshot(TRAIN)[1].shape[0]
    reached = int((exits == rt.num_exits).sum())
    assert reached > 0
    assert after - before == (reached if collect_rate == 1.0 else 0)


def test_before_exits_are_on_requests_that_do_not_teach_run_the_bare_backbone(
        teacher_artifact, traffic, reference):
    """``warmup_collect_rate``: the other requests get the backbone's answer without the
    exits' features, and only the teaching share reaches the buffer."""
    rt = runtime.load(teacher_artifact, background=False, warmup_collect_rate=0.3,
                      train_every=10 ** 9, **STABLE)
    x = traffic[0][:2000]
    out, exits = stream(rt, x, batch=10)
    assert torch.allclose(out, reference(x), atol=1e-4)
    assert bool((exits == rt.num_exits).all())
    kept = rt.buffer.size
    assert 0.2 * len(x) < kept < 0.4 * len(x)
    rt.close()


def test_while_no_exit_would_pay_fewer_requests_teach_and_rounds_space_out(
        teacher_artifact, traffic, reference, monkeypatch):
    """``idle_collect_rate``: heads priced as slow as the whole backbone pay on no row even at
    the held-out point estimate, so after the first round that can tell, only that share of
    requests teaches and rounds come 1/share times further apart (here after one such round:
    ``idle_rounds=1``); a round that finds an exit would pay restores the full warmup share."""
    import runtime.core

    def pinned(stages, heads, *args, **kwargs):   # every head costs a whole backbone
        return (torch.ones(len(stages), dtype=torch.float64),
                torch.full((len(heads),), float(len(stages)), dtype=torch.float64))
    monkeypatch.setattr(runtime.core, "profile", pinned)
    rt = runtime.load(teacher_artifact, background=False, backend="torchscript",
                      latency_weight=1.0, train_every=500, min_train=500, min_calib=250,
                      idle_collect_rate=0.25, idle_rounds=1)
    x = traffic[0]
    stream(rt, x[:1000], batch=10)        # too few rows for a round yet: every request teaches
    full = rt.buffer.size / 1000          # rows kept per row served at the full share
    out, exits = stream(rt, x[1000:2000], batch=10)
    learning = rt.stats()["learning"]
    assert learning["rounds"] >= 1 and learning["warmup_share"] == 0.25
    assert learning["promise"] <= 0.0    # no row pays for a head that costs a whole backbone
    assert bool((exits == rt.num_exits).all())
    assert torch.allclose(out, reference(x[1000:2000]), atol=1e-4)
    rounds, kept = learning["rounds"], rt.buffer.size
    out, _ = stream(rt, x[2000:3900], batch=10)
    assert torch.allclose(out, reference(x[2000:3900]), atol=1e-4)
    assert 0.15 * full < (rt.buffer.size - kept) / 1900 < 0.4 * full
    assert rt.stats()["learning"]["rounds"] - rounds <= 1    # 500 rows apart: 3 more rounds
    rt.loop.promise = lambda *args, **kwargs: 0.2             # now the exits would pay
    rt.learn()
    assert rt.stats()["learning"]["warmup_share"] == 1.0
    rt.close()


def test_a_plan_that_saves_too_little_switches_no_exit_on(teacher_artifact, traffic, reference):
    """``min_saving``: a round whose certified plan saves no more serves every exit off (the
    backbone's answers), while its point estimate still says what the exits would save. The
    default is 0 for a FLOPs-only cost model (exact) and 0.05 for one with measured time."""
    rt = runtime.load(teacher_artifact, background=False, min_saving=0.9, **STABLE)
    x = traffic[0]
    out, exits = stream(rt, x)
    st = rt.stats()
    assert st["learning"]["rounds"] >= 1 and not any(st["enabled"])
    assert 0.0 < st["learning"]["promise"] < 0.9
    assert st["learning"]["warmup_share"] == 1.0     # FLOPs only: idle only where none pays
    assert bool((exits == rt.num_exits).all())
    assert torch.allclose(out, reference(x), atol=1e-4)
    assert rt.loop.min_saving == 0.9 and rt.loop.idle_below == 0.0
    rt.close()
    for weight, saving, idle in ((0.0, 0.0, 0.0), (1.0, 0.05, 0.10)):
        rt = runtime.load(teacher_artifact, background=False, latency_weight=weight)
        assert (rt.loop.min_saving, rt.loop.idle_below) == (saving, idle), weight
        rt.close()


def test_a_cap_no_exit_fits_serves_the_backbone_and_teaches_nothing(teacher_artifact, traffic,
                                                                     reference, monkeypatch,
                                                                     caplog):
    """Under a ``max_miss_overhead`` below every exit's cost no exit can ever switch on, so no
    request pays the teaching path: the backbone answers, the buffer stays empty, a warning
    says so once and ``stats()`` reports it."""
    import runtime.core

    def pinned(stages, heads, *args, **kwargs):
        return (torch.ones(len(stages), dtype=torch.float64),
                torch.full((len(heads),), 0.04 * len(stages), dtype=torch.float64))
    monkeypatch.setattr(runtime.core, "profile", pinned)
    with caplog.at_level("WARNING", logger="layer_cache.runtime"):
        rt = runtime.load(teacher_artifact, background=False, max_miss_overhead=0.01,
                          backend="torchscript", **STABLE)
    assert sum("allows no exit" in r.getMessage() for r in caplog.records) == 1
    x = traffic[0][:1500]
    out, exits = stream(rt, x)
    assert torch.allclose(out, reference(x), atol=1e-4)
    assert bool((exits == rt.num_exits).all())
    assert rt.buffer.size == 0 and rt.stats()["exits_possible"] is False
    rt.close()


def test_a_saved_artifact_carries_its_exit_shares_and_a_load_that_prices_time_keeps_what_pays(
        learned, tmp_path, monkeypatch):
    """``save`` writes the share of held-out rows leaving at each exit under the saved
    thresholds. A runtime that prices time in (onnxruntime, ``latency_weight``) serves the
    prefix of those exits that pays by them; by FLOPs it serves them as saved."""
    from runtime.backends import OnnxRuntimeBackend
    rt, path = learned
    module, manifest = artifact.load(path)
    saved = manifest["runtime"]
    shares = saved["exit_shares"]
    assert len(shares) == rt.num_exits + 1 and abs(sum(shares) - 1) < 1e-6
    on = [t is not None for t in saved["thresholds"]]
    assert any(on) and all(s == 0 for s, o in zip(shares, on) if not o)
    again = runtime.load(path, background=False, **STABLE)
    as_saved = again.state.thresholds
    assert again.state.enabled_key == tuple(on)
    again.close()
    # the same artifact where no row left at any exit: every exit costs passing rows time
    manifest["runtime"]["exit_shares"] = [0.0] * rt.num_exits + [1.0]
    edited = tmp_path / "no_exit_pays.cached.pt"
    artifact.save(module, manifest, edited)
    monkeypatch.setattr(OnnxRuntimeBackend, "miss_profile",   # the clock, held still
                        lambda self, classifiers, reps=15: torch.full((rt.num_exits,), 0.03,
                                                                      dtype=torch.float64))
    timed = runtime.load(edited, background=False, backend="onnxruntime", latency_weight=1.0)
    assert not timed.state.any_enabled
    again = runtime.load(edited, background=False, backend="onnxruntime", **STABLE)
    assert again.state.thresholds == as_saved
    timed.close()
    again.close()


@pytest.mark.parametrize("with_shares,within", [(True, 1500), (False, 3000)])
def test_a_loaded_artifact_is_watched_for_drift_from_its_first_request(
        learned, fashion_small, tmp_path, with_shares, within):
    """A loaded artifact's next round may be tens of thousands of rows away (once exits are on,
    only shadow rows calibrate), so its exits are watched from the first request: against the
    exit shares its save measured, and by its shadow rows where it has none (an older artifact).
    Inverted images switch its exits off; before, nothing watched them until a round."""
    _, path = learned
    if not with_shares:
        module, manifest = artifact.load(path)
        manifest["runtime"].pop("exit_shares")
        path = tmp_path / "no_shares.cached.pt"
        artifact.save(module, manifest, path)
    xtr = fashion_small[0]
    rt = runtime.load(path, background=False, **STABLE)
    assert rt.state.any_enabled
    shifted = -xtr[35000:35000 + within]
    for i in range(0, len(shifted), BATCH):
        rt.predict(shifted[i:i + BATCH])
        if rt.stats()["drift_events"]:
            break
    else:
        pytest.fail(f"inverted images not caught within {within} rows")
    assert not rt.state.any_enabled
    rt.close()


@pytest.mark.parametrize("after_drift, relearns", [(250, True), (1000, False)])
def test_after_a_drift_alarm_the_heads_go_on_from_what_they_learned(learned, fashion_small,
                                                                    after_drift, relearns):
    """After an alarm the heads keep their weights, so the new traffic's first round needs only
    ``min_train_after_drift`` training rows, not the cold start's ``min_train`` (1,000): within
    2,000 shifted rows (about 700 of them training rows, the rest held out) a round runs.
    With the cold start's count, none does, and the exits stayed off some 3,000 rows."""
    _, path = learned
    rt = runtime.load(path, background=False, min_train_after_drift=after_drift, **STABLE)
    assert rt.config.learning.min_train == 1000 and rt.state.any_enabled
    shifted = -fashion_small[0][35000:41000]
    i = 0
    while not rt.stats()["drift_events"]:
        assert i < 2000, "inverted images not caught within 2,000 rows"
        rt.predict(shifted[i:i + BATCH])
        i += BATCH
    rounds = rt.stats()["learning"]["rounds"]
    stream(rt, shifted[i:i + 2000])
    assert rt.stats()["drift_events"] == 1
    assert (rt.stats()["learning"]["rounds"] > rounds) == relearns
    assert rt.state.generation == 1
    rt.close()
