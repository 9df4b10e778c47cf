"""The design effect: how many independent rows correlated traffic is worth, and what reads it."""
import torch

from runtime.config import DriftConfig
from runtime.correlation import DesignEffect, design_effect
from runtime.drift import ALARM, DriftMonitor


def _onehot(classes, k=10):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), k).float()


def test_independent_rows_have_a_design_effect_near_one():
    g = torch.Generator().manual_seed(0)
    counts = torch.stack([torch.bincount(torch.randint(10, (16,), generator=g), minlength=10)
                          for _ in range(400)]).double()
    assert 0.9 < design_effect(counts) < 1.1


def test_blocks_of_one_scene_are_worth_one_row_each():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(400, 10, dtype=torch.float64)
    counts[torch.arange(400), torch.randint(10, (400,), generator=g)] = 16
    assert 15.0 < design_effect(counts) < 17.0


def test_runs_across_single_row_requests_are_seen():
    """A camera served one frame per request: blocks span consecutive requests."""
    d = DesignEffect(10, block_rows=16)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        c = int(torch.randint(10, (1,), generator=g))
        for _ in range(16):
            d.observe(_onehot([c]))
    assert d.value > 10
    shuffled = DesignEffect(10, block_rows=16)
    for c in torch.randint(10, (3200,), generator=g).tolist():
        shuffled.observe(_onehot([c]))
    assert shuffled.value < 1.5


def test_a_shift_reads_as_correlation_until_the_estimate_is_reset():
    """Old and new traffic in one window look like correlation (the classes seen change from
    one block to the next); a drift alarm resets the estimate to the new traffic alone."""
    g = torch.Generator().manual_seed(2)
    d = DesignEffect(10, block_rows=16)
    for c in torch.randint(5, (2048,), generator=g).tolist():      # classes 0-4 only
        d.observe(_onehot([c]))
    assert d.value < 1.5
    for c in (5 + torch.randint(5, (2048,), generator=g)).tolist():   # then 5-9 only
        d.observe(_onehot([c]))
    assert d.value > 2        # a mixture of two independent streams, read as correlated
    d.reset()
    assert d.value == 1.0
    for c in (5 + torch.randint(5, (2048,), generator=g)).tolist():
        d.observe(_onehot([c]))
    assert d.value < 1.5


def test_correlation_longer_than_the_block_needs_a_longer_block():
    """Scenes of 48 rows: 16-row blocks each hold one scene and cap the design effect at 16;
    64-row blocks see that the rows are worth even less. The runtime measures over
    ``correlation_block_rows``."""
    g = torch.Generator().manual_seed(2)
    short, long_ = DesignEffect(10, block_rows=16), DesignEffect(10, block_rows=64)
    for _ in range(400):
        c = int(torch.randint(10, (1,), generator=g))
        for _ in range(48):
            short.observe(_onehot([c]))
            long_.observe(_onehot([c]))
    assert short.value <= 16.5 and long_.value > 25


def test_the_runtime_measures_the_design_effect_over_the_configured_block(teacher_artifact):
    import runtime
    for rows in (16, 64):
        rt = runtime.load(teacher_artifact, background=False, correlation_block_rows=rows)
        assert rt.design.block_rows == rows
        rt.close()
    rt = runtime.load(teacher_artifact, background=False)
    assert rt.design.block_rows == runtime.RuntimeConfig().guarantee.correlation_block_rows == 16
    rt.close()


class _Fixed:
    def __init__(self, value):
        self.value = value


def test_cusum_weighs_correlated_shadow_rows_as_the_rows_they_are_worth():
    """One shadow request of 16 frames of a scene the heads get wrong: 16 disagreements. As
    independent rows that is an alarm; as one scene (deff 16) it is one disagreement."""
    ok = torch.zeros(16, dtype=torch.bool)
    counts = [16, 0]
    naive = DriftMonitor(DriftConfig(), 0.99)
    naive.reset([0.5, 0.5])
    assert naive.observe(counts, ok).state == ALARM
    blocked = DriftMonitor(DriftConfig(), 0.99, _Fixed(16.0))
    blocked.reset([0.5, 0.5])
    assert blocked.observe(counts, ok).state != ALARM
    for _ in range(12):   # a real shift: scene after scene disagrees
        v = blocked.observe(counts, ok)
    assert v.state == ALARM


def test_hold_out_takes_whole_blocks_and_trains_on_nothing_next_to_them():
    from runtime.buffer import CALIB, TRAIN, FeatureBuffer
    from runtime.collect import Collector
    from runtime.config import CollectConfig
    buf = FeatureBuffer([2], 3, memory_mb=1)
    col = Collector(buf, CollectConfig(holdout_block_rows=8, holdout_gap_rows=3), seed=0)
    n = 8 * 40
    feats = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)   # a row's feature: its time
    for i in range(0, n, 5):                                              # requests cut across blocks
        col.add([feats[i:i + 5]], torch.zeros(min(5, n - i), 3), False, False)
    roles, kept = {}, set()
    for r in (CALIB, TRAIN):
        for pos in buf.snapshot(r)[0][0][:, 0].long().tolist():
            roles.setdefault(pos // 8, set()).add(r)
            kept.add(pos)
    assert all(len(r) == 1 for r in roles.values()), "a block is all held out or all trained on"
    held = {b for b, r in roles.items() if r == {CALIB}}
    assert 0 < len(held) < len(roles)
    for b in range(40):
        rows = set(range(8 * b, 8 * b + 8))
        if b in held:
            assert rows <= kept, "held-out rows are all kept"
            continue
        near = set()
        if b - 1 in held:
            near |= set(range(8 * b, 8 * b + 3))
        if b + 1 in held:
            near |= set(range(8 * b + 5, 8 * b + 8))
        assert not near & kept, f"training rows of block {b} next to a held-out block are kept"
        assert rows - near <= kept


def test_a_round_reads_held_out_rows_worth_max_calib_rows_independent_ones():
    """With a design effect d, calibration reads up to d * max_calib_rows held-out rows (the
    bound counts each as 1/d), so correlated traffic can still gather enough evidence."""
    from types import SimpleNamespace

    from runtime.buffer import CALIB, FeatureBuffer
    from runtime.config import RuntimeConfig
    from runtime.learning import LearningLoop

    buf = FeatureBuffer([4], 3, 1.0)
    buf.add([torch.zeros(1000, 4)], torch.zeros(1000, 3), torch.full((1000,), CALIB))
    cfg = RuntimeConfig().with_overrides(max_calib_rows=100)
    for deff, rows in ((1.0, 100), (4.0, 400), (0.5, 100), (16.0, 1000)):
        loop = LearningLoop(None, buf, None, cfg, [], [], torch.device("cpu"),
                            design=SimpleNamespace(value=deff))
        assert loop.calib_rows()[1].shape[0] == rows, deff


def test_warmup_collect_rate_samples_which_requests_teach_before_exits_are_on():
    """Before any exit is on, a ``warmup_collect_rate`` share of requests teaches (the others
    run the bare backbone); once exits are on the rate no longer applies."""
    import pytest

    from runtime.buffer import FeatureBuffer
    from runtime.collect import Collector
    from runtime.config import CollectConfig, ConfigError, RuntimeConfig

    buf = FeatureBuffer([4], 3, 1.0)
    col = Collector(buf, CollectConfig(warmup_collect_rate=0.3), seed=0)
    taught = [col.decide(False, 0.05, False) for _ in range(2000)]
    assert not any(s for s, _, _ in taught)
    assert 0.25 < sum(c for _, c, _ in taught) / 2000 < 0.35
    assert all(c for _, c, _ in (col.decide(True, 0.0, False) for _ in range(100)))
    every = Collector(buf, CollectConfig(), seed=0)
    assert all(c for _, c, _ in (every.decide(False, 0.05, False) for _ in range(100)))
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ConfigError, match="warmup_collect_rate"):
            RuntimeConfig().with_overrides(warmup_collect_rate=bad)


def test_the_warmup_share_backs_off_after_idle_rounds_in_a_row_and_comes_back():
    """``after_round``: only ``idle_rounds`` idle rounds in a row lower the teaching share, and
    rounds then wait 1/share times as long; any other round, or a drift alarm (``reset``),
    restores it."""
    from runtime.buffer import FeatureBuffer
    from runtime.collect import Collector
    from runtime.config import CollectConfig

    col = Collector(FeatureBuffer([4], 3, 1.0), CollectConfig(idle_collect_rate=0.125), seed=0)
    for _ in range(2):
        col.after_round(True)
        assert col.warmup_share == 1.0 and col.spacing == 1.0
    col.after_round(True)
    assert col.warmup_share == 0.125 and col.spacing == 8.0
    taught = sum(c for _, c, _ in (col.decide(False, 0.05, False) for _ in range(4000)))
    assert 0.1 < taught / 4000 < 0.15
    col.after_round(False)
    assert col.warmup_share == 1.0
    for _ in range(2):
        col.after_round(True)
    col.after_round(False)                # the count starts again
    col.after_round(True)
    assert col.warmup_share == 1.0
    for _ in range(3):
        col.after_round(True)
    assert col.warmup_share == 0.125
    col.reset()
    assert col.warmup_share == 1.0 and col.spacing == 1.0


def test_rows_shadowed_in_doubt_are_judged_but_only_the_usual_share_calibrates():
    """In doubt every request is shadowed (judged against the backbone); only those the plain
    shadow rate would have taken calibrate, so calibration rows stay an even sample in time.
    Out of doubt the draws are the same as before doubts existed."""
    from runtime.buffer import FeatureBuffer
    from runtime.collect import Collector
    from runtime.config import CollectConfig

    buf = FeatureBuffer([4], 3, 1.0)
    col = Collector(buf, CollectConfig(), seed=1)
    doubt = [col.decide(True, 0.05, False, 1.0) for _ in range(4000)]
    assert all(s and c for s, c, _ in doubt)
    assert 0.04 < sum(k for _, _, k in doubt) / 4000 < 0.06
    calm = Collector(buf, CollectConfig(), seed=1)
    plain = [calm.decide(True, 0.05, False) for _ in range(4000)]
    # the same requests calibrate, in doubt or not (no whole-model path: one draw a request)
    assert [k for _, _, k in doubt] == [s for s, _, _ in plain] == [k for _, _, k in plain]


def test_decisions_follow_the_seeded_generator_one_draw_at_a_time():
    """Uniforms are drawn ahead in bulk (no tensor op per request), yet every decision reads the
    same number as one ``torch.rand(1)`` per draw from the seeded generator would, in order,
    across refills and whichever branch draws."""
    from runtime.buffer import FeatureBuffer
    from runtime.collect import Collector
    from runtime.config import CollectConfig

    cfg = CollectConfig(warmup_collect_rate=0.5, collect_rate=0.3)
    col = Collector(FeatureBuffer([4], 3, 1.0), cfg, seed=7)
    g = torch.Generator().manual_seed(7)
    draw = lambda: torch.rand(1, generator=g).item()   # noqa: E731
    n = 3 * Collector.DRAW_AHEAD + 11
    for i in range(n):
        enabled, fast = (i % 3 != 0), (i % 5 != 0)
        got = col.decide(enabled, 0.05, fast)
        u = draw() if enabled else 1.0
        if u < 0.05:
            want = (True, True, True)
        elif not enabled:
            want = (False, draw() < 0.5, False)
        elif not fast:
            want = (False, True, False)
        else:
            want = (False, draw() < 0.3, False)
        assert got == want, i
