"""README examples run as tests, so the docs cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

import onnxslim
from onnxslim import registry
from onnxslim.testing import check_pass_contract

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    start = README.index(marker)
    return re.search(r"```python\n(.*?)```", README[start:], re.S).group(1)


def test_custom_pass_example_runs_and_keeps_its_contract():
    code = _block_after("<!-- custom-pass-example -->")
    # 30 lines before the public editing API (readers rewired by hand); it must not grow back
    assert len(code.strip().splitlines()) <= 26, "the README's custom pass stays short"
    # only public names: the top-level package and its documented modules, nothing private
    imports = re.findall(r"^(?:from|import) (\S+)", code, re.M)
    assert set(imports) <= {"onnxslim", "onnxslim.graph_edit"}, imports
    assert not re.search(r"\._[a-z]", code), "the example reaches into a private name"
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    cls = namespace["EliminateDoubleNegation"]
    try:
        model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y, float[N, 3] z) {
            a = Neg(x)
            b = Neg(a)
            y = Relu(b)
            c = Neg(y)
            z = Neg(c)
        }
        """)
        feeds = [{"x": np.array([[-1, 0, 2]], np.float32)}]
        check_pass_contract(cls(), model, feeds, expect_modified=True)
        out, report = onnxslim.optimize(model, ["eliminate_double_negation", "eliminate_dead_nodes"], fixed_point=False)
        assert [n.op_type for n in out.graph.node] == ["Relu", "Neg", "Neg"]
        rec = report.passes[0]
        assert rec.stats["pairs_removed"] == 1 and rec.skipped[0]["reason"] == "its output is a graph output"
    finally:
        registry.unregister_pass("eliminate_double_negation")


def test_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = _block_after("## Python API").replace('"cnn_digits.slim.onnx"', repr(str(tmp_path / "o.onnx")))
    code = code.replace('"report.json"', repr(str(tmp_path / "r.json")))
    code = code.replace("print(report.render_text())", "text = report.render_text()")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert (tmp_path / "o.onnx").exists() and (tmp_path / "r.json").exists()
    assert "eliminate_dead_nodes" in ns["text"]


def test_python_check_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    onnxslim.optimize("sample_models/cnn_digits/model.onnx", output=tmp_path / "o.onnx")
    start = README.index("Verify a result against its original")
    code = re.search(r"```python\n(.*?)```", README[start:], re.S).group(1)
    code = code.replace('"cnn_digits.slim.onnx"', repr(str(tmp_path / "o.onnx")))
    ns: dict = {"onnxslim": onnxslim}
    exec(compile(code, "README.md", "exec"), ns)
    report = ns["result"].to_dict()
    used = report["providers"]["used"]
    assert "CPUExecutionProvider" in used
    if "CUDAExecutionProvider" not in used:  # no GPU here: reported as skipped with a reason, not as a pass
        assert any(s["provider"] == "CUDAExecutionProvider" for s in report["providers"]["skipped"])


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = re.search(r"^TEST_COMMAND=\"(.*)\"$", ci, re.M).group(1)
    assert cmd in README, "the README's test command and .ci/run must stay the same"


def test_quick_start_main_job_runs(tmp_path, monkeypatch, capsys):
    """The README's first command, minus the venv setup, exits 0 and writes the model and the report."""
    from onnxslim.cli import main

    line = next(l for l in README.splitlines() if "onnxslim optimize sample_models" in l)
    args = line.split(".venv/bin/onnxslim ", 1)[1].split()
    monkeypatch.chdir(ROOT)
    args[args.index("-o") + 1] = str(tmp_path / "out.onnx")
    args[args.index("--report") + 1] = str(tmp_path / "report.json")
    assert main(args) == 0
    assert (tmp_path / "out.onnx").exists() and "parity (lossy): pass" in capsys.readouterr().out
