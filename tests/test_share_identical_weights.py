"""share_identical_weights: tiny graphs -> checker -> pass -> structure -> ORT parity -> idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxslim.graph import iter_graphs
from onnxslim.pipeline import optimize
from onnxslim.registry import get_pass
from onnxslim.testing import check_pass_contract

Pass = get_pass("share_identical_weights")
RNG = np.random.default_rng(0)


def _record(model, **options):
    _, report = optimize(model, [Pass(**options)], fixed_point=False, on_pass_error="raise")
    return report.passes[0]


def _initializers(model: onnx.ModelProto) -> list[str]:
    return [t.name for g in iter_graphs(model.graph) for t in g.initializer]


def test_two_1m_element_initializers_one_read_inside_an_if_branch():
    w = RNG.standard_normal(1_000_000).astype(np.float32)
    then_g = h.make_graph(
        [h.make_node("Add", ["x", "W_inner"], ["t"])],
        "then",
        [],
        [h.make_tensor_value_info("t", T.FLOAT, [1_000_000])],
        [nh.from_array(w.copy(), "W_inner")],
    )
    else_g = h.make_graph(
        [h.make_node("Neg", ["x"], ["e"])], "else", [], [h.make_tensor_value_info("e", T.FLOAT, [1_000_000])]
    )
    g = h.make_graph(
        [
            h.make_node("Mul", ["x", "W_outer"], ["m"]),
            h.make_node("Mul", ["m", "W_copy"], ["m2"]),
            h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1_000_000]), h.make_tensor_value_info("c", T.BOOL, [])],
        [h.make_tensor_value_info("y", T.FLOAT, [1_000_000]), h.make_tensor_value_info("m2", T.FLOAT, [1_000_000])],
        [nh.from_array(w, "W_outer"), nh.from_array(w.copy(), "W_copy")],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    x = RNG.standard_normal(1_000_000).astype(np.float32)
    out = check_pass_contract(
        Pass(), m, [{"x": x, "c": np.array(True)}, {"x": x, "c": np.array(False)}], expect_modified=True
    )
    # One copy left, in the main graph; the branch reads it from the outer scope.
    assert _initializers(out) == ["W_outer"]
    assert out.ByteSize() < m.ByteSize() - 7_900_000
    rec = _record(m)
    assert rec.stats == {"tensors_merged": 2, "bytes_saved": 8_000_000}


def test_same_bytes_with_another_dtype_or_shape_are_not_merged():
    raw = np.arange(4, dtype=np.float32)
    m = h.make_model(
        h.make_graph(
            [
                h.make_node("Add", ["x", "a"], ["p"]),
                h.make_node("Add", ["p", "b"], ["q"]),
                h.make_node("Cast", ["i"], ["fi"], to=T.FLOAT),
                h.make_node("Add", ["q", "fi"], ["y"]),
            ],
            "g",
            [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
            [h.make_tensor_value_info("y", T.FLOAT, [1, 4])],
            [
                nh.from_array(raw, "a"),
                nh.from_array(raw.reshape(1, 4), "b"),
                nh.from_array(raw.view(np.int32).reshape(1, 4), "i"),
            ],
        ),
        opset_imports=[h.make_opsetid("", 17)],
    )
    out = check_pass_contract(Pass(), m, [{"x": RNG.standard_normal((1, 4)).astype(np.float32)}], expect_modified=False)
    assert sorted(_initializers(out)) == ["a", "b", "i"]


def test_identical_constant_nodes_in_sibling_branches_are_hoisted_once():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[3] x) => (float[3] y) {
        y = If(c) <
            then_branch = t () => (float[3] ty) { tw = Constant<value = float[3] {1, 2, 3}>()  ty = Mul(x, tw) },
            else_branch = e () => (float[3] ey) { ew = Constant<value = float[3] {1, 2, 3}>()  ey = Add(x, ew) }
        >
    }
    """)
    onnx.checker.check_model(m, full_check=True)
    x = RNG.standard_normal(3).astype(np.float32)
    out = check_pass_contract(
        Pass(), m, [{"x": x, "c": np.array(True)}, {"x": x, "c": np.array(False)}], expect_modified=True
    )
    assert [n.op_type for n in out.graph.node] == ["Constant", "If"]
    for attr in out.graph.node[1].attribute:
        assert [n.op_type for n in attr.g.node] in (["Mul"], ["Add"])
    assert _record(m).stats == {"tensors_merged": 1, "bytes_saved": 12}


def test_initializer_that_is_a_graph_output_keeps_its_name():
    w = np.arange(6, dtype=np.float32)
    m = h.make_model(
        h.make_graph(
            [h.make_node("Add", ["x", "w2"], ["y"])],
            "g",
            [h.make_tensor_value_info("x", T.FLOAT, [6])],
            [h.make_tensor_value_info("y", T.FLOAT, [6]), h.make_tensor_value_info("w1", T.FLOAT, [6])],
            [nh.from_array(w, "w1"), nh.from_array(w.copy(), "w2")],
        ),
        opset_imports=[h.make_opsetid("", 17)],
    )
    out = check_pass_contract(Pass(), m, [{"x": w}], expect_modified=True)
    assert _initializers(out) == ["w1"] and out.graph.node[0].input[1] == "w1"


def test_two_identical_1m_element_initializers_save_4_mb():
    w = RNG.standard_normal(1_000_000).astype(np.float32)
    m = h.make_model(
        h.make_graph(
            [h.make_node("Add", ["x", "w1"], ["a"]), h.make_node("Mul", ["a", "w2"], ["y"])],
            "g",
            [h.make_tensor_value_info("x", T.FLOAT, [1_000_000])],
            [h.make_tensor_value_info("y", T.FLOAT, [1_000_000])],
            [nh.from_array(w, "w1"), nh.from_array(w.copy(), "w2")],
        ),
        opset_imports=[h.make_opsetid("", 17)],
    )
    out = check_pass_contract(Pass(), m, [{"x": w}], expect_modified=True)
    assert _initializers(out) == ["w1"]
    assert _record(m).stats == {"tensors_merged": 1, "bytes_saved": 4_000_000}


def test_external_weights_are_hashed_from_the_data_file(tmp_path):
    w = RNG.standard_normal(50_000).astype(np.float32)
    other = w.copy()
    other[-1] += 1  # same size, differs in the last chunk only
    m = h.make_model(
        h.make_graph(
            [
                h.make_node("Add", ["x", "w1"], ["a"]),
                h.make_node("Mul", ["a", "w2"], ["b"]),
                h.make_node("Sub", ["b", "w3"], ["y"]),
            ],
            "g",
            [h.make_tensor_value_info("x", T.FLOAT, [50_000])],
            [h.make_tensor_value_info("y", T.FLOAT, [50_000])],
            [nh.from_array(w, "w1"), nh.from_array(w.copy(), "w2"), nh.from_array(other, "w3")],
        ),
        opset_imports=[h.make_opsetid("", 17)],
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(
        m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0
    )
    out, report = optimize(str(path), [Pass()], output=str(tmp_path / "out.onnx"), on_pass_error="raise")
    assert report.passes[0].stats == {"tensors_merged": 1, "bytes_saved": 200_000}
    slim = onnx.load(str(tmp_path / "out.onnx"))
    assert sorted(t.name for t in slim.graph.initializer) == ["w1", "w3"]
    feed = {"x": w}
    from onnxslim.testing import assert_outputs_close, run_model

    assert_outputs_close(run_model(onnx.load(str(path)), feed), run_model(slim, feed))


def test_identical_initializers_of_sibling_branches_are_stored_once_in_the_parent():
    w = RNG.standard_normal(1000).astype(np.float32)
    then_g = h.make_graph(
        [h.make_node("Add", ["x", "Wt"], ["t"])],
        "then",
        [],
        [h.make_tensor_value_info("t", T.FLOAT, [1000])],
        [nh.from_array(w, "Wt")],
    )
    else_g = h.make_graph(
        [h.make_node("Mul", ["x", "We"], ["e"])],
        "else",
        [],
        [h.make_tensor_value_info("e", T.FLOAT, [1000])],
        [nh.from_array(w.copy(), "We")],
    )
    m = h.make_model(
        h.make_graph(
            [h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
            "g",
            [h.make_tensor_value_info("x", T.FLOAT, [1000]), h.make_tensor_value_info("c", T.BOOL, [])],
            [h.make_tensor_value_info("y", T.FLOAT, [1000])],
        ),
        opset_imports=[h.make_opsetid("", 17)],
    )
    onnx.checker.check_model(m, full_check=True)
    feeds = [{"x": w, "c": np.array(True)}, {"x": w, "c": np.array(False)}]
    out = check_pass_contract(Pass(), m, feeds, expect_modified=True)
    # One copy, stored in the main graph and read by both branches from the outer scope.
    assert len(out.graph.initializer) == 1 and _initializers(out) == [out.graph.initializer[0].name]
    assert _record(m).stats == {"tensors_merged": 1, "bytes_saved": 4000}


def test_same_prefix_different_tail_is_not_merged_but_a_true_twin_is():
    # 160 kB each: the first 64 KiB agree for all three, so only the full hash / byte check tells them apart.
    a = RNG.standard_normal(40_000).astype(np.float32)
    b = a.copy()
    b[-1] += 1.0
    m = h.make_model(
        h.make_graph(
            [
                h.make_node("Add", ["x", "a"], ["p"]),
                h.make_node("Add", ["p", "b"], ["q"]),
                h.make_node("Add", ["q", "a2"], ["y"]),
            ],
            "g",
            [h.make_tensor_value_info("x", T.FLOAT, [40_000])],
            [h.make_tensor_value_info("y", T.FLOAT, [40_000])],
            [nh.from_array(a, "a"), nh.from_array(b, "b"), nh.from_array(a.copy(), "a2")],
        ),
        opset_imports=[h.make_opsetid("", 17)],
    )
    out = check_pass_contract(Pass(), m, [{"x": RNG.standard_normal(40_000).astype(np.float32)}], expect_modified=True)
    assert sorted(_initializers(out)) == ["a", "b"]
    assert _record(m).stats == {"tensors_merged": 1, "bytes_saved": 160_000}
