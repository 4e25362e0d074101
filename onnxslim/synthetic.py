"""Seeded synthetic inputs for parity checks when the user has no data.

Synthetic data only proves that two models agree on *these* inputs; every report built on it says so.
The inputs respect the model's contract so the models compute something meaningful:

- dtypes are the declared ones; dynamic dims come from ``shapes`` (``{"input_ids": (1, 16)}`` or the CLI
  text ``input_ids:1x16,attention_mask:1x16``), else ``batch`` for the first dim; the dynamic spatial dims of
  an image-like input take the exporter's recorded size (metadata ``imgsz``) or a multiple of the model's total
  Conv/pool stride (a detector with an FPN needs one), others ``dim``;
- integer inputs that index a table (``Gather``/``GatherElements``/``GatherND`` indices, also through
  Cast/Unsqueeze/Reshape/...) are drawn in ``[0, rows)`` where ``rows`` is the table's size on the
  gathered axis (an embedding's vocabulary); integer inputs named like masks are all ones; other integers
  are drawn in ``[1, 10)`` so no integer input is all zeros;
- floats are standard normal, bools are fair coin flips.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import onnx

from .data import FeedData, InputSpec, input_specs
from .errors import UsageError

__all__ = ["parse_shapes", "synthetic_feeds", "infer_int_ranges", "plausible_dims"]

log = logging.getLogger(__name__)

# Ops that pass index values through unchanged (so a Gather further down still bounds the input).
_VALUE_PRESERVING = {
    "Cast",
    "Unsqueeze",
    "Squeeze",
    "Reshape",
    "Flatten",
    "Identity",
    "Expand",
    "Transpose",
    "Slice",
    "Concat",
    "Tile",
}
_MASK_NAME = re.compile(r"mask", re.IGNORECASE)


def parse_shapes(text: str | Mapping[str, object] | None) -> dict[str, tuple[int, ...]]:
    """``"a:1x3x224x224,b:1x16"`` (or a mapping of name -> shape) -> ``{"a": (1, 3, 224, 224), ...}``."""
    if not text:
        return {}
    if isinstance(text, Mapping):
        return {str(k): tuple(int(d) for d in v) for k, v in text.items()}  # type: ignore[union-attr]
    out: dict[str, tuple[int, ...]] = {}
    for item in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise UsageError(
                f"bad shape {item!r}; write NAME:DxDxD with positive dims, e.g. input:1x3x224x224"
            ) from None
        out[name] = shape
    return out


def _constant_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    shapes[n.output[0]] = tuple(a.t.dims)
    return shapes


def infer_int_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Integer inputs that index a constant table -> ``(low, high)`` (high exclusive): the table's rows."""
    g = model.graph
    consts = _constant_shapes(g)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ranges: dict[str, tuple[int, int]] = {}
    for spec in input_specs(model):
        if spec.dtype.kind not in "iu":
            continue
        bound: int | None = None
        seen, todo = set(), [spec.name]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for n in consumers.get(name, []):
                if (
                    n.op_type in ("Gather", "GatherElements")
                    and len(n.input) > 1
                    and n.input[1] == name
                    and n.input[0] in consts
                ):
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    table = consts[n.input[0]]
                    if table:
                        rows = table[axis % len(table)]
                        bound = rows if bound is None else min(bound, rows)
                elif n.op_type == "GatherND" and len(n.input) > 1 and n.input[1] == name and n.input[0] in consts:
                    table = consts[n.input[0]]
                    if table:
                        bound = table[0] if bound is None else min(bound, table[0])
                elif n.op_type in _VALUE_PRESERVING and n.input and n.input[0] == name:
                    todo.extend(o for o in n.output if o)
        if bound:
            ranges[spec.name] = (0, int(bound))
    return ranges


_STRIDED = {"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"}
_SIZE_KEYS = re.compile(r"^(imgsz|image_?size|input_?size|img_?size)$", re.IGNORECASE)


def _total_stride(model: onnx.ModelProto, name: str) -> int:
    """The largest product of Conv/pool strides on any path from input ``name`` (1: none): a spatial size that
    is a multiple of it survives every downsampling and the upsampling/concat that mirrors it (FPN, U-Net)."""
    factor = {name: 1}
    for n in model.graph.node:  # ONNX requires topological order
        got = [factor[i] for i in n.input if i in factor]
        if not got:
            continue
        f = max(got)
        if n.op_type in _STRIDED:
            strides = next((list(a.ints) for a in n.attribute if a.name == "strides"), [])
            f *= max([1, *strides])
        for o in n.output:
            factor[o] = max(factor.get(o, 1), f)
    return max(factor.values())


def _metadata_size(model: onnx.ModelProto) -> tuple[int, ...] | None:
    """A spatial size the exporter recorded (e.g. ``imgsz`` = ``[640, 640]``), if any."""
    for p in model.metadata_props:
        if _SIZE_KEYS.match(p.key.strip()):
            dims = [int(d) for d in re.findall(r"\d+", p.value)]
            if dims and all(0 < d <= 8192 for d in dims):
                return tuple(dims)
    return None


def plausible_dims(model: onnx.ModelProto, spec: InputSpec) -> tuple[dict[int, int], str]:
    """Sizes for the dynamic spatial dims of an image-like input (rank 3-5, float, read by a Conv or pool), from
    the exporter's metadata or from the model's total stride; with a note saying where they came from."""
    if spec.shape is None or not 3 <= len(spec.shape) <= 5 or spec.dtype.kind != "f":
        return {}, ""
    dynamic = [i for i, d in enumerate(spec.shape) if i >= 2 and not (isinstance(d, int) and d > 0)]
    if not dynamic:
        return {}, ""
    meta = _metadata_size(model)
    if meta and len(meta) in (1, len(spec.shape) - 2):
        sizes = meta * (len(spec.shape) - 2) if len(meta) == 1 else meta
        return {i: int(sizes[i - 2]) for i in dynamic}, "from the model's metadata"
    stride = _total_stride(model, spec.name)
    if stride <= 1:
        return {}, ""
    fixed = [d for i, d in enumerate(spec.shape) if i >= 2 and isinstance(d, int) and d > 0]
    size = max(2 * stride, 32, *fixed)
    size = -(-size // stride) * stride
    return {i: size for i in dynamic}, f"a multiple of the model's total stride {stride}"


def _concrete_shape(
    spec: InputSpec, shapes: dict[str, tuple[int, ...]], batch: int, dim: int, spatial: dict[int, int] | None = None
) -> tuple[int, ...]:
    if spec.name in shapes:
        got = shapes[spec.name]
        if spec.shape is not None:
            if len(got) != len(spec.shape):
                raise UsageError(
                    f"--shapes gives {spec.name} rank {len(got)}, the model declares "
                    f"{list(spec.shape)} (rank {len(spec.shape)})"
                )
            for i, (g, w) in enumerate(zip(got, spec.shape)):
                if isinstance(w, int) and w > 0 and g != w:
                    raise UsageError(f"--shapes gives {spec.name} dim {i} = {g}, the model fixes it to {w}")
        return got
    if spec.shape is None:
        raise UsageError(f"input '{spec.name}' has no declared shape; give it with --shapes {spec.name}:DxD")
    spatial = spatial or {}
    return tuple(
        d if isinstance(d, int) and d > 0 else (batch if i == 0 else spatial.get(i, dim))
        for i, d in enumerate(spec.shape)
    )


def synthetic_feeds(
    model: onnx.ModelProto,
    *,
    shapes: str | Mapping | None = None,
    count: int = 4,
    batch: int = 2,
    dim: int = 8,
    seed: int = 0,
) -> FeedData:
    """``count`` seeded feed dicts for ``model``; the FeedData's description says they are synthetic."""
    fixed = parse_shapes(shapes)
    specs = input_specs(model)
    unknown = sorted(set(fixed) - {s.name for s in specs})
    if unknown:
        raise UsageError(
            f"--shapes names {', '.join(unknown)}, not inputs of the model "
            f"(its inputs: {', '.join(s.name for s in specs)})"
        )
    int_ranges = infer_int_ranges(model)
    spatial = {s.name: plausible_dims(model, s) for s in specs if s.name not in fixed}
    concrete = {s.name: _concrete_shape(s, fixed, batch, dim, spatial.get(s.name, ({}, ""))[0]) for s in specs}
    plan: dict[str, str] = {}
    for s in specs:
        if s.dtype.kind in "iu":
            if s.name in int_ranges:
                lo, hi = int_ranges[s.name]
                plan[s.name] = f"int in [{lo}, {hi}) (table rows)"
            elif _MASK_NAME.search(s.name):
                plan[s.name] = "ones (mask)"
            else:
                plan[s.name] = "int in [1, 10)"
        elif s.dtype == np.bool_:
            plan[s.name] = "random bool"
        elif s.dtype.kind in "fc":
            plan[s.name] = "standard normal"
            sizes, why = spatial.get(s.name, ({}, ""))
            if sizes:
                plan[s.name] += f"; dynamic spatial dims {sorted(set(sizes.values()))} ({why})"
        else:
            raise UsageError(f"cannot synthesize input '{s.name}' of dtype {s.dtype}; give real data with --data")

    def make_one(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, i])
        feeds: dict[str, np.ndarray] = {}
        for s in specs:
            shape = concrete[s.name]
            if s.dtype.kind in "iu":
                if s.name in int_ranges:
                    lo, hi = int_ranges[s.name]
                    arr = rng.integers(lo, hi, size=shape)
                    if arr.size and hi > 1 and not arr.any():  # never an all-zero id tensor
                        arr.flat[0] = hi - 1
                elif _MASK_NAME.search(s.name):
                    arr = np.ones(shape)
                else:
                    arr = rng.integers(1, 10, size=shape)
                feeds[s.name] = arr.astype(s.dtype)
            elif s.dtype == np.bool_:
                feeds[s.name] = rng.random(shape) < 0.5
            else:
                feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        return feeds

    desc = (
        f"synthetic (seed {seed}, {count} feeds; "
        + "; ".join(f"{n} {list(concrete[n])} {p}" for n, p in plan.items())
        + ")"
    )
    data = FeedData(lambda: ((make_one(i), f"synthetic[{i}]") for i in range(count)), desc, count, specs)
    data.synthetic = True  # type: ignore[attr-defined]
    data.plan = {n: {"shape": list(concrete[n]), "values": p} for n, p in plan.items()}  # type: ignore[attr-defined]
    return data
