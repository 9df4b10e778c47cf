"""Deferred teaching (runtime/teaching.py) and the teacher yielding to requests (pacing.py)."""
import gc
import threading
import time

import pytest
import torch
from conftest import live_threads, wait_for

import runtime
from runtime.buffer import CALIB, TRAIN
from runtime.pacing import InFlight

BATCH = 16


def teacher_threads():
    return live_threads("layer-cache-teacher")


@pytest.fixture(scope="module")
def backbone_logits(teacher_artifact):
    """The artifact with its exits off, as plain TorchScript: the backbone's answer."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(teacher_artifact)).eval()
    return lambda x: module(x)


def _rows(fashion_small, n=1200):
    xtr, _, _, _ = fashion_small
    return xtr[7000:7000 + n]


def _serve(rt, x):
    for i in range(0, len(x), BATCH):
        rt.predict(x[i:i + BATCH])


def test_deferred_rows_reach_the_buffer_as_inline_ones_do(teacher_artifact, fashion_small):
    """Before any exit is on, every row teaches: deferred or inline, the same rows are buffered
    (the hold-out clock follows the rows, not the thread), with the same features."""
    x = _rows(fashion_small)
    kw = dict(train_every=10 ** 9, seed=3)
    deferred = runtime.load(teacher_artifact, background=True, **kw)
    inline = runtime.load(teacher_artifact, background=True, deferred=False, **kw)
    try:
        for i in range(0, len(x), BATCH):      # a teacher that keeps up: every request deferred
            deferred.predict(x[i:i + BATCH])
            assert deferred._teacher.drain(30)
        _serve(inline, x)
        a, b = deferred.stats()["learning"], inline.stats()["learning"]
        assert a["deferred_rows_taught"] > len(x) // 2 and a["deferred_rows_dropped"] == 0
        assert b["deferred_rows_taught"] == 0
        assert a["buffer_rows"] == b["buffer_rows"] > 0
        assert a["held_out_rows"] == b["held_out_rows"] > 0
        for role in (TRAIN, CALIB):
            fa, ta = deferred.buffer.snapshot(role)
            fb, tb = inline.buffer.snapshot(role)
            assert torch.allclose(ta, tb, atol=1e-4)
            for a_e, b_e in zip(fa, fb):
                assert torch.allclose(a_e, b_e, atol=1e-2, rtol=1e-2)   # stored as float16
    finally:
        deferred.close()
        inline.close()


def test_caller_reusing_its_tensor_does_not_corrupt_what_is_learned(teacher_artifact,
                                                                    fashion_small):
    x = _rows(fashion_small, 256)
    rt = runtime.load(teacher_artifact, background=True, train_every=10 ** 9)
    try:
        buf = torch.empty(BATCH, *x.shape[1:])
        for i in range(0, len(x), BATCH):
            buf.copy_(x[i:i + BATCH])
            out = rt.predict(buf)
            assert torch.isfinite(out).all()
            buf.fill_(float("nan"))       # the caller reuses its buffer at once
        assert rt._teacher.drain(30)
        s = rt.stats()["learning"]
        assert s["deferred_rows_taught"] > 0 and s["deferred_rows_dropped"] == 0
        assert s["buffer_rows_rejected"] == 0     # no NaN row reached the buffer
        assert s["buffer_rows"] > 0
    finally:
        rt.close()


def test_full_queue_answers_but_does_not_teach(teacher_artifact, fashion_small, backbone_logits):
    x = _rows(fashion_small, 256)
    rt = runtime.load(teacher_artifact, background=True, train_every=10 ** 9,
                      deferred_mb=1e-4)          # smaller than one request
    try:
        for i in range(0, len(x), BATCH):
            out = rt.predict(x[i:i + BATCH])
            assert torch.allclose(out, backbone_logits(x[i:i + BATCH]), atol=1e-4)
        assert rt._teacher.drain(10)
        s = rt.stats()["learning"]
        warm = rt.config.guard.range_warmup_rows     # the guard's warm-up teaches nothing
        assert s["deferred_rows_dropped"] == len(x) - warm
        assert s["deferred_rows_taught"] == 0 and s["buffer_rows"] == 0
    finally:
        rt.close()


def test_rows_served_before_a_drift_alarm_are_not_learned(teacher_artifact, fashion_small):
    x = _rows(fashion_small, 64)
    rt = runtime.load(teacher_artifact, background=True, train_every=10 ** 9)
    try:
        rt._generation += 1                       # as a drift alarm does
        rt._featurize(x, False, len(x), 0)        # an item queued under generation 0
        assert rt.stats()["learning"]["buffer_rows"] == 0
        rt._featurize(x, False, len(x), rt._generation)
        assert rt.stats()["learning"]["buffer_rows"] > 0
    finally:
        rt.close()


def test_synchronous_mode_has_no_teacher_thread(teacher_artifact, fashion_small):
    base = len(teacher_threads())
    rt = runtime.load(teacher_artifact, background=False, train_every=10 ** 9)
    assert rt._teacher is None and len(teacher_threads()) == base
    _serve(rt, _rows(fashion_small, 128))                 # past the guard's warm-up
    assert rt.stats()["learning"]["buffer_rows"] > 0      # taught inline
    assert rt.stats()["learning"]["deferred_rows_taught"] == 0


def test_load_and_del_leave_no_teacher_thread(teacher_artifact):
    base = len(teacher_threads())
    rt = runtime.load(teacher_artifact, background=True)
    assert len(teacher_threads()) == base + 1
    del rt
    gc.collect()
    assert wait_for(lambda: len(teacher_threads()) == base, 2.0), "teacher outlived its runtime"
    with runtime.load(teacher_artifact, background=True):
        assert len(teacher_threads()) == base + 1
    assert wait_for(lambda: len(teacher_threads()) == base, 2.0)


def test_background_work_waits_for_the_request_in_flight():
    gate = InFlight()
    events = []
    gate.__enter__()
    worker = threading.Thread(target=lambda: events.append(("yielded", gate.yield_to_requests(5.0))))
    worker.start()
    time.sleep(0.05)
    events.append(("request done", None))
    gate.__exit__(None, None, None)
    worker.join(5)
    assert events == [("request done", None), ("yielded", True)]
    assert gate.count == 0


def test_background_work_never_stalls_behind_a_busy_service():
    gate = InFlight()
    with gate:                                    # a request that never ends
        assert gate.yield_to_requests(0.01) is False   # the step goes on after max_wait
    assert gate.yield_to_requests(0.0) is True


def test_the_teacher_thread_builds_no_autograd_graph(teacher_artifact, fashion_small):
    """Grad mode is per thread: the teacher's own thread must run the backbone without it."""
    rt = runtime.load(teacher_artifact, background=True, train_every=10 ** 9)
    seen, run = [], rt._run

    def spy(state, x, shadow, collect):
        if threading.current_thread().name == "layer-cache-teacher":
            seen.append(torch.is_grad_enabled())
        return run(state, x, shadow, collect)

    rt._run = spy
    try:
        _serve(rt, _rows(fashion_small, 256))
        assert rt._teacher.drain(30)
        assert seen and not any(seen)
    finally:
        rt.close()


def test_requests_teach_inline_while_the_teacher_is_behind(teacher_artifact, fashion_small):
    """A teacher that cannot keep up (a saturated CPU): requests teach inline meanwhile, so
    learning goes on at the pace it had without the thread."""
    x = _rows(fashion_small, 1024)
    rt = runtime.load(teacher_artifact, background=True, train_every=10 ** 9)
    release, run = threading.Event(), rt._run

    def stuck(state, x, shadow, collect):       # the teacher's thread waits for release
        if threading.current_thread().name == "layer-cache-teacher":
            release.wait(30)
        return run(state, x, shadow, collect)

    rt._run = stuck
    try:
        _serve(rt, x)
        s = rt.stats()["learning"]
        assert rt._teacher.behind
        assert s["buffer_rows"] > 0                   # taught inline while the teacher was stuck
        assert s["deferred_rows_pending"] >= rt._teacher.BATCH_ROWS
        release.set()
        assert rt._teacher.drain(30)
        after = rt.stats()["learning"]
        assert after["deferred_rows_taught"] >= rt._teacher.BATCH_ROWS
        assert after["buffer_rows"] > s["buffer_rows"]
    finally:
        release.set()
        rt.close()


def test_with_exits_on_only_the_rows_that_reached_the_end_are_taught(teacher_artifact,
                                                                     fashion_small,
                                                                     backbone_logits, tmp_path):
    """With exits on, a request hands the teacher the rows that missed every exit, and only
    those: the buffer's training rows are exactly their backbone logits, in order."""
    from compiler import artifact
    x = _rows(fashion_small, 400)
    module, manifest = artifact.load(teacher_artifact)
    first = getattr(module.blocks, "0")
    with torch.no_grad():      # exit 0 on at the median confidence: about half the rows leave
        conf = torch.softmax(first.head(first.stage(x)), 1).amax(1)
    artifact.set_exit(first, float(conf.median()))
    on = tmp_path / "exits_on.cached.pt"
    artifact.save(module, manifest, on)
    rt = runtime.load(on, background=True, train_every=10 ** 9, shadow_rate=0.0,
                      collect_rate=1.0, seed=0)            # every request teaches
    missed = []
    try:
        assert rt.state.any_enabled
        warm = rt.config.guard.range_warmup_rows           # the guard's warm-up teaches nothing
        for i in range(0, len(x), BATCH):
            _, ex = rt.predict(x[i:i + BATCH], return_exits=True)
            if i >= warm:
                missed.append(x[i:i + BATCH][ex == rt.num_exits])
        assert rt._teacher.drain(30)
        missed = torch.cat(missed)
        s = rt.stats()["learning"]
        assert 0 < len(missed) < len(x) - warm, "some rows must exit and some miss"
        assert s["deferred_rows_taught"] == len(missed) == s["buffer_rows"]
        _, teacher = rt.buffer.snapshot(TRAIN)
        assert torch.allclose(teacher, backbone_logits(missed), atol=1e-4)
    finally:
        rt.close()
