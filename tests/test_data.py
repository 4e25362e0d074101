"""Feed data formats: a folder of .npz, one .npz, script.py:function, iterables, get_next() readers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim.data import LABEL_KEY, load_feeds
from onnxslim.errors import BadInputError

from conftest import SAMPLES


def _model():
    return onnx.load(str(SAMPLES / "transformer_text" / "model.onnx"))


def test_directory_of_npz_files_with_labels_and_varying_shapes():
    data = load_feeds(SAMPLES / "transformer_text" / "eval").bind(_model())
    samples = list(data.samples())
    assert len(samples) == len(data) >= 4
    assert {s.feeds["input_ids"].dtype for s in samples} == {np.dtype(np.int64)}
    assert len({s.feeds["input_ids"].shape[1] for s in samples}) > 1, "files may differ in seq length"
    assert all(LABEL_KEY in s.meta and LABEL_KEY not in s.feeds for s in samples)
    assert list(data)[0].keys() == {"input_ids", "attention_mask"}
    assert len(list(data)) == len(list(data)), "re-iterable"


def test_single_npz_file(tmp_path):
    np.savez(tmp_path / "one.npz", input=np.zeros((1, 1, 8, 8), np.float32))
    feeds = list(load_feeds(tmp_path / "one.npz"))
    assert len(feeds) == 1 and feeds[0]["input"].shape == (1, 1, 8, 8)


def test_script_function(tmp_path):
    script = tmp_path / "make_data.py"
    script.write_text(
        "import numpy as np\n"
        "def feeds():\n"
        "    for i in range(3):\n"
        "        yield {'input': np.full((1, 1, 8, 8), i, np.float32)}\n"
    )
    feeds = list(load_feeds(f"{script}:feeds"))
    assert [float(f["input"][0, 0, 0, 0]) for f in feeds] == [0.0, 1.0, 2.0]
    with pytest.raises(BadInputError, match="has no function 'nope'"):
        list(load_feeds(f"{script}:nope"))
    with pytest.raises(BadInputError, match="data script not found"):
        load_feeds(f"{tmp_path / 'missing.py'}:feeds")


def test_reader_protocol_can_be_iterated_twice():
    class Reader:
        def __init__(self):
            self.items = iter([{"input": np.ones((1, 1, 8, 8), np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    data = load_feeds(Reader())
    assert len(list(data)) == 4 and len(list(data)) == 4


def test_iterable_validation_names_the_problem():
    model = onnx.load(str(SAMPLES / "cnn_digits" / "model.onnx"))
    data = load_feeds([{"input": np.ones((1, 1, 8, 8), np.float32)}, {"input": np.ones((1, 1, 8, 8), np.float16)}])
    it = iter(data.bind(model))
    next(it)
    with pytest.raises(BadInputError, match=r"feeds\[1\]: input 'input' has dtype float16"):
        next(it)
    with pytest.raises(BadInputError, match="missing input"):
        list(load_feeds([{"__label__": np.zeros(1)}]).bind(model))
