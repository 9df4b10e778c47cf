"""The typed records of a benchmark run, as written to OUT/<backbone>.json and OUT/run.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from tools.baselines import BaselineRun, ExitDescription
from tools.bench.experiment import RunResult
from tools.bench.latency import LatencyResult
from tools.records import Record

RESULT_KEYS = ("backbone", "meta", "model", "backbone_accuracy", "ours", "baselines", "latency")


@dataclass
class ExitInfo(Record):
    """One exit the compiler placed: where it is and what its head costs."""

    name: str
    fraction: float          # of the backbone's FLOPs before it
    head_flops: int
    head_params: int
    pool: Optional[str] = None
    hidden: Optional[int] = None


@dataclass
class ModelInfo(Record):
    """The backbone and its artifact, from the compiler's manifest."""

    input_shape: List[int]
    total_flops: int
    params: int
    stage_flops: List[int]
    exits: List[ExitInfo]
    unsupported_ops: dict


@dataclass
class Meta(Record):
    source: str
    rows: int
    batch: int
    seeds: List[int]
    settings: dict           # Settings as a dict
    machine: dict            # tools.bench.provenance.machine_info
    date: str
    wall_s: Optional[float] = None


@dataclass
class OursRuns(Record):
    """The online cache at one budget: one run per seed."""

    seeds: List[RunResult] = field(default_factory=list)


@dataclass
class BaselineResult(Record):
    """One baseline over every seed."""

    title: str
    policy: str
    labels: bool
    exits: List[ExitDescription]
    epochs: int
    seeds: List[BaselineRun]
    wall_s: float


@dataclass
class BackboneResult(Record):
    """Everything BENCHMARKS.md reports for one backbone (OUT/<backbone>.json)."""

    backbone: str
    meta: Meta
    model: ModelInfo
    backbone_accuracy: Optional[float] = None
    baselines: Dict[str, BaselineResult] = field(default_factory=dict)
    ours: Dict[str, OursRuns] = field(default_factory=dict)       # by budget, as a string
    latency: Optional[LatencyResult] = None

    def ours_runs(self, budget) -> List[RunResult]:
        """The online runs at ``budget`` (any seed; none if it was not run)."""
        runs = self.ours.get(str(budget))
        return runs.seeds if runs else []

    def baseline_scores(self, name: str, budget) -> list:
        """Baseline ``name``'s BaselineScore per seed at ``budget``."""
        return [s.budgets[str(budget)] for s in self.baselines[name].seeds
                if str(budget) in s.budgets]


@dataclass
class RunInfo(Record):
    """OUT/run.json: the command and what it wrote."""

    command: str
    mode: str
    backbones: List[str]
    imagenet: bool
    wall_s: float
    machine: dict
    date: str
    code: dict = field(default_factory=dict)     # tools.bench.provenance.code_version
    out: Optional[str] = None
