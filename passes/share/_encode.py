"""Private helper of share_weights: store a shared weight as packed codes plus its codebook.

The weight, viewed as ``[rows, cols]`` after moving its output axes first (``order``), is rebuilt by::

    codes = unpack(words)                                   # onnxslim.bit_packing; b = 8: Cast(uint8 codes)
          | Gather(Concat([0], unpack(words_nz)), mask_index)  # sparse: codes of non-zeros behind a 1-bit mask
    view  = Gather(codebook[K], codes)                       # one codebook
          | GatherElements(codebook[rows, K], Reshape(codes, [rows, cols]), axis=1)   # one per output row
          | Mul(Reshape(Gather(codebook[K], codes), [rows, cols]), scales[rows, 1])    # one codebook, row scales
    w     = Transpose(Reshape(view, moved_shape), inverse(order))   # Transpose only when order is not identity

Every input is a constant: onnxruntime folds the chain into the dense weight once, at session load.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.bit_packing import mask_index_chain, pack_codes, packed_nbytes, unpack_chain

__all__ = ["stored_nbytes", "insert_decoder"]


def stored_nbytes(
    n: int, bits: int, codebook: np.ndarray, nnz: int | None = None, scales: np.ndarray | None = None
) -> int:
    """Bytes of the packed codes, the codebook and the channel scales if any (the chain's small shape constants
    aside); ``nnz``: the sparse form, a 1-bit mask of the n positions plus the codes of the nnz non-zero weights."""
    tables = int(codebook.nbytes) + (0 if scales is None else int(scales.nbytes))
    if nnz is None:
        return (n if bits == 8 else packed_nbytes(n, bits)) + tables
    return packed_nbytes(n, 1) + (nnz if bits == 8 else packed_nbytes(nnz, bits)) + tables


def insert_decoder(
    editor,
    base: str,
    codes: np.ndarray,
    codebook: np.ndarray,
    bits: int,
    order: tuple[int, ...],
    shape: tuple[int, ...],
    before: gs.Node | None,
    sparse: bool = False,
    scales: np.ndarray | None = None,
) -> gs.Variable:
    """Insert the decoding chain in front of ``before``; returns its output (the dense weight, ``shape``).
    ``scales`` [rows] (one codebook): row r of the view is ``scales[r] * codebook[codes_r]``.
    ``sparse``: code 0 is every codebook's exact zero, and only the non-zero codes are stored, behind a 1-bit
    mask (``Gather(Concat([0], codes_nz), mask_index)``): pruned zeros cost one bit instead of b."""
    rows, cols = codes.shape
    n = rows * cols
    dtype = codebook.dtype
    c = lambda suffix, v: editor.new_constant(f"{base}_{suffix}", np.asarray(v))
    v = lambda suffix, dt, shp: gs.Variable(editor.fresh_name(f"{base}_{suffix}"), dtype=dt, shape=shp)
    nodes = []
    flat = codes.reshape(-1)
    stored = flat[flat != 0] if sparse else flat
    if bits == 8:  # a byte per code already: no unpacking
        idx = v("codes", np.int64, [stored.size])
        nodes.append(gs.Node("Cast", inputs=[c("codes_u8", stored.astype(np.uint8))], outputs=[idx]))
        nodes[-1].attrs["to"] = 7  # INT64
        for node in nodes:  # the sparse chain below reads it
            node.name = editor.fresh_name(f"{base}_{node.op.lower()}")
            editor.insert_node(node, before=before)
        nodes = []
    else:
        idx = unpack_chain(editor, base, c("codes_packed", pack_codes(stored, bits)), bits, stored.size, before)
    if sparse:
        index = mask_index_chain(editor, base, c("mask", pack_codes(flat != 0, 1)), n, before)
        padded, full = v("codes_padded", np.int64, [stored.size + 1]), v("codes_all", np.int64, [n])
        nodes.append(gs.Node("Concat", inputs=[c("code_zero", np.zeros(1, np.int64)), idx], outputs=[padded]))
        nodes[-1].attrs["axis"] = 0
        nodes.append(gs.Node("Gather", inputs=[padded, index], outputs=[full], attrs={"axis": 0}))
        idx = full
    moved = [int(shape[a]) for a in order]
    if codebook.shape[0] == 1:
        view = v("view", dtype, [n])
        nodes.append(gs.Node("Gather", inputs=[c("codebook", codebook[0]), idx], outputs=[view], attrs={"axis": 0}))
        if scales is not None:
            grid, scaled = v("unit", dtype, [rows, cols]), v("view", dtype, [rows, cols])
            nodes.append(
                gs.Node("Reshape", inputs=[view, c("grid_shape", np.array([rows, cols], np.int64))], outputs=[grid])
            )
            nodes.append(gs.Node("Mul", inputs=[grid, c("scales", scales.reshape(rows, 1))], outputs=[scaled]))
            view = scaled
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
