"""Runtime integrity: no request or setting can silently corrupt what the cache serves or learns.

Each hostile case is checked the same way: the request gets a clear error or the backbone's own
answer, and the learned state afterwards is exactly the one a run without that request reaches
(same thresholds, same head weights), so exits still switch on with clean traffic.
"""
from __future__ import annotations

import pytest
import torch

import runtime
from runtime.buffer import FeatureBuffer
from runtime.core import InputError

STABLE = {"latency_weight": 0.0, "backend": "torchscript"}
ROWS = 3000
BATCH = 50


@pytest.fixture(scope="module")
def clean(fashion_small):
    xtr, _, _, _ = fashion_small
    return xtr[6000:6000 + ROWS]


@pytest.fixture(scope="module")
def reference(teacher_artifact):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(teacher_artifact)).eval()


def _serve(rt, x, hostile=None, at=None):
    """Stream ``x``; the ``hostile`` callable is called once, before batch ``at``."""
    for k, i in enumerate(range(0, len(x), BATCH)):
        if hostile is not None and k == at:
            hostile(rt)
        rt.predict(x[i:i + BATCH])


def _learned(rt):
    s = rt._state
    return s.thresholds, [{k: v.clone() for k, v in c.state_dict().items()} for c in s.classifiers]


def _assert_same_state(a, b):
    assert a[0] == b[0], "thresholds differ"
    for ca, cb in zip(a[1], b[1]):
        for k in ca:
            assert torch.equal(ca[k], cb[k]), f"head weights differ ({k})"


@pytest.fixture(scope="module")
def baseline(teacher_artifact, clean):
    rt = runtime.load(teacher_artifact, background=False, **STABLE)
    _serve(rt, clean)
    state = _learned(rt)
    assert any(t != float("inf") for t in state[0]), "clean traffic must switch an exit on"
    return state


def _scaled(factor):
    def send(rt):
        x = torch.randn(16, *rt.input_shape, generator=torch.Generator().manual_seed(1)) * factor
        out = rt.predict(x)
        assert torch.isfinite(out).all() or factor > 1e30
    return send


@pytest.mark.parametrize("at", [0, 20, 45])   # first request (warm-up), before and after exits
@pytest.mark.parametrize("factor", [1e5, 1e30])
def test_far_out_of_range_rows_are_answered_by_the_backbone_and_never_learned(
        teacher_artifact, clean, baseline, reference, at, factor):
    """The reported case: 16 finite rows scaled by 1e5 once disabled learning for good."""
    seen = {}

    def hostile(rt):
        x = torch.randn(16, *rt.input_shape, generator=torch.Generator().manual_seed(1)) * factor
        out, exits = rt.predict(x, return_exits=True)
        seen["exits"], seen["out"], seen["x"] = exits, out, x

    rt = runtime.load(teacher_artifact, background=False, **STABLE)
    _serve(rt, clean, hostile, at)
    assert (seen["exits"] == rt.num_exits).all(), "the backbone must answer every such row"
    torch.testing.assert_close(seen["out"], reference(seen["x"]), equal_nan=True)
    st = rt.stats()
    assert st["learning"]["rounds_nonfinite"] == 0
    assert st["learning"]["buffer_rows_rejected"] == 0
    if at == 0:
        # nothing seen yet to judge against: served as is, but the warm-up never learns, and
        # the warm-up it used up shifts which clean rows are learned, so the state differs
        assert st["guard"]["rows_outside"] == 0
        assert any(t != float("inf") for t in rt._state.thresholds), "exits must still switch on"
    else:
        assert st["guard"]["rows_outside"] == 16
        _assert_same_state(_learned(rt), baseline)


def test_rows_inside_the_range_are_served_by_the_exits(teacher_artifact, clean):
    """The guard must not send ordinary traffic to the backbone: a 3x brighter row is inside."""
    rt = runtime.load(teacher_artifact, background=False, **STABLE)
    _serve(rt, clean)
    _, exits = rt.predict(clean[:500] * 3, return_exits=True)
    assert rt.stats()["guard"]["rows_outside"] == 0
    assert (exits < rt.num_exits).any()


def test_a_lasting_change_of_scale_becomes_the_new_normal(teacher_artifact, clean):
    rt = runtime.load(teacher_artifact, background=False, range_window_rows=256, **STABLE)
    _serve(rt, clean[:500])
    _serve(rt, clean[:600] * 50)
    before = rt.stats()["guard"]["rows_outside"]
    assert before > 0
    rt.predict(clean[600:700] * 50)
    assert rt.stats()["guard"]["rows_outside"] == before, "50x is the normal scale by now"


def test_values_past_float32_range_are_refused(teacher_artifact):
    rt = runtime.load(teacher_artifact, background=False, **STABLE)
    x = torch.zeros(3, *rt.input_shape, dtype=torch.float64)
    x[2, 0, 0, 0] = 1e300
    with pytest.raises(InputError, match=r"rows \[2\] contain NaN, Inf or values beyond"):
        rt.predict(x)
    assert rt.stats()["rows"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_the_guard_judges_every_float_dtype_alike(dtype, rows):
    """numpy's reductions judge CPU batches numpy can view, torch's the rest (bfloat16, a batch
    that needs grad): both name the same bad rows and record the same scales."""
    from runtime.config import GuardConfig
    from runtime.guard import InputGuard
    x = torch.linspace(-3, 2, rows * 12).reshape(rows, 3, 2, 2).to(dtype)
    x[-1, 0, 0, 0] = -4.0          # a row's scale from its minimum
    verdicts = []
    for batch in (x, x.clone().requires_grad_(True)):   # numpy's path, torch's path
        guard = InputGuard(GuardConfig(range_warmup_rows=1))
        assert guard.judge(batch).finite
        verdicts.append(list(guard._scales))
        bad = batch.detach().clone()
        bad[-1, 1, 1, 1] = float("nan")
        if rows > 1:
            bad[0, 2, 0, 0] = float("inf")
        v = guard.judge(bad)
        assert not v.finite and v.bad_rows == ((0, rows - 1) if rows > 1 else (0,))
        assert list(guard._scales) == verdicts[-1], "a refused batch records nothing"
    assert verdicts[0] == verdicts[1]
    assert verdicts[0][-1] == 4.0


def test_a_saved_cache_judges_its_first_request(teacher_artifact, clean, tmp_path):
    rt = runtime.load(teacher_artifact, background=False, **STABLE)
    _serve(rt, clean)
    rt.save(tmp_path / "learned.pt")
    again = runtime.load(tmp_path / "learned.pt", background=False, **STABLE)
    _, exits = again.predict(clean[:8] * 1e4, return_exits=True)
    assert (exits == again.num_exits).all()
    assert again.stats()["guard"]["rows_outside"] == 8


def test_buffer_drops_rows_that_would_overflow_float16():
    buf = FeatureBuffer([4, 3], num_classes=2, memory_mb=1)
    feats = [torch.ones(5, 4), torch.ones(5, 3)]
    feats[0][1, 2] = 1e6
    feats[1][3, 0] = float("nan")
    teacher = torch.zeros(5, 2)
    teacher[4, 1] = float("inf")
    buf.add(feats, teacher, torch.zeros(5, dtype=torch.long))
    assert buf.size == 2 and buf.rows_rejected == 3
    f, t = buf.snapshot(0)
    assert all(torch.isfinite(x).all() for x in f) and torch.isfinite(t).all()


def test_a_round_whose_heads_come_out_non_finite_is_discarded(teacher_artifact, clean, caplog,
                                                              monkeypatch):
    """The buffer refuses what would overflow, so this needs rows slipped past it: the round's
    standardisation overflows, the round is dropped, logged and counted, serving unchanged."""
    from runtime.buffer import TRAIN
    rt = runtime.load(teacher_artifact, background=False, train_every=10 ** 9, **STABLE)
    _serve(rt, clean)
    rt.learn()
    before = _learned(rt)
    weights = [{k: v.clone() for k, v in m.state_dict().items()} for m in rt.learner.models]
    assert any(t != float("inf") for t in before[0])
    rt.learner.reset_normalisation()
    real = rt.buffer.snapshot

    def slipped(role, limit=0):
        feats, teacher = real(role, limit)
        if role == TRAIN:
            feats[0][:5] = 3e38
        return feats, teacher

    monkeypatch.setattr(rt.buffer, "snapshot", slipped)
    with caplog.at_level("WARNING", logger="layer_cache.runtime"):
        assert rt.learn() is False
    st = rt.stats()["learning"]
    assert st["rounds_nonfinite"] == 1 and "non-finite" in st["last_error"]
    assert "learning round discarded" in caplog.text
    _assert_same_state(_learned(rt), before)
    for m, w in zip(rt.learner.models, weights):   # the learner keeps what it had, too
        assert all(torch.equal(v, w[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("setting, value, message", [
    ("lr", float("nan"), "lr must be a finite number above 0"),
    ("lr", 0.0, "lr must be a finite number above 0"),
    ("lr", 1e38, "lr must be at most 1"),
    ("weight_decay", -1e-4, "weight_decay must be a finite number at least 0"),
    ("buffer_mb", float("inf"), "buffer_mb must be a finite number above 0"),
    ("calib_share", 1.0, "calib_share must be above 0 and below 1"),
    ("calib_share", float("nan"), "calib_share must be above 0 and below 1"),
    ("deferred_mb", 0.0, "deferred_mb must be a finite number above 0"),
    ("idle_collect_rate", 0.0, "idle_collect_rate must be above 0"),
    ("idle_below", 1.0, r"idle_below must be None \(the default for the cost model\) or a share"),
    ("min_saving", -0.1, r"min_saving must be None \(the default for the cost model\) or a share"),
    ("idle_rounds", 0, "idle_rounds must be a whole number of rounds, at least 1"),
    ("gil_switch_ms", 0.0, "gil_switch_ms must be None"),
    ("settle_every", 0, "settle_every must be None"),
    ("settle_every", True, "settle_every must be None"),
    ("idle_collect_rate", float("nan"), r"idle_collect_rate must be in \[0, 1\]"),
    ("range_factor", 1.0, "range_factor must be a finite number above 1"),
    ("range_factor", float("nan"), "range_factor must be a finite number above 1"),
    ("range_window_rows", 0, "range_window_rows must be at least 1"),
])
def test_settings_that_would_corrupt_learning_are_refused(teacher_artifact, setting, value, message):
    with pytest.raises(runtime.ConfigError, match=message):
        runtime.load(teacher_artifact, background=False, **{setting: value})
