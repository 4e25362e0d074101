"""Private helper of prune_channels: the per-op rules of the channel dependency analysis (``_channel_groups``).

Each rule gets the node and the spaces of its inputs (None: no removable channels), ties elements, records edits
and returns the inputs it took care of; an input with channels that no rule takes blocks its group.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import const_value, constant_source

from ._channel_groups import Analysis, Fixup, Space, attr, float_const, mono, prod

__all__ = ["handler_of"]

_UNARY = frozenset(
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Clip Elu Selu Celu Softplus Softsign Exp Log Neg Abs "
    "Sqrt Reciprocal Erf Gelu Mish Sin Cos Identity Dropout Cast Floor Ceil Round Sign ThresholdedRelu Shrink "
    "IsNaN IsInf Not".split()
)
_ELEMENTWISE = frozenset("Add Sub Mul Div Pow Max Min Sum Mean PRelu Where Mod And Or Xor Equal Greater Less".split())
_POOLS = frozenset("MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool".split())
_REDUCE = frozenset(
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp "
    "ReduceSumSquare".split()
)


def _layer(a: Analysis, node: gs.Node, ins: list) -> set[int]:
    """Conv / ConvTranspose / Gemm / MatMul: consume the input's channels, start a space at the output."""
    if len(node.inputs) < 2 or not node.outputs:
        return set()
    x, w, out = ins[0], node.inputs[1], node.outputs[0]
    wsrc = float_const(w)
    if ins[1] is not None or wsrc is None:
        for s in ins:
            if s is not None:
                what = "two activations (attention scores?)" if node.op == "MatMul" else "a computed weight"
                a.block(s, f"read by {node.op} '{node.name}' with {what}; heads/weights are not pruned")
        return {i for i, s in enumerate(ins) if s is not None}
    shape = [int(d) for d in wsrc.constant.shape]
    claimed = {0} if x is not None else set()
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op in ("Conv", "ConvTranspose"):
        if len(shape) < 3:
            return set()
        group = int(attr(node, "group", 1))
        transpose = node.op == "ConvTranspose"
        m, cg = (shape[1] * group, shape[0] // group) if transpose else (shape[0], shape[1])
        o = a.new_space(out, 1, len(shape), m)
        if bias is not None and (float_const(bias) is None or list(float_const(bias).constant.shape) != [m]):
            a.block(o, f"{node.op} '{node.name}' has a bias that is not a constant [{m}] vector")
        if len(ins) > 2 and ins[2] is not None:
            a.block(ins[2], f"used as the bias of {node.op} '{node.name}'")
            claimed.add(2)
        if group == 1:
            a.edit(node, 1, 1 if transpose else 0, o, "out")
            a.edit(node, 2, 0, o, "bias", optional=bias is None)
            if x is not None:
                if x.axis != 1 or x.size != cg:
                    a.block(x, f"{node.op} '{node.name}' reads {x.size} channels on axis {x.axis}")
                else:
                    a.edit(node, 1, 0 if transpose else 1, x, "in")
            return claimed
        if transpose or x is None or x.axis != 1 or x.size != cg * group or m % group:
            a.block(o, f"grouped {node.op} '{node.name}' whose input channels cannot follow")
            if x is not None:
                a.block(x, f"read by grouped {node.op} '{node.name}'")
            return claimed
        mg = m // group
        for k in range(group):  # a group goes as a whole: its input and output channels are one unit
            anchor = x.base + k * cg
            for i in range(1, cg):
                a.union(anchor, anchor + i)
            for j in range(mg):
                a.union(anchor, o.base + k * mg + j)
        a.edit(node, 1, 0, o, "grouped")
        a.edit(node, 2, 0, o, "bias", optional=bias is None)
        a.fixups.append(Fixup("group", node, (o.index,), divisor=mg))
        return claimed
    if len(shape) != 2:
        return set()
    if node.op == "Gemm":
        trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        o = a.new_space(out, 1, 2, shape[n_axis])
        a.edit(node, 1, n_axis, o, "out")
        if bias is None:
            a.edit(node, 2, 0, o, "bias", optional=True)
        elif float_const(bias) is None:
            a.block(o, f"Gemm '{node.name}' has a computed bias")
            if len(ins) > 2 and ins[2] is not None:
                a.block(ins[2], f"used as the bias of Gemm '{node.name}'")
                claimed.add(2)
        else:
            bshape = a.dims(bias)
            if bshape and bshape[-1] == shape[n_axis] and shape[n_axis] != 1:
                a.edit(node, 2, len(bshape) - 1, o, "bias")
        if x is not None and (x.axis != (0 if trans_a else 1) or x.rank != 2 or x.size != shape[k_axis]):
            a.block(x, f"Gemm '{node.name}' reads channels on its non-contracted axis")
        elif x is not None:
            a.edit(node, 1, k_axis, x, "in")
        return claimed
    if node.op != "MatMul":
        return set()
    rank = a.rank(node.inputs[0])
    if rank is None or rank < 2:
        if x is not None:
            a.block(x, f"MatMul '{node.name}' input of unknown rank")
        return claimed
    o = a.new_space(out, rank - 1, rank, shape[1])
    a.edit(node, 1, 1, o, "out")
    if x is not None and (x.axis != rank - 1 or x.size != shape[0]):
        a.block(x, f"MatMul '{node.name}' reads channels on a non-contracted axis")
    elif x is not None:
        a.edit(node, 1, 0, x, "in")
    return claimed


def _unary(a: Analysis, node: gs.Node, ins: list) -> set[int]:
    s = ins[0]
    if s is None or not node.outputs:
        return set()
    if any(a.used(o) for o in node.outputs[1:]):
        a.block(s, f"{node.op} '{node.name}' has a second output in use")
        return {0}
    if node.op in _POOLS and s.axis != 1:
        a.block(s, f"{node.op} '{node.name}' pools over the channel axis")
        return {0}
    a.derive(node.outputs[0], s)
    return {0}


def _elementwise(a: Analysis, node: gs.Node, ins: list) -> set[int]:
    chan = [(i, s) for i, s in enumerate(ins) if s is not None]
    if not chan:
        return set()
    out = node.outputs[0]
    ranks = [a.rank(t) for t in node.inputs if t.name]
    rank = a.rank(out) or (max(ranks) if None not in ranks else None)
    claimed = {i for i, _ in chan}
    if rank is None:
        for _, s in chan:
            a.block(s, f"{node.op} '{node.name}' has operands of unknown rank")
        return claimed
    axes = {s.axis + rank - s.rank for _, s in chan}
    if len(axes) != 1:
        for _, s in chan:
            a.block(s, f"{node.op} '{node.name}' combines channels on different axes")
        return claimed
    axis = axes.pop()
    size = max(s.size for _, s in chan)
    o = a.new_space(out, axis, rank, size)
    for _, s in chan:
        if s.size == size:
            a.tie(s, o)
        else:
            a.block(s, f"{node.op} '{node.name}' broadcasts it along the channel axis")
    for i, t in enumerate(node.inputs):
        if ins[i] is not None or not t.name:
            continue
        d = a.dims(t)
        at = axis - (rank - len(d)) if d is not None else None
        if d is not None and (at < 0 or d[at] == 1):
            continue
        if d is not None and d[at] == size and constant_source(t) is not None:
            a.edit(node, i, at, o, "param")
        else:
            a.block(o, f"{node.op} '{node.name}' combines it with '{t.name}', whose channels no layer can drop")
    return claimed


def _normalization(a: Analysis, node: gs.Node, ins: list) -> set[int]:
    s = ins[0]
    if s is None:
        return set()
    claimed = {i for i, t in enumerate(ins) if t is not None}
    params = range(1, 5) if node.op == "BatchNormalization" else range(1, 3)
    if s.axis != 1 or any(a.used(o) for o in node.outputs[1:]):
        a.block(s, f"{node.op} '{node.name}' is not per-channel on axis 1 in inference mode")
        return claimed
    if any(float_const(node.inputs[i]) is None or a.dims(node.inputs[i]) != [s.size] for i in params):
        a.block(s, f"{node.op} '{node.name}' has computed parameters")
        return claimed
    o = a.derive(node.outputs[0], s)
    for i in params:
        a.edit(node, i, 0, o, "param")
    return claimed


def _stop(a: Analysis, s: Space, reason: str, claimed: set[int]) -> set[int]:
    a.block(s, reason)
    return claimed


def _ints(a: Analysis, node: gs.Node, attr: str, index: int) -> list[int] | None:
    """An int list given as attribute ``attr`` or as constant input ``index`` (newer opsets)."""
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) > index and node.inputs[index].name:
        v = const_value(node.inputs[index])
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
    return []


def _shape_op(a: Analysis, node: gs.Node, ins: list) -> set[int]:
    """Transpose, Squeeze, Unsqueeze, Slice, Pad, Softmax, LayerNormalization, reductions: move or keep the axis."""
    s = ins[0]
    if s is None:
        return set()
    claimed = {i for i, t in enumerate(ins) if t is not None}
    op, ax, r = node.op, s.axis, s.rank
    why = f"{op} '{node.name}' mixes or drops the channel axis"
    new_axis, new_rank = ax, r
    if op == "Transpose":
        perm = [int(p) for p in attr(node, "perm", list(range(r))[::-1])]
        new_axis = perm.index(ax)
    elif op in ("Squeeze", "Unsqueeze"):
        axes = _ints(a, node, "axes", 1)
        if not axes:
            return _stop(a, s, f"{op} '{node.name}' without constant axes", claimed)
        if op == "Unsqueeze":
            new_rank = r + len(axes)
            axes = sorted(x % new_rank for x in axes)
            rest = [i for i in range(new_rank) if i not in axes]
            new_axis = rest[ax]
        else:
            axes = {x % r for x in axes}
            if ax in axes:
                return _stop(a, s, why, claimed)
            new_axis, new_rank = ax - sum(1 for x in axes if x < ax), r - len(axes)
    elif op == "Slice":
        starts, ends = _ints(a, node, "starts", 1), _ints(a, node, "ends", 2)
        axes, steps = _ints(a, node, "axes", 3), _ints(a, node, "steps", 4)
        if starts is None or ends is None or axes is None or steps is None:
            return _stop(a, s, f"Slice '{node.name}' with computed bounds", claimed)
        axes = [x % r for x in (axes or range(len(starts)))]
        if ax in axes:
            k = axes.index(ax)
            if starts[k] != 0 or ends[k] < s.size or (steps and steps[k] != 1):
                return _stop(a, s, f"Slice '{node.name}' cuts the channel axis", claimed)
    elif op == "Pad":
        pads = _ints(a, node, "pads", 1)
        if pads is None or len(node.inputs) > 3 or len(pads) != 2 * r or pads[ax] or pads[ax + r]:
            return _stop(a, s, f"Pad '{node.name}' pads the channel axis (or with computed pads)", claimed)
    elif op in ("Softmax", "LogSoftmax", "Hardmax"):
        axis = int(attr(node, "axis", 1 if a.opset < 13 else -1)) % r
        if (a.opset < 13 and ax >= axis) or ax == axis:
            return _stop(a, s, why, claimed)
    elif op == "LayerNormalization":
        if ax >= int(attr(node, "axis", -1)) % r or any(a.used(o) for o in node.outputs[1:]):
            return _stop(a, s, f"LayerNormalization '{node.name}' normalizes over the channels", claimed)
    else:  # reductions
        axes = _ints(a, node, "axes", 1)
        if not axes or ax in {x % r for x in axes}:
            return _stop(a, s, why, claimed)
        if not int(attr(node, "keepdims", 1)):
            gone = {x % r for x in axes}
            new_axis, new_rank = ax - sum(1 for x in gone if x < ax), r - len(gone)
    a.derive(node.outputs[0], s, new_axis, new_rank)
    return claimed


def _concat(a: Analysis, node: gs.Node, ins: list) -> set[int]:
    claimed = {i for i, s in enumerate(ins) if s is not None}
    if not claimed:
        return claimed
    first = next(s for s in ins if s is not None)
    axis = int(attr(node, "axis", 0)) % first.rank
    if any(s is None for s in ins) or any(s.axis != first.axis or s.rank != first.rank for s in ins):
        for s in ins:
            if s is not None:
                a.block(s, f"Concat '{node.name}' joins it with tensors whose channels no layer can drop")
        return claimed
    if axis != first.axis:
        if any(s.size != first.size for s in ins):
            a.block(first, f"Concat '{node.name}' of unequal channel counts")
            return claimed
        o = a.new_space(node.outputs[0], first.axis, first.rank, first.size)
        for s in ins:
            a.tie(s, o)
        return claimed
    o = a.new_space(node.outputs[0], axis, first.rank, sum(s.size for s in ins))
    offset = 0
    for s in ins:
        a.tie(s, o, offset)
        offset += s.size
    return claimed


def _split(a: Analysis, node: gs.Node, ins: list) -> set[int]:
    s = ins[0]
    if s is None:
        return set()
    claimed = {i for i, t in enumerate(ins) if t is not None}
    axis = int(attr(node, "axis", 0)) % s.rank
    if axis != s.axis:
        for o in node.outputs:
            a.derive(o, s)
        return claimed
    sizes = _ints(a, node, "split", 1)
    n = len(node.outputs)
    if sizes is None:
        return _stop(a, s, f"Split '{node.name}' with computed sizes", claimed)
    if not sizes:
        if s.size % n:
            return _stop(a, s, f"Split '{node.name}' into unequal parts without sizes", claimed)
        sizes = [s.size // n] * n
    if sum(sizes) != s.size or len(sizes) != n:
        return _stop(a, s, f"Split '{node.name}' sizes do not add up", claimed)
    offset, outs = 0, []
    for o, size in zip(node.outputs, sizes):
        part = a.new_space(o, axis, s.rank, size)
        for i in range(size):
            a.union(s.base + offset + i, part.base + i)
        offset += size
        outs.append(part.index)
    a.fixups.append(Fixup("split", node, tuple(outs)))
    return claimed


def _flatten_or_reshape(a: Analysis, node: gs.Node, ins: list) -> set[int]:
    """Keeps the channel axis whole (a pass-through), or merges it with the static axes after it (channel c ->
    the block [c * S, (c + 1) * S) of the last output axis: Flatten/Reshape into a Gemm)."""
    s = ins[0]
    if s is None:
        return set()
    claimed = {i for i, t in enumerate(ins) if t is not None}
    d_in = a.dims(node.inputs[0])
    mono_in = [mono(d, True) for d in d_in] if d_in is not None and len(d_in) == s.rank else None
    if mono_in is None or any(m is None for m in mono_in):
        return _stop(a, s, f"{node.op} '{node.name}' input of unknown shape", claimed)
    mono_in[s.axis] = (s.size, ())
    if node.op == "Flatten":
        f = int(attr(node, "axis", 1)) % (s.rank + 1)
        lead, tail = prod(mono_in[:f]), prod(mono_in[f:])
        mono_out, entry = [lead, tail], None
    else:
        shape = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if shape is None:
            return _stop(a, s, f"Reshape '{node.name}' with a computed shape", claimed)
        shape = [int(v) for v in np.asarray(shape).reshape(-1)]
        allowzero = int(attr(node, "allowzero", 0))
        copy = not allowzero
        mono_out = [mono_in[j] if v == 0 and copy and j < len(mono_in) else mono(v) for j, v in enumerate(shape)]
        if shape.count(-1) == 1:
            total, known = prod(mono_in), prod([m for m in mono_out if m is not None])
            k = shape.index(-1)
            syms = list(total[1])
            for x in known[1]:
                if x in syms:
                    syms.remove(x)
                else:
                    syms = None
                    break
            if syms is None or known[0] == 0 or total[0] % known[0]:
                return _stop(a, s, f"Reshape '{node.name}' of a shape the analysis cannot follow", claimed)
            mono_out[k] = (total[0] // known[0], tuple(sorted(syms)))
        entry = shape
    if any(m is None for m in mono_out):
        return _stop(a, s, f"{node.op} '{node.name}' of a shape the analysis cannot follow", claimed)
    before, after = prod(mono_in[: s.axis]), prod(mono_in[s.axis + 1 :])
    for b in range(len(mono_out)):
        if prod(mono_out[:b]) != before:
            continue
        tail = prod(mono_out[b + 1 :])
        if mono_out[b] == (s.size, ()) and tail == after:
            o = a.derive(node.outputs[0], s, b, len(mono_out))
        elif b == len(mono_out) - 1 and not after[1] and mono_out[b] == (s.size * after[0], ()):
            spatial = after[0]
            o = a.new_space(node.outputs[0], b, len(mono_out), s.size * spatial)
            for c in range(s.size):
                for j in range(spatial):
                    a.union(s.base + c, o.base + c * spatial + j)
        else:
            continue
        if entry is not None and entry[b] > 0:
            a.fixups.append(Fixup("reshape", node, (o.index,), input=1, entry=b))
        return claimed
    if after[1]:
        return _stop(a, s, f"{node.op} '{node.name}' merges the channels with dynamic dims", claimed)
    a.block(s, f"{node.op} '{node.name}' splits or merges the channel axis (attention heads are not pruned)")
    return claimed


def _resize(a: Analysis, node: gs.Node, ins: list) -> set[int]:
    s = ins[0]
    if s is None:
        return set()
    claimed = {i for i, t in enumerate(ins) if t is not None}
    scales_at = 1 if node.op == "Upsample" or a.opset < 11 else 2
    given = len(node.inputs) > scales_at and node.inputs[scales_at].name
    scales = const_value(node.inputs[scales_at]) if given else None
    sizes_in = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if sizes_in is not None:
        sizes = const_value(sizes_in)
        if sizes is None or len(node.attrs.get("axes", [])):
            return _stop(a, s, f"Resize '{node.name}' with computed sizes", claimed)
        o = a.derive(node.outputs[0], s)
        a.fixups.append(Fixup("resize", node, (o.index,), input=3, entry=s.axis))
        return claimed
    scales = None if scales is None else np.asarray(scales).reshape(-1)
    if scales is None or len(node.attrs.get("axes", [])) or len(scales) != s.rank or scales[s.axis] != 1:
        return _stop(a, s, f"Resize '{node.name}' that may scale the channel axis", claimed)
    a.derive(node.outputs[0], s)
    return claimed


def handler_of(op: str):
    if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return _layer
    if op in _UNARY or op in _POOLS:
        return _unary
    if op in _ELEMENTWISE:
        return _elementwise
    if op in ("BatchNormalization", "InstanceNormalization"):
        return _normalization
    if op in _REDUCE or op in ("Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad", "Softmax", "LogSoftmax"):
        return _shape_op
    if op in ("Hardmax", "LayerNormalization"):
        return _shape_op
    return {"Concat": _concat, "Split": _split, "Flatten": _flatten_or_reshape, "Reshape": _flatten_or_reshape}.get(
        op, _resize if op in ("Resize", "Upsample") else None
    )
