"""The drift monitor: no false alarms on stable traffic, quick alarms on a real shift."""
import pytest
import torch

import runtime
from runtime.config import DriftConfig
from runtime.drift import ALARM, DOUBT, OK, DriftMonitor

BATCH = 16
BUDGET = 0.99


def feed(monitor, disagreement: float, rows: int, seed: int, shares=(0.6, 0.2, 0.2)):
    """Shadow requests of BATCH rows with this disagreement rate; rows until the alarm (or None)."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, rows, BATCH):
        ok = torch.rand(BATCH, generator=gen) >= disagreement
        exits = torch.multinomial(torch.tensor(shares), BATCH, True, generator=gen)
        v = monitor.observe(torch.bincount(exits, minlength=len(shares)).tolist(), ok)
        if v.state == ALARM:
            return start + BATCH
    return None


def test_cusum_stays_quiet_on_traffic_that_keeps_the_budget():
    for seed in range(5):   # the CUSUM alone (the watch's doubts: below)
        m = DriftMonitor(DriftConfig(watch_threshold=0.0), BUDGET)
        m.reset((0.6, 0.2, 0.2))
        assert feed(m, 0.01, 100_000, seed) is None  # the budget's own disagreement rate
        assert m.events == 0


@pytest.mark.parametrize("disagreement,within", [(0.25, 100), (0.10, 400), (0.05, 1000)])
def test_cusum_alarms_quickly_on_a_real_shift(disagreement, within):
    for seed in range(5):
        m = DriftMonitor(DriftConfig(), BUDGET)
        m.reset((0.6, 0.2, 0.2))
        at = feed(m, disagreement, 20_000, seed)
        assert at is not None and at <= within, (seed, at)


def test_exit_shares_that_move_put_the_monitor_in_doubt_without_an_alarm():
    m = DriftMonitor(DriftConfig(), BUDGET)
    m.reset((0.6, 0.2, 0.2))
    gen = torch.Generator().manual_seed(0)
    states = []
    for _ in range(64):   # no shadow rows: only the exit shares speak, and they moved
        exits = torch.multinomial(torch.tensor([0.1, 0.1, 0.8]), BATCH, True, generator=gen)
        states.append(m.observe(torch.bincount(exits, minlength=3).tolist(), None).state)
    assert DOUBT in states and ALARM not in states
    assert m.in_doubt and m.doubts == 1
    # Stable shares never raise doubt.
    m.reset((0.6, 0.2, 0.2))
    for _ in range(2000):
        exits = torch.multinomial(torch.tensor([0.6, 0.2, 0.2]), BATCH, True, generator=gen)
        assert m.observe(torch.bincount(exits, minlength=3).tolist(), None).state == OK


def doubt_then_judge(monitor, disagreement: float, seed: int, rows: int = 1200):
    """Requests of BATCH rows whose exit shares moved, every one shadowed (the default doubt
    shadow rate) with this disagreement rate: (rows until the alarm or None, its verdict)."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, rows, BATCH):
        exits = torch.multinomial(torch.tensor([0.1, 0.1, 0.8]), BATCH, True, generator=gen)
        ok = torch.rand(BATCH, generator=gen) >= disagreement
        v = monitor.observe(torch.bincount(exits, minlength=3).tolist(),
                            ok if monitor.in_doubt else None)
        if v.state == ALARM:
            return start + BATCH, v
    return None, None


def test_a_doubt_whose_rows_break_the_budget_ends_in_an_alarm():
    # 4% disagreement, four times the budget's rate: the CUSUM (tuned for 4% and up) needs
    # ~900 rows on average; the doubt's own 400 rows are tested as a whole when it ends.
    # Whole windows only: the doubt begins after one, so the CUSUM sees the doubt's rows alone.
    cfg = DriftConfig(doubt_looks=1)
    by = cfg.window_rows + cfg.doubt_rows + BATCH
    with_test = without = 0
    for seed in range(10):
        m = DriftMonitor(cfg, BUDGET)
        m.reset((0.6, 0.2, 0.2))
        at, v = doubt_then_judge(m, 0.04, seed, rows=by)
        if at is not None:
            with_test += 1
            assert "judged in doubt" in v.reason or "CUSUM" in v.reason
        m = DriftMonitor(DriftConfig(doubt_alarm_p=0.0, doubt_looks=1), BUDGET)
        m.reset((0.6, 0.2, 0.2))
        without += doubt_then_judge(m, 0.04, seed, rows=by)[0] is not None
    assert with_test >= 8 and without <= 3, (with_test, without)


def test_a_doubt_whose_rows_keep_the_budget_ends_quietly():
    # At the budget's own rate an end-of-doubt alarm is a false one: at most doubt_alarm_p of
    # doubts (0.01) may end so; 40 streams hold ~160 doubts.
    doubts = alarms = 0
    for seed in range(40):
        m = DriftMonitor(DriftConfig(), BUDGET)
        m.reset((0.6, 0.2, 0.2))
        alarms += doubt_then_judge(m, 0.01, seed, rows=2000)[0] is not None
        doubts += m.doubts
    assert doubts >= 100 and alarms <= 0.02 * doubts, (doubts, alarms)


def test_the_end_of_doubt_test_counts_correlated_rows_as_fewer():
    class Design:   # a camera: each row worth a tenth of an independent one
        value = 10.0
    hits = 0
    for seed in range(5):
        m = DriftMonitor(DriftConfig(), BUDGET, design=Design())
        m.reset((0.6, 0.2, 0.2))
        hits += doubt_then_judge(m, 0.04, seed, rows=700)[0] is not None
    assert hits == 0   # 400 rows worth 40: 4% of them is no evidence against 1%


def test_one_window_of_moved_shares_is_a_scene_not_a_shift():
    """On a camera a scene can swing one window's exit shares; doubt then waits for
    ``doubt_windows`` windows in a row (a shift persists). Independent traffic needs one."""
    class Camera:
        value = 12.0

    def run(cfg, pattern, design=Camera()):
        m = DriftMonitor(cfg, BUDGET, design)
        m.reset((0.6, 0.2, 0.2))
        gen = torch.Generator().manual_seed(0)
        for shares in pattern:       # one window of requests per entry
            for _ in range(cfg.window_rows // BATCH):
                exits = torch.multinomial(torch.tensor(shares), BATCH, True, generator=gen)
                m.observe(torch.bincount(exits, minlength=3).tolist(), None)
        return m.doubts
    calm, moved = (0.6, 0.2, 0.2), (0.05, 0.05, 0.9)   # moved far enough for deff 12
    swing = [calm, moved, calm, moved, calm]
    assert run(DriftConfig(), swing) == 0
    assert run(DriftConfig(doubt_windows=1), swing) == 1   # no shadow rows: it never ends
    assert run(DriftConfig(), [calm, moved, moved]) == 1
    assert run(DriftConfig(), swing, design=None) == 1   # independent traffic: one window


def test_no_monitoring_while_exits_are_off():
    m = DriftMonitor(DriftConfig(), BUDGET)
    m.reset(None)
    assert feed(m, 0.9, 2000, 0) is None


def test_exits_on_with_no_expected_shares_are_still_judged_by_their_shadow_rows():
    """An artifact saved without exit shares: no share test, but the CUSUM still runs, its
    rows counted at the design effect the save recorded."""
    m = DriftMonitor(DriftConfig(watch_threshold=0.0), BUDGET)   # doubt only from shares
    m.reset(None, watching=True)
    assert feed(m, 0.25, 2000, 0) is not None and m.doubts == 0
    quiet = DriftMonitor(DriftConfig(), BUDGET)
    quiet.reset(None, watching=True)
    assert feed(quiet, 0.01, 50_000, 1) is None
    slow = DriftMonitor(DriftConfig(), BUDGET)
    slow.reset(None, watching=True, deff=4.0)   # four alike rows weigh as one
    m2 = DriftMonitor(DriftConfig(), BUDGET)
    m2.reset(None, watching=True)
    assert feed(slow, 0.10, 20_000, 2) > feed(m2, 0.10, 20_000, 2)


def test_stable_fashion_mnist_raises_no_alarm_and_inverted_images_are_caught(teacher_artifact,
                                                                             fashion_small):
    """30,000 rows of stable traffic: no alarm. Then inverted images: exits off within 1,000 rows,
    and no round that began before the alarm switches them back on."""
    xtr, _, _, _ = fashion_small
    stable = xtr[5000:35000]
    rt = runtime.load(teacher_artifact, background=False, train_every=3000, latency_weight=0.0)
    for i in range(0, len(stable), 100):
        rt.predict(stable[i:i + 100])
    s = rt.stats()
    assert any(s["enabled"]), "exits must be on for this test to mean anything"
    assert s["drift_events"] == 0, f"false alarm on stable traffic: {s['drift_events']}"
    shifted = -xtr[35000:37000]
    for i in range(0, len(shifted), BATCH):
        rt.predict(shifted[i:i + BATCH])
        if rt.stats()["drift_events"]:
            break
    else:
        pytest.fail("inverted images not caught within 2,000 rows")
    assert i + BATCH <= 1000, f"caught only after {i + BATCH} rows"
    s = rt.stats()
    assert s["enabled"] == [False] * rt.num_exits


def rows_to_doubt(cfg, shares, expected=(0.6, 0.2, 0.2), rows=4096, seed=0, design=None):
    """Requests of BATCH rows leaving by ``shares``, no shadow rows: rows until the first
    doubt (None: none), and the monitor."""
    m = DriftMonitor(cfg, BUDGET, design)
    m.reset(expected)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, rows, BATCH):
        exits = torch.multinomial(torch.tensor(shares), BATCH, True, generator=gen)
        m.observe(torch.bincount(exits, minlength=len(shares)).tolist(), None)
        if m.in_doubt:
            return start + BATCH, m
    return None, m


def test_looks_within_a_window_doubt_a_large_shift_in_a_few_dozen_rows():
    moved = (0.1, 0.1, 0.8)
    for seed in range(5):
        early, _ = rows_to_doubt(DriftConfig(), moved, seed=seed)
        whole, _ = rows_to_doubt(DriftConfig(doubt_looks=1), moved, seed=seed)
        assert early is not None and early <= 64, (seed, early)
        assert whole == 256, (seed, whole)

    class Camera:   # correlated traffic waits for whole windows, doubt_windows of them
        value = 12.0
    at, _ = rows_to_doubt(DriftConfig(), (0.02, 0.02, 0.96), design=Camera())
    assert at == 2 * 256


def test_stable_traffic_with_a_rarely_taken_exit_raises_no_doubt():
    # An exit calibration expects to take 0.1% of rows: two of them among the 32 rows of one
    # look would read as p < 1e-9 if that cell were tested alone; it is pooled with others.
    shares = (0.6, 0.2, 0.199, 0.001)
    for seed in range(3):
        at, m = rows_to_doubt(DriftConfig(), shares, expected=shares, rows=60_000, seed=seed)
        assert at is None and m.doubts == 0, (seed, at)


def test_the_cusum_adds_up_across_the_rounds_of_one_traffic():
    """A round publishes a new state every ~1,000 requests, some 50 shadow rows once exits are
    on. Reset with each state, the CUSUM never gathered evidence of a slow drift; within one
    traffic (``carry``) it goes on, and an alarm (a plain reset) still clears it."""
    def rounds(carry, rows_per_round=48, n=200):
        m = DriftMonitor(DriftConfig(), BUDGET)
        m.reset((0.6, 0.2, 0.2))
        for r in range(n):
            if feed(m, 0.06, rows_per_round, r) is not None:
                return r
            m.reset((0.6, 0.2, 0.2), carry=carry)
        return None
    assert rounds(carry=False) is None   # 48 rows at 6% never reach the threshold
    assert rounds(carry=True) is not None
    m = DriftMonitor(DriftConfig(), BUDGET)
    m.reset((0.6, 0.2, 0.2))
    feed(m, 0.06, 320, 0)
    m.reset((0.6, 0.2, 0.2), carry=True)
    kept = m._cusum
    m.reset(None)                      # an alarm: exits off, nothing carried
    m.reset((0.6, 0.2, 0.2), carry=True)
    assert kept > 0 and m._cusum == 0.0


def test_the_watch_doubts_a_drift_the_exit_shares_do_not_show():
    """Disagreement at twice the budget's rate with unchanged exit shares (a head grown wrong
    but no less sure): the CUSUM, tuned to 4%, takes up to ~17,000 shadow rows; the watch
    CUSUM puts the monitor in doubt and the doubts' rows raise the alarm sooner. Traffic that
    keeps the budget doubts now and then and raises no alarm."""
    watched, slow = [], []
    for seed in range(6):
        watched.append(feed(_monitor(DriftConfig()), 0.02, 30_000, seed))
        slow.append(feed(_monitor(DriftConfig(watch_threshold=0.0)), 0.02, 30_000, seed))
        assert watched[-1] is not None and watched[-1] <= (slow[-1] or 30_000), (watched, slow)
    assert sorted(watched)[3] <= 2_000, watched
    assert sum(at is None or at > 10_000 for at in slow) >= 2, slow
    for seed in range(4):   # 100,000 shadow rows: some 2 million rows at a 5% shadow rate
        m = _monitor(DriftConfig())
        assert feed(m, 0.008, 100_000, seed) is None
        assert m.doubts <= 20, (seed, m.doubts)


def _monitor(cfg):
    m = DriftMonitor(cfg, BUDGET)
    m.reset((0.6, 0.2, 0.2))
    return m
