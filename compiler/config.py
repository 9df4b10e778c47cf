"""Settings of the rewrite pass, in one documented dataclass."""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class RewriteConfig:
    """How ``compiler.rewrite`` analyses a model and places exits.

    input_shape:  example input shape, batch first (the batch size itself is ignored); None uses
                  the shape a .pt2 carries or the arch's default.
    leaf_modules: submodules fx must not trace into (qualified names or class names), the escape
                  hatch for untraceable code; analysis.trace.DEFAULT_LEAF_MODULES are always leaves.
    num_exits:    how many exits to place when ``exits`` is empty.
    exits:        cut point names (see --report) to use instead of the automatic choice.
    min_fraction, max_fraction: the FLOPs range (fraction of the model) exits are spread over.
    head_budget:  all heads together hold at most this fraction of the backbone's parameters.
                  Parameters, not FLOPs, bind: heads pool first, so even at 15% they cost about
                  0.5% of the backbone's FLOPs, and 15% lets the early heads have a hidden layer
                  (the demo saves 60.6% of FLOPs; 57.6% with ``--head-budget 0.05``).
    atol, rtol:   tolerance when checking that the artifact reproduces the model.
    seed:         seeds head initialisation and the example input.
    """

    input_shape: Optional[Tuple[int, ...]] = None
    leaf_modules: List[str] = field(default_factory=list)
    num_exits: int = 6
    exits: List[str] = field(default_factory=list)
    min_fraction: float = 0.05
    max_fraction: float = 0.9
    head_budget: float = 0.15
    atol: float = 1e-4
    rtol: float = 1e-4
    seed: int = 0
