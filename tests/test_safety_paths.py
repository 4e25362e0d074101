"""External data is read only from inside the model's folder, with symbolic links resolved."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from onnxslim.cli import main
from onnxslim.errors import BadInputError

SECRET = b"root:x:0:0:root:/root:/bin/bash\n" * 4  # 128 bytes, as many as the weight below


def _external_model(folder, location: str) -> os.PathLike:
    """A model whose 32-float weight lives at ``location`` (relative to ``folder``), not yet written."""
    w = numpy_helper.from_array(np.zeros(32, dtype=np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "128")):
        w.external_data.add(key=k, value=v)
    g = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"], name="add")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [32])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [32])],
        [w],
    )
    path = folder / "model.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


@pytest.fixture
def layout(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(SECRET)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    return tmp_path, model_dir, outside


def _escape(kind: str, model_dir, outside) -> os.PathLike:
    if kind == "file_link":
        os.symlink(outside / "secret.bin", model_dir / "weights.bin")
        return _external_model(model_dir, "weights.bin")
    if kind == "folder_link":
        os.symlink(outside, model_dir / "sub")
        return _external_model(model_dir, "sub/secret.bin")
    if kind == "relative_link":
        os.symlink("../outside/secret.bin", model_dir / "weights.bin")
        return _external_model(model_dir, "weights.bin")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["file_link", "folder_link", "relative_link"])
def test_symlink_out_of_the_model_folder_is_refused_by_every_command(kind, layout, capsys):
    root, model_dir, outside = layout
    model = _escape(kind, model_dir, outside)
    out = root / "out.onnx"
    for args in (["optimize", model, "-o", out], ["info", model], ["check", model, model]):
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (args, err)
        assert len(lines) == 1 and re.search(r"outside the model's folder", lines[0]), err
    assert not out.exists() and not (root / "out.onnx.data").exists()
    assert not [p for p in root.iterdir() if p.name.startswith("out.onnx")]


def test_symlink_escape_refused_from_python(layout):
    _, model_dir, outside = layout
    model = _escape("file_link", model_dir, outside)
    with pytest.raises(BadInputError, match="outside the model's folder"):
        onnxslim.load_model(model)


def test_read_time_check_catches_a_link_swapped_in_after_loading(layout, tmp_path):
    # The check runs at every read, not only when the model is loaded.
    _, model_dir, outside = layout
    (model_dir / "weights.bin").write_bytes(np.arange(32, dtype=np.float32).tobytes())
    model = _external_model(model_dir, "weights.bin")
    loaded = onnxslim.load_model(model)
    (model_dir / "weights.bin").unlink()
    os.symlink(outside / "secret.bin", model_dir / "weights.bin")
    with pytest.raises(BadInputError, match="outside the model's folder"):
        onnxslim.save_model(loaded.proto, tmp_path / "o.onnx", source_dir=loaded.base_dir)
    assert not (tmp_path / "o.onnx").exists()


def test_symlink_inside_the_folder_still_works(layout):
    root, model_dir, _ = layout
    (model_dir / "real.bin").write_bytes(np.arange(32, dtype=np.float32).tobytes())
    os.symlink("real.bin", model_dir / "weights.bin")
    model = _external_model(model_dir, "weights.bin")
    out = root / "out.onnx"
    onnxslim.optimize(model, passes=[], output=out)
    saved = onnx.load(str(out))
    np.testing.assert_array_equal(numpy_helper.to_array(saved.graph.initializer[0]), np.arange(32, dtype=np.float32))
