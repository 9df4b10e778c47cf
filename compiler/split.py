"""Split a GraphModule at cut points into stages that each map one tensor to the next.

Before (cuts at ``layer1`` and ``layer3``)::

    def forward(self, x):
        ... layer1 = ... layer3 = ... return fc

After: three GraphModules ``stage0(x) -> layer1``, ``stage1(layer1) -> layer3``,
``stage2(layer3) -> fc``; each copies the node metadata and the parameters it reads.
"""
from typing import List

import torch.fx as fx


def split_stages(gm: fx.GraphModule, cut_names: List[str]) -> List[fx.GraphModule]:
    """Stages of ``gm`` split after each node in ``cut_names`` (cut points, in graph order)."""
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    bounds = [by_name[c] for c in cut_names]
    stages, start = [], 0
    order = {n: i for i, n in enumerate(nodes)}
    ends = [order[b] for b in bounds] + [len(nodes) - 1]
    for k, end in enumerate(ends):
        graph = fx.Graph()
        env = {}
        if k == 0:
            segment = nodes[:end + 1]
        else:
            prev = bounds[k - 1]
            env[prev] = graph.placeholder(prev.name)
            env[prev].meta = dict(prev.meta)
            segment = nodes[start:end + 1]

        def lookup(n, graph=graph, env=env):
            if n not in env:  # a parameter read before this segment: re-read it here
                if n.op != "get_attr":
                    raise RuntimeError(f"node {n.name} crosses cut {cut_names}; not a cut point")
                env[n] = graph.get_attr(n.target)
                env[n].meta = dict(n.meta)
            return env[n]

        for n in segment:
            if n.op == "output":
                graph.output(fx.map_arg(n.args[0], lookup))
                break
            if n.op == "get_attr" and not any(order[u] <= end for u in n.users):
                continue  # read only by later stages
            env[n] = graph.node_copy(n, lookup)
        else:
            graph.output(env[nodes[end]])
        graph.lint()
        stages.append(fx.GraphModule(gm, graph, f"Stage{k}"))
        start = end + 1
    return stages
