"""The runtime under threads: background learning, drift, save and shutdown while 8 threads serve."""
import gc
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import live_threads, wait_for

import runtime
from runtime.drift import ALARM, Verdict

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
THREADS = 8
# Small rounds so that several happen within a test's traffic.
QUICK = {"train_every": 400, "min_train": 400, "min_calib": 300, "epochs": 2,
         "fast_after": 1500, "latency_weight": 0.0}


def jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).eval()


def learner_threads():
    return live_threads("layer-cache-learner")


@pytest.fixture(scope="module")
def rows(fashion_small):
    xtr, _, _, _ = fashion_small
    return xtr[5000:5000 + 12000]


@pytest.fixture(scope="module")
def backbone(teacher_artifact):
    return jit_load(teacher_artifact)


def test_eight_threads_serve_while_the_learner_trains_publishes_drifts_and_saves(
        teacher_artifact, backbone, rows, tmp_path):
    rt = runtime.load(teacher_artifact, background=True, shadow_rate=0.3, **QUICK)
    E = rt.num_exits
    failures, sent, requests = [], [0] * THREADS, [0] * THREADS
    switch = threading.Event()    # after it, half the threads send drifted rows
    drifted = []                  # inverted rows the exits answer wrongly (set at the switch)
    stop = threading.Event()
    versions = set()

    def client(k):
        gen = torch.Generator().manual_seed(k)
        try:
            while not stop.is_set():
                idx = torch.randint(0, len(rows), (int(torch.randint(1, BATCH + 1, (1,),
                                                                     generator=gen)),),
                                    generator=gen)
                x = rows[idx]
                if switch.is_set() and k % 2 == 0:
                    x = drifted[0][idx % len(drifted[0])]
                out, exits = rt.predict(x, return_exits=True)
                versions.add(rt.state.version)
                sent[k] += len(x)
                requests[k] += 1
                ran = exits == E   # rows the backbone answered must be the backbone's, in order
                if bool(ran.any()):
                    with torch.no_grad():
                        ref = backbone(x[ran])
                    if not torch.allclose(out[ran], ref, atol=1e-4, rtol=1e-4):
                        failures.append(f"thread {k}: backbone rows differ from the backbone")
                if exits.shape != (len(x),) or out.shape[0] != len(x):
                    failures.append(f"thread {k}: {out.shape[0]} answers for {len(x)} rows")
        except Exception as e:  # pragma: no cover - reported below
            failures.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: any(rt.stats()["enabled"]), 120), "no exit switched on"
        saves = []
        for i in range(3):   # save while rounds publish
            p = tmp_path / f"saved{i}.pt"
            rt.save(p)
            saves.append(p)
        # Inverted images are a drift the cache may survive: its exits answer most of them as the
        # backbone does, and a round learned on them can agree again. The drifted traffic is the
        # inverted rows on which the state just saved exits with another answer than the
        # backbone's, so that the alarm (not a lucky round) is what the test waits for.
        # Learning pauses so that the state keeps exiting on them until the alarm.
        rt.pause_learning()
        inverted = -rows
        for _ in range(3):   # a round that had already begun may still publish once
            assert wait_for(lambda: not rt._learn_lock.locked(), 60), "a round never finished"
            version = rt.state.version
            rt.save(tmp_path / "at_switch.pt")
            with torch.no_grad():
                out, exits = jit_load(tmp_path / "at_switch.pt").forward_with_exits(inverted)
                wrong = (exits < E) & (out.argmax(1) != backbone(inverted).argmax(1))
            if rt.state.version == version:
                break
        assert bool(wrong.any()), "no inverted row leaves at an exit with another answer"
        drifted.append(inverted[wrong])
        switch.set()
        assert wait_for(lambda: rt.stats()["drift_events"] >= 1, 60), f"drifted traffic not caught {rt.stats()}"
        rt.resume_learning()
        rt.save(tmp_path / "after_drift.pt")
    except BaseException:
        rt.close()   # a failure here must not leave a learner to the next tests
        raise
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    s = rt.stats()
    assert s["requests"] == sum(requests)
    assert s["rows"] == sum(sent) == sum(s["rows_per_exit"])
    assert s["learning"]["rounds"] >= 1 and s["learning"]["rounds_failed"] == 0
    assert len(versions) >= 2
    for p in saves + [tmp_path / "after_drift.pt"]:  # every save is a whole, runnable artifact
        m = jit_load(p)
        out, exits = m.forward_with_exits(rows[:64])
        assert out.shape == (64, 10) and ((exits >= 0) & (exits <= E)).all()
    t0 = time.perf_counter()
    rt.close()
    assert time.perf_counter() - t0 < 1.5
    assert not wait_for(lambda: bool(learner_threads()), 0) or not any(
        t for t in learner_threads() if t is getattr(rt._thread, "_thread", None))


def _exits_on(rt, rows, limit=8000):
    for i in range(0, limit, BATCH):
        rt.predict(rows[i:i + BATCH])
        if any(rt.stats()["enabled"]):
            return i + BATCH
    pytest.fail("exits never switched on")


def test_a_round_that_began_before_drift_never_re_enables_exits(teacher_artifact, rows,
                                                                  monkeypatch):
    rt = runtime.load(teacher_artifact, background=False, shadow_rate=0.2, **QUICK)
    served = _exits_on(rt, rows)
    real_train = rt.learner.train

    def train_then_drift(*a, **kw):  # drift strikes while this round trains
        real_train(*a, **kw)
        rt._on_drift(rt.state, Verdict(ALARM, reason="injected by the test"))

    monkeypatch.setattr(rt.learner, "train", train_then_drift)
    before = rt.stats()["learning"]
    assert rt.learn() is False
    s = rt.stats()
    assert s["enabled"] == [False] * rt.num_exits
    assert s["learning"]["rounds_discarded"] == before["rounds_discarded"] + 1
    assert s["learning"]["rounds"] == before["rounds"]
    monkeypatch.setattr(rt.learner, "train", real_train)
    # Rounds that start after the drift may switch exits on again, from new traffic only.
    for i in range(served, served + 4000, BATCH):
        rt.predict(rows[i:i + BATCH])
    assert rt.stats()["learning"]["rounds"] > before["rounds"]


def test_background_round_in_flight_during_drift_is_dropped(teacher_artifact, rows, monkeypatch):
    rt = runtime.load(teacher_artifact, background=True, shadow_rate=0.2, **QUICK)
    try:
        assert wait_for(lambda: (rt.predict(rows[:BATCH]) is not None) and
                        any(rt.stats()["enabled"]), 120, step=0)
        entered, release = threading.Event(), threading.Event()
        real_train = rt.learner.train

        def held_train(*a, **kw):
            entered.set()
            release.wait(30)
            return real_train(*a, **kw)

        monkeypatch.setattr(rt.learner, "train", held_train)
        rt._thread.wake.set()
        assert entered.wait(30), "the learner did not start a round"
        # Drift while that round is held: exits off now ...
        rt._on_drift(rt.state, Verdict(ALARM, reason="injected by the test"))
        assert rt.stats()["enabled"] == [False] * rt.num_exits
        release.set()
        # ... and the round, which began before it, must not switch them back on.
        assert wait_for(lambda: rt.stats()["learning"]["rounds_discarded"] == 1, 30)
        assert rt.stats()["enabled"] == [False] * rt.num_exits
    finally:
        rt.close()


def test_a_round_that_raises_leaves_the_previous_state_and_says_so(teacher_artifact, rows,
                                                                    monkeypatch, caplog):
    rt = runtime.load(teacher_artifact, background=False, shadow_rate=0.0, **QUICK)
    served = _exits_on(rt, rows)
    state = rt.state

    def broken(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(rt.learner, "train", broken)
    for i in range(served, served + 2 * QUICK["train_every"], BATCH):
        out = rt.predict(rows[i:i + BATCH])  # rounds fail inside predict; requests are answered
        assert out.shape == (len(rows[i:i + BATCH]), 10)
    s = rt.stats()
    assert s["learning"]["rounds_failed"] >= 1
    assert "disk on fire" in s["learning"]["last_error"]
    assert rt.state is state
    assert "learning round failed" in caplog.text


def test_load_and_del_leave_no_learner_thread(teacher_artifact):
    base = len(learner_threads())
    for _ in range(3):
        rt = runtime.load(teacher_artifact, background=True)
        assert len(learner_threads()) == base + 1
        del rt
        gc.collect()
        assert wait_for(lambda: len(learner_threads()) == base, 2.0), "learner outlived its runtime"
    with runtime.load(teacher_artifact, background=True) as rt:
        assert len(learner_threads()) == base + 1
    assert wait_for(lambda: len(learner_threads()) == base, 1.0)


def _busy(teacher_artifact, rows):
    """A background runtime whose learner is inside a long round."""
    rt = runtime.load(teacher_artifact, background=True, train_every=400, min_train=400,
                      epochs=10000, latency_weight=0.0)
    # Rows reach the buffer through the deferred teacher, so a round woken after 400 rows may
    # find fewer than min_train of them and end at once; the next one is due 400 rows later.
    # Serve (at most the whole fixture, at most 30 s) until a round is under way.
    deadline, i = time.monotonic() + 30, 0
    while not rt._learning and time.monotonic() < deadline and i + BATCH <= len(rows):
        rt.predict(rows[i:i + BATCH])
        i += BATCH
        if i >= 1200:
            time.sleep(0.005)   # the teacher and the learner get the core between requests
    assert wait_for(lambda: rt._learning, 5), \
        f"no round started: {rt.stats()['learning']}, pending {rt._pending}"
    return rt


def test_close_returns_within_a_second_abandoning_the_round(teacher_artifact, rows):
    rt = _busy(teacher_artifact, rows)
    t0 = time.perf_counter()
    rt.close()
    assert time.perf_counter() - t0 < 1.0
    assert not rt._thread.alive
    assert rt.stats()["learning"]["rounds"] == 0      # abandoned, nothing published
    out = rt.predict(rows[:BATCH])                     # serving still works
    assert out.shape == (BATCH, 10)


def test_process_with_a_busy_learner_exits_cleanly(teacher_artifact, tmp_path):
    script = tmp_path / "busy.py"
    script.write_text(f"""
import sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
torch.set_num_threads(1)
import runtime
rt = runtime.load({str(teacher_artifact)!r}, background=True, train_every=200, min_train=200,
                  epochs=10000, latency_weight=0.0)
x = torch.randn(200, 1, 14, 14)
for _ in range(300):
    if rt._learning:
        break
    rt.predict(x)
    time.sleep(0.05)
print("learning" if rt._learning else "idle")
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.stdout.strip() == "learning", proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr


def test_background_mode_lowers_the_gil_switch_interval_and_never_raises_it(teacher_artifact):
    """``gil_switch_ms``: a background runtime shortens the interpreter's GIL switch interval
    (a learner running Python then holds a request at most that long), never lengthens one set
    shorter, and None leaves it alone; synchronous mode never touches it."""
    before = sys.getswitchinterval()
    try:
        for start, setting, background, want in ((0.005, 0.5, True, 0.0005),
                                                 (0.0001, 0.5, True, 0.0001),
                                                 (0.005, None, True, 0.005),
                                                 (0.005, 0.5, False, 0.005)):
            sys.setswitchinterval(start)
            rt = runtime.load(teacher_artifact, background=background, gil_switch_ms=setting)
            try:
                assert sys.getswitchinterval() == pytest.approx(want), (start, setting,
                                                                        background)
            finally:
                rt.close()
    finally:
        sys.setswitchinterval(before)


def test_plain_requests_booked_in_bulk_are_all_counted_under_threads(teacher_artifact, rows):
    """``settle_every``: requests that buffer nothing are booked in bulk. Under 8 threads none
    is lost or booked twice (requests and rows add up), and ``stats()`` books those still
    held."""
    rt = runtime.load(teacher_artifact, background=True, warmup_collect_rate=1e-9,
                      settle_every=16, seed=0)
    per_thread, batch = 37, 3   # 8 x 37 requests: not a multiple of 16, some stay held

    def client(k):
        for i in range(per_thread):
            j = (k * per_thread + i) * batch
            rt.predict(rows[j:j + batch])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = rt.stats()
        assert s["requests"] == THREADS * per_thread
        assert s["rows"] == sum(s["rows_per_exit"]) == THREADS * per_thread * batch
        assert len(rt._held) == 0
        for i in range(5):   # one thread: the bulk path holds them until the 16th or stats()
            rt.predict(rows[i:i + 1])
        assert len(rt._held) == 5 and rt.counters.requests == THREADS * per_thread
        assert rt.stats()["requests"] == THREADS * per_thread + 5
    finally:
        rt.close()


def test_synchronous_mode_books_each_request_at_once(teacher_artifact, rows):
    """In synchronous mode (rounds on the request path, the mode of the benchmarks) nothing is
    held back: a round starts at the same request as when each request was booked at once."""
    rt = runtime.load(teacher_artifact, background=False, warmup_collect_rate=1e-9)
    rt.predict(rows[:4])
    assert len(rt._held) == 0 and rt.counters.requests == 1
