"""Threshold calibration: the agreement bound holds on the rows it was chosen on, and exits that
do not pay for their heads stay off."""
import pytest
import torch

from runtime.calibrate import (INF, choose_global_threshold, choose_thresholds,
                               choose_thresholds_corrected, evaluate, wilson_lower, z_of)


def _traffic(n=3000, E=4, seed=0):
    """Confidence rises with depth; a head agrees more often when it is confident."""
    g = torch.Generator().manual_seed(seed)
    conf = (torch.rand(E, n, generator=g) * 0.5 + torch.linspace(0.3, 0.5, E)[:, None]).double()
    agree = torch.rand(E, n, generator=g).double() < 0.85 + 0.15 * conf
    stage = torch.full((E + 1,), 1.0 / (E + 1), dtype=torch.float64)
    head = torch.full((E,), 0.005, dtype=torch.float64)
    return conf, agree, stage, head


def test_wilson_lower_bound_exact_values():
    assert wilson_lower(100, 100, z_of(0.95)) < 1.0
    assert abs(wilson_lower(0, 10, 1.0) - 0.0) < 1e-12
    # p=0.5, n=100, z=1: (0.5 + 1/200 - sqrt(0.25/100 + 1/40000)) / (1 + 1/100)
    want = (0.5 + 0.005 - (0.0025 + 0.000025) ** 0.5) / 1.01
    assert abs(wilson_lower(50, 100, 1.0) - want) < 1e-12


def test_plans_meet_the_bound_on_their_rows():
    conf, agree, stage, head = _traffic()
    z = z_of(0.95)
    for choose in (choose_thresholds, choose_global_threshold, choose_thresholds_corrected):
        plan = choose(conf, agree, stage, head, 0.99, 0.95)
        saving, agreeing = evaluate(conf, agree, stage, head, plan.thresholds)
        assert wilson_lower(agreeing, conf.shape[1], z) >= 0.99, choose.__name__
        assert abs(saving - plan.saving) < 1e-9
        assert plan.saving > 0, choose.__name__  # this traffic has easy rows to take


def test_exits_too_costly_for_their_heads_stay_off():
    conf, agree, stage, head = _traffic()
    costly = torch.full_like(head, 0.9)  # every head costs most of the model
    for choose in (choose_thresholds, choose_global_threshold):
        plan = choose(conf, agree, stage, costly, 0.99, 0.95)
        assert plan.thresholds == [INF] * conf.shape[0], choose.__name__
        assert plan.saving == 0.0


def test_stricter_budget_saves_less():
    conf, agree, stage, head = _traffic()
    loose = choose_thresholds_corrected(conf, agree, stage, head, 0.97, 0.95)
    strict = choose_thresholds_corrected(conf, agree, stage, head, 0.995, 0.95)
    assert loose.saving >= strict.saving
    assert strict.lower_bound >= 0.995 or strict.thresholds == [INF] * conf.shape[0]


def test_a_subsample_can_keep_the_margin_of_all_rows():
    """Cross-fitting searches half the rows; held to half the rows' margin, a strict budget is
    out of reach there and the search's optimism would read as zero."""
    conf, _, stage, head = _traffic(n=2000)
    agree = torch.ones_like(conf, dtype=torch.bool)  # every row agrees: only the margin binds
    half = conf[:, :1000], agree[:, :1000]
    # 1000 rows cannot show 0.998 at 95% (bound 0.9973); 2000 rows can (0.99865).
    assert choose_thresholds(*half, stage, head, 0.998, 0.95).thresholds == [INF] * 4
    scaled = choose_thresholds(*half, stage, head, 0.998, 0.95, bound_rows=2000)
    assert any(t != INF for t in scaled.thresholds) and scaled.saving > 0



def test_binomial_tail_matches_the_sum_of_the_mass_function():
    from math import comb
    from runtime.calibrate import binomial_tail
    for errors, n, p in [(0, 10, 0.1), (3, 50, 0.05), (12, 300, 0.01), (300, 300, 0.2)]:
        want = sum(comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(errors + 1))
        assert abs(binomial_tail(errors, n, p) - min(want, 1.0)) < 1e-9
    assert binomial_tail(5, 0, 0.01) == 1.0


def test_binomial_tail_of_fractional_errors_lies_between_the_whole_numbers():
    """Correlated rows count as rows / d with errors / d (runtime/calibrate.py): between whole
    numbers the tail (the incomplete beta function) rises with the errors, strictly inside its
    neighbours; one error among rows worth a tenth of their number is not a whole error."""
    from runtime.calibrate import binomial_tail
    for n, p in [(360, 0.01), (50, 0.2), (4000, 0.005)]:
        for k in (0, 1, 7):
            lo, hi = binomial_tail(k, n, p), binomial_tail(k + 1, n, p)
            mids = [binomial_tail(k + f, n, p) for f in (0.1, 0.5, 0.9)]
            assert lo < mids[0] < mids[1] < mids[2] < hi, (n, p, k, lo, mids, hi)
    # 360 rows worth 3,600 correlated ones (d = 10) with one error: 0.1 of an error passes a
    # 5% test that a whole error fails
    assert binomial_tail(0.1, 360, 0.01) <= 0.05 < binomial_tail(1, 360, 0.01)
    assert binomial_tail(360.5, 360, 0.01) == 1.0


@pytest.mark.parametrize("family", ["global", "fitted", "both"])
def test_ltt_keeps_its_guarantee_on_rows_it_never_saw(family):
    """Draw calibration rows, choose, measure on a large fresh sample of the same traffic: the
    agreement falls below the budget in at most about 1 - confidence of the draws."""
    from runtime.calibrate import choose_thresholds_ltt
    conf, agree, stage, head = _traffic(n=60000, seed=1)
    budget, confidence, draws, below, saved = 0.99, 0.9, 60, 0, []
    for d in range(draws):
        perm = torch.randperm(conf.shape[1], generator=torch.Generator().manual_seed(d))
        cal, fresh = perm[:1500], perm[1500:]
        plan = choose_thresholds_ltt(conf[:, cal], agree[:, cal], stage, head, budget,
                                     confidence, seed=d, family=family)
        s, a = evaluate(conf[:, fresh], agree[:, fresh], stage, head, plan.thresholds)
        below += a / len(fresh) < budget
        saved.append(s)
    # 10% allowed; binomial(60, 0.1) exceeds 12 with probability < 1%
    assert below <= 12, f"{below} of {draws} draws broke the budget"
    assert sum(saved) / draws > 0.05, "it must still take the easy rows"


def test_ltt_switches_everything_off_when_rows_cannot_prove_the_budget():
    from runtime.calibrate import choose_thresholds_ltt
    conf, agree, stage, head = _traffic(n=200)   # 200 rows cannot show 1% at 95% (299 can)
    for family in ("global", "fitted"):
        plan = choose_thresholds_ltt(conf, agree, stage, head, 0.99, 0.95, family=family)
        assert plan.thresholds == [INF] * conf.shape[0] and plan.saving == 0.0


def test_ltt_fixed_sequence_stops_at_the_first_failure(monkeypatch):
    """A later setting that would pass on its own is not reached once an earlier one fails."""
    from runtime import calibrate
    E, n = 1, 1000
    conf = torch.linspace(0, 1, n, dtype=torch.float64)[None]
    agree = torch.ones(1, n, dtype=torch.bool)
    agree[0, 500:520] = False                                  # a middle band disagrees
    stage = torch.tensor([0.5, 0.5], dtype=torch.float64)
    head = torch.tensor([0.0], dtype=torch.float64)
    family = [[INF], [0.99], [0.5], [0.9]]   # [0.5] takes the bad band; [0.9] alone would pass
    monkeypatch.setattr(calibrate, "threshold_path", lambda *a, **k: family)
    plan = calibrate.choose_thresholds_ltt(conf, agree, stage, head, 0.99, 0.95, family="fitted")
    assert plan.thresholds == [0.99]


def test_rows_repeated_count_as_the_rows_they_are_worth():
    """200 distinct rows, each seen 16 times (a camera's runs): as 3,200 rows they prove the
    budget; as the 200 they are worth, no rule may switch an exit on."""
    from runtime.calibrate import choose_thresholds_ltt
    conf, agree, stage, head = _traffic(n=200)
    conf, agree = conf.repeat_interleave(16, 1), agree.repeat_interleave(16, 1)
    n = conf.shape[1]
    for rule in (choose_thresholds_ltt, choose_thresholds_corrected):
        assert rule(conf, agree, stage, head, 0.99, 0.95).saving > 0, rule.__name__
        plan = rule(conf, agree, stage, head, 0.99, 0.95, effective_rows=n / 16)
        assert plan.thresholds == [INF] * conf.shape[0], rule.__name__


def test_a_cap_on_the_miss_path_limits_the_exits_every_rule_enables():
    """``allowed`` (ServingConfig.max_miss_overhead): no rule serves a set of exits outside it,
    and without it the same rows enable more."""
    from runtime.calibrate import choose_thresholds_ltt
    conf, agree, stage, head = _traffic(n=6000)
    at_most_one = lambda enabled: sum(enabled) <= 1   # noqa: E731
    rules = (choose_thresholds, choose_global_threshold, choose_thresholds_corrected,
             choose_thresholds_ltt)
    for choose in rules:
        free = choose(conf, agree, stage, head, 0.97, 0.95)
        capped = choose(conf, agree, stage, head, 0.97, 0.95, allowed=at_most_one)
        assert sum(t != INF for t in free.thresholds) > 1, choose.__name__
        assert sum(t != INF for t in capped.thresholds) <= 1, choose.__name__
        assert capped.saving <= free.saving + 1e-12, choose.__name__
    nothing = choose_thresholds_ltt(conf, agree, stage, head, 0.97, 0.95,
                                    allowed=lambda enabled: not any(enabled))
    assert nothing.thresholds == [INF] * conf.shape[0]


def test_the_miss_overhead_is_the_enabled_heads_measured_time_over_the_stages():
    from runtime.costs import CostModel
    manifest = {"total_flops": 10.0, "stage_flops": [4.0, 3.0, 3.0],
                "exits": [{"head": {"flops": 0.1}}, {"head": {"flops": 0.1}}]}
    costs = CostModel(manifest, 0.0, (torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64),
                                      torch.tensor([0.1, 0.3], dtype=torch.float64)))
    assert abs(costs.miss_overhead((True, False)) - 0.025) < 1e-12
    assert abs(costs.miss_overhead((True, True)) - 0.1) < 1e-12
    assert costs.within_miss_cap(None) is None
    cap = costs.within_miss_cap(0.05)
    assert cap((True, False)) and not cap((False, True)) and cap((False, False))


def test_a_head_is_priced_at_what_a_passing_row_pays_where_that_was_measured():
    """Latency-weighted, a head costs its own ops' share of the stages' time, or, where the
    onnxruntime backend measured it (``miss_profile``: the head, its decision and its branch at
    batch 1), that share; FLOPs saved are FLOPs whatever the weight."""
    from runtime.costs import CostModel
    manifest = {"total_flops": 10.0, "stage_flops": [4.0, 3.0, 3.0],
                "exits": [{"head": {"flops": 0.1}}, {"head": {"flops": 0.1}}]}
    lat = (torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64),
           torch.tensor([0.1, 0.3], dtype=torch.float64))
    own = CostModel(manifest, 1.0, lat)
    assert torch.allclose(own.head_cost, torch.tensor([0.025, 0.075], dtype=torch.float64))
    passing = CostModel(manifest, 1.0, lat, miss_share=[0.06, 0.01])
    assert torch.allclose(passing.head_cost, torch.tensor([0.06, 0.01], dtype=torch.float64))
    half = CostModel(manifest, 0.5, lat, miss_share=[0.06, 0.01])
    assert torch.allclose(half.head_cost, torch.tensor([0.035, 0.01], dtype=torch.float64))
    flops = CostModel(manifest, 0.0, lat, miss_share=[0.06, 0.01])
    assert torch.allclose(flops.head_cost, torch.tensor([0.01, 0.01], dtype=torch.float64))
    assert abs(passing.miss_overhead((True, True)) - 0.07) < 1e-12


def test_independent_rows_needed_is_where_a_perfect_head_can_first_switch_on():
    """Below ``independent_rows_needed`` held-out rows no exit can be certified even when every
    row agrees; at it, LTT switches an exit on (for each LTT rule: "ltt-fitted" loses 30% of
    the rows to ordering its settings)."""
    from runtime.calibrate import choose_thresholds_ltt, independent_rows_needed
    need = independent_rows_needed(0.99, 0.95)
    assert need == 299 and independent_rows_needed(0.99, 0.95, "ltt-fitted") == 428
    assert independent_rows_needed(0.99, 0.95, "ltt-both") == 368   # the global half, at 2.5%
    for family, rule in (("global", "ltt"), ("fitted", "ltt-fitted"), ("both", "ltt-both")):
        need_ = independent_rows_needed(0.99, 0.95, rule)
        for n, on in ((need_, True), (need_ - 10, False)):
            conf = torch.linspace(0.5, 1.0, n, dtype=torch.float64)[None].repeat(2, 1)
            agree = torch.ones(2, n, dtype=torch.bool)
            stage = torch.full((3,), 1 / 3, dtype=torch.float64)
            plan = choose_thresholds_ltt(conf, agree, stage,
                                         torch.full((2,), 0.01, dtype=torch.float64), 0.99, 0.95,
                                         family=family)
            assert any(t != INF for t in plan.thresholds) == on, (rule, n)
    assert independent_rows_needed(0.99, 0.95, "crossfit") < need   # Wilson: no ordering split
    assert independent_rows_needed(0.0, 0.95) == 0   # every answer shadowed: nothing to show


def test_ltt_global_grid_is_fixed_in_advance_and_enables_exits_by_cost_alone():
    """The "ltt" rule serves one threshold for every exit, taken from ``LTT_GRID`` (never from
    the rows); under a cap it enables the earliest exits the cap accepts together."""
    from runtime import calibrate
    conf, agree, stage, head = _traffic(n=6000)
    plan = calibrate.choose_thresholds_ltt(conf, agree, stage, head, 0.97, 0.95)
    assert plan.saving > 0 and len(set(plan.thresholds)) == 1
    assert plan.thresholds[0] in calibrate.LTT_GRID
    capped = calibrate.choose_thresholds_ltt(conf, agree, stage, head, 0.97, 0.95,
                                             allowed=lambda enabled: not enabled[0])
    assert capped.thresholds[0] == INF and all(t != INF for t in capped.thresholds[1:])


def test_ltt_serves_the_certified_setting_that_saves_most_not_the_last(monkeypatch):
    """Every setting that passed before the first failure is certified; when a later one saves
    less (it switches on a head that costs more than it saves), the earlier one is served."""
    from runtime import calibrate
    n = 2000
    conf = torch.linspace(0, 1, n, dtype=torch.float64)[None].repeat(2, 1)
    agree = torch.ones(2, n, dtype=torch.bool)                   # every setting passes
    stage = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    head = torch.tensor([0.6, 0.0], dtype=torch.float64)         # exit 0's head does not pay
    family = [[INF, INF], [INF, 0.5], [0.99, 0.5]]
    monkeypatch.setattr(calibrate, "threshold_path", lambda *a, **k: family)
    plan = calibrate.choose_thresholds_ltt(conf, agree, stage, head, 0.99, 0.95, family="fitted")
    last, _ = evaluate(conf, agree, stage, head, family[-1])
    assert plan.thresholds == [INF, 0.5] and plan.saving > last


def test_ltt_switches_off_a_late_exit_whose_head_costs_more_than_it_saves():
    """A certified setting's prefixes (its later exits off) disagree only where it did, so they
    are certified too: a last head that costs every row passing it more than its few exits
    save is switched off, while the global threshold keeps the early exit on."""
    from runtime import calibrate
    n = 3000
    g = torch.Generator().manual_seed(0)
    conf = torch.stack([torch.rand(n, generator=g, dtype=torch.float64),
                        torch.full((n,), 0.999, dtype=torch.float64)])
    agree = torch.stack([conf[0] >= 0.3, torch.ones(n, dtype=torch.bool)])
    stage = torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64)
    head = torch.tensor([0.01, 0.2], dtype=torch.float64)   # exit 1 saves 0.1 for a 0.2 head
    plan = calibrate.choose_thresholds_ltt(conf, agree, stage, head, 0.99, 0.95)
    assert plan.enabled == [True, False]
    both = [plan.thresholds[0]] * 2
    assert plan.saving > evaluate(conf, agree, stage, head, both)[0]
    # a prefix never disagrees where its setting agreed, row by row
    conf2 = torch.rand(3, n, generator=g, dtype=torch.float64)
    agree2 = torch.rand(3, n, generator=g) < 0.9
    for t in ([0.5, 0.6, 0.7], [INF, 0.4, 0.8]):
        full = calibrate.route(conf2, t)
        ok = torch.cat([agree2, torch.ones(1, n, dtype=torch.bool)]).gather(0, full[None])[0]
        for p in calibrate.prefixes(t):
            r = calibrate.route(conf2, p)
            ok_p = torch.cat([agree2, torch.ones(1, n, dtype=torch.bool)]).gather(0, r[None])[0]
            assert bool((ok_p | ~ok).all()) and bool((ok_p >= ok).all())


def test_a_loaded_setting_keeps_the_prefix_of_its_exits_that_pays_in_time():
    """Time priced in (``latency_weight``), an exit that few rows take but every passing row
    pays for is switched off with those after it (a prefix keeps the setting's bound); the
    rows it and they took reach the backbone. FLOPs alone, or no shares: kept as they are."""
    from runtime.costs import CostModel
    manifest = {"total_flops": 10.0, "stage_flops": [4.0, 3.0, 3.0],
                "exits": [{"head": {"flops": 0.1}}, {"head": {"flops": 0.1}}]}
    lat = (torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64),
           torch.tensor([0.1, 0.3], dtype=torch.float64))
    timed = CostModel(manifest, 1.0, lat, miss_share=[0.02, 0.10])
    t, shares = (0.9, 0.8), (0.5, 0.05, 0.45)
    # exit 1 saves 0.05 x 0.25 of the time and costs the 0.5 of rows passing it 0.10 each
    assert timed.cheapest_prefix(t, shares) == ((0.9, INF), (0.5, 0.0, 0.5))
    # taken often enough, it pays
    assert timed.cheapest_prefix(t, (0.3, 0.5, 0.2)) == (t, (0.3, 0.5, 0.2))
    # an exit that pays nothing at all goes, even the first
    assert timed.cheapest_prefix(t, (0.0, 0.0, 1.0)) == ((INF, INF), (0.0, 0.0, 1.0))
    flops = CostModel(manifest, 0.0, lat, miss_share=[0.02, 0.10])
    assert flops.cheapest_prefix(t, shares) == (t, shares)
    assert timed.cheapest_prefix(t, None) == (t, None)
