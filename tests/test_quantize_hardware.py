"""Hardware-aware quantization defaults: cpuinfo parsing, target -> settings, reduce_range, --target-cpu."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.cli import main as cli_main
from onnxslim.errors import UsageError
from onnxslim.graph import check_model, iter_graphs
from onnxslim.passes.quantize._hardware import detect_target, host_target, resolve_hardware, target_settings
from onnxslim.pipeline import optimize

QUANT = "quantize_int8_static"
# The tiny test layers are below the default min_macs_for_activation_quantization (they would get weights only).
FULL = f"{QUANT}:min_macs_for_activation_quantization=0"

X86_VNNI = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme de pse sse sse2 ssse3 fma avx avx2 avx512f avx512bw avx512_vnni avx512_bf16
"""
X86_AVX_VNNI = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 avx avx2 avx_vnni
"""
X86_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7R32
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2
"""
X86_OLD = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 ssse3
"""
ARM_DOT = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""
ARM_NODOT = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    "text,machine,want",
    [
        (X86_VNNI, "x86_64", "x86-vnni"),
        (X86_AVX_VNNI, "x86_64", "x86-vnni"),
        (X86_AVX2, "x86_64", "x86-avx2"),
        (X86_OLD, "x86_64", "generic"),
        (ARM_DOT, "aarch64", "arm-dotprod"),
        (ARM_NODOT, "aarch64", "arm"),
        (X86_AVX2, "", "x86-avx2"),  # architecture read from the text itself
        (ARM_DOT, "", "arm-dotprod"),
        ("", "", "generic"),
        ("processor : 0\n", "riscv64", "generic"),
    ],
)
def test_detect_target_from_cpuinfo(text, machine, want):
    assert detect_target(text, machine) == want


def test_host_target_reads_the_given_file(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(X86_AVX2 if "x86" in host_target() else ARM_NODOT)
    assert host_target(f) in ("x86-avx2", "arm")
    assert host_target() in ("x86-vnni", "x86-avx2", "arm-dotprod", "arm", "generic")


def test_target_settings_and_overrides(tmp_path):
    assert target_settings("x86-vnni") == (False, "uint8")
    assert target_settings("x86-avx2") == (True, "uint8")
    assert target_settings("arm-dotprod") == (False, "int8")
    assert target_settings("arm") == (False, "int8")
    assert target_settings("generic") == (False, "uint8")
    with pytest.raises(ValueError, match="unknown target"):
        target_settings("sparc")
    hw = resolve_hardware("x86-avx2", reduce_range=False, activations="int8")
    assert (hw.target, hw.reduce_range, hw.activations, hw.detected) == ("x86-avx2", False, "int8", False)
    f = tmp_path / "cpuinfo"
    f.write_text(X86_AVX2)
    hw = resolve_hardware("auto", None, "auto", cpuinfo_path=f)
    assert hw.detected and hw.reduce_range == (hw.target == "x86-avx2")
    assert "detected on this machine" in hw.note()


# ------------------------------------------------------------------------------------------ the pass
def _conv_model() -> onnx.ModelProto:
    r = np.random.default_rng(0)
    w = r.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = r.standard_normal(8).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "G"], ["y"], transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "B"),
            numpy_helper.from_array(r.standard_normal((5, 128)).astype(np.float32), "G"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    check_model(m, full=True)
    return m


def _calib(n=8):
    r = np.random.default_rng(1)
    return [{"x": r.standard_normal((1, 3, 4, 4)).astype(np.float32)} for _ in range(n)]


def _int8_weights(m: onnx.ModelProto) -> list[np.ndarray]:
    return [
        numpy_helper.to_array(t)
        for g in iter_graphs(m.graph)
        for t in g.initializer
        if t.data_type == TensorProto.INT8 and len(t.dims) >= 2
    ]


def _zero_point_types(m: onnx.ModelProto) -> set[int]:
    inits = {t.name: t for t in m.graph.initializer}
    return {inits[n.input[2]].data_type for n in m.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize(
    "target,qmax,act",
    [
        ("x86-vnni", 127, TensorProto.UINT8),
        ("x86-avx2", 63, TensorProto.UINT8),
        ("arm-dotprod", 127, TensorProto.INT8),
        ("arm", 127, TensorProto.INT8),
    ],
)
def test_target_sets_weight_range_and_activation_type_and_runs(target, qmax, act):
    m = _conv_model()
    out, rep = optimize(m, [f"{FULL},target={target},bias_correction=false"], calibration=_calib())
    check_model(out, full=True)
    ws = _int8_weights(out)
    assert len(ws) == 2
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in ws) == qmax  # each channel's max hits the grid end
    assert all(w.min() >= -64 and w.max() <= 63 for w in ws) == (qmax == 63)
    assert _zero_point_types(out) == {act}
    assert any(target in n for n in rep.passes[0].notes)
    x = _calib(1)[0]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        got = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)[0]
        ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
        cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
        assert cos > 0.99, (target, level, cos)


def test_explicit_reduce_range_and_activations_override_the_target():
    out, rep = optimize(
        _conv_model(), [f"{FULL},target=x86-avx2,reduce_range=false,activations=int8"], calibration=_calib()
    )
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(out)) == 127
    assert _zero_point_types(out) == {TensorProto.INT8}
    out, _ = optimize(_conv_model(), [f"{FULL},target=x86-vnni,reduce_range=true"], calibration=_calib())
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(out)) == 63


def test_auto_target_is_recorded_in_the_report():
    from onnxslim.passes.quantize import _hardware

    _, rep = optimize(_conv_model(), [FULL], calibration=_calib())
    # conftest pins what "this machine" detects to x86-avx2; the note names what detection gave the pass
    assert _hardware.host_target() == "x86-avx2"
    assert any("target x86-avx2 (detected on this machine)" in n for n in rep.passes[0].notes)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_target_cpu_applies_to_the_quantize_pass(tmp_path):
    src, dst = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_conv_model(), src)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, f in enumerate(_calib(4)):
        np.savez(calib / f"{i}.npz", **f)
    rc = cli_main(
        [
            "optimize",
            str(src),
            "-o",
            str(dst),
            "-p",
            "eliminate_dead_nodes",
            "--quantize",
            "int8",
            "--calib",
            str(calib),
            "--target-cpu",
            "x86-avx2",
            "-q",
        ]
    )
    assert rc == 0
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(onnx.load(str(dst)))) == 63


def test_cli_target_cpu_without_quantize_is_a_usage_error(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_conv_model(), src)
    rc = cli_main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--target-cpu", "x86-avx2"])
    assert rc == 2
    assert "--quantize int8" in capsys.readouterr().err


def test_unknown_target_is_rejected():
    with pytest.raises(UsageError, match="target"):
        optimize(_conv_model(), [f"{FULL},target=sparc"], calibration=_calib())


@pytest.mark.parametrize(
    ("cpuinfo", "machine", "qmax", "zero_point"),
    [
        (X86_VNNI, "x86_64", 127, TensorProto.UINT8),
        (X86_AVX2, "x86_64", 63, TensorProto.UINT8),
        (ARM_DOT, "aarch64", 127, TensorProto.INT8),
        ("", "x86_64", 127, TensorProto.UINT8),  # nothing readable: generic
    ],
    ids=["vnni", "avx2-only", "arm-dotprod", "none"],
)
def test_auto_target_follows_faked_cpu_flags(tmp_path, monkeypatch, cpuinfo, machine, qmax, zero_point):
    from onnxslim.passes.quantize import _hardware

    f = tmp_path / "cpuinfo"
    f.write_text(cpuinfo)
    monkeypatch.setattr(_hardware.platform, "machine", lambda: machine)
    monkeypatch.setattr(_hardware, "host_target", lambda *a, **k: host_target(f))  # the real detection, faked flags
    real_flags = _hardware.deciding_flags
    monkeypatch.setattr(_hardware, "deciding_flags", lambda *a, **k: real_flags(f))
    out, rep = optimize(_conv_model(), [FULL], calibration=_calib())
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(out)) == qmax
    assert _zero_point_types(out) == {zero_point}
    (note,) = [n for n in rep.passes[0].notes if "(detected on this machine)" in n]
    # The note names the flags that decided it (issue 15: the report shows them, in its facts section).
    have, checked = real_flags(f)
    assert f"CPU flags: {' '.join(have) or 'none of those checked'}" in note
    assert set(have) <= set(checked) and ("avx2" in have) == ("avx2" in cpuinfo)
