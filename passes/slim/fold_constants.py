"""fold_constants: replace nodes whose inputs are all constants by the constants they compute.

``y = op(c1, c2, ...)`` with every ``ci`` a constant (initializers, Constant nodes, outer-scope constants
of a subgraph) becomes the constant ``y``. Values come from onnxruntime with graph optimizations disabled
(the same kernels the model would run), one session per round for all foldable nodes of all graphs;
rounds repeat until nothing more folds. ``Constant`` nodes become initializers first.

Never folded: nondeterministic ops (Random*, Multinomial, Bernoulli, Dropout in training mode),
QuantizeLinear/DequantizeLinear (a quantized model's Q/DQ pairs must stay), nodes with subgraphs, and
ops of any domain but the default one (ai.onnx.ml, com.microsoft, custom: never evaluated). Nodes
onnxruntime cannot run are skipped with its reason.

Memory: before anything is evaluated, each node's output size is taken from shape inference (its constant
inputs' shapes and small values); a node whose outputs would exceed ``max_bytes``, or whose output size
cannot be known in advance, is skipped and never run; nodes are evaluated in batches of at most
``max_bytes`` outputs. A 177-byte model whose Expand makes a 60000x60000 tensor costs nothing.

Size: a fold whose new constant is bigger than what it removes (the node and the inputs only it reads)
by more than ``size_threshold`` bytes is skipped unless ``allow_growth``; the default never grows the
model. Exact: the values are the ones the runtime would compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxslim.graph_edit import constant_nbytes
from onnxslim.gs_bridge import RawAttribute
from onnxslim.pass_base import Pass, PassContext, PassResult, iter_graphs
from onnxslim.runtime import make_session

__all__ = ["FoldConstants"]

log = logging.getLogger(__name__)

_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
_QUANT = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_MAX_ROUNDS = 64
_MAX_BYTES = 256 * 2**20
# Constant inputs up to this size go into the shape-inference model with their values (shape operands of
# Reshape, Expand, Tile, Range...); bigger ones only with their type and shape.
_SHAPE_VALUE_BYTES = 4096
# onnxruntime's CPU kernels run many 16-bit float ops in float32 and skip the rounding between
# consecutive ones; folding a node alone rounds its output, which can differ by an ulp. Only ops that
# move data (no arithmetic) are folded on float16/bfloat16.
_HALF = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# Types onnxruntime hands back to Python as something else (float8 as uint8) or not at all: never folded.
_EXOTIC = {
    getattr(onnx.TensorProto, n)
    for n in (
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
        "UINT4",
        "INT4",
        "FLOAT4E2M1",
        "FLOAT8E8M0",
    )
    if hasattr(onnx.TensorProto, n)
}
_MOVES_DATA = {
    "Reshape",
    "Transpose",
    "Concat",
    "Gather",
    "GatherElements",
    "GatherND",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Flatten",
    "Expand",
    "Tile",
    "Split",
    "Shape",
    "Size",
    "Cast",
    "ConstantOfShape",
    "Pad",
    "DepthToSpace",
    "SpaceToDepth",
    "ScatterElements",
    "ScatterND",
}


def _onnx_type(t: gs.Constant) -> int | None:
    """The ONNX element type a constant is stored as (exporters may keep float8/int4 as uint8 arrays)."""
    if getattr(t, "export_dtype", None) is not None:
        dt = t.export_dtype
        return dt if isinstance(dt, int) else _np_to_onnx(dt)
    v = t._values
    if isinstance(v, LazyValues):
        return int(v.tensor.data_type)
    return _np_to_onnx(getattr(v, "dtype", None))


def _np_to_onnx(dtype) -> int | None:
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except Exception:  # noqa: BLE001 - ml_dtypes and the like
        return None


def _is_half(t: gs.Constant) -> bool:
    return _onnx_type(t) in _HALF


def _constant_node_value(node: gs.Node) -> np.ndarray | gs.Constant | None:
    """The value a Constant node produces (None when it is a form we leave alone: sparse, strings)."""
    a = node.attrs
    if "value" in a and isinstance(a["value"], gs.Constant):
        return a["value"]
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(list(a["value_floats"]), dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(list(a["value_ints"]), dtype=np.int64)
    return None


def _inferred_output_bytes(ctx: PassContext, nodes: list[gs.Node]) -> dict[int, int]:
    """Bytes each node's named outputs will take, from onnx shape inference on the nodes alone (fed their
    constant inputs' types and shapes, and the values of small ones); a node missing here has an output of
    unknown size."""
    inits: dict[str, onnx.TensorProto] = {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    protos, outs = [], []
    for i, node in enumerate(nodes):
        for t in node.inputs:
            if not isinstance(t, gs.Constant) or t.name in inits or t.name in inputs:
                continue
            dtype = _onnx_type(t)
            if constant_nbytes(t) <= _SHAPE_VALUE_BYTES or dtype is None:
                inits[t.name] = onnx.numpy_helper.from_array(np.asarray(t.values), t.name)
            else:
                inputs[t.name] = onnx.helper.make_tensor_value_info(t.name, dtype, list(t.shape))
        p = OnnxExporter.export_node(node)
        p.name = f"fold_{i}"
        protos.append(p)
        outs.extend(t.name for t in node.outputs if t.name)
    model = _standalone(ctx, protos, list(inputs.values()), outs, list(inits.values()), "fold_shapes")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - then no size is known and nothing folds this round
        return {}
    known: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.elem_type or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None for d in dims):
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
        except Exception:  # noqa: BLE001 - strings and exotic types: count 8 bytes an element
            itemsize = 8
        known[vi.name] = int(np.prod(dims, dtype=np.float64) * itemsize)  # float: no overflow on huge shapes
    sizes = {}
    for node in nodes:
        named = [t.name for t in node.outputs if t.name]
        if all(n in known for n in named):
            sizes[id(node)] = sum(known[n] for n in named)
    return sizes


def _batches(nodes: list[gs.Node], sizes: dict[int, int], cap: int) -> list[list[gs.Node]]:
    """Nodes in order, grouped so one evaluation session's outputs stay within ``cap`` bytes."""
    out: list[list[gs.Node]] = []
    total = cap + 1
    for node in nodes:
        if total + sizes[id(node)] > cap:
            out.append([])
            total = 0
        out[-1].append(node)
        total += sizes[id(node)]
    return out


def _scopes(t: gs.Tensor, owner: dict[int, int]) -> int:
    """How many graphs read ``t``: the exporter writes a constant into every graph that reads it."""
    return max(1, len({owner.get(id(n)) for n in t.outputs}))


def _owners(root: gs.Graph) -> dict[int, int]:
    return {id(n): id(g) for g in iter_graphs(root) for n in g.nodes}


class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant and store their outputs as constants."""

    name = "fold_constants"

    @dataclass
    class Options:
        size_threshold: int = field(
            default=0,
            metadata={
                "help": "bytes a single fold may add to the model (new constant minus the node and inputs it removes)"
            },
        )
        allow_growth: bool = field(
            default=False, metadata={"help": "fold even when the model grows by more than size_threshold"}
        )
        max_bytes: int = field(
            default=_MAX_BYTES,
            metadata={"help": "largest output (bytes) a fold may compute; checked before evaluating it"},
        )

        def validate(self) -> str | None:
            if self.size_threshold < 0:
                return f"size_threshold must be >= 0 bytes; got {self.size_threshold}"
            if self.max_bytes < 1:
                return f"max_bytes must be >= 1 byte; got {self.max_bytes}"
            return None

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        refused: set[int] = set()  # nodes already skipped: don't evaluate them again next round
        for _ in range(_MAX_ROUNDS):
            converted = self._convert_constant_nodes(ctx.graph, result)
            folded = self._fold_round(ctx, result, refused)
            if not converted and not folded:
                break
        return result

    # ------------------------------------------------------------------ Constant nodes -> initializers
    def _convert_constant_nodes(self, root: gs.Graph, result: PassResult) -> int:
        n = 0
        owner = _owners(root)
        for g in iter_graphs(root):
            for node in list(g.nodes):
                if node.op != "Constant" or node.domain not in (None, "", "ai.onnx") or len(node.outputs) != 1:
                    continue
                value = _constant_node_value(node)
                if value is None:
                    continue
                out = node.outputs[0]
                if not isinstance(out, gs.Variable) or isinstance(out, gs.Constant):
                    continue
                values = value._values if isinstance(value, gs.Constant) else value
                if (
                    _scopes(out, owner) > 1
                    and (constant_nbytes(value) if isinstance(value, gs.Constant) else value.nbytes) > 64
                ):
                    continue  # read from several subgraphs: an initializer would be stored once per graph
                node.outputs.clear()
                g.nodes.remove(node)
                out.to_constant(values)
                n += 1
        if n:
            result.count("constant_nodes_converted", n)
            result.modified = True
        return n

    # ------------------------------------------------------------------ one round of folding
    def _candidates(self, root: gs.Graph, result: PassResult, refused: set[int]) -> list[tuple[gs.Graph, gs.Node]]:
        found = []
        for g in iter_graphs(root):
            for node in g.nodes:
                if id(node) in refused:
                    continue
                consts = [t for t in node.inputs if isinstance(t, gs.Constant)]
                if not consts or any(not isinstance(t, gs.Constant) and t.name for t in node.inputs):
                    continue
                reason = self._refusal(node)
                if reason:
                    refused.add(id(node))
                    result.skip(node, reason, g)
                    continue
                found.append((g, node))
        return found

    def _refusal(self, node: gs.Node) -> str | None:
        if node.domain not in (None, "", "ai.onnx"):
            return f"op of domain '{node.domain}' is never evaluated"
        if node.op in _NONDETERMINISTIC:
            return "nondeterministic op"
        if node.op in _QUANT:
            return "Q/DQ nodes of a quantized model are kept"
        if node.op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
            mode = node.inputs[2]
            if bool(np.asarray(mode.values).reshape(-1)[:1].any()):
                return "Dropout in training mode is nondeterministic"
        for v in node.attrs.values():
            if isinstance(v, (gs.Graph, RawAttribute)) or (
                isinstance(v, (list, tuple)) and any(isinstance(x, gs.Graph) for x in v)
            ):
                return "node has subgraphs or attributes that are not folded"
        if not any(t.name for t in node.outputs):
            return "node has no named outputs"
        if (
            any(_onnx_type(t) in _EXOTIC for t in node.inputs if isinstance(t, gs.Constant))
            or node.op == "Cast"
            and int(node.attrs.get("to", 0)) in _EXOTIC
            or node.op == "CastLike"
            and _onnx_type(node.inputs[1]) in _EXOTIC
            or isinstance(node.attrs.get("value"), gs.Constant)
            and _onnx_type(node.attrs["value"]) in _EXOTIC
        ):
            return "bfloat16/float8/int4 values are not folded (no exact numpy round trip)"
        if (
            node.op == "Cast"
            and int(node.attrs.get("to", 0)) in _HALF
            or node.op == "CastLike"
            and _is_half(node.inputs[1])
        ):
            # onnxruntime drops a float->half->float Cast pair it inserts around half ops: no rounding there
            return "Cast to float16/bfloat16 feeding half arithmetic is not folded"
        if node.op not in _MOVES_DATA and any(_is_half(t) for t in node.inputs if t.name):
            return "arithmetic on float16/bfloat16: onnxruntime may keep float32 between ops"
        return None

    def _fold_round(self, ctx: PassContext, result: PassResult, refused: set[int]) -> int:
        cands = self._candidates(ctx.graph, result, refused)
        if not cands:
            return 0
        cands, sizes = self._bounded(ctx, cands, result, refused)
        values: dict[int, list[np.ndarray]] = {}
        for batch in _batches([n for _, n in cands], sizes, self.options.max_bytes):
            values.update(self._evaluate(ctx, batch, result, refused))
        cands = [(g, n) for g, n in cands if id(n) in values]
        outputs = {id(t) for g in iter_graphs(ctx.graph) for t in g.outputs}
        owner = _owners(ctx.graph)
        out_bytes = {id(n): sum(int(a.nbytes) for a in values[id(n)]) for _, n in cands}
        # Drop folds that grow the model until the set is stable (a skipped fold keeps its inputs alive).
        while True:
            folding = {id(n) for _, n in cands}
            keep, growths = [], {}
            for g, node in cands:
                growth = self._growth(node, values[id(node)], folding, outputs, owner, out_bytes)
                if growth > self.options.size_threshold and not self.options.allow_growth:
                    refused.add(id(node))
                    result.skip(
                        node, f"folding would add {growth} bytes (size_threshold={self.options.size_threshold})", g
                    )
                    continue
                keep.append((g, node))
                growths[id(node)] = growth
            if len(keep) == len(cands):
                break
            cands = keep
        for g, node in cands:
            outs = list(node.outputs)
            node.outputs.clear()
            node.inputs.clear()
            g.nodes.remove(node)
            for t, arr in zip(outs, values[id(node)]):
                if t.name:
                    t.to_constant(arr)
            growth = growths[id(node)]
            result.count("nodes_folded")
            result.count("bytes_added" if growth > 0 else "bytes_saved", abs(growth))
        if cands:
            result.modified = True
        return len(cands)

    @staticmethod
    def _growth(
        node: gs.Node,
        arrays: list[np.ndarray],
        folding: set[int],
        outputs: set[int],
        owner: dict[int, int],
        out_bytes: dict[int, int],
    ) -> int:
        """Approximate serialized bytes added by the fold: new constants minus the node and freed inputs. An
        input freed because all its readers fold is credited to them in proportion to their outputs' bytes
        (an LSTM weight cut by three Slices of unequal sizes: together they free exactly what they add)."""
        added = 0
        for t, arr in zip(node.outputs, arrays):
            if t.name and (t.outputs or id(t) in outputs):
                added += (arr.nbytes + len(t.name) + 2 * arr.ndim + 8) * _scopes(t, owner)
        removed = (
            OnnxExporter.export_node(node).ByteSize()
            if not node.attrs or all(not isinstance(v, RawAttribute) for v in node.attrs.values())
            else 0
        )
        seen: set[int] = set()
        for t in node.inputs:
            if not isinstance(t, gs.Constant) or id(t) in seen or id(t) in outputs:
                continue
            seen.add(id(t))
            users = {id(c) for c in t.outputs}
            if users and users <= folding:
                total = sum(out_bytes.get(u, 0) for u in users)
                share = out_bytes.get(id(node), 0) / total if total > 0 else 1.0 / len(users)
                removed += int((constant_nbytes(t) + len(t.name) + 8) * share)
        return added - removed

    # ------------------------------------------------------------------ memory bound
    def _bounded(
        self, ctx: PassContext, cands: list[tuple[gs.Graph, gs.Node]], result: PassResult, refused: set[int]
    ) -> tuple[list[tuple[gs.Graph, gs.Node]], dict[int, int]]:
        """The candidates whose outputs are known, before evaluation, to fit in ``max_bytes``; their sizes."""
        sizes = _inferred_output_bytes(ctx, [n for _, n in cands])
        cap = self.options.max_bytes
        keep = []
        for g, node in cands:
            size = sizes.get(id(node))
            if size is None:
                refused.add(id(node))
                result.skip(node, "its output size cannot be inferred before evaluating it", g)
            elif size > cap:
                refused.add(id(node))
                why = f"its output would take {size} bytes (max_bytes={cap}; raise it with fold_constants:max_bytes=N)"
                result.skip(node, why, g)
            else:
                keep.append((g, node))
        return keep, sizes

    # ------------------------------------------------------------------ evaluation
    def _evaluate(
        self, ctx: PassContext, nodes: list[gs.Node], result: PassResult, refused: set[int]
    ) -> dict[int, list[np.ndarray]]:
        """Values of the nodes' outputs; a failing batch is split in halves to find the nodes at fault."""
        try:
            got = self._run_nodes(ctx, nodes)
        except Exception as e:  # noqa: BLE001 - one bad node fails the whole batch
            if len(nodes) > 1:
                log.debug("batch of %d failed (%s); splitting it", len(nodes), e)
                half = len(nodes) // 2
                out = self._evaluate(ctx, nodes[:half], result, refused)
                out.update(self._evaluate(ctx, nodes[half:], result, refused))
                return out
            refused.add(id(nodes[0]))
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            result.skip(nodes[0], f"onnxruntime could not evaluate it: {msg}")
            return {}
        for node in nodes:
            if id(node) not in got:
                refused.add(id(node))
                result.skip(node, "it produces a non-tensor or string output")
        return got

    def _run_nodes(self, ctx: PassContext, nodes: list[gs.Node]) -> dict[int, list[np.ndarray]]:
        inits: dict[str, onnx.TensorProto] = {}
        protos, outs = [], []
        for i, node in enumerate(nodes):
            for t in node.inputs:
                if isinstance(t, gs.Constant) and t.name not in inits:
                    inits[t.name] = onnx.numpy_helper.from_array(np.asarray(t.values), t.name)
            p = OnnxExporter.export_node(node)
            p.name = f"fold_{i}"
            protos.append(p)
            outs.extend(t.name for t in node.outputs if t.name)
        model = _standalone(ctx, protos, [], outs, list(inits.values()), "fold")
        sess = make_session(model, "cpu", optimize=False).session
        quiet = onnxruntime.RunOptions()
        quiet.log_severity_level = 4  # a node that fails is reported as a skip, not on stderr
        got = dict(zip(outs, sess.run(outs, {}, quiet)))
        values: dict[int, list[np.ndarray]] = {}
        for node in nodes:
            arrs = [got.get(t.name) for t in node.outputs]
            if all(a is None or (isinstance(a, np.ndarray) and a.dtype != object) for a in arrs):
                values[id(node)] = [np.asarray(a) if a is not None else None for a in arrs]
        return values


def _standalone(ctx, nodes: list, inputs: list, outputs: list[str], inits: list, name: str) -> onnx.ModelProto:
    """The nodes as a model of their own, at the graph's default-domain opset (shape inference or evaluation)."""
    graph = onnx.helper.make_graph(
        nodes, name, inputs, [onnx.helper.make_empty_tensor_value_info(n) for n in outputs], initializer=inits
    )
    opsets = [
        onnx.helper.make_opsetid(d.domain, d.version)
        for d in (ctx.graph.import_domains or [])
        if d.domain in ("", "ai.onnx")
    ] or [onnx.helper.make_opsetid("", ctx.opset)]
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    model.ir_version = max(7, min(onnx.IR_VERSION, onnx.helper.find_min_ir_version_for(opsets)))
    return model
