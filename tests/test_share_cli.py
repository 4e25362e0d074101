"""The weight-sharing shortcut of the CLI: --share BITS, --share-option, and its order with pruning and int8."""

from __future__ import annotations

import json

from onnxslim.cli import main

from conftest import SAMPLES

CNN = SAMPLES / "cnn_digits" / "model.onnx"
CALIB = SAMPLES / "cnn_digits" / "calib"
EVAL = SAMPLES / "cnn_digits" / "eval"


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_share_4_bits_passes_its_gate_and_shrinks_the_file(capsys, tmp_path):
    out, lossless = tmp_path / "s.onnx", tmp_path / "l.onnx"
    code, text, err = run_cli(
        capsys, "optimize", CNN, "-o", out, "--share", "4", "--calib", CALIB, "--check-data", EVAL
    )
    assert code == 0, text + err
    assert run_cli(capsys, "optimize", CNN, "-o", lossless)[0] == 0
    assert out.stat().st_size < 0.5 * lossless.stat().st_size


def test_prune_share_and_int8_run_in_order(capsys, tmp_path):
    code, text, err = run_cli(
        capsys, "optimize", CNN, "-o", tmp_path / "o.onnx", "--share", "4", "--quantize", "int8", "--prune", "0.5",
        "--target-cpu", "x86-vnni", "--calib", CALIB, "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, text + err
    passes = json.loads((tmp_path / "r.json").read_text())["passes"]
    names = [p["name"] for p in passes]
    order = ["prune_by_magnitude", "share_weights", "quantize_int8_static", "pack_sparse_weights"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)
    share = next(p for p in passes if p["name"] == "share_weights")
    assert share["options"]["decode"] == "packed"  # stacked: the quantizer makes the codebooks int8
    quantize = next(p for p in passes if p["name"] == "quantize_int8_static")
    assert quantize["stats"]["codebook_weights_quantized"] >= 4, quantize["stats"]


def test_bad_sharing_flags_exit_2_and_write_nothing(capsys, tmp_path):
    for args, message in ((["--share", "9"], "bits must be in 2..8"), (["--share-option", "bits=4"], "--share BITS")):
        code, _, err = run_cli(capsys, "optimize", CNN, "-o", tmp_path / "o.onnx", *args)
        assert code == 2 and message in err and "\n" not in err.strip()
    assert not list(tmp_path.iterdir())
