"""sklearn_wine_tree: scikit-learn RandomForestClassifier on load_wine, converted with
skl2onnx (zipmap=False) to an ai.onnx.ml TreeEnsembleClassifier. Outputs ``label``
int64 [batch] and ``probabilities`` float [batch, 3].

Run from the repo root:  python sample_models/scripts/make_sklearn_wine_tree.py
"""

import common
import numpy as np
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_wine
from sklearn.ensemble import RandomForestClassifier

NAME = "sklearn_wine_tree"
OPSET = 17
ML_OPSET = 3
N_TREES = 20
MAX_DEPTH = 4


def main():
    common.seed_everything()
    d = load_wine()
    x = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    tr, te = common.split_indices(y, 0.25)

    clf = RandomForestClassifier(n_estimators=N_TREES, max_depth=MAX_DEPTH, random_state=common.SEED, n_jobs=1)
    clf.fit(x[tr], y[tr])
    ref_acc = float((clf.predict(x[te]) == y[te]).mean())

    onnx_model = convert_sklearn(
        clf,
        name=NAME,
        initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
        options={RandomForestClassifier: {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    common.dedupe_opset_imports(onnx_model)
    for vi in list(onnx_model.graph.input) + list(onnx_model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"

    calib = common.single_feeds({"input": x[tr]}, common.calib_indices(len(tr)))
    evals = common.batch_feeds({"input": x[te]}, y[te], 16)
    ml = {o.domain: o.version for o in onnx_model.opset_import}.get("ai.onnx.ml")
    common.finalize(
        name=NAME,
        model=onnx_model,
        exporter=f"skl2onnx {skl2onnx.__version__}",
        doc="RandomForestClassifier on scikit-learn wine (3 cultivars). Built by onnxslim "
        "sample_models/scripts/make_sklearn_wine_tree.py.",
        calib_feeds=calib,
        eval_feeds=evals,
        label_output="label",
        label_output_kind="label",
        notes=f"{N_TREES} trees, max_depth {MAX_DEPTH}, random_state 0, converted with "
        f"zipmap=False to ai.onnx.ml TreeEnsembleClassifier (ai.onnx.ml opset {ml}); outputs "
        "label (int64 [batch]) and probabilities (float [batch,3]). Tree thresholds are float "
        "node attributes, not initializers: nothing for a quantizer. Raw float32 features; "
        "stratified 75/25 split (seed 0).",
        min_accuracy=0.90,
        reference_accuracy=ref_acc,
    )


if __name__ == "__main__":
    main()
