"""Model I/O keeps the model's contract: sample models, onnx's node test cases, external data, errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from onnxslim.errors import BadInputError, UsageError
from onnxslim.graph import ModelContract, load_model
from onnxslim.gs_bridge import export_graph, import_graph, value_types
from onnxslim.model_save import save_model
from onnxslim.runtime import make_session
from onnxslim.testing import outputs_close, run_model

from conftest import accuracy, eval_feeds


def _run_all(model, feeds):
    info = make_session(model)
    names = [o.name for o in info.session.get_outputs()]
    return [
        dict(zip(names, info.session.run(None, {k: v for k, v in f.items() if not k.startswith("__")}))) for f in feeds
    ]


# ------------------------------------------------------------------------------------------ sample models
def test_sample_model_round_trip_keeps_contract_and_outputs(sample, tmp_path):
    src = sample["model_path"]
    before = src.read_bytes()
    out_path = tmp_path / "out.onnx"
    model, report = onnxslim.optimize(src, passes=[], output=out_path)
    assert src.read_bytes() == before, "the input model must never be touched"
    original = onnx.load(str(src))
    saved = onnx.load(str(out_path))
    assert ModelContract.of(original).differences(saved) == []
    assert saved.doc_string == original.doc_string
    assert [(p.key, p.value) for p in saved.metadata_props] == [(p.key, p.value) for p in original.metadata_props]
    onnx.checker.check_model(saved, full_check=True)
    feeds = eval_feeds(sample)
    a, b = _run_all(str(src), feeds), _run_all(str(out_path), feeds)
    for x, y in zip(a, b):
        assert outputs_close(list(x.values()), list(y.values()))
    assert accuracy(sample, b, feeds) == pytest.approx(sample["float_metric"], abs=1e-6)


def test_default_pipeline_keeps_outputs_on_sample_models(sample, tmp_path):
    out_path = tmp_path / "slim.onnx"
    model, report = onnxslim.optimize(sample["model_path"], output=out_path)
    assert report.after.nodes <= report.before.nodes
    assert report.after.file_size <= report.before.file_size * 1.01 + 512
    assert ModelContract.of(onnx.load(str(sample["model_path"]))).differences(model) == []
    feeds = eval_feeds(sample)
    a, b = _run_all(str(sample["model_path"]), feeds), _run_all(str(out_path), feeds)
    for x, y in zip(a, b):
        for k in x:
            assert outputs_close(x[k], y[k], rtol=1e-4, atol=1e-5), k
    assert accuracy(sample, b, feeds) == pytest.approx(sample["float_metric"], abs=1e-6)


def test_optimize_never_mutates_the_callers_model(sample):
    model = onnx.load(str(sample["model_path"]))
    snapshot = model.SerializeToString()
    onnxslim.optimize(model)
    assert model.SerializeToString() == snapshot


# ------------------------------------------------------------------------------------------ onnx node tests
def _node_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect_testcases(None)


def _feedable(x):
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, list):
        return [_feedable(v) for v in x]
    return x


def test_round_trip_on_every_onnx_node_test_case(tmp_path):
    """Two round trips per case: load -> graphsurgeon import/export -> save, and the default pipeline.
    Both must give outputs identical to the original's where ORT runs the op, and equal to onnx's stored
    expected outputs wherever the original matches them."""
    checked = unsupported = rolled_back = 0
    failures = []
    src, raw, slim = tmp_path / "m.onnx", tmp_path / "raw.onnx", tmp_path / "slim.onnx"
    for case in _node_cases():
        try:
            ref = make_session(case.model)
        except BadInputError:
            unsupported += 1
            continue
        onnx.save(case.model, str(src))
        try:
            loaded = load_model(src)
            save_model(export_graph(import_graph(loaded), loaded.contract, value_types(loaded.proto)), raw)
            _, report = onnxslim.optimize(src, output=slim)
            crashed = [f"{r.name}: {r.error}" for r in report.passes if r.error and "fails onnx.checker" not in r.error]
            if crashed:  # only changes the checker rejects may be rolled back; a pass crash is a bug
                failures.append(f"{case.name}: " + "; ".join(crashed)[:300])
            rolled_back += any(r.error for r in report.passes)
            sessions = {"raw": make_session(raw), "default pipeline": make_session(slim)}
        except Exception as e:  # collect every failure, report them together
            failures.append(f"{case.name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        names = [i.name for i in ref.session.get_inputs()]
        for inputs, expected in case.data_sets or []:
            feeds = dict(zip(names, (_feedable(x) for x in inputs)))
            try:
                r0 = ref.session.run(None, feeds)
            except Exception:
                continue  # ORT itself cannot run this data set on the original
            exp = [_feedable(e) for e in expected]
            original_matches = outputs_close(r0, exp, rtol=case.rtol, atol=case.atol)
            for label, info in sessions.items():
                r1 = info.session.run(None, feeds)
                if not outputs_close(r0, r1):
                    failures.append(f"{case.name} ({label}): outputs differ from the original's")
                elif original_matches and not outputs_close(r1, exp, rtol=case.rtol, atol=case.atol):
                    failures.append(f"{case.name} ({label}): outputs differ from onnx's expected outputs")
            checked += 1
    assert not failures, "\n".join(failures[:30])
    assert checked > 1400, f"only {checked} data sets checked ({unsupported} models ORT cannot load)"
    assert rolled_back <= 5, f"{rolled_back} models needed a checker rollback"


# ------------------------------------------------------------------------------------------ external data
def _model_with_weights(n: int = 64, external: bool = False, tmp: Path | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w2")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "g",
        [x],
        [y],
        [w1, w2],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    helper.set_model_props(m, {"k": "v"})
    return m


def test_external_data_round_trip(tmp_path):
    m = _model_with_weights()
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir(), out_dir.mkdir()
    onnx.save(m, str(src_dir / "m.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    loaded = load_model(src_dir / "m.onnx")
    assert loaded.has_external_data and loaded.external_files == ["weights.bin"]
    assert all(len(t.raw_data) == 0 for t in loaded.proto.graph.initializer), "weights must stay on disk"
    out, report = onnxslim.optimize(src_dir / "m.onnx", output=out_dir / "slim.onnx")
    assert (out_dir / "slim.onnx.data").exists(), "external data is written next to the output"
    feed = {"x": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)}
    assert outputs_close(run_model(str(src_dir / "m.onnx"), feed), run_model(str(out_dir / "slim.onnx"), feed))
    onnx.checker.check_model(str(out_dir / "slim.onnx"), full_check=True)
    # Move the output folder: the data reference is relative, so it still loads.
    moved = tmp_path / "moved"
    (out_dir).rename(moved)
    assert outputs_close(run_model(str(src_dir / "m.onnx"), feed), run_model(str(moved / "slim.onnx"), feed))
    # Inline on request.
    onnxslim.optimize(src_dir / "m.onnx", output=tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    assert outputs_close(run_model(str(src_dir / "m.onnx"), feed), run_model(str(tmp_path / "inline.onnx"), feed))


def test_external_data_on_request(tmp_path):
    m = _model_with_weights()
    onnx.save(m, str(tmp_path / "m.onnx"))
    onnxslim.optimize(tmp_path / "m.onnx", output=tmp_path / "e.onnx", external_data=True)
    assert (tmp_path / "e.onnx.data").stat().st_size >= 2 * 64 * 64 * 4
    assert (tmp_path / "e.onnx").stat().st_size < 2000


def test_missing_and_truncated_external_data_are_clear_errors(tmp_path):
    m = _model_with_weights()
    onnx.save(m, str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="truncated"):
        load_model(tmp_path / "m.onnx")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(BadInputError, match="missing.*copy it next to the model"):
        load_model(tmp_path / "m.onnx")


@pytest.mark.parametrize(
    "content,match", [(b"", "empty"), (b"\x08\x07garbage\xff\xff" * 10, "not a readable ONNX model")]
)
def test_corrupt_model_file(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(BadInputError, match=match):
        load_model(p)


def test_truncated_model_file(sample, tmp_path):
    data = sample["model_path"].read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError):
        load_model(p)


def test_output_equal_to_input_needs_explicit_consent(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_model_with_weights(), str(p))
    before = p.read_bytes()
    with pytest.raises(UsageError, match="overwrite"):
        onnxslim.optimize(p, output=p)
    assert p.read_bytes() == before
    onnxslim.optimize(p, output=p, overwrite_input=True)
    onnx.checker.check_model(str(p))
    assert not [f for f in os.listdir(tmp_path) if "tmp-onnxslim" in f], "no temp files left behind"


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    m = _model_with_weights()
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous content")

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", boom)
    with pytest.raises(BadInputError, match="cannot write .*disk full"):
        save_model(m, target)
    monkeypatch.undo()
    assert target.read_bytes() == b"previous content", "a failed write must not clobber the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_saved_files_get_normal_permissions(tmp_path):
    # The atomic write goes through a temporary file (0600 by default); the result must be readable like any
    # file this process creates (0666 minus the umask), and an overwritten file keeps its own mode.
    m = _model_with_weights()
    umask = os.umask(0)
    os.umask(umask)
    save_model(m, tmp_path / "a.onnx", external_data=True, size_threshold=0)
    assert (tmp_path / "a.onnx").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "a.onnx.data").stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "b.onnx").write_bytes(b"old")
    os.chmod(tmp_path / "b.onnx", 0o640)
    save_model(m, tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx").stat().st_mode & 0o777 == 0o640


def test_ir3_model_with_initializers_as_inputs(tmp_path):
    """Old exporters list initializers among graph inputs (IR < 4); those are not part of the contract."""
    m = _model_with_weights()
    m.ir_version = 3
    m.opset_import[0].version = 9
    for init in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, list(init.dims)))
    onnx.save(m, str(tmp_path / "old.onnx"))
    out, _ = onnxslim.optimize(tmp_path / "old.onnx", output=tmp_path / "o.onnx")
    assert out.ir_version == 3
    feed = {"x": np.ones((2, 64), np.float32)}
    assert outputs_close(run_model(str(tmp_path / "old.onnx"), feed), run_model(str(tmp_path / "o.onnx"), feed))


def test_custom_domain_and_functions_pass_through(tmp_path):
    """Unknown domains and model-local functions survive untouched."""
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1, "com.example" : 1]>
    agraph (float[N, 4] x) => (float[N, 4] y, float[N, 4] z) {
        t = local.Twice(x)
        y = Relu(t)
        z = com.example.Mystery(x)
    }
    <domain: "local", opset_import: ["" : 17]>
    Twice (a) => (b) {
        b = Add(a, a)
    }
    """
    m = onnx.parser.parse_model(text)
    out, report = onnxslim.optimize(m, check="basic")
    assert [f.name for f in out.functions] == ["Twice"]
    assert {(n.domain, n.op_type) for n in out.graph.node} == {
        ("local", "Twice"),
        ("", "Relu"),
        ("com.example", "Mystery"),
    }
    assert {o.domain: o.version for o in out.opset_import} == {"": 17, "local": 1, "com.example": 1}
    assert report.before.custom_domains == ["com.example", "local"]


@pytest.mark.slow
def test_model_over_2gb_loads_and_saves(tmp_path):
    """> 2 GB of weights: load without reading them, save streaming them. Run with -m slow."""
    n = 17_000  # 2 x 17000^2 x 4 B = 2.3 GB
    w = np.ones((n, n), np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "big",
        [x],
        [y],
        [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w * 0.5, "w2")],
    )
    del w
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "big.onnx"), save_as_external_data=True, location="big.data")
    del m, g
    out, report = onnxslim.optimize(tmp_path / "big.onnx", output=tmp_path / "slim.onnx")
    assert report.before.initializer_bytes > 2**31
    assert (tmp_path / "slim.onnx.data").stat().st_size >= report.before.initializer_bytes
    onnx.checker.check_model(str(tmp_path / "slim.onnx"))


def test_a_model_with_nothing_to_remove_comes_back_byte_identical(tmp_path):
    src = Path(__file__).resolve().parents[1] / "sample_models" / "sklearn_cancer" / "model.onnx"
    out, report = onnxslim.optimize(src, output=tmp_path / "o.onnx")
    assert not any(p.modified for p in report.passes)
    assert (tmp_path / "o.onnx").read_bytes() == src.read_bytes()
