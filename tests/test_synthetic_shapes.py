"""Synthetic inputs for dynamic spatial dims: sizes a real detector accepts (issue 15 item 6)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxslim.cli import main
from onnxslim.data import input_specs
from onnxslim.synthetic import plausible_dims, synthetic_feeds


def _fpn(levels: int = 5, metadata: dict | None = None) -> onnx.ModelProto:
    """Stride-2 convs down `levels` times, then the deepest map upsampled x2 (Resize) and added to the level above:
    8x8 inputs make a 1x1 map whose upsampled 2x2 cannot be concatenated with the 1x1 level above (the real OCR crash)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "image"
    feats = []
    for i in range(levels):
        w = numpy_helper.from_array(rng.standard_normal((4, 3 if i == 0 else 4, 3, 3)).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes.append(
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1], name=f"conv{i}")
        )
        x = f"c{i}"
        feats.append(x)
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes.append(helper.make_node("Resize", [feats[-1], "", "scales"], ["up"], mode="nearest", name="resize"))
    nodes.append(helper.make_node("Concat", ["up", feats[-2]], ["out"], axis=1, name="concat"))
    g = helper.make_graph(
        nodes,
        "fpn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    for k, v in (metadata or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


def test_spatial_dims_are_a_multiple_of_the_total_stride(tmp_path, capsys):
    m = _fpn()
    (spec,) = input_specs(m)
    sizes, why = plausible_dims(m, spec)
    assert sizes == {2: 64, 3: 64} and "total stride 32" in why
    feeds = synthetic_feeds(m)
    assert next(iter(feeds.samples())).feeds["image"].shape == (2, 3, 64, 64)
    path = tmp_path / "fpn.onnx"
    onnx.save(m, str(path))
    # The check runs on the synthetic inputs it picked (8x8 crashed onnxruntime's Concat with a shape mismatch).
    assert main(["check", str(path), str(path), "-q"]) == 0


def test_exporter_metadata_size_wins():
    m = _fpn(metadata={"imgsz": "[96, 128]"})
    (spec,) = input_specs(m)
    assert plausible_dims(m, spec) == ({2: 96, 3: 128}, "from the model's metadata")


def test_non_image_inputs_keep_the_plain_default():
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    (spec,) = input_specs(m)
    assert plausible_dims(m, spec) == ({}, "")
    assert next(iter(synthetic_feeds(m).samples())).feeds["x"].shape == (2, 8, 16)


def test_a_synthetic_run_that_fails_names_shapes(tmp_path, capsys):
    # --shapes given but wrong for this model: the error names the sizes used and the fix.
    path = tmp_path / "fpn.onnx"
    onnx.save(_fpn(), str(path))
    assert main(["check", str(path), str(path), "--shapes", "image:1x3x8x8"]) == 2
    err = capsys.readouterr().err
    assert "synthetic inputs image:1x3x8x8" in err and "--shapes NAME:DxD" in err and "--data" in err
    assert err.count("\n") == 1
