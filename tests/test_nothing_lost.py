"""Nothing is lost: the input is never written, a failed run writes nothing, and the model/data pair is
replaced so that a kill at any step leaves the old pair or the new one, both loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.cli import main
from onnxslim.model_save import save_model

from conftest import ROOT, SAMPLES

CNN = SAMPLES / "cnn_digits" / "model.onnx"


def _model(value: float, n: int = 4096) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.full(n, value, dtype=np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"], name="add")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _weight(path) -> float:
    m = onnx.load(str(path))  # loads the external data the model points at
    values = numpy_helper.to_array(m.graph.initializer[0])
    assert len(set(values.tolist())) == 1
    return float(values[0])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------ input never touched
def test_output_data_file_never_overwrites_a_file_the_input_reads(tmp_path, capsys):
    folder = tmp_path / "collide"
    folder.mkdir()
    src = folder / "model_fp32.onnx"
    m = _model(3.0)
    m.graph.initializer.append(numpy_helper.from_array(np.full(4096, 7.0, dtype=np.float32), "unused"))
    onnx.save(m, str(src), save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    data_before = (folder / "big.onnx.data").read_bytes()

    def input_intact():
        assert (folder / "big.onnx.data").read_bytes() == data_before, "the input's weights must never change"
        loaded = onnx.load(str(src))
        assert [float(numpy_helper.to_array(t)[0]) for t in loaded.graph.initializer] == [3.0, 7.0]

    # the output drops the unused weight, so its data file differs from the input's
    assert main(["optimize", str(src), "-o", str(folder / "big.onnx"), "-q", "--external-data"]) == 0
    input_intact()
    assert _weight(folder / "big.onnx") == 3.0
    # and again, now that big.onnx exists and reads a data file of its own
    assert main(["optimize", str(src), "-o", str(folder / "big.onnx"), "-q", "--external-data"]) == 0
    input_intact()
    assert _weight(folder / "big.onnx") == 3.0


def test_output_path_that_is_the_inputs_data_file_is_refused(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_model(3.0), str(src), save_as_external_data=True, location="w.bin", size_threshold=0)
    before = (tmp_path / "w.bin").read_bytes()
    code = main(["optimize", str(src), "-o", str(tmp_path / "w.bin")])
    assert code == 2
    assert "the input model reads" in _one_error_line(capsys.readouterr().err)
    assert (tmp_path / "w.bin").read_bytes() == before


# ------------------------------------------------------------------------------------------ no output on failure
def test_bad_check_data_fails_before_the_existing_output_is_replaced(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the previous output")
    bad = tmp_path / "eval"
    bad.mkdir()
    np.savez(bad / "0.npz", input=np.zeros((1, 1, 8, 8), dtype=np.float64))
    code = main(["optimize", str(CNN), "-o", str(out), "--check-data", str(bad)])
    assert code == 2
    assert "dtype" in _one_error_line(capsys.readouterr().err)
    assert out.read_bytes() == b"the previous output"


def test_a_bad_later_sample_also_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    good = sorted((SAMPLES / "cnn_digits" / "eval").glob("*.npz"))[0]
    data = tmp_path / "eval"
    data.mkdir()
    (data / "0.npz").write_bytes(good.read_bytes())
    np.savez(data / "1.npz", input=np.zeros((1, 1, 8, 8), dtype=np.float64))
    assert main(["optimize", str(CNN), "-o", str(out), "--check-data", str(data)]) == 2
    assert "1.npz" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_report_into_a_missing_folder_fails_before_writing_the_model(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(CNN), "-o", str(out), "--report", str(tmp_path / "no" / "r.json")])
    assert code == 2
    assert "report folder" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_check_report_into_a_missing_folder_exits_2(tmp_path, capsys):
    code = main(["check", str(CNN), str(CNN), "--report", str(tmp_path / "no" / "r.json")])
    assert code == 2
    assert "report folder" in _one_error_line(capsys.readouterr().err)


def test_unwritable_output_folder_exits_2(tmp_path, capsys, monkeypatch):
    # Tests may run as root, which ignores mode bits: make every file creation there fail instead.
    import tempfile

    real = tempfile.mkstemp

    def denied(*a, dir=None, **kw):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(tmp_path / "ro"):
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **kw)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    code = main(["optimize", str(CNN), "-o", str(tmp_path / "ro" / "out.onnx")])
    assert code == 2
    assert "cannot write to the output folder" in _one_error_line(capsys.readouterr().err)
    assert not list((tmp_path / "ro").iterdir())


# ------------------------------------------------------------------------------------------ atomic pair
_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[4])
    import onnx
    from onnxslim import model_save

    step, model, out = sys.argv[1], onnx.load(sys.argv[2]), sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_replace, real_unlink, real_write = os.replace, os.unlink, model_save._write_external
    renames = []

    def replace(a, b):
        real_replace(a, b)
        renames.append(b)
        if step == "after_data_rename" and len(renames) == 1 or step == "after_model_rename" and len(renames) == 2:
            die()

    def unlink(p, *a, **kw):
        if step == "removing_old_data" and str(p).endswith(".data"):
            die()
        real_unlink(p, *a, **kw)

    def write(*a, **kw):
        digest = real_write(*a, **kw)
        if step == "after_data_written":
            die()
        return digest

    def write_partly(model, data_path, *a, **kw):
        with open(data_path, "wb") as f:
            f.write(b"partial")
        die()

    os.replace, os.unlink = replace, unlink
    model_save._write_external = write_partly if step == "while_writing_data" else write
    model_save.save_model(model, out, external_data=True, size_threshold=0)
    """
)
STEPS = ["while_writing_data", "after_data_written", "after_data_rename", "after_model_rename", "removing_old_data"]


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_any_step_of_save_leaves_a_loadable_pair(step, tmp_path):
    out = tmp_path / "out.onnx"
    save_model(_model(1.0), out, external_data=True, size_threshold=0)  # the old pair
    new = tmp_path / "new.onnx"
    onnx.save(_model(2.0), str(new))
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, step, str(new), str(out), str(ROOT)], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    got = _weight(out)  # the model at out loads, with the data file it points at
    expected = {1.0} if step in ("while_writing_data", "after_data_written", "after_data_rename") else {2.0}
    assert got in expected, (step, got)
    onnx.checker.check_model(str(out))
    # The next run cleans the dead writer's temp files and leaves one consistent pair.
    save_model(_model(4.0), out, external_data=True, size_threshold=0)
    assert _weight(out) == 4.0
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "new.onnx")
    assert not [n for n in left if "tmp-onnxslim" in n], left
    referenced = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
                  for e in t.external_data if e.key == "location"}  # fmt: skip
    assert set(left) - {"out.onnx"} <= referenced | {"out.onnx.data"}, left


def test_replacing_an_existing_pair_never_rewrites_the_data_file_the_old_model_reads(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    save_model(_model(1.0), out, external_data=True, size_threshold=0)
    written = []
    real_open = open

    def spy(file, mode="r", *a, **kw):
        if "w" in mode or "a" in mode:
            written.append(os.path.basename(str(file)))
        return real_open(file, mode, *a, **kw)

    import builtins

    monkeypatch.setattr(builtins, "open", spy)
    save_model(_model(2.0), out, external_data=True, size_threshold=0)
    monkeypatch.undo()
    assert "out.onnx.data" not in written and "out.onnx" not in written, written
    assert _weight(out) == 2.0
    assert not (tmp_path / "out.onnx.data").exists(), "the old data file is removed once the new pair is in place"


def _mismatch_model() -> onnx.ModelProto:
    """Valid, and fine for the optimizer, but onnxruntime fails to run it on 5-wide feeds (MatMul with 4x4)."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "k"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_gate_that_cannot_run_writes_nothing_and_keeps_the_old_output(tmp_path, capsys):
    # Found by the fuzzer: the data passes every pre-flight check, the gate then fails with exit 2 after the
    # optimized model was already written in place of the old output.
    model = tmp_path / "m.onnx"
    onnx.save(_mismatch_model(), str(model))
    data = tmp_path / "d.npz"
    np.savez(data, X=np.ones((1, 5), np.float32))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old output")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["optimize", str(model), "-o", str(out), "--check-data", str(data), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime failed" in err
    assert out.read_bytes() == b"old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_gate_raising_in_the_api_discards_the_staged_pair(tmp_path):
    from onnxslim import optimize

    out = tmp_path / "out.onnx"
    save_model(_model(1.0), out, external_data=True)
    old = sorted(p.name for p in tmp_path.iterdir())

    def gate(staged, report):
        assert staged.exists() and staged != out and _weight(staged) == 2.0  # complete, loadable, not published
        raise KeyboardInterrupt

    two = tmp_path / "two.onnx"
    onnx.save(_model(2.0), str(two))
    with pytest.raises(KeyboardInterrupt):
        optimize(str(two), output=out, external_data=True, gate=gate)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*old, "two.onnx"])
    assert _weight(out) == 1.0
    # A passing gate publishes the staged pair and removes the old data file.
    optimize(str(two), output=out, external_data=True, gate=lambda staged, report: True)
    assert _weight(out) == 2.0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and "out.onnx" in names and "two.onnx" in names, names
    assert len([n for n in names if n.startswith("out.onnx.") and n.endswith(".data")]) == 1, names


def test_temp_folders_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    from onnxslim.temp_files import private_temp_dir, remove_stale_temp_dirs

    code = textwrap.dedent(
        f"""
        import sys, time
        from onnxslim.temp_files import private_temp_dir
        with private_temp_dir("calib", root={str(tmp_path)!r}) as d:
            (d / "model.onnx").write_bytes(b"x" * 4096)
            print(d, flush=True)
            time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    left = child.stdout.readline().strip()
    with private_temp_dir("calib", root=tmp_path) as mine:
        assert remove_stale_temp_dirs(tmp_path) == 0  # both owners alive: nothing removed
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert os.path.isdir(left)
        assert remove_stale_temp_dirs(tmp_path) == 1
        assert not os.path.exists(left) and mine.is_dir()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_writers_temp_files_for_another_output_are_removed_too(tmp_path):
    out = tmp_path / "a.onnx"
    # A temp file of our naming from a process that no longer exists (pid 2**22 + 1 is above pid_max's default).
    dead = tmp_path / f".b.onnx.{2**22 + 1}.x1y2z3.tmp-onnxslim"
    dead.write_bytes(b"partial")
    foreign = tmp_path / ".b.onnx.tmp"  # not ours: left alone
    foreign.write_bytes(b"keep")
    save_model(_model(1.0), out)
    assert not dead.exists() and foreign.exists()
