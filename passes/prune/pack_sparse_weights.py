"""pack_sparse_weights: store mostly-zero constants as a bitmask plus their non-zero values (exact).

ONNX's ``sparse_initializer`` (COO) keeps int64 indices, 8 bytes per kept value, so a 50%-sparse float weight is
1.5x its dense bytes. Here a constant ``w`` with ``nnz`` non-zeros becomes two initializers, ``ceil(n / 8)`` bytes
of packed mask bits and ``nnz + 1`` values (a leading 0), and a chain of standard ops (opset >= 11) that rebuilds
it::

    bits  = Mod(BitShift(mask[B, 1], [7..0]), 2)         # [B, 8] uint8, the mask's bits (MSB first)
    keep  = Cast(Slice(Reshape(bits, [-1]), 0, n), int64) # 1 where w != 0
    index = Mul(CumSum(keep), keep)                        # i-th non-zero -> i, zero -> 0
    w     = Reshape(Gather(values, index), shape)          # values[0] = 0

A 50%-sparse float32 weight takes 0.53x its dense bytes (int8 weights: 0.63x). Every input of the chain is a
constant, so onnxruntime folds it into the dense tensor once, when the session loads: inference runs exactly as
before (the QDQ fusions of an int8 model see an initializer again). The rebuilt values are bit-identical.
The mask is 1-bit codes of ``onnxslim.bit_packing``, the unpacking chain share_weights uses for its indices.

Packed: constants (initializers and ``Constant`` nodes, in every graph) of any numeric type with at least
``min_elements`` elements, read only by nodes of one graph, not a graph output, whose packed form is at most
``1 - min_saving`` of their dense bytes. The constant keeps its name (now the chain's output), so nothing that
names tensors changes. Run it last: passes after it see the chain, not a constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.bit_packing import mask_index_chain, pack_codes, unpack_codes
from onnxslim.bit_packing import packed_nbytes as packed_code_bytes
from onnxslim.graph_edit import peek_values, replace_input
from onnxslim.pass_base import Pass, PassContext, PassResult

__all__ = ["PackSparseWeights", "packed_nbytes", "pack_bitmask", "unpack_bitmask"]


def packed_nbytes(n: int, nnz: int, itemsize: int) -> int:
    return packed_code_bytes(n, 1) + (nnz + 1) * itemsize


def pack_bitmask(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask bytes [B, 1] uint8, values [nnz + 1] with a leading 0) of ``w``."""
    flat = w.reshape(-1)
    keep = flat != 0
    mask = pack_codes(keep, 1)
    values = np.concatenate([np.zeros(1, dtype=w.dtype), flat[keep]])
    return mask, values


def unpack_bitmask(mask: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """What the op chain computes (numpy; the tests' reference)."""
    n = int(np.prod(shape)) if shape else 1
    keep = unpack_codes(mask, 1, n)
    return values[np.cumsum(keep) * keep].reshape(shape)


class PackSparseWeights(Pass):
    """Store mostly-zero constants as a bitmask plus non-zero values, rebuilt by foldable ops (exact)."""

    name = "pack_sparse_weights"
    exact = True

    @dataclass
    class Options:
        min_elements: int = field(default=1024, metadata={"help": "constants with fewer elements stay dense"})
        min_saving: float = field(
            default=0.1, metadata={"help": "pack only when the packed bytes are at most 1 - this of the dense"}
        )

        def validate(self) -> str | None:
            if not 0.0 <= self.min_saving < 1.0:
                return f"min_saving must be in [0, 1); got {self.min_saving}"
            if self.min_elements < 1:
                return f"min_elements must be >= 1; got {self.min_elements}"
            return None

    def run_graph(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if ctx.opset < 11:
            result.notes.append(f"opset {ctx.opset} < 11 (BitShift, CumSum): nothing packed")
            return result
        editor = ctx.edit(graph)
        position = {id(n): k for k, n in enumerate(graph.nodes)}
        outputs = {id(t) for t in graph.outputs}
        seen: set[int] = set()
        for node in list(graph.nodes):
            for t in list(node.inputs):
                const, source = _constant(t, node)
                if const is None or id(const) in seen or id(t) in outputs:
                    continue
                seen.add(id(const))
                readers = list(t.outputs)
                if not readers or any(id(r) not in position for r in readers):
                    continue  # read from another graph too: the chain would live in one of them only
                if any(r.op == "BitShift" for r in readers):
                    continue  # a packed mask already
                dense = peek_values(const)
                if dense.size < self.options.min_elements or dense.dtype.kind not in "fiu":
                    continue
                nnz = int(np.count_nonzero(dense))
                stored = packed_nbytes(dense.size, nnz, dense.dtype.itemsize)
                if stored > (1.0 - self.options.min_saving) * dense.nbytes:
                    continue
                first = min(readers, key=lambda r: position[id(r)]) if source is None else source
                out = self._chain(editor, t.name, np.asarray(dense), first)
                if source is None:
                    for r in readers:
                        replace_input(r, t, out)
                    out.name = t.name
                    t.name = editor.fresh_name(t.name + "_dense")  # the old initializer, now unread
                else:  # a Constant node: its output keeps the name, the chain produces it
                    old = source.outputs[0]
                    editor.remove_node(source)
                    for r in readers:
                        replace_input(r, old, out)
                    out.name = old.name
                    old.name = editor.fresh_name(old.name + "_dense")
                result.count("constants_packed")
                result.count("bytes_saved", dense.nbytes - stored)
                result.layers.append(
                    {
                        "constant": out.name,
                        "dense_bytes": int(dense.nbytes),
                        "stored_bytes": int(stored),
                        "sparsity": round(1 - nnz / dense.size, 4),
                    }
                )
                result.modified = True
        editor.commit()
        return result

    def _chain(self, editor, base: str, dense: np.ndarray, before: gs.Node) -> gs.Variable:
        mask, values = pack_bitmask(dense)
        n = dense.size
        c = lambda suffix, v: editor.new_constant(f"{base}_{suffix}", np.asarray(v))
        v = lambda suffix, dtype, shape: gs.Variable(editor.fresh_name(f"{base}_{suffix}"), dtype=dtype, shape=shape)
        index = mask_index_chain(editor, base, c("mask", mask), n, before)
        gathered = v("values_dense", dense.dtype, [n])
        out = gs.Variable(editor.fresh_name(base + "_unpacked"), dtype=dense.dtype, shape=list(dense.shape))
        nodes = [
            gs.Node("Gather", inputs=[c("values", values), index], outputs=[gathered], attrs={"axis": 0}),
            gs.Node("Reshape", inputs=[gathered, c("shape", np.array(dense.shape, np.int64))], outputs=[out]),
        ]
        for node in nodes:
            node.name = editor.fresh_name(f"{base}_{node.op.lower()}")
            editor.insert_node(node, before=before)
        return out


def _constant(t: gs.Tensor, reader: gs.Node) -> tuple[gs.Constant | None, gs.Node | None]:
    """(the constant, its Constant node or None for an initializer) behind input ``t`` of ``reader``."""
    if isinstance(t, gs.Constant):
        return t, None
    node = t.inputs[0] if len(t.inputs) == 1 else None
    if (
        node is not None
        and node.op == "Constant"
        and not node.domain
        and isinstance(node.attrs.get("value"), gs.Constant)
    ):
        return node.attrs["value"], node
    return None, None
