"""Choose per-exit thresholds jointly: most saving while agreement keeps a statistical bound.

A row leaves at the first enabled exit whose confidence reaches its threshold. Its cost is the
stages it ran plus every enabled head it passed. Agreement counts rows that left at a head
which agrees with the backbone, and rows that ran to the end. The constraint is on a
statistical bound of agreement over held-out rows (Learn-then-Test's exact binomial test by
default, ``choose_thresholds_ltt``; a Wilson lower bound for the others), not on the point
estimate.
"""
import math
from dataclasses import dataclass
from typing import List

import torch

from compiler import exit_rule

from .learner import RoundCancelled

INF = float("inf")


def wilson_lower(successes: float, n: int, z: float) -> float:
    """One-sided Wilson score lower bound of a proportion."""
    if n <= 0:
        return 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return (centre - margin) / denom


def wilson_upper(successes: float, n: int, z: float) -> float:
    if n <= 0:
        return 1.0
    return 1.0 - wilson_lower(n - successes, n, z)


def z_of(confidence: float) -> float:
    """Standard normal quantile for a one-sided ``confidence``."""
    return math.sqrt(2) * torch.special.erfinv(torch.tensor(2 * confidence - 1.0)).item()


@dataclass
class Plan:
    thresholds: List[float]   # INF: exit off
    saving: float             # expected cost saved (fraction of the backbone), heads counted
    agreement: float          # point estimate on the calibration rows
    lower_bound: float
    n: int

    @property
    def enabled(self) -> List[bool]:
        return [t != INF for t in self.thresholds]

    @staticmethod
    def off(num_exits: int, n: int) -> "Plan":
        """Every exit off (the backbone answers every row), judged on ``n`` rows."""
        return Plan([INF] * num_exits, 0.0, 1.0, 1.0, n)


def route(conf: torch.Tensor, t) -> torch.Tensor:
    """Each row's exit (``E``: the backbone) under thresholds ``t`` (``inf``: off), by the exit rule."""
    threshold, enabled = exit_rule.split_thresholds(t)
    return exit_rule.first_exit(conf, threshold, enabled)


def evaluate_many(conf, agree, stage_cost, head_cost, T):
    """(savings [K], agreeing rows [K]) of K threshold settings ``T`` [K, E] (``inf``: off)."""
    E, n = conf.shape
    T = torch.as_tensor(T, dtype=torch.float64).reshape(-1, E)
    threshold, enabled = exit_rule.split_thresholds(T.flatten())
    threshold, enabled = threshold.reshape(T.shape), enabled.reshape(T.shape)
    first = exit_rule.first_exit(conf, threshold, enabled)                    # [K, n]
    cost = exit_rule.row_cost(first, stage_cost, head_cost, enabled)          # [K, n]
    ok = torch.cat([agree, torch.ones(1, n, dtype=torch.bool)], 0)             # the backbone agrees
    agreeing = torch.gather(ok, 0, first).sum(1)
    return (1.0 - cost.mean(1)).tolist(), agreeing.tolist()


def evaluate(conf, agree, stage_cost, head_cost, t):
    """(saving, agreeing rows) of thresholds ``t`` on conf/agree [E, n]."""
    s, a = evaluate_many(conf, agree, stage_cost, head_cost, [list(t)])
    return s[0], int(a[0])


def exit_shares(conf: torch.Tensor, t) -> List[float]:
    """Share of rows leaving at each exit (last: the backbone) under thresholds ``t``."""
    E, n = conf.shape
    counts = torch.bincount(route(conf, t), minlength=E + 1).double()
    return (counts / max(n, 1)).tolist()


def greedy_path(conf, agree, stage_cost, head_cost, feasible, grid: int = 48, should_stop=None,
                allowed=None):
    """The greedy joint search, one setting per step: repeatedly take the threshold move with
    the best saving per new disagreement among those whose agreeing rows pass ``feasible``.
    ``allowed`` (None: any): which sets of enabled exits (a tuple of bools) may be served; a
    move that would switch on an exit outside them is not taken.
    Yields (thresholds, saving, agreeing rows) after each move, most cautious first."""
    E, n = conf.shape
    qs = torch.linspace(0.0, 1.0, grid, dtype=conf.dtype)
    cands = [torch.unique(torch.quantile(conf[e], qs)).flip(0).tolist() for e in range(E)]
    pos = [-1] * E                      # index into cands[e]; -1 = off
    t = [INF] * E
    saving, agreeing = evaluate(conf, agree, stage_cost, head_cost, t)
    while True:
        _poll(should_stop)
        moves = []
        for e in range(E):
            # An exit that is off must pay for its head first: try every threshold for it.
            # One that is on moves a few grid steps at a time.
            if pos[e] < 0 and allowed is not None and \
                    not allowed(tuple(p >= 0 or j == e for j, p in enumerate(pos))):
                continue
            ahead = len(cands[e]) if pos[e] < 0 else 3
            moves += [(e, k) for k in range(pos[e] + 1, min(pos[e] + 1 + ahead, len(cands[e])))]
        if not moves:
            return
        trials = [list(t) for _ in moves]
        for trial, (e, k) in zip(trials, moves):
            trial[e] = cands[e][k]
        best = None
        for (e, k), s, a in zip(moves, *evaluate_many(conf, agree, stage_cost, head_cost, trials)):
            if s <= saving or not feasible(a):
                continue
            ratio = (s - saving) / (max(agreeing - a, 0) + 1.0)
            if best is None or ratio > best[0]:
                best = (ratio, e, k, s, a)
        if best is None:
            return
        _, e, k, saving, agreeing = best
        pos[e], t[e] = k, cands[e][k]
        yield list(t), saving, agreeing


def choose_thresholds(conf: torch.Tensor, agree: torch.Tensor, stage_cost: torch.Tensor,
                      head_cost: torch.Tensor, budget: float, confidence: float,
                      grid: int = 48, bound_rows: int = 0, should_stop=None,
                      allowed=None) -> Plan:
    """Greedy joint search: repeatedly take the threshold move with the best saving per new
    disagreement among those that keep the bound; then switch off exits that do not pay.

    ``bound_rows``: compute the bound as if the agreement rate seen held over this many rows
    (0: the rows given), so a search on a subsample keeps the margin of a search on all rows.
    """
    E, n = conf.shape
    z = z_of(confidence)
    scale = bound_rows / n if bound_rows and n else 1.0

    def feasible(a):
        return wilson_lower(a * scale, n * scale, z) >= budget

    t, saving, agreeing = [INF] * E, *evaluate(conf, agree, stage_cost, head_cost, [INF] * E)
    for t, saving, agreeing in greedy_path(conf, agree, stage_cost, head_cost, feasible, grid,
                                           should_stop, allowed):
        pass
    for e in range(E):                  # prune exits whose saving does not pay for their head
        if t[e] != INF:
            trial = list(t)
            trial[e] = INF
            s, a = evaluate(conf, agree, stage_cost, head_cost, trial)
            if s >= saving and feasible(a):
                t, saving, agreeing = trial, s, a
    return Plan(t, saving, agreeing / max(n, 1), wilson_lower(agreeing, n, z), n)


def choose_global_threshold(conf: torch.Tensor, agree: torch.Tensor, stage_cost: torch.Tensor,
                            head_cost: torch.Tensor, budget: float, confidence: float,
                            grid: int = 256, should_stop=None, effective_rows: float = 0,
                            allowed=None) -> Plan:
    """One threshold for every exit (SDN-style), then exits that do not pay switched off.

    A single free parameter barely overfits the rows it is chosen on, so with few held-out
    rows it often generalises better than per-exit thresholds.
    """
    E, n = conf.shape
    z = z_of(confidence)
    scale = effective_rows / n if effective_rows and n else 1.0

    def bound(a, n_):  # over the effective rows (correlated traffic)
        return wilson_lower(a * scale, n_ * scale, z)

    cands = torch.unique(torch.quantile(conf.flatten().float(), torch.linspace(0, 1, grid))).tolist()
    best = Plan([INF] * E, *_score(conf, agree, stage_cost, head_cost, [INF] * E, z), n)
    _poll(should_stop)
    # Every candidate at once: score it, then (exit by exit, as a sequential pass would) switch
    # off exits whose saving does not pay for their head.
    T = [[c] * E for c in cands]
    s, a = evaluate_many(conf, agree, stage_cost, head_cost, T)
    live = [k for k in range(len(T)) if bound(a[k], n) >= budget]
    for e in range(E):
        _poll(should_stop)
        if not live:
            break
        trials = [list(T[k]) for k in live]
        for trial in trials:
            trial[e] = INF
        s2, a2 = evaluate_many(conf, agree, stage_cost, head_cost, trials)
        for j, k in enumerate(live):
            if s2[j] >= s[k] and bound(a2[j], n) >= budget:
                T[k], s[k], a[k] = trials[j], s2[j], a2[j]
    for k in live:
        if s[k] > best.saving and (allowed is None or allowed(tuple(v != INF for v in T[k]))):
            best = Plan(T[k], s[k], a[k] / max(n, 1), bound(a[k], n), n)
    return best


def _poll(should_stop):
    if should_stop is not None and should_stop():
        raise RoundCancelled()


def _score(conf, agree, stage_cost, head_cost, t, z):
    n = conf.shape[1]
    s, a = evaluate(conf, agree, stage_cost, head_cost, t)
    return s, a / max(n, 1), wilson_lower(a, n, z)


def choose_thresholds_corrected(conf: torch.Tensor, agree: torch.Tensor, stage_cost: torch.Tensor,
                                head_cost: torch.Tensor, budget: float, confidence: float,
                                seed: int = 0, splits: int = 3, should_stop=None,
                                effective_rows: float = 0, allowed=None) -> Plan:
    """choose_thresholds with its search optimism measured and paid for.

    Returns the better of that and the single global threshold (choose_global_threshold).

    Searching many thresholds on the same rows the bound is computed on makes the chosen plan
    look better than it is. Two-fold cross-fitting, over ``splits`` random halvings, measures
    that optimism (agreement where the thresholds were chosen minus agreement on the other half,
    averaged before it is clipped at zero, so noise does not inflate it); the final search on all
    rows then targets the budget raised by that optimism, scaled to the full number of rows.

    ``effective_rows``: the rows' worth as independent rows (``runtime/correlation.py``; 0:
    all of them); every bound is computed as if the agreement seen held over that many.
    """
    n = conf.shape[1]
    n_eff = effective_rows or n
    gen = torch.Generator().manual_seed(seed)
    gaps = []
    for _ in range(splits):
        perm = torch.randperm(n, generator=gen)
        halves = (perm[: n // 2], perm[n // 2:])
        for fit, held in (halves, halves[::-1]):
            # Each half is held to the margin of the full search: with the margin of half the
            # rows a strict budget is often out of reach there, and the optimism would read 0.
            p = choose_thresholds(conf[:, fit], agree[:, fit], stage_cost, head_cost, budget,
                                  confidence, bound_rows=n_eff, should_stop=should_stop,
                                  allowed=allowed)
            _, a_fit = evaluate(conf[:, fit], agree[:, fit], stage_cost, head_cost, p.thresholds)
            _, a_held = evaluate(conf[:, held], agree[:, held], stage_cost, head_cost,
                                 p.thresholds)
            gaps.append(a_fit / len(fit) - a_held / len(held))
    # Optimism shrinks like 1/sqrt(rows): a fit on all rows has about 1/sqrt(2) of a half's.
    optimism = max(0.0, sum(gaps) / len(gaps)) / math.sqrt(2)
    per_exit = choose_thresholds(conf, agree, stage_cost, head_cost, min(budget + optimism, 1.0),
                                 confidence, bound_rows=n_eff, should_stop=should_stop,
                                 allowed=allowed)
    single = choose_global_threshold(conf, agree, stage_cost, head_cost, budget, confidence,
                                     should_stop=should_stop, effective_rows=n_eff,
                                     allowed=allowed)
    return per_exit if per_exit.saving >= single.saving else single


def binomial_tail(errors: float, n: int, risk: float) -> float:
    """P(Binomial(n, risk) <= errors): the p-value of "the true disagreement rate is at least
    ``risk``" having seen ``errors`` disagreements in ``n`` rows (exact, in log space).

    ``errors`` may be fractional: correlated rows count as n / d independent rows with errors
    / d errors (Korn and Graubard's effective sample), and the tail is then the regularized
    incomplete beta function I_{1-risk}(n - errors, errors + 1), which equals the sum at
    whole numbers and lies between its neighbours in between."""
    if n <= 0:
        return 1.0
    if risk <= 0.0:
        return 1.0 if errors >= 0 else 0.0
    if errors >= n:
        return 1.0
    if errors != int(errors):
        return min(1.0, max(0.0, _betainc(n - errors, errors + 1.0, 1.0 - risk)))
    errors = int(errors)
    k = torch.arange(0, errors + 1, dtype=torch.float64)   # errors < n here
    logc = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1) \
        - torch.lgamma(n - k + 1)
    logp = logc + k * math.log(risk) + (n - k) * math.log1p(-risk)
    return min(1.0, float(torch.logsumexp(logp, 0).exp()))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (a, b > 0, 0 <= x <= 1), by its
    continued fraction (Lentz's method, as in Numerical Recipes' ``betai``)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):   # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def threshold_path(conf, agree, stage_cost, head_cost, floor: float, grid: int = 48,
                   should_stop=None, allowed=None) -> List[List[float]]:
    """An ordered family of threshold settings, most cautious first: the greedy search's moves
    (best saving per new disagreement), continued until agreement on these rows falls below
    ``floor``, merged with the single global threshold swept from high to low; sorted by the
    saving they give on these rows. Chosen on rows that will not test it."""
    E, n = conf.shape
    path = [(evaluate(conf, agree, stage_cost, head_cost, [INF] * E)[0], [INF] * E)]
    path += [(s_, t) for t, s_, _ in greedy_path(conf, agree, stage_cost, head_cost,
                                                 lambda a: a >= floor * n, grid, should_stop,
                                                 allowed)]
    glob = torch.unique(torch.quantile(conf.flatten().float(), torch.linspace(0, 1, 4 * grid)))
    T = [[c] * E for c in glob.flip(0).tolist()]
    s_all, a_all = evaluate_many(conf, agree, stage_cost, head_cost, T)
    if allowed is None or allowed((True,) * E):
        path += [(s_, tt) for tt, s_, a in zip(T, s_all, a_all) if a >= floor * n]
    path.sort(key=lambda p: p[0])
    return [tt for _, tt in path]


def prefixes(t) -> List[List[float]]:
    """Setting ``t`` and each of its prefixes: its first k enabled exits on, the rest off
    (k = all of them, then fewer). A prefix's rows leave where ``t`` let them or reach the
    backbone, so it disagrees on a subset of ``t``'s rows."""
    on = [e for e, x in enumerate(t) if x != INF]
    return [[x if e in on[:k] else INF for e, x in enumerate(t)]
            for k in range(len(on), 0, -1)]


LTT_FAMILY = {"ltt": "global", "ltt-fitted": "fitted",   # threshold_rule -> the family tested
              "ltt-both": "both"}
LTT_RULES = tuple(LTT_FAMILY)
LTT_FIT_SHARE = 0.3   # "ltt-fitted": share of the held-out rows that order the settings
LTT_GRID = [1.0 - 10.0 ** (-k / 16) for k in range(96, -1, -1)]
"""The "ltt" rule's settings: one threshold for every exit, 1 - 1e-6 down to 0 in steps of a
sixteenth of a decade of 1 - t. Fixed before any row is seen, so every held-out row tests it
and the grid can be fine at no cost (fixed-sequence testing pays nothing per setting)."""


def independent_rows_needed(budget: float, confidence: float, rule: str = "ltt") -> int:
    """The fewest independent held-out rows with which ``rule`` could switch any exit on at
    all: even with no disagreement among them, fewer cannot show the risk is below
    1 - ``budget`` at ``confidence``. (With correlated traffic, held-out rows count as rows /
    design effect; ``stats()["learning"]`` compares the two.)"""
    risk = 1.0 - budget
    if risk >= 1.0:   # a budget of 0 (every answer shadowed): nothing to show
        return 0
    if risk <= 0.0:   # a budget of 1: no finite number of rows shows it
        return 2 ** 62
    if rule in LTT_RULES:   # binomial_tail(0, m, risk) = (1 - risk)^m <= 1 - confidence
        delta = (1.0 - confidence) / (2 if rule == "ltt-both" else 1)
        m = math.ceil(math.log(delta) / math.log1p(-risk))
        return m if rule != "ltt-fitted" else math.ceil(m / (1.0 - LTT_FIT_SHARE))
    z = z_of(confidence)   # Wilson with no error: n / (n + z^2) >= budget
    return math.ceil(budget * z * z / risk)


def choose_thresholds_ltt(conf: torch.Tensor, agree: torch.Tensor, stage_cost: torch.Tensor,
                          head_cost: torch.Tensor, budget: float, confidence: float,
                          seed: int = 0, fit_share: float = LTT_FIT_SHARE, should_stop=None,
                          effective_rows: float = 0, allowed=None, family: str = "global") -> Plan:
    """Learn-then-Test with fixed-sequence testing (Angelopoulos et al. 2021; CALM).

    Settings are tested in a fixed order, most cautious first: a setting passes when the
    binomial p-value of "its disagreement is at least 1 - budget" is at most 1 - ``confidence``,
    and the testing stops at the first that fails. Of those that passed and their prefixes
    (``prefixes``: later exits off, certified with their setting), the one saving most is
    served. Each test is at the full level, with no union bound, because the order never looked
    at the testing rows: with probability ``confidence`` every setting that passed, so the
    served one too, has a disagreement below 1 - budget.

    ``family`` "global" (the "ltt" rule): ``LTT_GRID``, one threshold for every exit, fixed in
    advance, and every row tests it. "fitted" (the "ltt-fitted" rule): a seeded ``fit_share``
    of the rows orders per-exit settings (``threshold_path``) and the other rows test them.
    "both" (the "ltt-both" rule): each of the two at half the error level (1 - confidence) / 2,
    and the better of their plans is served: by the union bound both guarantees hold together
    with probability ``confidence``.
    On the demo streams the global grid saves more (BENCHMARKS.md): it loses no rows to the
    ordering.
    ``effective_rows`` (0: all): the test counts rows and errors scaled to that many
    independent rows (correlated traffic, ``runtime/correlation.py``), errors as a fraction
    (Korn and Graubard's effective sample; ``binomial_tail``). Rounded up, as until
    2026-12-06, one held-out error on a camera stream counted as a whole error among rows
    worth a tenth as many, and the thresholds had to clear every confidently wrong frame
    (docs/detection.md, "Latest").
    ``allowed``: as in ``greedy_path``; the global grid then enables the earliest exits that
    ``allowed`` accepts together (chosen from costs alone, never from the rows).
    """
    E, n = conf.shape
    if family == "both":
        half = 1.0 - (1.0 - confidence) / 2
        kw = dict(seed=seed, fit_share=fit_share, should_stop=should_stop,
                  effective_rows=effective_rows, allowed=allowed)
        plans = [choose_thresholds_ltt(conf, agree, stage_cost, head_cost, budget, half,
                                       family=f, **kw) for f in ("global", "fitted")]
        return max(plans, key=lambda p: p.saving)
    risk = 1.0 - budget
    delta = 1.0 - confidence
    off = Plan.off(E, n)
    if family == "global":
        test = torch.arange(n)
        on = []
        for e in range(E):
            if allowed is None or allowed(tuple(j in on or j == e for j in range(E))):
                on.append(e)
        if not on or n < 1:
            return off
        settings = [[t if e in on else INF for e in range(E)] for t in LTT_GRID]
    else:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=gen)
        cut = int(n * fit_share)
        fit, test = perm[:cut], perm[cut:]
        if cut < 1 or len(test) < 1:
            return off
        floor = max(0.0, budget - 2 * (1 - budget))   # walk a little past the budget on the fit rows
        settings = threshold_path(conf[:, fit], agree[:, fit], stage_cost, head_cost, floor,
                                  should_stop=should_stop, allowed=allowed)
    m = len(test)
    _, a_all = evaluate_many(conf[:, test], agree[:, test], stage_cost, head_cost, settings)
    shrink = min(1.0, effective_rows / n) if effective_rows else 1.0
    m_eff = int(m * shrink)
    passed = []
    for t, a in zip(settings, a_all):
        if binomial_tail((m - int(a)) * shrink, m_eff, risk) > delta:
            break
        if any(x != INF for x in t):
            passed.append(t)
    # Every setting passed is certified, and so is each of its prefixes (its exits after some
    # enabled one switched off: a row then leaves where it did or reaches the backbone, so it
    # disagrees only where the setting did). Serving the one of them that saves most keeps the
    # guarantee; an exit whose head costs more than it saves (in time, under latency_weight)
    # is switched off, not only a setting whose heads all cost more.
    candidates = [p for t in passed for p in prefixes(t)]
    if not candidates:
        return off
    s_c, a_c = [], []
    for k in range(0, len(candidates), len(LTT_GRID)):   # in chunks: [K, rows] stays small
        s_k, a_k = evaluate_many(conf[:, test], agree[:, test], stage_cost, head_cost,
                                 candidates[k:k + len(LTT_GRID)])
        s_c += s_k
        a_c += a_k
    # ties (an exit no row reaches): the fewer exits, then the earlier setting
    best = max(range(len(candidates)),
               key=lambda k: (s_c[k], -sum(x != INF for x in candidates[k]), -k))
    chosen, saving_c, agreeing_c = candidates[best], s_c[best], a_c[best]
    if saving_c <= 0:
        return off
    saving, agreeing = evaluate(conf, agree, stage_cost, head_cost, chosen)
    return Plan(list(chosen), saving, agreeing / n, wilson_lower(agreeing_c, m, z_of(confidence)), n)
