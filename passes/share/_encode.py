"""Private helper of share_weights: store a shared weight as packed codes plus its codebook.

The weight, viewed as ``[rows, cols]`` after moving its output axes first (``order``), is rebuilt by::

    codes = unpack(words)                                   # onnxslim.bit_packing; b = 8: Cast(uint8 codes)
    view  = Gather(codebook[K], codes)                       # one codebook
          | GatherElements(codebook[rows, K], Reshape(codes, [rows, cols]), axis=1)   # one per output row
    w     = Transpose(Reshape(view, moved_shape), inverse(order))   # Transpose only when order is not identity

Every input is a constant: onnxruntime folds the chain into the dense weight once, at session load.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.bit_packing import pack_codes, packed_nbytes, unpack_chain

__all__ = ["stored_nbytes", "insert_decoder"]


def stored_nbytes(n: int, bits: int, codebook: np.ndarray) -> int:
    """Bytes of the packed codes and the codebook (the chain's small shape constants aside)."""
    return (n if bits == 8 else packed_nbytes(n, bits)) + int(codebook.nbytes)


def insert_decoder(
    editor,
    base: str,
    codes: np.ndarray,
    codebook: np.ndarray,
    bits: int,
    order: tuple[int, ...],
    shape: tuple[int, ...],
    before: gs.Node | None,
) -> gs.Variable:
    """Insert the decoding chain in front of ``before``; returns its output (the dense weight, ``shape``)."""
    rows, cols = codes.shape
    n = rows * cols
    dtype = codebook.dtype
    c = lambda suffix, v: editor.new_constant(f"{base}_{suffix}", np.asarray(v))
    v = lambda suffix, dt, shp: gs.Variable(editor.fresh_name(f"{base}_{suffix}"), dtype=dt, shape=shp)
    nodes = []
    if bits == 8:  # a byte per code already: no unpacking
        idx = v("codes", np.int64, [n])
        nodes.append(gs.Node("Cast", inputs=[c("codes_u8", codes.reshape(-1).astype(np.uint8))], outputs=[idx]))
        nodes[-1].attrs["to"] = 7  # INT64
    else:
        idx = unpack_chain(editor, base, c("codes_packed", pack_codes(codes, bits)), bits, n, before)
    moved = [int(shape[a]) for a in order]
    if codebook.shape[0] == 1:
        view = v("view", dtype, [n])
        nodes.append(gs.Node("Gather", inputs=[c("codebook", codebook[0]), idx], outputs=[view], attrs={"axis": 0}))
    else:
        grid, view = v("codes_grid", np.int64, [rows, cols]), v("view", dtype, [rows, cols])
        nodes.append(
            gs.Node("Reshape", inputs=[idx, c("grid_shape", np.array([rows, cols], np.int64))], outputs=[grid])
        )
        nodes.append(
            gs.Node("GatherElements", inputs=[c("codebook", codebook), grid], outputs=[view], attrs={"axis": 1})
        )
    identity = tuple(order) == tuple(range(len(shape)))
    out = v("dense" if identity else "moved", dtype, moved)
    nodes.append(gs.Node("Reshape", inputs=[view, c("shape", np.array(moved, np.int64))], outputs=[out]))
    if not identity:
        dense = v("dense", dtype, [int(d) for d in shape])
        perm = [int(a) for a in np.argsort(order)]
        nodes.append(gs.Node("Transpose", inputs=[out], outputs=[dense], attrs={"perm": perm}))
        out = dense
    for node in nodes:
        node.name = editor.fresh_name(f"{base}_{node.op.lower()}")
        editor.insert_node(node, before=before)
    return out
