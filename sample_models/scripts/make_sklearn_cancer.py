"""sklearn_cancer: scikit-learn Pipeline(StandardScaler, LogisticRegression) on
load_breast_cancer, converted with skl2onnx (zipmap=False) so the outputs are plain
tensors: ``label`` int64 [batch] and ``probabilities`` float [batch, 2]. Keeps the
ai.onnx.ml ops (Scaler, LinearClassifier, ...).

Run from the repo root:  python sample_models/scripts/make_sklearn_cancer.py
"""

import common
import numpy as np
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

NAME = "sklearn_cancer"
OPSET = 17
ML_OPSET = 3


def main():
    common.seed_everything()
    d = load_breast_cancer()
    x = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    tr, te = common.split_indices(y, 0.25)

    pipe = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("clf", LogisticRegression(C=1.0, max_iter=1000, random_state=common.SEED)),
        ]
    )
    pipe.fit(x[tr], y[tr])
    ref_acc = float((pipe.predict(x[te]) == y[te]).mean())

    onnx_model = convert_sklearn(
        pipe,
        name=NAME,
        initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
        options={LogisticRegression: {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    common.dedupe_opset_imports(onnx_model)  # skl2onnx 1.20 emits the "" domain twice
    # give the symbolic batch dim a name (skl2onnx leaves it anonymous)
    for vi in list(onnx_model.graph.input) + list(onnx_model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"

    calib = common.single_feeds({"input": x[tr]}, common.calib_indices(len(tr)))
    evals = common.batch_feeds({"input": x[te]}, y[te], 32)
    common.finalize(
        name=NAME,
        model=onnx_model,
        exporter=f"skl2onnx {skl2onnx.__version__}",
        doc="StandardScaler + LogisticRegression on scikit-learn breast cancer (0=malignant, "
        "1=benign). Built by onnxslim sample_models/scripts/make_sklearn_cancer.py.",
        calib_feeds=calib,
        eval_feeds=evals,
        label_output="label",
        label_output_kind="label",
        notes="skl2onnx with zipmap=False: outputs are tensors label (int64 [batch]) and "
        "probabilities (float [batch,2]). The whole graph is two ai.onnx.ml ops (Scaler -> "
        "LinearClassifier with post_transform LOGISTIC); skl2onnx lowers the requested "
        f"ai.onnx.ml opset {ML_OPSET} to the minimum it needs (1). Raw (unscaled) float32 "
        "features; stratified 75/25 split (seed 0). skl2onnx listed the default domain twice "
        "in opset_import; the script de-duplicates it.",
        min_accuracy=0.95,
        reference_accuracy=ref_acc,
    )


if __name__ == "__main__":
    main()
