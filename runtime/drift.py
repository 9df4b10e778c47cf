"""The drift monitor: exit shares on every request (doubt) and a CUSUM on shadow disagreements (alarm)."""
import math
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .calibrate import binomial_tail
from .config import DriftConfig

OK, DOUBT, ALARM = "ok", "doubt", "alarm"
# Traffic whose design effect reads above this is correlated (shuffled traffic reads 1.00-1.05):
# there one window's exit shares can swing with a scene, and doubt waits for ``doubt_windows``.
CORRELATED_DEFF = 1.5


@dataclass
class Verdict:
    state: str               # OK, DOUBT or ALARM
    live_disagreement: Optional[float] = None   # over the shadow rows judged since the last reset
    reason: str = ""


class DriftMonitor:
    """Watches the traffic served under one serving state; ``reset`` when a new state is published.

    - Exit shares, every request, no backbone needed: every ``window_rows`` rows (on
      independent traffic also ``doubt_looks`` times within a window), a chi-square
      test of the share of rows leaving at each exit against what calibration predicted. A
      shift (one window rejecting; on correlated traffic ``doubt_windows`` in a row, since a
      camera's scene can swing one window's shares) puts the monitor in *doubt*: the
      caller raises the shadow rate (by default every request is then answered by the backbone
      and judged), which feeds the shadow-row tests. Doubt itself switches no exit off.
    - Shadow rows: a one-sided CUSUM of the log-likelihood ratio of disagreement at
      ``shift_factor`` x the budget's rate (+ ``shift_margin``) against the budget's rate. It
      alarms quickly on a real shift and, on traffic that keeps the budget, drifts down.
    - The watch: a second CUSUM on the same rows, tuned to ``watch_factor`` x the budget's
      rate, puts the monitor in doubt when it passes ``watch_threshold``. Heads grown wrong
      but no less sure leave the exit shares where they were, and the alarm's CUSUM, tuned
      to 3x plus a point, takes thousands of shadow rows to see twice the budget's rate.
    - The end of a doubt: the shadow rows judged while in doubt are tested against the budget's
      rate (one-sided exact binomial test); a p-value below ``doubt_alarm_p`` raises the alarm.
      This catches a moderate shift (disagreement 3-4x the budget's), which the CUSUM, tuned
      for larger ones, takes thousands of rows to see, but only once the exit shares (or
      the watch) have said the traffic moved.

    Both count rows as independent only as far as the traffic allows: with ``design`` (a
    ``runtime/correlation.py`` estimate, read when a state is published) the chi-square
    statistic and each shadow row's log-likelihood ratio are divided by the design effect, so a camera's run of alike frames
    weighs as the few independent rows it is worth (shadow checks take whole requests, whose
    rows are often one scene).
    """

    def __init__(self, config: DriftConfig, budget: float, design=None):
        self.config = config
        self.budget = budget
        self.design = design
        d0 = min(max(1.0 - budget, 1e-4), 0.5)
        self._d0 = d0
        self.llr_agree, self.llr_disagree = _llr(
            d0, min(config.shift_factor * d0 + config.shift_margin, 0.9))
        self.watch_agree, self.watch_disagree = _llr(d0, min(config.watch_factor * d0, 0.9))
        self._lock = threading.Lock()
        self.events = 0
        self.doubts = 0
        self._expected: Optional[torch.Tensor] = None
        self.reset(None)

    def reset(self, exit_shares: Optional[Sequence[float]], watching: Optional[bool] = None,
              deff: Optional[float] = None, carry: bool = False):
        """Start watching a new serving state with these expected exit shares (None: exits off).

        ``watching`` (default: shares given): the state has exits on. A state with exits on but
        no expected shares (an artifact saved without them) is still judged by its shadow rows
        (the CUSUM and the end of a doubt), only not by the share test. ``deff``: the design
        effect of the traffic the state was calibrated on (default: the live estimate now; a
        loaded artifact passes the one its save recorded). ``carry``: a round's new state on the
        same traffic (no alarm between): the shadow rows' CUSUM goes on from where the state
        before, if it had exits on, left it. Each state is certified at the budget, so the
        in-control rate holds across states; reset at every round (every ~1,000 requests,
        ~50 shadow rows once exits are on), it could never add up evidence of a slow drift."""
        with self._lock:
            carried = carry and self._watching
            self._watching = exit_shares is not None if watching is None else bool(watching)
            self._expected = None if exit_shares is None else \
                torch.tensor(exit_shares, dtype=torch.float64).clamp_min(1e-3)
            if self._expected is not None:
                self._expected /= self._expected.sum()
            self._counts = None
            # The design effect of the traffic the new state was calibrated on, held fixed: a
            # shift makes the live estimate soar (old and new traffic in one window look like
            # correlation), and dividing by that would blind the monitor to the shift itself.
            if deff is None:
                deff = 1.0 if self.design is None else self.design.value
            self._deff_at_reset = max(1.0, float(deff))
            if not carried:
                self._cusum = 0.0
                self._watch_cusum = 0.0
                self._judged = 0
                self._disagreed = 0
            self._doubt_left = 0
            self._rejected_in_a_row = 0  # consecutive exit-share windows that rejected
            self._next_look = 1          # the next look at the window's counts (doubt_looks)
            self._doubt_from = (0, 0)   # (judged, disagreed) when the current doubt began

    @property
    def in_doubt(self) -> bool:
        return self._doubt_left > 0

    def observe(self, exit_counts: Sequence[int], shadow_ok: Optional[torch.Tensor]) -> Verdict:
        """Take one request: rows per exit (last: backbone; for a shadow request, where the rows
        would have left) and, if shadowed, each row's agreement."""
        with self._lock:
            if not self._watching:
                return Verdict(OK)
            if self._expected is not None:
                self._test_shares(exit_counts)
            if shadow_ok is not None:
                ok = shadow_ok.cpu().tolist()
                w = 1.0 / self._deff()
                for a in ok:
                    self._cusum = max(0.0, self._cusum + w * (self.llr_agree if a else
                                                              self.llr_disagree))
                    self._watch_cusum = max(0.0, self._watch_cusum + w * (
                        self.watch_agree if a else self.watch_disagree))
                self._judged += len(ok)
                self._disagreed += len(ok) - sum(ok)
                live = self._disagreed / max(self._judged, 1)
                if self._cusum > self.config.cusum_threshold:
                    self.events += 1
                    return Verdict(ALARM, live, f"CUSUM {self._cusum:.1f} over {self._judged} "
                                                f"shadow rows (disagreement {live:.3f})")
                if self._doubt_left:
                    self._doubt_left = max(0, self._doubt_left - len(ok))
                    if not self._doubt_left:
                        alarm = self._end_doubt()
                        if alarm:
                            self.events += 1
                            return Verdict(ALARM, live, alarm)
                elif self.config.watch_threshold > 0 and \
                        self._watch_cusum > self.config.watch_threshold:
                    self._watch_cusum = 0.0     # the shadow rows lean toward a slow shift
                    self._begin_doubt()
            return Verdict(DOUBT if self._doubt_left else OK)

    def _begin_doubt(self):
        self.doubts += 1
        self._doubt_left = self.config.doubt_rows
        self._doubt_from = (self._judged, self._disagreed)

    def _end_doubt(self) -> str:
        """Test the rows the doubt judged against the budget's rate; the alarm's reason, or ""."""
        n = self._judged - self._doubt_from[0]
        k = self._disagreed - self._doubt_from[1]
        p = self._doubt_p_value(n, k)
        if p < self.config.doubt_alarm_p:
            return (f"{k} of {n} shadow rows judged in doubt disagree ({k / n:.3f}; "
                    f"p = {p:.1e} at the budget's rate)")
        return ""

    def _doubt_p_value(self, judged: int, disagreed: int) -> float:
        """P(at least ``disagreed`` of ``judged`` rows disagreeing | the budget's rate), rows
        scaled by the design effect (a camera's alike frames are worth fewer independent rows)."""
        d = self._deff()
        n = int(judged / d)
        k = int(disagreed / d)
        if k == 0 or n == 0:
            return 1.0
        return max(0.0, 1.0 - binomial_tail(k - 1, n, self._d0))

    def _deff(self) -> float:
        return self._deff_at_reset

    def _test_shares(self, exit_counts):
        # plain ints between looks: a tensor op per request costs ~10 us on a cold request path
        self._counts = list(exit_counts) if self._counts is None else \
            [a + b for a, b in zip(self._counts, exit_counts)]
        n = float(sum(self._counts))
        correlated = self._deff() > CORRELATED_DEFF
        need = self.config.doubt_windows if correlated else 1
        # Independent traffic: the window's counts so far are tested every window_rows /
        # doubt_looks rows, each look at doubt_p / doubt_looks (a Bonferroni split keeps a
        # window's false doubts within doubt_p), so a large shift is caught after a few dozen
        # rows rather than a whole window of answers it spoiled. Correlated traffic waits for
        # whole windows: a scene that swings a part of one must not count as a window.
        looks = 1 if correlated else self.config.doubt_looks
        full = n >= self.config.window_rows
        if not full and n < self._next_look * self.config.window_rows / looks:
            return
        self._next_look = int(n * looks // self.config.window_rows) + 1
        counts = torch.tensor(self._counts, dtype=torch.float64)
        rejected = share_p_value(counts, self._expected, self._deff()) < \
            self.config.doubt_p / looks
        if not (rejected or full):
            return
        self._counts, self._next_look = None, 1     # the window ends: a new one begins
        self._rejected_in_a_row = self._rejected_in_a_row + 1 if rejected else 0
        if self._rejected_in_a_row >= need and not self._doubt_left:
            self._begin_doubt()


def _llr(d0: float, d1: float):
    """A CUSUM's steps for one agreeing and one disagreeing row: the log-likelihood ratio of
    disagreement rate ``d1`` (out of control) against ``d0`` (in control)."""
    return math.log((1 - d1) / (1 - d0)), math.log(d1 / d0)


MIN_EXPECTED = 5.0   # independent rows expected per cell for the chi-square to hold


def share_p_value(counts: torch.Tensor, expected_shares: torch.Tensor, deff: float) -> float:
    """Chi-square p-value of rows per exit (``counts``) against the shares calibration
    predicted, with rows counted as ``counts / deff`` independent ones. The exits expected to
    take fewest rows are pooled into one cell until it expects ``MIN_EXPECTED`` (below that the
    chi-square does not hold: two rows at an exit expected to take 0.03 read as p < 1e-9)."""
    n = float(counts.sum()) / deff
    obs, exp = counts / deff, expected_shares * n
    order = torch.argsort(exp)
    obs, exp = obs[order], exp[order]
    small = int((exp < MIN_EXPECTED).sum())
    if small:   # pool every small cell, and more of the next smallest until the pool reaches it
        k = max(small, int((torch.cumsum(exp, 0) < MIN_EXPECTED).sum()) + 1)
        obs = torch.cat([obs[:k].sum().reshape(1), obs[k:]])
        exp = torch.cat([exp[:k].sum().reshape(1), exp[k:]])
    df = len(exp) - 1
    if df < 1 or float(exp.min()) <= 0:
        return 1.0
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(chi2 / 2, dtype=torch.float64)))
