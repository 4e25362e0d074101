"""wine_ifloop: a hand-built ONNX graph (onnx.helper, opset 11, IR 6) with real
control flow, holding a small MLP for scikit-learn's wine data trained with plain
full-batch gradient descent in numpy.

Forward (trained exactly like this):
    xc = clip(x, p1, p99)                      # per-feature 1st/99th train percentiles
    z  = (xc - mean) / std
    h  = relu(z @ W1 + b1)                     # 13 -> 16, weights in Constant nodes
    for k in range(K): h = h + relu(h @ Wr[k] + br[k])   # K residual layers, 16 -> 16
    logits = h @ W2 + b2                       # 16 -> 3

Graph:
    cond = ReduceMax(Cast(Or(Less(x, p1), Greater(x, p99)))) > 0    (any value out of range?)
    If(cond): then -> Max/Min clip, normalize, Gemm(W1, b1), Relu
              else -> normalize, MatMul(W1) + Add(b1), Relu
      (both branches hold their own copy of W1/b1 as Constant nodes; mean/std/p1/p99
       are main-graph initializers referenced from the branches: outer-scope inputs)
    Loop(K): body Gathers Wr[i], br[i] (stacked initializers) by the iteration counter,
             MatMul + Add + Relu + residual Add on the loop-carried h
    Gemm head -> logits
Both branches compute the same function (clipping is the identity when nothing is out of
range), so the If only saves work; both are exercised by calib and eval files.

Run from the repo root:  python sample_models/scripts/make_wine_ifloop.py
"""

import common
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_wine

NAME = "wine_ifloop"
OPSET = 11
IR_VERSION = 6
HIDDEN = 16
K = 3
EPOCHS = 3000
LR = 0.1
L2 = 1e-4
F32 = np.float32


# --------------------------------------------------------------------------- #
# numpy model + plain gradient descent
# --------------------------------------------------------------------------- #
def init_params(rng, n_in, n_out):
    return {
        "W1": rng.normal(0, np.sqrt(2.0 / n_in), (n_in, HIDDEN)),
        "b1": np.zeros(HIDDEN),
        "Wr": rng.normal(0, 0.1 * np.sqrt(2.0 / HIDDEN), (K, HIDDEN, HIDDEN)),
        "br": np.zeros((K, HIDDEN)),
        "W2": rng.normal(0, np.sqrt(1.0 / HIDDEN), (HIDDEN, n_out)),
        "b2": np.zeros(n_out),
    }


def forward(p, z):
    a1 = z @ p["W1"] + p["b1"]
    h = np.maximum(a1, 0)
    cache = {"a1": a1, "hs": [h], "as": []}
    for k in range(K):
        a = h @ p["Wr"][k] + p["br"][k]
        h = h + np.maximum(a, 0)
        cache["as"].append(a)
        cache["hs"].append(h)
    return h @ p["W2"] + p["b2"], cache


def softmax(l):
    e = np.exp(l - l.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def train(rng, z, y, n_classes):
    p = init_params(rng, z.shape[1], n_classes)
    onehot = np.eye(n_classes)[y]
    n = len(y)
    for ep in range(EPOCHS):
        logits, c = forward(p, z)
        prob = softmax(logits)
        dl = (prob - onehot) / n
        g = {"W2": c["hs"][-1].T @ dl, "b2": dl.sum(0)}
        dh = dl @ p["W2"].T
        g["Wr"] = np.zeros_like(p["Wr"])
        g["br"] = np.zeros_like(p["br"])
        for k in reversed(range(K)):
            da = dh * (c["as"][k] > 0)
            g["Wr"][k] = c["hs"][k].T @ da
            g["br"][k] = da.sum(0)
            dh = dh + da @ p["Wr"][k].T
        da1 = dh * (c["a1"] > 0)
        g["W1"] = z.T @ da1
        g["b1"] = da1.sum(0)
        for key in p:
            if key.startswith("W"):
                g[key] = g[key] + L2 * p[key]
            p[key] = p[key] - LR * g[key]
        if (ep + 1) % 500 == 0:
            loss = -np.log(prob[np.arange(n), y] + 1e-12).mean()
            print(f"  step {ep + 1:5d}/{EPOCHS} loss {loss:.4f}")
    return {k: v.astype(F32) for k, v in p.items()}


# --------------------------------------------------------------------------- #
# graph
# --------------------------------------------------------------------------- #
def const_node(name, arr):
    return helper.make_node(
        "Constant",
        [],
        [name],
        name=f"{name}_const",
        value=numpy_helper.from_array(np.asarray(arr), name=f"{name}_value"),
    )


def build_graph(p, lo, hi, mean, std, n_in, n_classes):
    # ---- then branch: clip (Min/Max, per feature) -> normalize -> Gemm -> Relu
    then_nodes = [
        const_node("then_W1", p["W1"]),
        const_node("then_b1", p["b1"]),
        helper.make_node("Min", ["input", "clip_hi"], ["then_min"], name="then_clip_hi"),
        helper.make_node("Max", ["then_min", "clip_lo"], ["then_clipped"], name="then_clip_lo"),
        helper.make_node("Sub", ["then_clipped", "norm_mean"], ["then_centered"], name="then_sub"),
        helper.make_node("Div", ["then_centered", "norm_std"], ["then_z"], name="then_div"),
        helper.make_node("Gemm", ["then_z", "then_W1", "then_b1"], ["then_a1"], name="then_gemm"),
        helper.make_node("Relu", ["then_a1"], ["then_h0"], name="then_relu"),
    ]
    then_g = helper.make_graph(
        then_nodes,
        "clip_then_normalize",
        [],
        [helper.make_tensor_value_info("then_h0", TensorProto.FLOAT, [None, HIDDEN])],
    )

    # ---- else branch: normalize -> MatMul + Add -> Relu
    else_nodes = [
        const_node("else_W1", p["W1"]),
        const_node("else_b1", p["b1"]),
        helper.make_node("Sub", ["input", "norm_mean"], ["else_centered"], name="else_sub"),
        helper.make_node("Div", ["else_centered", "norm_std"], ["else_z"], name="else_div"),
        helper.make_node("MatMul", ["else_z", "else_W1"], ["else_mm"], name="else_matmul"),
        helper.make_node("Add", ["else_mm", "else_b1"], ["else_a1"], name="else_add"),
        helper.make_node("Relu", ["else_a1"], ["else_h0"], name="else_relu"),
    ]
    else_g = helper.make_graph(
        else_nodes, "normalize_only", [], [helper.make_tensor_value_info("else_h0", TensorProto.FLOAT, [None, HIDDEN])]
    )

    # ---- loop body: h = h + relu(h @ Wr[i] + br[i])
    body_nodes = [
        helper.make_node("Gather", ["res_W", "iter"], ["body_W"], name="body_gather_W", axis=0),
        helper.make_node("Gather", ["res_b", "iter"], ["body_b"], name="body_gather_b", axis=0),
        helper.make_node("MatMul", ["h_in", "body_W"], ["body_mm"], name="body_matmul"),
        helper.make_node("Add", ["body_mm", "body_b"], ["body_a"], name="body_add_bias"),
        helper.make_node("Relu", ["body_a"], ["body_r"], name="body_relu"),
        helper.make_node("Add", ["h_in", "body_r"], ["h_out"], name="body_residual"),
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
    ]
    body_g = helper.make_graph(
        body_nodes,
        "residual_layers",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [None, HIDDEN]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [None, HIDDEN]),
        ],
    )

    # ---- main graph
    nodes = [
        helper.make_node("Less", ["input", "clip_lo"], ["below"], name="range_below"),
        helper.make_node("Greater", ["input", "clip_hi"], ["above"], name="range_above"),
        helper.make_node("Or", ["below", "above"], ["outside"], name="range_outside"),
        helper.make_node("Cast", ["outside"], ["outside_f"], name="range_cast", to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["outside_f"], ["any_outside_f"], name="range_any", keepdims=0),
        helper.make_node("Greater", ["any_outside_f", "zero"], ["any_outside"], name="range_cond"),
        helper.make_node("If", ["any_outside"], ["h0"], name="maybe_clip", then_branch=then_g, else_branch=else_g),
        const_node("trip_count", np.array(K, dtype=np.int64)),
        const_node("loop_cond", np.array(True)),
        helper.make_node("Loop", ["trip_count", "loop_cond", "h0"], ["h_final"], name="residual_loop", body=body_g),
        helper.make_node("Gemm", ["h_final", "head_W", "head_b"], ["logits"], name="head_gemm"),
    ]
    inits = [
        numpy_helper.from_array(lo, "clip_lo"),
        numpy_helper.from_array(hi, "clip_hi"),
        numpy_helper.from_array(mean, "norm_mean"),
        numpy_helper.from_array(std, "norm_std"),
        numpy_helper.from_array(np.array(0.0, F32), "zero"),
        numpy_helper.from_array(p["Wr"], "res_W"),
        numpy_helper.from_array(p["br"], "res_b"),
        numpy_helper.from_array(p["W2"], "head_W"),
        numpy_helper.from_array(p["b2"], "head_b"),
    ]
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxslim-sample-models",
        producer_version="1",
    )
    model.ir_version = IR_VERSION
    return model


def main():
    rng = common.seed_everything()
    d = load_wine()
    x = d.data.astype(F32)
    y = d.target.astype(np.int64)
    tr, te = common.split_indices(y, 0.25)

    lo = np.percentile(x[tr], 1, axis=0).astype(F32)
    hi = np.percentile(x[tr], 99, axis=0).astype(F32)
    xc = np.clip(x[tr], lo, hi)
    mean = xc.mean(0).astype(F32)
    std = xc.std(0).astype(F32)
    z = ((xc - mean) / std).astype(np.float64)
    p = train(rng, z, y[tr], 3)

    zt = (np.clip(x[te], lo, hi) - mean) / std
    ref_acc = float((forward(p, zt)[0].argmax(1) == y[te]).mean())

    model = build_graph(p, lo, hi, mean, std, x.shape[1], 3)

    outside = ((x < lo) | (x > hi)).any(1)
    calib_idx = common.calib_indices(len(tr))
    calib = common.single_feeds({"input": x[tr]}, calib_idx)
    # eval: in-range samples (else branch) and out-of-range samples (then branch) are put in
    # separate batches so both If branches run on held-out data
    evals = []
    for group in (te[~outside[te]], te[outside[te]]):
        evals += common.batch_feeds({"input": x[group]}, y[group], 16)
    n_then_calib = int(outside[tr][calib_idx].sum())
    n_then_eval = int(outside[te].sum())
    print(f"then-branch (clip) samples: calib {n_then_calib}/{len(calib_idx)}, eval {n_then_eval}/{len(te)}")

    entry = common.finalize(
        name=NAME,
        model=model,
        exporter=f"onnx.helper (onnx {onnx.__version__})",
        doc="Hand-built wine classifier with If (clip outliers or not) and Loop (residual "
        "layers gathered from a stacked initializer). Built by onnxslim "
        "sample_models/scripts/make_wine_ifloop.py.",
        calib_feeds=calib,
        eval_feeds=evals,
        label_output="logits",
        label_output_kind="logits",
        notes=f"Opset {OPSET}, IR {IR_VERSION}. MLP 13->{HIDDEN} (+{K} residual {HIDDEN}x{HIDDEN} "
        "layers)->3 trained with plain full-batch gradient descent in numpy "
        f"({EPOCHS} steps, lr {LR}, seed 0). If: then-branch = per-feature clip (Min/Max) to "
        "the training 1st/99th percentiles + normalize + Gemm; else-branch = normalize + "
        "MatMul+Add; each branch holds its own first-layer weights as Constant nodes "
        "(Paddle-style) and reads mean/std/clip bounds from main-graph initializers (outer "
        "scope). Both branches compute the same function. Loop: trip count and cond are "
        "Constant nodes; body Gathers res_W[i]/res_b[i] by the iteration counter, so its "
        "MatMul weight is not a plain initializer. Eval files 0.."
        f"{(len(te) - n_then_eval + 15) // 16 - 1} are all in range (else branch), the rest "
        f"contain out-of-range values (then branch, {n_then_eval} samples); calib: "
        f"{n_then_calib}/32 take the then branch. Data: sklearn load_wine, stratified 75/25 split.",
        min_accuracy=0.90,
        reference_accuracy=ref_acc,
    )

    # the ONNX graph must reproduce the numpy forward exactly (both branches)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(common.SAMPLE_DIR / entry["path"]), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x[te]})[0]
    want = forward(p, (np.clip(x[te], lo, hi) - mean) / std)[0]
    assert np.allclose(got, want, atol=1e-4), np.abs(got - want).max()
    got_b = np.concatenate([sess.run(["logits"], {"input": x[i : i + 1]})[0] for i in te])
    assert np.allclose(got_b, want, atol=1e-4), np.abs(got_b - want).max()
    print("[wine_ifloop] onnxruntime matches the numpy forward (batched and per-sample)")


if __name__ == "__main__":
    main()
