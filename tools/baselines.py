"""Baseline exit heads and exit policies, scored on the same rows as the online cache.

Every baseline here sits on the same frozen backbone and is judged by the same rule as ours:
agreement with the backbone, FLOPs saved with the heads' own cost counted, thresholds chosen on
held-out rows so that the Wilson lower bound of agreement meets the budget (runtime.calibrate).

    sdn         SDN-style internal classifiers (Kaya 2019, "IC-only" on a frozen backbone) at the
                cut points nearest 15/30/45/60/75/90% of the FLOPs: avg + max pooling to at most
                4x4 then one Linear (a Linear over both poolings contains SDN's learned mix), one
                global max-softmax threshold; distilled from the backbone, no labels.
    apparate    Apparate-style ramps (SOSP 2024) at every cut point: global average pooling + one
                Linear, per-ramp thresholds chosen jointly (runtime.calibrate.choose_thresholds,
                which also switches off ramps that do not pay); no labels.
    paper       the seed paper's configuration (aminabedi/Automated-Layer-Caching): an exit after
                each stage (the last cut point at each spatial resolution but the last), heads
                that flatten the un-pooled map into Linear(d, 512) - ReLU - Linear (256 wide for
                the last exit), one global threshold; no labels. Calibrating that threshold to
                the budget is more than the paper did (it fixed one by hand).
    branchynet  heads of our own shape at our own exits, trained with the true labels (the other
                side of the line: labels are not available to a label-free cache), an entropy
                criterion, per-exit thresholds chosen as ours are.

Offline protocol (see BENCHMARKS.md): heads train on the first half of a seed's stream order
minus its last ``calib_share``, thresholds are chosen on that held-out tail, and every figure is
measured on the second half, the rows the online cache is scored on.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from compiler import exit_rule
from compiler.analysis.flops import FlopCounter
from compiler.config import RewriteConfig
from compiler.heads import HeadSpec, Pool, plan_heads
from compiler.split import split_stages
from runtime.calibrate import INF, Plan, choose_thresholds, evaluate, wilson_lower, z_of
from runtime.learner import HeadLearner
from tools.records import Record

SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)
LABEL_LOGIT = 12.0          # one-hot labels as "teacher logits": softmax puts ~1 - 1e-4 on the label


# ----- pooling of an activation into a feature row ----------------------------------------------
class MixPool(nn.Module):
    """SDN-style: average and max pooling to at most ``k`` x ``k``, concatenated (over height
    and width: ``hwc`` maps are [B, H, W, C])."""

    def __init__(self, k: int = 4, hwc: bool = False):
        super().__init__()
        self.k = k
        self.hwc = hwc

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 4:
            return h.flatten(1)
        if self.hwc:
            h = h.permute(0, 3, 1, 2)
        k = min(self.k, h.shape[2], h.shape[3])
        a = nn.functional.adaptive_avg_pool2d(h, k)
        m = nn.functional.adaptive_max_pool2d(h, k)
        return torch.cat([a.flatten(1), m.flatten(1)], 1)


class AvgPool(nn.Module):
    """Apparate-style ramp input: global average pooling (``hwc`` maps are [B, H, W, C])."""

    def __init__(self, hwc: bool = False):
        super().__init__()
        self.hwc = hwc

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 4:
            return h.mean(dim=[1, 2] if self.hwc else [2, 3])
        if h.dim() == 3:
            return h.mean(dim=1)
        return h.flatten(1)


class Flatten(nn.Module):
    """The seed paper's heads read the whole un-pooled map."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.flatten(1)


# ----- baseline definitions ---------------------------------------------------------------------
@dataclass
class BaselineSpec:
    name: str
    title: str
    placement: str          # "sdn" | "all" | "stage_ends" | "ours"
    pool: str               # "mix4" | "avg" | "flat" | "ours"
    hidden: str             # "none" | "paper" | "ours"
    policy: str             # "global" | "per_exit"
    labels: bool = False
    score: str = "maxprob"  # "maxprob" | "entropy"
    epochs: int = 20
    store_half: bool = False  # keep features as float16 (large, un-pooled maps)


BASELINES: Dict[str, BaselineSpec] = {
    "sdn": BaselineSpec("sdn", "SDN-style ICs, one global threshold", "sdn", "mix4", "none",
                        "global"),
    "apparate": BaselineSpec("apparate", "Apparate-style ramps, per-ramp thresholds", "all", "avg",
                             "none", "per_exit"),
    "paper": BaselineSpec("paper", "seed paper: exit per stage, flattened heads, global threshold",
                          "stage_ends", "flat", "paper", "global", epochs=4, store_half=True),
    "branchynet": BaselineSpec("branchynet", "BranchyNet-style: our heads trained WITH labels, "
                               "entropy, per-exit thresholds", "ours", "ours", "ours", "per_exit",
                               labels=True, score="entropy"),
}


@dataclass
class Exit:
    cut: str
    fraction: float
    flops_before: int
    shape: tuple
    pool: nn.Module
    classifier: nn.Sequential
    head_flops: int = 0
    head_params: int = 0


@dataclass
class ExitSet:
    """A baseline's exits over a backbone with pure-FLOPs costs (fractions of the backbone)."""

    spec: BaselineSpec
    exits: List[Exit]
    total_flops: int
    stage_cost: torch.Tensor = field(default=None)   # [E+1]
    head_cost: torch.Tensor = field(default=None)    # [E]

    def __post_init__(self):
        bounds = [0] + [e.flops_before for e in self.exits] + [self.total_flops]
        self.stage_cost = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])],
                                       dtype=torch.float64) / self.total_flops
        self.head_cost = torch.tensor([e.head_flops for e in self.exits],
                                      dtype=torch.float64) / self.total_flops

    def describe(self) -> List["ExitDescription"]:
        return [ExitDescription(e.cut, e.fraction, e.head_flops, e.head_params)
                for e in self.exits]


@dataclass
class ExitDescription(Record):
    """A baseline exit as reported: its cut point, FLOPs fraction and head size."""

    cut: str
    fraction: float
    head_flops: int
    head_params: int


def module_flops(module: nn.Module, shape: Sequence[int]) -> int:
    """FLOPs of ``module`` on one row of ``shape`` (batch dimension ignored)."""
    counter = FlopCounter()
    with torch.no_grad(), counter:
        module(torch.zeros((1,) + tuple(shape[1:])))
    return counter.flops


def stage_end_cuts(cuts) -> list:
    """The last preferred cut point at each spatial resolution, all but the deepest resolution:
    the end of each ResNet stage (layer1..layer3), of each VGG block before its max-pool, ..."""
    pool = [c for c in cuts if c.preferred and c.fraction < 0.999 and len(c.shape) == 4]
    if not pool:
        return []
    last = {}
    for c in pool:
        last[tuple(c.shape[2:])] = c      # graph order: the last one at a size wins
    ends = sorted(last.values(), key=lambda c: c.position)
    deepest = tuple(pool[-1].shape[2:])
    return [c for c in ends if tuple(c.shape[2:]) != deepest]


def place(spec: BaselineSpec, cuts, our_exit_names: Sequence[str]) -> list:
    """Cut points a baseline puts exits at."""
    usable = [c for c in cuts if c.preferred and 0.0 < c.fraction < 0.999]
    if spec.placement == "ours":
        by = {c.name: c for c in cuts}
        return [by[n] for n in our_exit_names]
    if spec.placement == "all":
        return usable
    if spec.placement == "stage_ends":
        return stage_end_cuts(cuts)
    chosen = []
    for f in SDN_FRACTIONS:
        free = [c for c in usable if c not in chosen]
        if free:
            chosen.append(min(free, key=lambda c: abs(c.fraction - f)))
    return sorted(chosen, key=lambda c: c.position)


def build_exit_set(spec: BaselineSpec, an, our_exit_names: Sequence[str],
                   head_budget: float = RewriteConfig.head_budget,
                   max_feature_dim: int = RewriteConfig.max_feature_dim) -> ExitSet:
    """Heads (fresh) for baseline ``spec`` on the analysed backbone ``an``; "ours" heads are
    sized as the compiler sizes them (``head_budget``, ``max_feature_dim``: its defaults)."""
    num_classes = int(an.output.shape[1])
    chosen = place(spec, an.cuts, our_exit_names)
    ours = {}
    if spec.pool == "ours":
        for c, hs in zip(chosen, plan_heads([c.shape for c in chosen], num_classes,
                                            int(head_budget * an.params), max_feature_dim,
                                            [c.channels_last for c in chosen])):
            ours[c.name] = hs
    exits = []
    for k, c in enumerate(chosen):
        if spec.pool == "ours":
            hs: HeadSpec = ours[c.name]
            pool = Pool(hs.pool)
            layers = [nn.Linear(hs.feature_dim, hs.hidden), nn.ReLU(),
                      nn.Linear(hs.hidden, num_classes)] if hs.hidden else \
                [nn.Linear(hs.feature_dim, num_classes)]
        else:
            pool = {"mix4": MixPool(4, c.channels_last), "avg": AvgPool(c.channels_last),
                    "flat": Flatten()}[spec.pool]
            dim = pool(torch.zeros((1,) + tuple(c.shape[1:]))).shape[1]
            if spec.hidden == "paper":
                width = 256 if k == len(chosen) - 1 else 512
                layers = [nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, num_classes)]
            else:
                layers = [nn.Linear(dim, num_classes)]
        clf = nn.Sequential(*layers)
        head = nn.Sequential(pool, clf)
        exits.append(Exit(c.name, c.fraction, c.flops_before, tuple(c.shape), pool, clf,
                          module_flops(head, c.shape), sum(p.numel() for p in clf.parameters())))
    return ExitSet(spec, exits, an.total_flops)


@torch.no_grad()
def extract(gm, cuts, exit_sets: Sequence[ExitSet], x: torch.Tensor, batch: int = 500,
            device="cpu"):
    """One pass of ``x`` through the backbone split at every cut any exit set uses.

    Returns (features: {(baseline, exit index): [N, d]}, backbone logits [N, K]). Features are
    what each head's pooling makes of the activation, so the heads can be trained offline.
    """
    if torch.device(device).type != "cpu":
        gm = copy.deepcopy(gm)          # moving the stages must not move the caller's graph
    position = {c.name: c.position for c in cuts}
    names = sorted({e.cut for s in exit_sets for e in s.exits}, key=lambda n: position[n])
    stages = [st.to(device) for st in split_stages(gm, names)]
    users = {n: [] for n in names}
    for s in exit_sets:
        for i, e in enumerate(s.exits):
            users[e.cut].append((s.spec.name, i, e.pool, s.spec.store_half))
    chunks = {(b, i): [] for n in names for (b, i, _, _) in users[n]}
    logits = []
    for a in range(0, len(x), batch):
        h = x[a:a + batch].to(device)
        for n, stage in zip(names + [None], stages):
            h = stage(h)
            if n is None:
                break
            for b, i, pool, half in users[n]:
                f = pool(h).float().cpu()
                chunks[(b, i)].append(f.half() if half else f)
        logits.append(h.float().cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}, torch.cat(logits)


# ----- routing and scoring (the exit rule itself: compiler.exit_rule) ---------------------------
@dataclass
class BaselineScore(Record):
    """Figures of one routing on the scored rows; the ``calib_*`` fields: on the calibration rows
    its thresholds were chosen on."""

    rows: int
    flops_saved: float
    agreement: float
    exit_share: List[float]
    accuracy: Optional[float] = None            # with labels (reports only)
    thresholds: Optional[List[Optional[float]]] = None   # None: exit off
    calib_saving: Optional[float] = None
    calib_agreement: Optional[float] = None
    calib_lower_bound: Optional[float] = None


@dataclass
class BaselineRun(Record):
    """One baseline on one seed: its training and its figures per agreement budget."""

    seed: int
    train_rows: int
    calib_rows: int
    test_rows: int
    train_flops: float
    head_agreement: List[float]                 # each head on the scored rows
    oracle_saving: float
    budgets: Dict[str, BaselineScore] = field(default_factory=dict)


def score(first, head_pred, ref_pred, labels, stage_cost, head_cost, enabled) -> BaselineScore:
    """Figures of one routing: FLOPs saved, agreement, accuracy, share of rows per exit."""
    E, n = head_pred.shape
    left = first < E
    answer = ref_pred.clone()
    answer[left] = head_pred[first[left], torch.nonzero(left).flatten()]
    cost = exit_rule.row_cost(first, stage_cost, head_cost, enabled)
    return BaselineScore(
        rows=n, flops_saved=1.0 - cost.mean().item(),
        agreement=(answer == ref_pred).double().mean().item(),
        exit_share=(torch.bincount(first, minlength=E + 1).double() / max(n, 1)).tolist(),
        accuracy=None if labels is None else (answer == labels).double().mean().item())


def oracle_exits(head_pred: torch.Tensor, ref_pred: torch.Tensor, stage_cost=None,
                 head_cost=None) -> torch.Tensor:
    """Each row's oracle exit (E: the backbone): the earliest exit whose head agrees with the
    backbone or, when costs are given, the cheapest of those exits and the backbone alone (the
    same thing whenever a head costs less than the stages between two exits)."""
    E, n = head_pred.shape
    agree = head_pred == ref_pred[None]
    if stage_cost is None:
        return torch.where(agree.any(0), agree.float().argmax(0), torch.full((n,), E))
    cost = _oracle_costs(stage_cost, head_cost)                       # [E + 1]
    per = torch.where(agree, cost[:E, None], torch.full((E, n), float("inf"), dtype=cost.dtype))
    per = torch.cat([per, cost[E:].expand(1, n)])
    return per.argmin(0)


def _oracle_costs(stage_cost, head_cost):
    """Cost of answering at exit e (stages before it + its head only), and at E (backbone).

    The oracle knows where to stop: answering at e it is a cache whose one enabled exit is e;
    answering with the backbone, a cache with every exit off.
    """
    E = head_cost.shape[0]
    alone = torch.eye(E, dtype=torch.bool)
    at_exit = [exit_rule.exit_costs(stage_cost, head_cost, alone[e])[e] for e in range(E)]
    backbone = exit_rule.exit_costs(stage_cost, head_cost, torch.zeros(E, dtype=torch.bool))[E]
    return torch.stack(at_exit + [backbone])


def oracle_saving(head_pred, ref_pred, stage_cost, head_cost) -> float:
    """FLOPs saved by the oracle: each row is answered where it is cheapest to be right, at an
    exit whose head agrees with the backbone (paying the stages before it and that one head: it
    knows where to stop, so it evaluates no other head) or by the backbone alone. A ceiling for
    any cache that never answers against the backbone with these exits."""
    first = oracle_exits(head_pred, ref_pred, stage_cost, head_cost)
    return 1.0 - _oracle_costs(stage_cost, head_cost)[first].mean().item()


def global_threshold(conf, agree, stage_cost, head_cost, budget: float, confidence: float,
                     grid: int = 200) -> Plan:
    """One threshold shared by every exit: the most saving whose agreement bound meets the budget.

    All exits are on (their heads are paid) unless no threshold both pays and meets the bound,
    then all are off.
    """
    E, n = conf.shape
    z = z_of(confidence)
    qs = torch.linspace(0.0, 1.0, grid, dtype=conf.dtype)
    cands = torch.unique(torch.quantile(conf.flatten(), qs)).tolist() + [1.0 + 1e-9]
    best = Plan([INF] * E, 0.0, 1.0, wilson_lower(n, n, z), n)
    for t in cands:
        s, a = evaluate(conf, agree, stage_cost, head_cost, [t] * E)
        if s > best.saving and wilson_lower(a, n, z) >= budget:
            best = Plan([t] * E, s, a / n, wilson_lower(a, n, z), n)
    return best


def confidence_of(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """A head's confidence per row: the exit rule's ("maxprob") or 1 - normalised entropy."""
    if kind == "entropy":   # 1 = certain, 0 = uniform
        p = torch.softmax(logits.float(), 1)
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
        return 1.0 - ent / math.log(p.shape[1])
    return exit_rule.confidence(logits.float())


# ----- one baseline on one seed -----------------------------------------------------------------
def train_exit_set(es: ExitSet, feats: List[torch.Tensor], teacher: torch.Tensor,
                   labels: Optional[torch.Tensor], seed: int, lr: float = 3e-3,
                   batch_size: int = 256) -> HeadLearner:
    """Train the exit set's heads offline on (features, backbone logits) or on labels."""
    learner = HeadLearner([e.classifier for e in es.exits], seed)
    if es.spec.labels:
        teacher = nn.functional.one_hot(labels, teacher.shape[1]).float() * LABEL_LOGIT
    learner.train([f.float() for f in feats], teacher, es.spec.epochs, batch_size, lr, 1e-4)
    return learner


@torch.no_grad()
def head_outputs(learner: HeadLearner, feats: List[torch.Tensor], kind: str, chunk: int = 2000):
    """(confidence [E, n], prediction [E, n]) of every head on every row."""
    confs, preds = [], []
    for i, f in enumerate(feats):
        c, p = [], []
        for a in range(0, f.shape[0], chunk):
            logits = learner.predict(i, f[a:a + chunk].float())
            c.append(confidence_of(logits, kind))
            p.append(logits.argmax(1))
        confs.append(torch.cat(c))
        preds.append(torch.cat(p))
    return torch.stack(confs).double(), torch.stack(preds)


def run_baseline(es: ExitSet, feats_all: Dict, logits: torch.Tensor, labels: torch.Tensor,
                 order: torch.Tensor, budgets: Sequence[float], confidence: float = 0.95,
                 calib_share: float = 0.3, seed: int = 0) -> BaselineRun:
    """Train on the first half of ``order`` (minus its held-out tail), choose thresholds on that
    tail for each budget, and score on the second half. Returns figures per budget."""
    n = len(order)
    half = n // 2
    n_train = int(round(half * (1 - calib_share)))
    train_rows, calib_rows, test_rows = order[:n_train], order[n_train:half], order[half:]
    E = len(es.exits)
    feats = [feats_all[(es.spec.name, i)] for i in range(E)]
    ref = logits.argmax(1)
    learner = train_exit_set(es, [f[train_rows] for f in feats], logits[train_rows],
                             labels[train_rows], seed)
    c_conf, c_pred = head_outputs(learner, [f[calib_rows] for f in feats], es.spec.score)
    t_conf, t_pred = head_outputs(learner, [f[test_rows] for f in feats], es.spec.score)
    c_agree = c_pred == ref[calib_rows][None]
    out = BaselineRun(seed=seed, train_rows=int(n_train), calib_rows=int(half - n_train),
                      test_rows=int(n - half), train_flops=learner.flops,
                      head_agreement=(t_pred == ref[test_rows][None]).double().mean(1).tolist(),
                      oracle_saving=oracle_saving(t_pred, ref[test_rows], es.stage_cost,
                                                  es.head_cost))
    for b in budgets:
        if es.spec.policy == "global":
            plan = global_threshold(c_conf, c_agree, es.stage_cost, es.head_cost, b, confidence)
        else:
            plan = choose_thresholds(c_conf, c_agree, es.stage_cost, es.head_cost, b, confidence)
        threshold, enabled = exit_rule.split_thresholds(plan.thresholds)
        first = exit_rule.first_exit(t_conf, threshold, enabled)
        res = score(first, t_pred, ref[test_rows], labels[test_rows], es.stage_cost,
                    es.head_cost, enabled)
        res.thresholds = [None if t == INF else t for t in plan.thresholds]
        res.calib_saving, res.calib_agreement = plan.saving, plan.agreement
        res.calib_lower_bound = plan.lower_bound
        out.budgets[str(b)] = res
    return out
