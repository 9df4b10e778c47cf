"""The onnxruntime serving backend (runtime/backends.py) answers as the TorchScript path does.

Exits are switched on in the teacher's artifact with thresholds that send about 30% of the
remaining rows out at each exit (untrained heads: the point is routing, not accuracy); then
the runtime with ``backend="onnxruntime"`` and with ``backend="torchscript"`` must give the same
exit for every row and the same logits (to float tolerance), at batch 1 (the plan's one-row
path), odd batches and large ones, and on the requests that learn or are shadowed.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import runtime
from compiler import artifact
from compiler.heads import Pool, StridedPool
from runtime.backends import BackendError, resolve
from runtime.config import ConfigError
from runtime.serving import serve_collected, serve_staged

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

INF = float("inf")
FIXED = {"background": False, "train_every": 10 ** 9, "shadow_rate": 0.0, "collect_rate": 0.0,
         "latency_weight": 0.0}


@pytest.fixture(scope="module")
def rows(fashion_small):
    return fashion_small[2][:600]


@pytest.fixture(scope="module")
def exits_on(teacher_artifact, rows, tmp_path_factory):
    """The teacher's artifact with every exit on at a threshold ~30% of its remaining rows reach."""
    module, manifest = artifact.load(teacher_artifact)
    h = rows[:300]
    with torch.no_grad():
        for i in range(len(manifest["exits"])):
            blk = getattr(module.blocks, str(i))
            h = blk.stage(h)
            conf = torch.softmax(blk.head(h), 1).amax(1)
            thr = float(conf.quantile(0.7)) if len(conf) else 2.0
            artifact.set_exit(blk, thr)
            h = h[conf < thr]
    path = tmp_path_factory.mktemp("backends") / "exits_on.cached.pt"
    artifact.save(module, manifest, path)
    return path


def test_onnxruntime_backend_answers_as_torchscript(exits_on, rows):
    ort_rt = runtime.load(exits_on, backend="onnxruntime", **FIXED)
    ts_rt = runtime.load(exits_on, backend="torchscript", **FIXED)
    assert ort_rt.stats()["backend"] == "onnxruntime" and ort_rt.state.compiled is not None
    assert ts_rt.stats()["backend"] == "torchscript" and ts_rt.state.compiled is None
    taken = torch.zeros(ort_rt.num_exits + 1, dtype=torch.long)
    for batch in (1, 7, 64, 600):
        for s in range(0, min(len(rows), 60 * batch), batch):
            x = rows[s:s + batch]
            out, ex = ort_rt.predict(x, return_exits=True)
            want, want_ex = ts_rt.predict(x, return_exits=True)
            assert torch.equal(ex, want_ex), f"batch {batch}, rows {s}: exits differ"
            torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
            taken += torch.bincount(ex, minlength=ort_rt.num_exits + 1)
    assert (taken > 0).sum() >= 3, f"too few exits taken to test routing: {taken.tolist()}"


@pytest.mark.parametrize("on", ["all", "some", "none"])
def test_requests_that_learn_or_are_shadowed_route_the_same(exits_on, rows, on):
    """``serve_collected`` (onnxruntime: the plan's segments, its shadow session, or the whole
    backbone + every exit's features where no exit is on) against ``serve_staged``
    (TorchScript, stage by stage), plain, collecting and shadow; every exit on, every other
    one, none."""
    import dataclasses
    rt = runtime.load(exits_on, backend="onnxruntime", **FIXED)
    state, x = rt.state, rows[:257]
    if on != "all":
        thr = tuple(t if (on == "some" and e % 2 == 1) else INF
                    for e, t in enumerate(state.thresholds))
        state = dataclasses.replace(state, thresholds=thr,
                                    compiled=rt.backend.compile(state.classifiers, thr))
        assert (state.compiled is None) == (on == "none")
    with torch.no_grad():
        for shadow, collect in ((False, True), (True, True), (True, False), (False, False)):
            got = serve_collected(rt.backend, state, x, shadow, collect)
            want = serve_staged(rt.stages, rt.heads, state, x, shadow, collect)
            assert torch.equal(got.exit_of, want.exit_of)
            torch.testing.assert_close(got.out, want.out, atol=1e-4, rtol=1e-4)
            if shadow:
                assert torch.equal(got.shadow_exit, want.shadow_exit)
                assert torch.equal(got.shadow_ok, want.shadow_ok)
            assert (got.features is None) == (want.features is None)
            if want.features is not None:
                torch.testing.assert_close(got.teacher, want.teacher, atol=1e-4, rtol=1e-4)
                for f, g in zip(got.features, want.features):
                    torch.testing.assert_close(f, g, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode,shape", [
    ("avgmax4x4", (3, 16, 28, 28)), ("avgmax4x4", (3, 32, 14, 14)), ("avgmax3x3", (3, 64, 7, 7)),
    ("avgmax2x2", (3, 128, 4, 4)), ("avgmax2x2", (2, 8, 7, 7)), ("avgmax3x3", (2, 8, 5, 5)),
    ("avgmax4x4", (2, 8, 6, 9)), ("avgmax", (2, 8, 5, 5)), ("tokens", (2, 6, 8)), ("clstokens", (2, 6, 8)),
    ("flat", (2, 5, 3))])
def test_strided_pooling_computes_adaptive_pooling(mode, shape):
    """The backend's pooling equals the heads' adaptive pooling: max exactly, the mean to the
    last bits of float32 (same windows, summed in another order)."""
    h = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    want, got = Pool(mode)(h), StridedPool(mode, shape)(h)
    assert got.shape == want.shape
    half = want.shape[1] // 2 if mode != "flat" else 0
    torch.testing.assert_close(got[:, :half], want[:, :half], atol=1e-6, rtol=1e-6)
    assert torch.equal(got[:, half:], want[:, half:])


def test_bad_backend_settings_say_what_to_do(teacher_artifact, monkeypatch):
    with pytest.raises(ConfigError, match="backend must be 'auto', 'torchscript' or "
                                          "'onnxruntime', got 'tensorrt'"):
        runtime.load(teacher_artifact, backend="tensorrt", background=False)
    with pytest.raises(BackendError, match="CPU only.*backend='torchscript'"):
        resolve("onnxruntime", "cuda")
    assert resolve("auto", "cuda") == "torchscript"

    import runtime.core as core

    def broken(*a, **k):
        raise RuntimeError("operator aten::foo is not supported")
    monkeypatch.setattr(core, "OnnxRuntimeBackend", broken)
    with pytest.raises(BackendError, match="cannot serve .* with onnxruntime: operator aten::foo"
                                           ".*backend='torchscript'"):
        runtime.load(teacher_artifact, backend="onnxruntime", background=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt = runtime.load(teacher_artifact, background=False)   # auto: falls back
    assert rt.stats()["backend"] == "torchscript"


def test_the_miss_path_is_measured_per_exit_against_the_backbone_session(exits_on):
    """``miss_profile``: per exit, the extra share of the backbone's time a row pays when only
    that exit is on and it misses it (what ``max_miss_overhead`` caps)."""
    rt = runtime.load(exits_on, backend="onnxruntime", **FIXED)
    share = rt.backend.miss_profile(list(rt.state.classifiers), reps=3)
    assert share.shape == (rt.num_exits,)
    assert bool(torch.isfinite(share).all()) and bool((share >= 0).all())
    assert float(share.sum()) > 0   # a head and a session boundary are never free
    rt.close()


def test_stage_weights_stay_in_memory_and_leave_with_their_backend(exits_on, rows):
    """Each round composes a plan's graphs from the stages: the stages' weights are held in
    process memory and the graphs only name them (composition then copies no weight bytes,
    in C++ holding the GIL); the sessions still answer as TorchScript does, and a backend's
    weights are freed with it (a service reloading models does not grow)."""
    import gc

    from runtime import backends
    before = set(backends._IN_MEMORY)
    rt = runtime.load(exits_on, backend="onnxruntime", **FIXED)
    mine = set(backends._IN_MEMORY) - before
    weight_bytes = sum(backends._IN_MEMORY[k].nbytes for k in mine)
    assert weight_bytes > 100_000
    assert len(rt.backend._chain(features=False).SerializeToString()) < weight_bytes / 10
    x = rows[:64]
    ts = runtime.load(exits_on, backend="torchscript", **FIXED)
    for batch in (x[:1], x):   # the one-row graph and the batched one, both with exits on
        want, want_exit = ts.predict(batch, return_exits=True)
        got, got_exit = rt.predict(batch, return_exits=True)
        assert torch.equal(got_exit, want_exit)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert rt.state.compiled is not None
    del rt
    gc.collect()
    assert not mine & set(backends._IN_MEMORY), "a dropped backend's weights are still held"


def test_a_plan_builds_the_composed_forms_its_predecessor_served(exits_on, rows):
    """Each composed form of a plan (one row, many rows) costs far more memory than the rest
    of it: a round's plan builds the forms the plan in force served. A form first needed later
    is built on that request, once, and answers as a plan built with both."""
    rt = runtime.load(exits_on, backend="onnxruntime", **FIXED)
    first = rt.state.compiled
    assert first.built == {"one", "many"}    # nothing served yet: both
    for i in range(8):                       # batch-1 traffic
        rt.predict(rows[i:i + 1])
    assert first.used == {"one"}
    st = rt.state
    plan = rt._compile(st.classifiers, st.thresholds, True)
    assert plan.built == {"one"}
    x = rows[:64].numpy()
    got, got_exit = plan.run(x)              # a larger batch: its form is built now
    assert plan.built == {"one", "many"} and plan.used == {"many"}
    want, want_exit = first.run(x)
    assert (got_exit == want_exit).all()
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want))
    rt.close()
