"""b-bit codes packed into words, and the chain of standard ONNX ops (opset >= 11) that unpacks them.

Codes (non-negative integers below ``2^b``) are packed ``k = floor(width / b)`` to a word, the first code in the
highest bits: uint8 words where ``b`` divides 8 (b = 1, 2, 4: no bit wasted), uint64 words otherwise (b = 3:
21 codes per word, b = 5: 12, b = 6: 10, b = 7: 9; at most 1/16 of the bits unused). The chain is::

    codes = Cast(Slice(Reshape(Mod(BitShift(words[N, 1], shifts[k]), 2^b), [-1]), 0, n), int64)

Every input is a constant, so onnxruntime folds the chain once when the session loads. A bitmask is b = 1
(``pack_sparse_weights``); codebook indices are b = 2..7 (``share_weights``; b = 8 needs no packing).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["word_layout", "pack_codes", "unpack_codes", "packed_nbytes", "unpack_chain"]


def word_layout(bits: int) -> tuple[np.dtype, int]:
    """(word dtype, codes per word) for ``bits``-bit codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8; got {bits}")
    if 8 % bits == 0:
        return np.dtype(np.uint8), 8 // bits
    return np.dtype(np.uint64), 64 // bits


def _shifts(bits: int) -> np.ndarray:
    dtype, k = word_layout(bits)
    return (np.arange(k - 1, -1, -1) * bits).astype(dtype)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of ``n`` packed ``bits``-bit codes."""
    dtype, k = word_layout(bits)
    return -(-n // k) * dtype.itemsize


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Words ``[N, 1]`` holding the flattened ``codes`` (each in ``[0, 2^bits)``), first code in the high bits."""
    dtype, k = word_layout(bits)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"codes must be in [0, {1 << bits}) for {bits} bits")
    if dtype == np.uint8 and bits == 1:
        return np.packbits(flat.astype(bool)).reshape(-1, 1)
    padded = np.zeros(-(-flat.size // k) * k, dtype=dtype)
    padded[: flat.size] = flat
    words = np.bitwise_or.reduce(padded.reshape(-1, k) << _shifts(bits), axis=1)
    return words.astype(dtype).reshape(-1, 1)


def unpack_codes(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """What the op chain computes (numpy; the tests' reference): the first ``n`` codes, int64."""
    dtype, k = word_layout(bits)
    if k == 1:  # a byte per code: nothing to unpack
        return np.asarray(words).reshape(-1)[:n].astype(np.int64)
    mod = np.array(1 << bits, dtype=dtype)
    return ((np.asarray(words, dtype) >> _shifts(bits)) % mod).reshape(-1)[:n].astype(np.int64)


def unpack_chain(editor, base: str, words: gs.Constant, bits: int, n: int, before: gs.Node | None) -> gs.Variable:
    """Insert the unpacking chain of ``words`` (a constant from ``pack_codes``) in front of ``before`` through
    ``editor`` (a ``GraphEditor``); returns its output, the ``n`` codes as int64."""
    dtype, k = word_layout(bits)
    if k == 1:
        raise ValueError("8-bit codes need no unpacking: Cast them to int64")
    rows = int(words.shape[0])
    c = lambda suffix, v: editor.new_constant(f"{base}_{suffix}", np.asarray(v))
    v = lambda suffix, dt, shape: gs.Variable(editor.fresh_name(f"{base}_{suffix}"), dtype=dt, shape=shape)
    shifted, split, flat, cut = (
        v("shifted", dtype, [rows, k]),
        v("bits", dtype, [rows, k]),
        v("bits_flat", dtype, [rows * k]),
        v("bits_n", dtype, [n]),
    )
    out = v("codes", np.int64, [n])
    nodes = [
        gs.Node(
            "BitShift", inputs=[words, c("shifts", _shifts(bits))], outputs=[shifted], attrs={"direction": "RIGHT"}
        ),
        gs.Node("Mod", inputs=[shifted, c("modulus", np.array([1 << bits], dtype))], outputs=[split]),
        gs.Node("Reshape", inputs=[split, c("flat_shape", np.array([-1], np.int64))], outputs=[flat]),
        gs.Node(
            "Slice",
            inputs=[flat, c("start", np.array([0], np.int64)), c("stop", np.array([n], np.int64))],
            outputs=[cut],
        ),
        gs.Node("Cast", inputs=[cut], outputs=[out], attrs={"to": 7}),  # INT64
    ]
    for node in nodes:
        node.name = editor.fresh_name(f"{base}_{node.op.lower()}")
        editor.insert_node(node, before=before)
    return out


def mask_index_chain(editor, base: str, mask: gs.Constant, n: int, before: gs.Node | None) -> gs.Variable:
    """From packed 1-bit ``mask`` words of ``n`` positions: ``Mul(CumSum(keep), keep)``, int64 [n], the i-th set
    position -> i and every clear one -> 0, so ``Gather(values, index)`` with a leading 0 in ``values`` scatters
    the kept values back (pack_sparse_weights' values, share_weights' codes of non-zero weights)."""
    keep = unpack_chain(editor, base, mask, 1, n, before)
    c = lambda suffix, v: editor.new_constant(f"{base}_{suffix}", np.asarray(v))
    csum = gs.Variable(editor.fresh_name(f"{base}_cumsum"), dtype=np.int64, shape=[n])
    index = gs.Variable(editor.fresh_name(f"{base}_index"), dtype=np.int64, shape=[n])
    for node in (
        gs.Node("CumSum", inputs=[keep, c("axis", np.array(0, np.int64))], outputs=[csum]),
        gs.Node("Mul", inputs=[csum, keep], outputs=[index]),
    ):
        node.name = editor.fresh_name(f"{base}_{node.op.lower()}")
        editor.insert_node(node, before=before)
    return index
