"""The one Pass interface, its result type, and the context a pass runs in.

A pass rewrites a graphsurgeon graph in place and returns facts (``PassResult``). It declares facts about
itself as class attributes: ``exact`` (lossless up to float rounding, which picks the parity oracle),
``needs_calibration``, ``requires`` (passes that must run earlier), and typed ``Options``.

Passes that work node by node override ``run_graph``; the base ``run`` calls it on the main graph and on
every If/Loop/Scan body (and model-local function bodies when ``visit_functions`` is set). Passes that
need the whole model at once override ``run`` instead.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from .errors import UsageError
from .graph import iter_graphs
from .graph_edit import GraphEditor, Names

__all__ = ["Pass", "PassResult", "PassContext", "SkippedNode", "iter_graphs", "option_specs", "OptionSpec"]

log = logging.getLogger(__name__)


@dataclass
class SkippedNode:
    """A node a pass left alone, and why (so users can ask 'why didn't this fire?')."""

    node: str
    op_type: str
    reason: str
    graph: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    """Facts a pass reports: whether it changed the graph, named counts, and the nodes it skipped."""

    modified: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    skipped: list[SkippedNode] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Per-layer facts (one flat dict per layer: name, op, params/bytes/FLOPs before and after...), shown in
    # the report as a table and kept whole in the JSON.
    layers: list[dict] = field(default_factory=list)

    def count(self, key: str, n: float = 1) -> None:
        """Add ``n`` to stat ``key``. Set ``modified`` yourself: a count alone does not mark a change."""
        self.stats[key] = self.stats.get(key, 0) + n

    def skip(self, node: gs.Node, reason: str, graph: gs.Graph | None = None) -> None:
        log.debug("skip %s (%s): %s", node.name, node.op, reason)
        self.skipped.append(SkippedNode(node.name, node.op, reason, graph.name if graph is not None else ""))

    def merge(self, other: PassResult) -> PassResult:
        self.modified = self.modified or other.modified
        for k, v in other.stats.items():
            self.stats[k] = self.stats.get(k, 0) + v
        self.skipped.extend(other.skipped)
        self.notes.extend(other.notes)
        self.layers.extend(other.layers)
        return self


@dataclass
class PassContext:
    """What a pass may read besides the graph. The pipeline builds it; passes don't create sessions or files."""

    graph: gs.Graph
    opset: int
    base_dir: Path | None = None
    calibration: Any = None
    seed: int = 0
    shared: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str, int, int | None], None] | None = None  # (stage, done, total) for long stages
    # The run's calibration service (``calibration_service.CalibrationService``; the pipeline makes one, shared
    # by every pass of the run): ``statistics()`` asks it.
    statistics_service: Any = None
    # The model as the pipeline loaded it, before any pass ran (external weights stay on disk): the teacher
    # that reconstruction and distillation match, e.g. ``ctx.statistics(request, model=ctx.original_model)``.
    original_model: Any = None
    # Per-run state (fresh names) lives here, never on the pass instance.
    _names: Names | None = field(default=None, init=False, repr=False)

    def opset_of(self, domain: str = "") -> int | None:
        if domain in ("", "ai.onnx"):
            return self.opset
        return next((d.version for d in self.graph.import_domains or [] if d.domain == domain), None)

    @property
    def names(self) -> Names:
        """Fresh names unique in the whole model, for this pass run (made on first use)."""
        if self._names is None:
            self._names = Names(self.graph)
        return self._names

    def edit(self, graph: gs.Graph | None = None) -> GraphEditor:
        """An editor for ``graph`` (default: the main graph), with names unique in the whole model."""
        return GraphEditor(self.graph if graph is None else graph, self.names)

    def statistics(self, request: Any, model: Any = None) -> Any:
        """Calibration statistics for a ``StatisticsRequest``, from one streaming run over ``calibration`` (or
        none, when the same numbers were collected on this model state before). ``model``: the graph as a
        model (default: ``ctx.graph`` exported as it is now)."""
        if self.statistics_service is None:
            from .calibration_service import CalibrationService

            self.statistics_service = CalibrationService(self.calibration, self.base_dir, self.progress)
        if model is None:
            from .gs_bridge import export_standalone

            model = export_standalone(self.graph, self.opset)
        return self.statistics_service.statistics(model, request)

    def for_graph(self, graph: gs.Graph) -> PassContext:
        """A context for a fresh run on ``graph`` (a copy being tried out): the same model facts, data and shared
        services, its own per-run state."""
        return dataclasses.replace(self, graph=graph)


# --------------------------------------------------------------------------------------------- options
@dataclass
class OptionSpec:
    name: str
    type: str
    default: Any
    help: str
    choices: tuple | None = None


def option_specs(options_cls: type) -> list[OptionSpec]:
    hints = typing.get_type_hints(options_cls)
    specs = []
    for f in dataclasses.fields(options_cls):
        tp = hints.get(f.name, Any)
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
        specs.append(OptionSpec(f.name, _type_name(tp), default, f.metadata.get("help", ""), choices))
    return specs


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "choice"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(pass_name: str, name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = UsageError
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(pass_name, name, value, a)
            except UsageError as e:
                last = e
        raise last or bad(f"{pass_name}: bad value {value!r} for option '{name}'")
    if origin is typing.Literal:
        if value in args:
            return value
        raise bad(f"{pass_name}: option '{name}' must be one of {', '.join(map(str, args))}; got {value!r}")
    if origin in (list, tuple):
        item = args[0] if args else str
        if isinstance(value, str):
            value = [v for v in value.replace(";", ",").split("|" if "|" in value else ",") if v != ""]
        if not isinstance(value, (list, tuple)):
            value = [value]
        out = [_coerce(pass_name, name, v, item) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise bad(f"{pass_name}: option '{name}' expects true/false; got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise bad(f"{pass_name}: option '{name}' expects a number; got {value!r}")
        try:
            num = (
                float(value)
                if tp is float
                else int(str(value).replace("_", ""), 0)
                if isinstance(value, str)
                else int(value)
            )
        except (TypeError, ValueError):
            raise bad(f"{pass_name}: option '{name}' expects {tp.__name__}; got {value!r}") from None
        if tp is int and isinstance(value, float) and not float(value).is_integer():
            raise bad(f"{pass_name}: option '{name}' expects an integer; got {value!r}")
        return num
    if tp is str:
        return str(value)
    return value


# --------------------------------------------------------------------------------------------- the pass
class Pass:
    """Base of every pass, built-in or third-party.

    Subclasses set ``name`` (verb_object, the CLI token and entry-point name), may declare an ``Options``
    dataclass, and override ``run_graph`` (node-by-node, subgraphs walked for them) or ``run``.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    # Passes that, when in the same list, must come after this one: they rewrite what it reads (float weights
    # become int8, codes or packed masks), so this pass would find nothing to do after them.
    runs_before: ClassVar[tuple[str, ...]] = ()
    idempotent: ClassVar[bool] = True
    visit_functions: ClassVar[bool] = False
    # Lossy passes declare the floors their output should meet (metric -> value), used by parity gates.
    metric_floors: ClassVar[dict[str, float]] = {}

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any):
        self.options = self.make_options(options)

    @classmethod
    def make_options(cls, given: dict[str, Any]) -> Any:
        hints = typing.get_type_hints(cls.Options)
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(given) - known)
        if unknown:
            names = ", ".join(sorted(known)) or "none"
            raise UsageError(f"{cls.name or cls.__name__}: unknown option(s) {', '.join(unknown)}; it takes: {names}")
        values = {k: _coerce(cls.name, k, v, hints.get(k, Any)) for k, v in given.items()}
        opts = cls.Options(**values)
        check = getattr(opts, "validate", None)
        if callable(check):
            problem = check()
            if problem:
                raise UsageError(f"{cls.name}: {problem}")
        return opts

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def run(self, ctx: PassContext) -> PassResult:
        """Whole-model entry point. Default: ``run_graph`` on every graph and subgraph."""
        result = PassResult()
        for g in list(iter_graphs(ctx.graph, functions=self.visit_functions)):
            result.merge(self.run_graph(g, ctx))
        return result

    def run_graph(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} must override run_graph() or run()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options_dict()})"
