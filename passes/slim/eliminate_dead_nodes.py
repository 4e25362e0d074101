"""eliminate_dead_nodes: remove nodes whose outputs reach no graph output, and constants nobody reads.

Walks If/Loop/Scan bodies too (a tensor read only inside a branch stays alive). Graph inputs are part
of the model's contract and are never removed. Exact: the computed outputs are untouched.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph_edit import constant_nbytes
from onnxslim.pass_base import Pass, PassContext, PassResult, iter_graphs

__all__ = ["EliminateDeadNodes"]


def _constants(graph: gs.Graph) -> dict[int, gs.Constant]:
    found: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    found[id(t)] = t
        for t in g.outputs:
            if isinstance(t, gs.Constant):
                found[id(t)] = t
    return found


class EliminateDeadNodes(Pass):
    """Remove nodes and initializers that no graph output depends on (subgraphs included)."""

    name = "eliminate_dead_nodes"

    def run(self, ctx: PassContext) -> PassResult:
        graph = ctx.graph
        nodes_before = sum(len(g.nodes) for g in iter_graphs(graph))
        consts_before = _constants(graph)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True, recurse_functions=False)
        nodes_after = sum(len(g.nodes) for g in iter_graphs(graph))
        consts_after = _constants(graph)
        gone = [t for k, t in consts_before.items() if k not in consts_after]
        result = PassResult()
        result.count("nodes_removed", nodes_before - nodes_after)
        result.count("initializers_removed", len(gone))
        result.count("bytes_saved", sum(constant_nbytes(t) for t in gone))
        result.modified = nodes_after != nodes_before or bool(gone)
        return result
