"""Invalid models are refused with exit 2 and one line naming the problem; nothing is written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.cli import main


def _model(nodes=None, outputs=None, opset=17, **kw) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "W")
    nodes = nodes or [helper.make_node("Add", ["X", "W"], ["Y"], name="add")]
    outputs = outputs or [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])], outputs, [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], **kw)


def _bytes_with(model: onnx.ModelProto, marker: bytes, replacement: bytes) -> bytes:
    raw = model.SerializeToString()
    assert raw.count(marker) == 1
    return raw.replace(marker, replacement)


def _case(name: str) -> bytes:
    if name == "cycle":
        nodes = [
            helper.make_node("Add", ["X", "t2"], ["t1"], name="a"),
            helper.make_node("Relu", ["t1"], ["t2"], name="b"),
            helper.make_node("Identity", ["t1"], ["Y"], name="c"),
        ]
        return _model(nodes).SerializeToString()
    if name == "undefined_input":
        return _model([helper.make_node("Add", ["X", "nowhere"], ["Y"], name="add")]).SerializeToString()
    if name == "duplicate_outputs":
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])
        return _model(outputs=[y, y]).SerializeToString()
    if name == "input_as_output_other_type":  # found by the fuzzer: exit 3 "contract changed" before
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])
        return _model(outputs=[helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4]), x]).SerializeToString()
    if name == "two_producers":
        nodes = [helper.make_node("Add", ["X", "W"], ["Y"], name="a"), helper.make_node("Relu", ["X"], ["Y"], name="b")]
        return _model(nodes).SerializeToString()
    if name == "opset_99":
        return _model(opset=99).SerializeToString()
    if name == "non_utf8_doc":
        return _bytes_with(_model(doc_string="QQQQQQQQ"), b"QQQQQQQQ", b"\xff\xfe\xfd\xfc\xff\xfe\xfd\xfc")
    if name == "non_utf8_node_name":
        m = _model([helper.make_node("Add", ["X", "W"], ["Y"], name="ZZZZZZZZ")])
        return _bytes_with(m, b"ZZZZZZZZ", b"\xff\xfe\xfd\xfc\xff\xfe\xfd\xfc")
    if name == "tensor_type_0":  # graphsurgeon: "Unsupported type: 0"
        m = _model()
        m.graph.initializer[0].data_type = 0
        return m.SerializeToString()
    if name == "elem_type_99":
        m = _model()
        m.graph.input[0].type.tensor_type.elem_type = 99
        return m.SerializeToString()
    if name == "tensor_type_99":
        m = _model()
        m.graph.initializer[0].data_type = 99
        return m.SerializeToString()
    raise AssertionError(name)


CASES = {
    "cycle": "cycle|not a DAG",
    "undefined_input": "nowhere.*nothing produces",
    "duplicate_outputs": "'Y' twice",
    "two_producers": "produced by two nodes",
    "input_as_output_other_type": "'X' as a graph input and a graph output with different types",
    "opset_99": "opset 99",
    "non_utf8_doc": "UTF-8",
    "non_utf8_node_name": "UTF-8",
    "tensor_type_0": "not a valid model|type 0",
    "elem_type_99": "not a valid model|type 99",
    "tensor_type_99": "not a valid model|type 99",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_model_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(_case(case))
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(src), "-o", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error: "), err
    import re

    assert re.search(CASES[case], lines[0]), lines[0]
    assert not out.exists(), "nothing is written for an invalid model"
    assert src.read_bytes() == before


@pytest.mark.parametrize("case", ["non_utf8_doc", "elem_type_99", "opset_99"])
def test_info_on_invalid_model_exits_2(case, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(_case(case))
    code = main(["info", str(src)])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "internal error" not in err and "Traceback" not in err


def test_valid_tiny_model_still_optimizes(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_model(), str(src))
    assert main(["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "-q"]) == 0
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
