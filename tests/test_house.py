"""The house's edges: no import cycles, passes import the core and their own family only, one name per pass,
per-run state never on a pass, and a plain checkout that imports like the install."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import onnxslim
from onnxslim import Pass, PassResult, register_pass, registry
from onnxslim.errors import PluginError

from conftest import MODELS, ROOT, SAMPLES

CORE = ROOT / "onnxslim"
PASSES = ROOT / "passes"


def _module_name(path: Path) -> str:
    if path.is_relative_to(PASSES):
        parts = ["onnxslim", "passes", *path.relative_to(PASSES).with_suffix("").parts]
    else:
        parts = ["onnxslim", *path.relative_to(CORE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Project module -> project modules it imports (every import statement, at any depth)."""
    files = [*CORE.rglob("*.py"), *PASSES.rglob("*.py")]
    modules = {_module_name(f): f for f in files}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                # Names that are not submodules are read from ``base`` itself, so it is an edge too.
                targets = [t for t in subs if t in modules] + ([base] if any(t not in modules for t in subs) else [])
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        out[name] = found
    return out


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_passes_import_only_the_core_and_their_own_family():
    graph = _imports()
    assert any(m.startswith("onnxslim.passes.slim.") for m in graph)  # the scan sees the families
    for m, deps in graph.items():
        if not m.startswith("onnxslim.passes."):
            assert not any(d.startswith("onnxslim.passes") for d in deps), f"core module {m} imports a pass: {deps}"
            continue
        family = m.split(".")[2]
        for d in deps:
            if d.startswith("onnxslim.passes."):
                parts = d.split(".")
                assert parts[2] == family, f"{m} imports {d}, a module of another family"
                assert len(parts) == 3 or parts[3].startswith("_"), (
                    f"{m} imports the pass module {d}; what two passes share goes to a private helper or the core"
                )
            elif d != "onnxslim.passes":
                assert d not in ("onnxslim.cli", "onnxslim.pipeline", "onnxslim.testing"), (
                    f"{m} imports {d}: a pass sees the core, never the pipeline, the CLI or the test helpers"
                )


def test_a_decorated_pass_cannot_take_a_registered_name():
    with pytest.raises(PluginError, match=r"'eliminate_dead_nodes' is taken by onnxslim .*EliminateDeadNodes"):

        @register_pass
        class Shadow(Pass):
            name = "eliminate_dead_nodes"

            def run_graph(self, graph, ctx):
                return PassResult()

    assert onnxslim.get_pass("eliminate_dead_nodes").__module__ == "onnxslim.passes.slim.eliminate_dead_nodes"

    @register_pass("test_house_unique")
    class First(Pass):
        def run_graph(self, graph, ctx):
            return PassResult()

    try:
        with pytest.raises(PluginError, match="taken by .*First.*Second"):

            @register_pass("test_house_unique")
            class Second(Pass):
                def run_graph(self, graph, ctx):
                    return PassResult()

        register_pass("test_house_unique")(First)  # the same class again (a re-run notebook cell) is fine
    finally:
        registry.unregister_pass("test_house_unique")


def test_two_packages_claiming_one_name_is_an_error_naming_both(monkeypatch):
    real = metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    twin = metadata.EntryPoint("fold_constants", "other_pkg.passes:Fold", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [*real, twin])
    with pytest.raises(PluginError, match=r"'fold_constants' is claimed by .*FoldConstants.* and by .*other_pkg"):
        onnxslim.get_pass("fold_constants")
    entry = next(e for e in onnxslim.available_passes() if e.name == "fold_constants")
    assert entry.cls is None and "claimed by" in entry.error
    assert onnxslim.get_pass("eliminate_dead_nodes") is not None  # the others are unaffected


def test_a_plain_checkout_reads_the_builtins_from_pyproject(monkeypatch):
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(registry, "_loaded", {})
    assert onnxslim.get_pass("quantize_int8_static").__name__ == "QuantizeInt8Static"
    assert {e.name for e in onnxslim.available_passes()} >= set(onnxslim.DEFAULT_PASSES)


def test_a_plain_checkout_imports_the_passes_without_an_install():
    # No editable-install finder, only the checkout on sys.path: onnxslim.passes comes from passes/.
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import onnxslim.passes.slim.fold_constants as f, onnxslim.passes.quantize._ops as q\n"
        "print(f.__file__); print(q.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(PASSES / "slim" / "fold_constants.py"), str(PASSES / "quantize" / "_ops.py")]


@pytest.mark.parametrize(
    "entry", [m for m in MODELS if m["name"] in ("cnn_digits", "wine_ifloop")], ids=lambda m: m["name"]
)
def test_passes_keep_no_per_run_state(entry):
    """After running, a pass instance holds its options and nothing else: per-run state lives in the context."""
    passes = [onnxslim.get_pass(n)() for n in onnxslim.DEFAULT_PASSES]
    quant = onnxslim.get_pass("quantize_int8_static")(target="x86-avx2")
    onnxslim.optimize(SAMPLES / entry["path"], [*passes, quant], calibration=SAMPLES / entry["calib"])
    for p in [*passes, quant]:
        assert set(vars(p)) == {"options"}, f"{p.name} keeps {sorted(set(vars(p)) - {'options'})} on the instance"


def test_check_pass_contract_holds_lossy_passes_to_their_declared_floors():
    import numpy as np
    import onnx_graphsurgeon as gs

    from onnxslim.testing import check_pass_contract

    cnn = next(m for m in MODELS if m["name"] == "cnn_digits")
    model, data, calib = SAMPLES / cnn["path"], SAMPLES / cnn["eval"], SAMPLES / cnn["calib"]
    quant = onnxslim.get_pass("quantize_int8_static")(target="x86-avx2")
    out = check_pass_contract(quant, model, data, calibration=calib)  # a sample model's path and data folder
    assert any(n.op_type == "QuantizeLinear" for n in out.graph.node)

    class NegateHead(Pass):
        """A lossy pass that breaks the model: the classifier's weights change sign."""

        name = "test_negate_head"
        exact = False
        idempotent = False
        metric_floors = {"cosine": 0.99, "accuracy_drop": 0.01}

        def run_graph(self, graph, ctx):
            result = PassResult()
            for node in graph.nodes:
                if node.op == "Gemm":
                    node.inputs[1] = gs.Constant("negated_head", -np.asarray(node.inputs[1].values))
                    result.modified = True
            return result

    with pytest.raises(AssertionError, match="test_negate_head misses its declared floors"):
        check_pass_contract(NegateHead(), model, data)
