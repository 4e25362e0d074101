"""Write a seeded synthetic transformer-like ONNX model with external data for the lossless benchmark.

Per layer (hidden 1024, 16 heads, FFN 4096): decomposed LayerNorm, fused QKV MatMul [1024x3072],
attention with a dynamic-shape Reshape (Shape->Gather->Unsqueeze->Concat), output MatMul [1024x1024],
FFN MatMuls [1024x4096] and [4096x1024] with Gelu written as Erf.  That is ~12.6M params per layer;
the layer count is chosen from ``--params`` (default 300M -> 24 layers).

What a lossless optimizer can remove (on purpose):
- duplicated weights: every 4th layer's FFN weights repeat the previous layer's values under new names;
- foldable constants: the attention scale is Mul(Constant, Constant) -> Sqrt -> Reciprocal, the QKV bias
  is Reshape(initializer, Constant shape), the head split shape comes through Constant nodes;
- redundant work: each layer computes Shape(x) twice (CSE) and has an Identity on the residual;
  one Constant node (axes_last) is dead.
Inputs are float hidden states [batch, seq, 1024] (both dims dynamic); the output is [batch, seq, 1024].

Weights are streamed to ``<name>.onnx.data`` one tensor at a time, so generating needs little memory.
Also writes ``<name>.inputs.npz``-style eval feeds (``<stem>_eval/0000.npz`` ...) with seeded inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HIDDEN = 1024
HEADS = 16
FFN = 4096
QKV = 3 * HIDDEN


def _layer_params() -> int:
    return HIDDEN * QKV + QKV + HIDDEN * HIDDEN + HIDDEN + HIDDEN * FFN + FFN + FFN * HIDDEN + HIDDEN + 4 * HIDDEN


class _Writer:
    """Appends tensors to the external data file and records them as initializers."""

    def __init__(self, data_path: Path, rng: np.random.Generator):
        self.f = open(data_path, "wb")
        self.location = data_path.name
        self.offset = 0
        self.rng = rng
        self.initializers: list[TensorProto] = []
        self.params = 0
        self.cache: dict[str, np.ndarray] = {}

    def add(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        if arr.nbytes < 1024:  # small tensors inline, like onnx.save's default threshold
            t.raw_data = arr.tobytes()
        else:
            pad = (-self.offset) % 4096
            self.f.write(b"\0" * pad)
            self.offset += pad
            self.f.write(arr.tobytes())
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.location), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
                t.external_data.add(key=k, value=v)
            self.offset += arr.nbytes
        self.initializers.append(t)
        self.params += arr.size
        return name

    def weight(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        return self.add(name, (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)))

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def build(out: Path, params: int, seed: int) -> dict:
    layers = max(1, math.ceil(params / _layer_params()))
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_path = out.with_name(out.name + ".data")
    w = _Writer(data_path, rng)
    nodes: list[onnx.NodeProto] = []

    def node(op, inputs, outputs=None, name=None, **attrs):
        name = name or f"n{len(nodes)}_{op}"
        outputs = outputs or [f"{name}_out"]
        nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def const(name, arr):
        return node(
            "Constant", [], [name], name=f"{name}_const", value=onnx.numpy_helper.from_array(np.asarray(arr), name)
        )

    eps = const("ln_eps", np.array(1e-5, np.float32))
    const("axes_last", np.array([-1], np.int64))  # dead on purpose: nothing reads it
    axes0 = const("axes0", np.array([0], np.int64))
    half = const("half", np.array(0.5, np.float32))
    one = const("one", np.array(1.0, np.float32))
    inv_sqrt2 = const("inv_sqrt2", np.array(1 / math.sqrt(2), np.float32))
    two = const("two", np.array(2.0, np.float32))

    def layer_norm(x, p):
        g = w.add(f"{p}.gamma", np.ones(HIDDEN, np.float32) + rng.standard_normal(HIDDEN, dtype=np.float32) * 0.01)
        b = w.add(f"{p}.beta", rng.standard_normal(HIDDEN, dtype=np.float32) * 0.01)
        mean = node("ReduceMean", [x], name=f"{p}.mean", axes=[-1], keepdims=1)
        d = node("Sub", [x, mean], name=f"{p}.sub")
        var = node("ReduceMean", [node("Pow", [d, two], name=f"{p}.pow")], name=f"{p}.var", axes=[-1], keepdims=1)
        std = node("Sqrt", [node("Add", [var, eps], name=f"{p}.addeps")], name=f"{p}.sqrt")
        return node(
            "Add", [node("Mul", [node("Div", [d, std], name=f"{p}.div"), g], name=f"{p}.mulg"), b], name=f"{p}.addb"
        )

    def gelu(x, p):
        e = node("Erf", [node("Mul", [x, inv_sqrt2], name=f"{p}.scale")], name=f"{p}.erf")
        return node(
            "Mul", [node("Mul", [x, node("Add", [e, one], name=f"{p}.add1")], name=f"{p}.mulx"), half], name=f"{p}.half"
        )

    x = "hidden_states"
    dh = HIDDEN // HEADS
    prev_ffn: tuple[np.ndarray, np.ndarray] | None = None
    for i in range(layers):
        p = f"layer{i}"
        h = layer_norm(x, f"{p}.ln1")
        wqkv = w.weight(f"{p}.attn.qkv.weight", (HIDDEN, QKV), 0.02)
        bqkv_flat = w.add(f"{p}.attn.qkv.bias_flat", rng.standard_normal(QKV, dtype=np.float32) * 0.01)
        # foldable: the bias goes through Reshape(initializer, Constant)
        bshape = const(f"{p}.bias_shape", np.array([1, 1, QKV], np.int64))
        bqkv = node("Reshape", [bqkv_flat, bshape], name=f"{p}.bias_reshape")
        qkv = node("Add", [node("MatMul", [h, wqkv], name=f"{p}.qkv_mm"), bqkv], name=f"{p}.qkv_add")
        # dynamic head split: Shape(h) -> batch, seq (computed twice: a CSE target)
        shp = node("Shape", [h], name=f"{p}.shape_a")
        shp2 = node("Shape", [h], name=f"{p}.shape_b")
        bdim = node(
            "Unsqueeze",
            [node("Gather", [shp, const(f"{p}.i0", np.array(0, np.int64))], name=f"{p}.g0", axis=0), axes0],
            name=f"{p}.u0",
        )
        sdim = node(
            "Unsqueeze",
            [node("Gather", [shp2, const(f"{p}.i1", np.array(1, np.int64))], name=f"{p}.g1", axis=0), axes0],
            name=f"{p}.u1",
        )
        heads = const(f"{p}.heads", np.array([3, HEADS, dh], np.int64))
        split_shape = node("Concat", [bdim, sdim, heads], name=f"{p}.split_shape", axis=0)
        qkv5 = node(
            "Transpose",
            [node("Reshape", [qkv, split_shape], name=f"{p}.reshape5")],
            name=f"{p}.tr5",
            perm=[2, 0, 3, 1, 4],
        )
        q, k, v = (
            node("Gather", [qkv5, const(f"{p}.sel{j}", np.array(j, np.int64))], name=f"{p}.sel{j}", axis=0)
            for j in range(3)
        )
        # foldable: scale = 1 / sqrt(c1 * c2) from two constants
        c1 = const(f"{p}.c1", np.array(float(dh) / 2, np.float32))
        c2 = const(f"{p}.c2", np.array(2.0, np.float32))
        scale = node(
            "Reciprocal",
            [node("Sqrt", [node("Mul", [c1, c2], name=f"{p}.cmul")], name=f"{p}.csqrt")],
            name=f"{p}.crecip",
        )
        kt = node("Transpose", [k], name=f"{p}.kt", perm=[0, 1, 3, 2])
        att = node(
            "Softmax",
            [node("Mul", [node("MatMul", [q, kt], name=f"{p}.qk"), scale], name=f"{p}.qks")],
            name=f"{p}.softmax",
            axis=-1,
        )
        ctx = node("Transpose", [node("MatMul", [att, v], name=f"{p}.av")], name=f"{p}.ctx_tr", perm=[0, 2, 1, 3])
        merge_shape = node(
            "Concat", [bdim, sdim, const(f"{p}.hid", np.array([HIDDEN], np.int64))], name=f"{p}.merge_shape", axis=0
        )
        ctx = node("Reshape", [ctx, merge_shape], name=f"{p}.merge")
        wo = w.weight(f"{p}.attn.out.weight", (HIDDEN, HIDDEN), 0.02)
        bo = w.add(f"{p}.attn.out.bias", rng.standard_normal(HIDDEN, dtype=np.float32) * 0.01)
        attn_out = node("Add", [node("MatMul", [ctx, wo], name=f"{p}.o_mm"), bo], name=f"{p}.o_add")
        x = node("Add", [node("Identity", [x], name=f"{p}.res_id"), attn_out], name=f"{p}.res1")
        h = layer_norm(x, f"{p}.ln2")
        if i % 4 == 3 and prev_ffn is not None:
            # duplicated weights: same values as the previous layer, stored again under new names
            w1 = w.add(f"{p}.ffn.up.weight", prev_ffn[0])
            w2 = w.add(f"{p}.ffn.down.weight", prev_ffn[1])
        else:
            a1 = rng.standard_normal((HIDDEN, FFN), dtype=np.float32) * np.float32(0.02)
            a2 = rng.standard_normal((FFN, HIDDEN), dtype=np.float32) * np.float32(0.02)
            w1 = w.add(f"{p}.ffn.up.weight", a1)
            w2 = w.add(f"{p}.ffn.down.weight", a2)
            prev_ffn = (a1, a2)
        b1 = w.add(f"{p}.ffn.up.bias", rng.standard_normal(FFN, dtype=np.float32) * 0.01)
        b2 = w.add(f"{p}.ffn.down.bias", rng.standard_normal(HIDDEN, dtype=np.float32) * 0.01)
        f = gelu(node("Add", [node("MatMul", [h, w1], name=f"{p}.up_mm"), b1], name=f"{p}.up_add"), f"{p}.gelu")
        f = node("Add", [node("MatMul", [f, w2], name=f"{p}.down_mm"), b2], name=f"{p}.down_add")
        x = node("Add", [x, f], name=f"{p}.res2")
    out_name = node("Identity", [layer_norm(x, "final_ln")], ["last_hidden_state"], name="output_id")
    del prev_ffn
    w.close()

    dims = ["batch", "seq", HIDDEN]
    graph = helper.make_graph(
        nodes,
        "synthetic_transformer",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, dims)],
        initializer=w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxslim-bench")
    model.ir_version = 8
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(model.SerializeToString())
    os.replace(tmp, out)
    onnx.checker.check_model(str(out), full_check=True)

    eval_dir = out.with_name(out.stem + "_eval")
    eval_dir.mkdir(exist_ok=True)
    erng = np.random.default_rng(seed + 1)
    for j, (b, s) in enumerate([(2, 16), (1, 33)]):
        np.savez(eval_dir / f"{j:04d}.npz", hidden_states=erng.standard_normal((b, s, HIDDEN), dtype=np.float32))
    info = {
        "model": str(out),
        "data": str(data_path),
        "layers": layers,
        "params": int(w.params),
        "weight_bytes": int(data_path.stat().st_size),
        "nodes": len(nodes),
        "seed": seed,
        "eval": str(eval_dir),
    }
    out.with_name(out.stem + ".json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=300e6, help="minimum number of float params (default 300e6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=None, help="default bench/out/large_<N>M.onnx")
    args = ap.parse_args()
    out = (
        Path(args.output)
        if args.output
        else Path(__file__).resolve().parent / "out" / f"large_{int(args.params / 1e6)}M.onnx"
    )
    print(json.dumps(build(out, int(args.params), args.seed), indent=2))


if __name__ == "__main__":
    main()
