"""All fusion passes on every sample model: outputs within rtol 1e-4/atol 1e-5 on the eval data, accuracy
unchanged, node count and size never growing, and the patterns each model is known to hold handled as expected."""

from __future__ import annotations

import onnx

from onnxslim.pipeline import optimize
from onnxslim.testing import assert_outputs_close, run_model

from _fusion_testlib import ATOL, RTOL, ops
from conftest import accuracy, eval_feeds

FUSIONS = [
    "fuse_batchnorm_into_conv",
    "fuse_bias_add_into_conv",
    "fuse_scale_into_conv",
    "fuse_matmul_add_into_gemm",
    "fuse_pad_into_conv",
    "collapse_reshape_chains",
]


def test_fusions_on_sample_model(sample):
    m = onnx.load(str(sample["model_path"]))
    out, report = optimize(m, FUSIONS, on_pass_error="raise", fixed_point=False)
    before, after = ops(m), ops(out)
    assert sum(after.values()) <= sum(before.values())
    baseline, _ = optimize(m, [], fixed_point=False)  # the export round trip alone moves a few bytes
    assert out.ByteSize() <= baseline.ByteSize()

    feeds = eval_feeds(sample)
    names = [o.name for o in m.graph.output]
    ref, got = [], []
    for feed in feeds:
        inputs = {k: v for k, v in feed.items() if not k.startswith("__")}
        a, b = run_model(m, inputs), run_model(out, inputs)
        assert_outputs_close(a, b, names, RTOL, ATOL)
        ref.append(dict(zip(names, a)))
        got.append(dict(zip(names, b)))
    if all("__label__" in f for f in feeds):
        assert accuracy(sample, got, feeds) == accuracy(sample, ref, feeds)

    if sample["name"] == "cnn_digits":
        assert before["BatchNormalization"] == 6 and after["BatchNormalization"] == 0
        assert after["Conv"] == 6 and after["Add"] == 2  # residual Adds are not biases
    if sample["name"] == "transformer_text":
        # 3-D MatMul + Add must stay as they are (no Reshape/Gemm/Reshape)
        assert after["MatMul"] == before["MatMul"] and after["Gemm"] == before["Gemm"]
        assert after["Reshape"] == before["Reshape"]
    if sample["name"] == "wine_ifloop":
        assert after["Gemm"] == before["Gemm"] + 1  # the If else-branch's 2-D MatMul + Add

    again, rep2 = optimize(out, FUSIONS, on_pass_error="raise", fixed_point=False)
    assert not any(r.modified for r in rep2.passes)
