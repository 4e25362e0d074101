"""The pipeline's own duties: order checks, rollback, validation, calibration needs, registry, config."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxslim
from onnxslim import Pass, PassResult, register_pass, registry
from onnxslim.config import OptimizeSettings, load_config, settings_from_mapping
from onnxslim.errors import PassError, PluginError, UsageError
from onnxslim.pipeline import PassSpec, resolve_passes
from onnxslim.report import Report
from onnxslim.testing import check_pass_contract


def tiny_model() -> onnx.ModelProto:
    return onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
        a = Identity(x)
        b = Relu(a)
        dead = Sigmoid(x)
        y = Abs(b)
    }
    """)


class BreakingPass(Pass):
    """Raises halfway through, after mutating the graph."""

    name = "test_breaking"

    def run(self, ctx):
        ctx.graph.nodes.clear()
        raise RuntimeError("boom")


class DanglingPass(Pass):
    """Leaves a node reading a tensor nothing produces."""

    name = "test_dangling"

    def run_graph(self, graph, ctx):
        node = graph.nodes[0]
        node.inputs[0] = gs.Variable("nowhere", dtype=np.float32)
        r = PassResult(modified=True)
        return r


class NeedsFirst(Pass):
    name = "test_needs_first"
    requires = ("eliminate_dead_nodes",)

    def run_graph(self, graph, ctx):
        return PassResult()


class NeedsData(Pass):
    name = "test_needs_data"
    needs_calibration = True

    def run(self, ctx):
        r = PassResult()
        r.count("samples", sum(1 for _ in ctx.calibration))
        return r


@dataclass
class _Opts:
    factor: float = 1.0
    mode: str = "a"


def test_default_pipeline_removes_dead_node_and_reports_it():
    out, report = onnxslim.optimize(tiny_model())
    assert [n.op_type for n in out.graph.node] == ["Relu", "Abs"]
    totals = {p.name: p for p in report.pass_totals()}
    assert list(totals) == list(onnxslim.DEFAULT_PASSES)
    assert totals["eliminate_identity_ops"].stats["Identity_removed"] == 1
    assert totals["eliminate_dead_nodes"].modified and totals["eliminate_dead_nodes"].stats["nodes_removed"] == 1
    assert report.before.nodes == 4 and report.after.nodes == 2
    # Fixed point: a second round ran and changed nothing, then the loop stopped.
    rounds = sorted({p.iteration for p in report.passes})
    assert rounds == [0, 1] and not any(p.modified for p in report.passes if p.iteration == 1)
    assert "2 rounds to a fixed point" in report.render_text()


def test_failing_pass_is_rolled_back_and_recorded():
    out, report = onnxslim.optimize(tiny_model(), [BreakingPass(), "eliminate_dead_nodes"])
    rec = report.passes[0]
    assert rec.error and "boom" in rec.error and not rec.modified
    assert len(out.graph.node) == 3, "the rollback restored the graph; the next pass still ran"
    assert any("test_breaking" in w for w in report.warnings)


def test_failing_pass_raises_with_its_name_when_strict():
    with pytest.raises(PassError, match="pass 'test_breaking' failed.*boom"):
        onnxslim.optimize(tiny_model(), ["eliminate_dead_nodes", BreakingPass()], on_pass_error="raise")


def test_invalid_graph_after_a_pass_is_caught():
    with pytest.raises(PassError, match="test_dangling.*nowhere"):
        onnxslim.optimize(tiny_model(), [DanglingPass()], on_pass_error="raise")
    out, report = onnxslim.optimize(tiny_model(), [DanglingPass()])
    assert "nothing produces" in report.passes[0].error
    onnx.checker.check_model(out, full_check=True)


def test_order_is_checked_not_silently_changed():
    with pytest.raises(UsageError, match="requires 'eliminate_dead_nodes' to run before it"):
        resolve_passes([NeedsFirst()])
    assert [p.name for p in resolve_passes(["eliminate_dead_nodes", NeedsFirst()])] == [
        "eliminate_dead_nodes",
        "test_needs_first",
    ]


def test_calibration_needed_and_given():
    with pytest.raises(UsageError, match="need calibration data.*--calib"):
        onnxslim.optimize(tiny_model(), [NeedsData()])
    feeds = [{"x": np.ones((2, 4), np.float32)} for _ in range(3)]
    _, report = onnxslim.optimize(tiny_model(), [NeedsData()], calibration=feeds)
    assert report.passes[0].stats["samples"] == 3
    with pytest.raises(onnxslim.BadInputError, match="dtype int32.*expects float32"):
        onnxslim.optimize(tiny_model(), [NeedsData()], calibration=[{"x": np.ones((2, 4), np.int32)}])


def test_pass_options_are_typed_and_validated():
    class WithOptions(Pass):
        name = "test_with_options"

        @dataclass
        class Options:
            factor: float = field(default=1.0, metadata={"help": "scale"})
            mode: str = "a"
            keep: bool = False

        def run_graph(self, graph, ctx):
            return PassResult()

    p = WithOptions(factor="2.5", keep="yes")
    assert p.options.factor == 2.5 and p.options.keep is True
    with pytest.raises(UsageError, match="unknown option.*nope.*it takes: factor, keep, mode"):
        WithOptions(nope=1)
    with pytest.raises(UsageError, match="expects float"):
        WithOptions(factor="lots")


def test_pass_spec_parsing():
    spec = PassSpec.parse("fold_constants:size_threshold=4096,allow-growth=true")
    assert spec == PassSpec("fold_constants", {"size_threshold": "4096", "allow_growth": "true"})
    with pytest.raises(UsageError, match="has no value"):
        PassSpec.parse("x:flag")


# ------------------------------------------------------------------------------------------ registry
def test_decorator_registers_a_pass_by_name():
    @register_pass("test_registered_abs_to_relu")
    class AbsNoop(Pass):
        def run_graph(self, graph, ctx):
            return PassResult()

    try:
        assert onnxslim.get_pass("test_registered_abs_to_relu") is AbsNoop
        assert AbsNoop.name == "test_registered_abs_to_relu"
        names = [e.name for e in onnxslim.available_passes()]
        assert "test_registered_abs_to_relu" in names and "eliminate_dead_nodes" in names
    finally:
        registry.unregister_pass("test_registered_abs_to_relu")


def test_unknown_pass_suggests_the_closest_name():
    with pytest.raises(UsageError, match="did you mean 'eliminate_dead_nodes'"):
        onnxslim.get_pass("eliminate_dead_node")


def test_broken_plugin_is_reported_when_used_and_spares_the_others(monkeypatch):
    real = registry._entry_points()
    broken = metadata.EntryPoint("broken_plugin", "no_such_module_xyz:Thing", registry.ENTRY_POINT_GROUP)
    not_a_pass = metadata.EntryPoint("not_a_pass", "json:dumps", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: {**real, "broken_plugin": broken, "not_a_pass": not_a_pass})
    entries = {e.name: e for e in onnxslim.available_passes()}
    assert entries["broken_plugin"].cls is None and "failed to import" in entries["broken_plugin"].error
    assert entries["not_a_pass"].cls is None and "not an onnxslim.Pass" in entries["not_a_pass"].error
    assert entries["eliminate_dead_nodes"].cls is not None
    with pytest.raises(PluginError, match="broken_plugin.*failed to import.*ModuleNotFoundError"):
        onnxslim.get_pass("broken_plugin")
    onnxslim.optimize(tiny_model())  # the default pipeline is unaffected


def test_builtin_passes_come_from_the_entry_point_group():
    eps = metadata.entry_points(group="onnxslim.passes")
    assert "eliminate_dead_nodes" in eps.names
    for name in onnxslim.DEFAULT_PASSES:
        assert name in eps.names, f"default pass {name} must be registered like a plugin"


def test_check_pass_contract_catches_a_lying_pass():
    class Liar(Pass):
        name = "test_liar"

        def run_graph(self, graph, ctx):
            for node in graph.nodes:
                if node.op == "Relu":
                    node.op = "Sigmoid"
            return PassResult(modified=False)

    with pytest.raises(AssertionError, match="modified=False but changed the graph"):
        check_pass_contract(Liar(), tiny_model(), [{"x": np.ones((1, 4), np.float32)}])


# ------------------------------------------------------------------------------------------ config
def test_config_file_and_cli_map_to_the_same_settings(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text(
        'passes = ["eliminate_dead_nodes"]\ncalib = "data"\nseed = 3\n'
        '[[pass]]\nname = "fold_constants"\nsize_threshold = 10\n'
    )
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text(
        "passes:\n  - eliminate_dead_nodes\n  - name: fold_constants\n    size_threshold: 10\ncalib: data\nseed: 3\n"
    )
    a, b = load_config(toml), load_config(yaml_file)
    assert a == b
    cli = settings_from_mapping(
        {"passes": ["eliminate_dead_nodes", "fold_constants:size_threshold=10"], "calibration": "data", "seed": 3}
    )
    assert [p.name for p in cli.passes] == [p.name for p in a.passes]
    assert set(OptimizeSettings().api_kwargs()) <= set(onnxslim.optimize.__code__.co_varnames)
    with pytest.raises(UsageError, match="unknown setting 'bogus'"):
        settings_from_mapping({"bogus": 1})


def test_report_json_round_trip():
    _, report = onnxslim.optimize(tiny_model())
    again = Report.from_json(report.to_json())
    assert again.to_dict() == report.to_dict()
    text = report.render_text()
    assert "eliminate_dead_nodes" in text and "Sigmoid" in text


def test_context_reports_opsets_per_domain():
    from onnxslim.gs_bridge import import_graph
    from onnxslim.pass_base import PassContext

    from conftest import SAMPLES

    graph = import_graph(onnxslim.load_model(SAMPLES / "sklearn_cancer" / "model.onnx"))
    ctx = PassContext(graph=graph, opset=17)
    assert (ctx.opset_of(""), ctx.opset_of("ai.onnx.ml"), ctx.opset_of("com.microsoft")) == (17, 1, None)


@pytest.mark.parametrize(
    ("order", "early"),
    [
        (["quantize_int8_static", "share_weights"], "share_weights"),
        (["share_weights", "prune_by_magnitude"], "prune_by_magnitude"),
        (["pack_sparse_weights", "prune_by_magnitude"], "prune_by_magnitude"),
        (["prune_by_magnitude", "prune_channels"], "prune_channels"),
    ],
)
def test_a_compression_order_that_would_do_nothing_is_explained(order, early):
    from onnxslim.pipeline import resolve_passes

    with pytest.raises(UsageError, match=f"pass '{early}' must run before '{order[0]}'.*put '{early}' earlier"):
        resolve_passes(order)
    resolve_passes(order[::-1])  # the right order is accepted
