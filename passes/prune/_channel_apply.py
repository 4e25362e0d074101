"""Private helper of prune_channels: carry out the removal the analysis planned (weights, attributes, shapes).

``Weights`` holds float64 working copies of the constants a pass run edits (recovery refits them first, the
removal slices them after), written back once through ``GraphEditor.set_constant_input`` (a constant another
node still reads is never edited in place). MACs are counted from inferred shapes, for the stats.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import GraphEditor, const_value, constant_source, peek_values

from ._channel_groups import Analysis, Group, attr, float_const

__all__ = ["Weights", "apply_removal", "count_macs", "channel_norms"]


class Weights:
    """Working copies of constant inputs, keyed by (node, input)."""

    def __init__(self) -> None:
        self._work: dict[tuple[int, int], tuple[gs.Node, int, np.ndarray, np.dtype, int]] = {}

    def has(self, node: gs.Node, i: int) -> bool:
        return (id(node), i) in self._work

    def get(self, node: gs.Node, i: int) -> np.ndarray:
        key = (id(node), i)
        if key not in self._work:
            src = constant_source(node.inputs[i])
            arr = peek_values(src.constant)
            self._work[key] = (node, i, arr.astype(np.float64), arr.dtype, arr.size)
        return self._work[key][2]

    def set(self, node: gs.Node, i: int, values: np.ndarray) -> None:
        if not self.has(node, i) and _present(node, i):
            self.get(node, i)
        old = self._work.get((id(node), i))
        if old is None:  # a new input (a bias recovery adds): as the weight's dtype
            dtype = np.dtype(constant_source(node.inputs[1]).constant.dtype)
            self._work[(id(node), i)] = (node, i, values, dtype, 0)
        else:
            self._work[(id(node), i)] = (node, i, values, old[3], old[4])

    def write(self, editor: GraphEditor) -> int:
        """Write every working copy back; the number of constant elements removed."""
        removed = 0
        for node, i, arr, dtype, size in self._work.values():
            editor.set_constant_input(node, i, arr.astype(dtype), f"{node.name or node.op}_pruned")
            removed += size - arr.size
        return removed


def _present(node: gs.Node, i: int) -> bool:
    return i < len(node.inputs) and bool(node.inputs[i].name)


def channel_norms(arr: np.ndarray, axis: int, p: int = 2) -> np.ndarray:
    """L1 or L2 norm of each slice of ``arr`` along ``axis``."""
    rows = np.moveaxis(np.asarray(arr, np.float64), axis, 0).reshape(arr.shape[axis], -1)
    return np.abs(rows).sum(axis=1) if p == 1 else np.sqrt((rows * rows).sum(axis=1))


def apply_removal(
    editor: GraphEditor, analysis: Analysis, groups: list[Group], removed: dict[int, np.ndarray], weights: Weights
) -> int:
    """Delete the ``removed`` channels (space index -> sorted channel indices) everywhere the groups' edits and
    fixups say; returns the constant elements removed."""
    done: set[tuple[int, int, int]] = set()
    for g in groups:
        for e in g.edits:
            r = removed.get(e.space)
            key = (id(e.node), e.input, e.axis)
            if r is None or not len(r) or key in done:
                continue
            done.add(key)
            if not _present(e.node, e.input) and not weights.has(e.node, e.input):
                continue  # an absent optional bias
            weights.set(e.node, e.input, np.delete(weights.get(e.node, e.input), r, axis=e.axis))
    params = weights.write(editor)
    kept = {s: analysis.spaces[s].size - len(r) for s, r in removed.items()}
    for g in groups:
        for f in g.fixups:
            if not any(len(removed.get(s, ())) for s in f.spaces):
                continue
            node = f.node
            if f.kind == "group":
                node.attrs["group"] = kept[f.spaces[0]] // f.divisor
            elif f.kind == "split":
                sizes = np.array([kept.get(s, analysis.spaces[s].size) for s in f.spaces], dtype=np.int64)
                if analysis.opset >= 13:
                    node.attrs.pop("num_outputs", None)
                    editor.set_constant_input(node, 1, sizes, f"{node.name or 'split'}_sizes")
                else:
                    node.attrs["split"] = [int(v) for v in sizes]
            else:  # reshape / resize: one entry of a constant shape input
                values = np.array(const_value(node.inputs[f.input]), copy=True)
                values.reshape(-1)[f.entry] = kept[f.spaces[0]]
                editor.set_constant_input(node, f.input, values, f"{node.name or node.op}_shape")
    for s, r in removed.items():
        space = analysis.spaces[s]
        shape = space.tensor.shape
        if len(r) and shape is not None and len(shape) == space.rank and isinstance(shape[space.axis], int):
            shape = list(shape)
            shape[space.axis] = kept[s]
            space.tensor.shape = shape
    return params


def count_macs(graph: gs.Graph, types: dict) -> tuple[int, int]:
    """Multiply-accumulates of the Conv / ConvTranspose / Gemm / MatMul layers for one sample (a symbolic
    leading batch counts as 1), and the number of such layers left out for want of static shapes."""
    total = unknown = 0
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain or len(node.inputs) < 2:
            continue
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        dims = [types.get(t.name, (None, None))[1] for t in (x, y)]
        src = float_const(w)
        wdims = [int(d) for d in src.constant.shape] if src is not None else types.get(w.name, (None, None))[1]
        if any(d is None for d in dims) or wdims is None:
            unknown += 1
            continue
        xd, yd = ([1 if j == 0 and not (isinstance(v, int) and v > 0) else v for j, v in enumerate(d)] for d in dims)
        if not all(isinstance(v, int) and v > 0 for v in [*xd, *yd, *wdims]):
            unknown += 1
            continue
        if node.op == "Conv":
            total += int(np.prod(yd)) * int(np.prod(wdims[1:]))
        elif node.op == "ConvTranspose":
            total += int(np.prod(xd)) * int(np.prod(wdims[1:]))
        else:
            k = xd[0] if node.op == "Gemm" and int(attr(node, "transA", 0)) else xd[-1]
            total += int(np.prod(yd)) * int(k)
    return total, unknown
