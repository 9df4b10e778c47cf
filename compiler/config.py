"""Settings of the rewrite pass, in one documented dataclass, and their range checks."""
import argparse
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .errors import UsageError

MAX_EXITS = 64
MAX_DIMS = 8
MAX_ROW_ELEMENTS = 1 << 26     # 64 Mi values per input row (256 MiB as float32)


@dataclass
class RewriteConfig:
    """How ``compiler.rewrite`` analyses a model and places exits.

    input_shape:  example input shape, batch first (the batch size itself is ignored); None uses
                  the shape a .pt2 carries or the arch's default. 2 to 8 dims, each >= 1, at most
                  ``MAX_ROW_ELEMENTS`` values per row.
    leaf_modules: submodules fx must not trace into (qualified names or class names), the escape
                  hatch for untraceable code; analysis.trace.DEFAULT_LEAF_MODULES are always leaves.
                  Each must name a submodule or a class of the model.
    num_exits:    how many exits to place when ``exits`` is empty (1 to ``MAX_EXITS``; fewer
                  are placed when the model has fewer cut points).
    exits:        cut point names (see --report) to use instead of the automatic choice; no
                  name twice.
    min_fraction, max_fraction: the FLOPs range (fraction of the model) exits are spread over,
                  0 <= min < max <= 1.
    head_budget:  all heads together hold at most this fraction of the backbone's parameters,
                  in (0, 1]. Parameters, not FLOPs, bind: heads pool first, so even at 15% they
                  cost about 0.5% of the backbone's FLOPs, and 15% lets the early heads have a
                  hidden layer (the demo saves 60.6% of FLOPs; 57.6% with ``--head-budget 0.05``).
    max_feature_dim: an exit's pooled features hold at most this many values (0: no cap); a
                  wide layer then pools to a coarser grid, and the head's budget goes to its
                  hidden layer (global pooling is always allowed, whatever its size). The
                  runtime buffers every exit's features for each row it learns from (float16,
                  256 MB by default), so this also bounds a row's cost. Uncapped, ResNet-50 at
                  224 px held 950 rows (16-33 K values per exit) and vgg16_bn on 32 px 3,100:
                  too few to learn and certify from. Over seeds 0-3 (BENCHMARKS.md), 1024 saved
                  more than 4096 on vgg16_bn (52.3% against 46.2% at 0.99) and on the demo
                  (60.6% against 59.7% at 0.99 over seeds 0-7, 55.6% against 54.2% at 0.995).
    atol, rtol:   tolerance (>= 0) when checking that the artifact reproduces the model.
    seed:         seeds head initialisation and the example input (0 to 2**63 - 1).
    """

    input_shape: Optional[Tuple[int, ...]] = None
    leaf_modules: List[str] = field(default_factory=list)
    num_exits: int = 6
    exits: List[str] = field(default_factory=list)
    min_fraction: float = 0.05
    max_fraction: float = 0.9
    head_budget: float = 0.15
    max_feature_dim: int = 1024
    atol: float = 1e-4
    rtol: float = 1e-4
    seed: int = 0

    def validate(self) -> "RewriteConfig":
        """Raise UsageError (naming the CLI flag) for any setting out of range; returns self."""
        if self.input_shape is not None:
            check_shape(self.input_shape, "--input-shape")
        for name in self.leaf_modules:
            if not isinstance(name, str) or not name.strip():
                raise UsageError(f"--leaf-module {name!r} is not a module name; give a "
                                 f"submodule's qualified name or class name, e.g. layer1.0")
        if not _is_int(self.num_exits) or not 1 <= self.num_exits <= MAX_EXITS:
            raise UsageError(f"--num-exits {self.num_exits!r} is out of range; give 1 to "
                             f"{MAX_EXITS} (default {RewriteConfig.num_exits})")
        seen = set()
        for name in self.exits:
            if not isinstance(name, str) or not name:
                raise UsageError(f"--exits holds {name!r}, not a cut point name; see --report")
            if name in seen:
                raise UsageError(f"--exits names '{name}' twice; name each cut point once")
            seen.add(name)
        if len(self.exits) > MAX_EXITS:
            raise UsageError(f"--exits names {len(self.exits)} cut points; at most {MAX_EXITS}")
        if not (_is_fraction(self.min_fraction) and _is_fraction(self.max_fraction)
                and self.min_fraction < self.max_fraction):
            raise UsageError(f"min_fraction {self.min_fraction!r} and max_fraction "
                             f"{self.max_fraction!r} must satisfy 0 <= min < max <= 1")
        if not _is_number(self.head_budget) or not 0 < self.head_budget <= 1:
            raise UsageError(f"--head-budget {self.head_budget!r} is out of range; give a "
                             f"fraction of the backbone's parameters in (0, 1], e.g. "
                             f"{RewriteConfig.head_budget} (default)")
        if not _is_int(self.max_feature_dim) or self.max_feature_dim < 0:
            raise UsageError(f"--max-feature-dim {self.max_feature_dim!r} is out of range; give "
                             f"a whole number of values, 0 for no cap (default "
                             f"{RewriteConfig.max_feature_dim})")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise UsageError(f"{name} {value!r} must be a finite number >= 0")
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise UsageError(f"seed {self.seed!r} must be an integer in 0..2**63-1")
        return self


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_fraction(v) -> bool:
    return _is_number(v) and 0 <= v <= 1


def check_shape(shape, flag: str = "--input-shape") -> Tuple[int, ...]:
    """``shape`` as a tuple if it is a sane example input shape (batch first), else UsageError."""
    text = ",".join(str(d) for d in shape) if isinstance(shape, (tuple, list)) else repr(shape)
    if not isinstance(shape, (tuple, list)) or not all(_is_int(d) for d in shape):
        raise UsageError(f"{flag} {text} is not a list of integers; give batch,dims... e.g. "
                         f"1,3,224,224")
    if not 2 <= len(shape) <= MAX_DIMS:
        raise UsageError(f"{flag} {text} has {len(shape)} dimensions; give 2 to {MAX_DIMS} "
                         f"(batch first), e.g. 1,3,224,224")
    if min(shape) < 1:
        raise UsageError(f"{flag} {text} has a dimension below 1; every size is >= 1")
    row = 1
    for d in shape[1:]:
        row *= d
    if row > MAX_ROW_ELEMENTS:
        raise UsageError(f"{flag} {text} makes {row} values per input row, more than "
                         f"{MAX_ROW_ELEMENTS}; check the shape")
    return tuple(shape)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as one-line UsageErrors (the CLI prints them on one line
    and exits 2) instead of a usage block and SystemExit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def number(kind, lo=None, hi=None, lo_open=False):
    """An argparse ``type``: a finite int/float within [lo, hi] ((lo, hi] with ``lo_open``);
    the message says the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        ok = value is not None and (kind is int or math.isfinite(value))
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value <= hi
        if not ok:
            lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            hi_s = "" if hi is None else f"<= {hi}"
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(
                f"'{text}' is not {what} {' and '.join(s for s in (lo_s, hi_s) if s)}".strip())
        return value
    parse.__name__ = kind.__name__
    return parse
