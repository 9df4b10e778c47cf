"""Learning rounds and the thread that runs them: distil, calibrate on capped recent rows, propose a state."""
import logging
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from compiler import artifact
from compiler.heads import ExitHead, HeadSpec

from .buffer import CALIB, TRAIN, FeatureBuffer
from .calibrate import (INF, LTT_FAMILY, Plan, choose_thresholds, choose_thresholds_corrected,
                        choose_thresholds_ltt, exit_shares)
from .config import RuntimeConfig
from .costs import CostModel
from .learner import HeadLearner
from .tasks import ClassificationTask, Task, head_confidences

log = logging.getLogger("layer_cache.runtime")


@dataclass
class Proposal:
    """What a round proposes to serve; the runtime publishes it only if no drift came between."""

    classifiers: tuple
    thresholds: tuple
    plan: Optional[Plan]
    exit_shares: Optional[tuple]
    train_rows: int
    calib_rows: int
    promise: Optional[float] = None   # what exits would save were the held-out agreement exact
    idle: bool = False                # no exit on, and none would pay enough (Collector.after_round)
    whole: bool = False               # trained on fast_after rows: the whole-model paths serve


class LearningLoop:
    """One round: the most recent ``max_train_rows`` training rows distil the heads, the most
    recent held-out rows (``max_calib_rows`` independent rows' worth, ``calib_rows``) choose
    thresholds by the task's confidence and agreement, and a serving state is proposed."""

    def __init__(self, learner: HeadLearner, buffer: FeatureBuffer, costs: CostModel,
                 config: RuntimeConfig, exits: list, scripted_stages: list, device,
                 design=None, task: Task = None):
        self.learner = learner
        self.buffer = buffer
        self.costs = costs
        self.config = config
        self.exits = exits
        self.scripted_stages = scripted_stages
        self.device = device
        self.design = design   # runtime/correlation.py: held-out rows count as n / deff
        self.task = task or ClassificationTask()   # runtime/tasks.py: confidence and agreement

    def confidences(self, head_logits, feats, teacher):
        """(confidence, agrees) [E, n] of each head on held-out rows (the task's rule)."""
        return head_confidences(self.task, head_logits, feats, teacher)

    def choose(self, head_logits, feats, teacher, budget: float, round_seed: int,
               should_stop=None):
        """(plan, exit shares): thresholds meeting ``budget`` on held-out rows (feats,
        teacher), and the share of those rows leaving at each exit under them (last: the
        backbone; None when every exit is off)."""
        conf, agree = self.confidences(head_logits, feats, teacher)
        plan = self._choose(conf, agree, budget, round_seed, should_stop)
        return plan, (exit_shares(conf, plan.thresholds) if any(plan.enabled) else None)

    def _choose(self, conf, agree, budget: float, round_seed: int, should_stop=None) -> Plan:
        """The threshold rule's plan, or every exit off where it saves no more than
        ``min_saving``."""
        g = self.config.guarantee
        deff = 1.0 if self.design is None else max(1.0, self.design.value)
        kw = dict(should_stop=should_stop, effective_rows=conf.shape[1] / deff,
                  allowed=self.costs.within_miss_cap(self.config.serving.max_miss_overhead))
        if g.threshold_rule == "crossfit":
            rule = choose_thresholds_corrected
        else:
            rule = choose_thresholds_ltt
            kw["family"] = LTT_FAMILY[g.threshold_rule]
        plan = rule(conf, agree, self.costs.stage_cost, self.costs.head_cost, budget,
                    g.confidence, round_seed, **kw)
        if any(plan.enabled) and plan.saving <= self.min_saving:   # too little to serve
            return Plan.off(len(plan.thresholds), plan.n)
        return plan

    def calib_rows(self):
        """The most recent held-out rows, ``max_calib_rows`` independent rows' worth: with
        correlated traffic (design effect d) up to d times as many rows, so a long camera
        stream can gather the independent evidence a strict budget needs."""
        deff = 1.0 if self.design is None else max(1.0, self.design.value)
        return self.buffer.snapshot(CALIB, int(self.config.learning.max_calib_rows * deff))

    def run(self, round_index: int, should_stop, after_drift: bool = False) -> Optional[Proposal]:
        """Train and calibrate; None when too few rows have arrived yet (``after_drift``: the
        heads go on from what they learned before an alarm, ``min_train_after_drift``)."""
        cfg = self.config.learning
        feats, teacher = self.buffer.snapshot(TRAIN, cfg.max_train_rows)
        need = min(cfg.min_train, cfg.min_train_after_drift) if after_drift else cfg.min_train
        if teacher.shape[0] < need:
            return None
        self.learner.train(feats, teacher, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay,
                           should_stop=should_stop)
        cfeats, cteacher = self.calib_rows()
        plan, shares, promise, idle = None, None, None, False
        if cteacher.shape[0] >= cfg.min_calib:
            conf, agree = self.confidences(lambda e, f: self.learner.predict(e, f), cfeats,
                                           cteacher)
            plan = self._choose(conf, agree, self.config.guarantee.plan_budget,
                                self.config.seed + round_index, should_stop)
            shares = tuple(exit_shares(conf, plan.thresholds))
            promise = plan.saving if plan.saving > 0 else \
                self.promise(conf, agree, should_stop)
            idle = plan.saving <= 0 and promise <= self.idle_below
        classifiers = tuple(self.learner.folded(e).to(self.device) for e in range(len(self.exits)))
        thresholds = tuple(plan.thresholds) if plan else (INF,) * len(self.exits)
        whole = teacher.shape[0] >= self.config.serving.fast_after
        return Proposal(classifiers, thresholds, plan, shares if plan and plan.saving > 0 else None,
                        teacher.shape[0], cteacher.shape[0], promise, idle, whole)

    def _by_cost_model(self, setting: Optional[float], timed: float) -> float:
        """``setting``, or where None: ``timed`` when the cost model mixes in measured time,
        0 when it counts FLOPs (exact)."""
        if setting is not None:
            return float(setting)
        return timed if self.costs.latency_weight > 0 else 0.0

    @property
    def min_saving(self) -> float:
        """``LearningConfig.min_saving`` in force: a plan must save more to switch exits on."""
        return self._by_cost_model(self.config.learning.min_saving, 0.05)

    @property
    def idle_below(self) -> float:
        """``CollectConfig.idle_below`` in force: a round whose exits would save no more even
        at the point estimate counts toward backing off."""
        return self._by_cost_model(self.config.collect.idle_below, 0.10)

    def promise(self, conf, agree, should_stop=None) -> float:
        """What the exits would save on these held-out rows if their agreement were exact
        (the greedy search at the point estimate, no bound): more than more rows alone could
        certify, with heads as good as now (``CollectConfig.idle_below``)."""
        return choose_thresholds(conf, agree, self.costs.stage_cost, self.costs.head_cost,
                                 self.config.guarantee.plan_budget, 0.5, should_stop=should_stop,
                                 allowed=self.costs.within_miss_cap(
                                     self.config.serving.max_miss_overhead)).saving

    def fast_module(self, classifiers, thresholds):
        """The serving state as one scripted CachedModel (CPU; on CUDA the staged path runs
        its CUDA graphs), sharing the artifact's scripted stages."""
        if self.device.type != "cpu" or all(t == INF for t in thresholds):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = self.exit_blocks(classifiers, thresholds)
            return torch.jit.script(artifact.CachedModel(blocks, self.scripted_stages[-1]).eval())

    def exit_blocks(self, classifiers, thresholds) -> list:
        """Per exit, the artifact's scripted stage and a freshly scripted head holding
        ``classifiers[e]``, at ``thresholds[e]`` (a whole-model path's blocks)."""
        blocks = []
        for e, ex in enumerate(self.exits):
            head = ExitHead(HeadSpec(*(ex["head"][k] for k in ("pool", "feature_dim", "hidden",
                                                                "num_classes"))))
            head.classifier.load_state_dict(classifiers[e].state_dict())
            blk = artifact.ExitBlock(self.scripted_stages[e], torch.jit.script(head.eval()))
            artifact.set_exit(blk, thresholds[e])
            blocks.append(blk)
        return blocks


# Every live runtime, so the interpreter's exit can stop their learners before it tears down
# the C++ runtime under a thread that is still inside torch (that aborts the process).
_LIVE = weakref.WeakSet()


def _close_all():
    for rt in list(_LIVE):
        try:
            rt.close()
        except Exception:  # exiting anyway; never turn a clean exit into a traceback
            pass


import atexit  # noqa: E402

atexit.register(_close_all)


class LearnerThread:
    """Runs ``owner.learn()`` whenever woken, holding the owner only weakly: when the runtime is
    garbage-collected its finaliser stops the thread, so load/del cycles leave no learner."""

    JOIN_SECONDS = 1.0

    def __init__(self, owner):
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._thread = threading.Thread(target=_run, args=(weakref.ref(owner), self.stop,
                                                           self.wake),
                                        name="layer-cache-learner", daemon=True)
        weakref.finalize(owner, _stop, self.stop, self.wake)
        _LIVE.add(owner)
        self._thread.start()

    def close(self) -> bool:
        """Stop; the round in progress is abandoned at its next step. True if the thread ended."""
        _stop(self.stop, self.wake)
        if self._thread is not threading.current_thread():
            self._thread.join(self.JOIN_SECONDS)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _stop(stop, wake):
    stop.set()
    wake.set()


def _run(ref, stop, wake):
    while not stop.is_set():
        wake.wait(0.5)
        if stop.is_set():
            return
        if not wake.is_set():
            if ref() is None:
                return
            continue
        wake.clear()
        owner = ref()
        if owner is None:
            return
        try:
            owner.learn()
        except Exception:  # recorded by learn() in stats(); serving keeps the previous state
            log.exception("learning round failed; exits keep their previous state")
        finally:
            del owner
        time.sleep(0)
