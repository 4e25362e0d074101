"""The command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 a parity/quality gate failed, 2 bad usage or bad input, 3 a pass or onnxslim itself
failed (a bug: please report it with --verbose output).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from ._version import __version__
from .cli_auto import add_auto_arguments, run_auto
from .cli_compress import add_compression_arguments, apply_compression_arguments
from .cli_progress import progress_display
from .config import OptimizeSettings, load_config, settings_from_mapping
from .errors import BadInputError, OnnxSlimError, UsageError

__all__ = ["main", "build_parser"]

log = logging.getLogger("onnxslim")

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str):
    def deco(cls):
        _COMMANDS[name] = (cls.add_arguments, cls.run, help)
        return cls

    return deco


def _text_width() -> int:
    """The terminal's width (at least 80) when stdout is one; 120 for files and pipes, so logs are stable."""
    import shutil

    return max(80, shutil.get_terminal_size((120, 24)).columns) if sys.stdout.isatty() else 120


def _out(text: str = "") -> None:
    sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))


# ------------------------------------------------------------------------------------------ optimize
@command("optimize", "optimize a model (default: the lossless pipeline) and write it atomically")
class Optimize:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="input .onnx file")
        p.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
        p.add_argument("--report", metavar="REPORT.json", help="write the JSON report here")
        p.add_argument(
            "-p",
            "--pass",
            dest="passes",
            action="append",
            metavar="NAME[:K=V,...]",
            help="run this pass (repeatable, in order); without any, the default lossless pipeline runs",
        )
        p.add_argument("--config", metavar="FILE", help="settings from a TOML/YAML/JSON file (flags override it)")
        p.add_argument(
            "--calib",
            "--calibration",
            dest="calibration",
            metavar="DATA",
            help="calibration data: a folder of .npz feeds, one .npz, or script.py:function",
        )
        p.add_argument(
            "--opset",
            type=int,
            metavar="N",
            help="raise the model's opset to N first (e.g. 13: per-channel int8 weight scales for opset-11/12 "
            "models); the output imports opset N, a contract change the report names",
        )
        add_compression_arguments(p)
        add_auto_arguments(p)
        fp = p.add_mutually_exclusive_group()
        fp.add_argument(
            "--fixed-point",
            dest="fixed_point",
            action="store_true",
            default=None,
            help="repeat the passes until nothing changes (default when all passes are exact)",
        )
        fp.add_argument("--no-fixed-point", dest="fixed_point", action="store_false", help="run each pass once")
        p.add_argument("--max-iterations", type=int, help="cap on fixed-point rounds (default 10)")
        p.add_argument(
            "--check",
            choices=["auto", "full", "basic", "none"],
            help="onnx.checker level for the result (default auto: as strict as the input passes)",
        )
        p.add_argument(
            "--strict",
            action="store_true",
            help="stop on the first failing pass (default: roll it back, warn, and go on)",
        )
        ext = p.add_mutually_exclusive_group()
        ext.add_argument(
            "--external-data",
            dest="external_data",
            action="store_true",
            default=None,
            help="write weights to a data file next to the model (OUTPUT.data, or OUTPUT.<hash>.data when that exists)",
        )
        ext.add_argument(
            "--no-external-data",
            dest="external_data",
            action="store_false",
            help="keep all weights inside the .onnx file",
        )
        lat = p.add_mutually_exclusive_group()
        lat.add_argument(
            "--latency",
            dest="latency",
            action="store_true",
            default=True,
            help="measure onnxruntime CPU latency of the input and the output, 1 thread and all cores, "
            "interleaved runs, a few seconds at most (default)",
        )
        lat.add_argument("--no-latency", dest="latency", action="store_false", help="do not measure latency")
        p.add_argument(
            "--shape-annotations",
            choices=["keep", "all"],
            help="keep: annotate only tensors the input annotated (default; never grows the file); "
            "all: write every inferred shape",
        )
        p.add_argument("--seed", type=int, help="seed for anything random (default 0)")
        p.add_argument("--overwrite-input", action="store_true", help="allow OUTPUT to be the input file")
        p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
        g = p.add_argument_group("parity gate (runs after optimizing when --check-data is given)")
        g.add_argument(
            "--check-data",
            metavar="DATA",
            help="eval data (same formats as --calib): check the output against the input model on it; "
            "exit 1 if the gate fails",
        )
        _add_parity_arguments(g)

    @staticmethod
    def settings(args: argparse.Namespace) -> OptimizeSettings:
        base = load_config(args.config) if args.config else OptimizeSettings()
        given = {
            k: getattr(args, k)
            for k in (
                "passes",
                "calibration",
                "fixed_point",
                "max_iterations",
                "check",
                "external_data",
                "shape_annotations",
                "seed",
                "opset",
            )
            if getattr(args, k) is not None
        }
        if args.strict:
            given["on_pass_error"] = "raise"
        settings = settings_from_mapping(given, where="command line", base=base)
        apply_compression_arguments(args, settings)
        return settings

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .pipeline import optimize

        settings = Optimize.settings(args)
        _preflight(args.output, args.report, args.model, args.check_data)
        if args.auto:
            with progress_display(args.quiet) as progress:
                rc, report = run_auto(args, settings, progress)
            return _finish(args, report, rc)
        gated: dict = {}

        def gate(staged, report) -> bool:
            # Runs on the written result before it replaces OUTPUT: a failed or broken gate publishes nothing.
            from .parity_metrics import merge_floors
            from .registry import get_pass

            lossy = [p for p in report.passes if not p.exact and p.modified]
            floors = [dict(get_pass(p.name).metric_floors) for p in lossy]
            result = _run_check(
                args,
                args.model,
                staged,
                args.check_data,
                mode="lossy" if lossy else "exact",
                metric_floors=merge_floors(floors) if floors else None,
                seed=settings.seed,
                progress=progress or (lambda *a: None),  # the display optimize runs under (only one may be live)
            )
            result.candidate = str(args.output)
            gated["result"] = result
            return result.passed

        with progress_display(args.quiet) as progress:
            _, report = optimize(
                args.model,
                output=args.output,
                overwrite_input=args.overwrite_input,
                progress=progress,
                gate=gate if args.check_data else None,
                latency=args.latency,
                latency_data=args.check_data,
                **settings.api_kwargs(),
            )
        rc = 0
        if "result" in gated:
            report.parity = gated["result"].to_dict()
            rc = 0 if gated["result"].passed else 1
            if rc:
                from .suggest import next_steps

                report.next_steps = next_steps(report)
        return _finish(args, report, rc)


def _finish(args: argparse.Namespace, report, rc: int) -> int:
    if args.report:
        report.write_json(args.report)
    if not args.quiet or rc:
        _out(report.to_json() if args.json else report.render_text(_text_width()))
    return rc


# ------------------------------------------------------------------------------------------ check
@command("check", "check that CANDIDATE gives ORIGINAL's answers on data, per execution provider")
class Check:
    """Exit 0 when every gate holds, 1 when one fails (including a provider that --require-providers
    names but that did not really run: the check could not be done, so it did not pass), 2 on bad input."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("original", help="the reference .onnx model")
        p.add_argument("candidate", help="the .onnx model to check against it")
        p.add_argument(
            "--data",
            metavar="DATA",
            help="feeds: a folder of .npz, one .npz, or script.py:function "
            "(keys '__label__' give labels for accuracy); default: seeded synthetic inputs",
        )
        p.add_argument("--shapes", metavar="NAME:DxD,...", help="dims for synthetic inputs, e.g. input:1x3x224x224")
        p.add_argument("--samples", type=int, default=4, help="number of synthetic feeds (default 4)")
        p.add_argument("--seed", type=int, default=0, help="seed for synthetic inputs (default 0)")
        p.add_argument(
            "--mode",
            choices=["auto", "exact", "lossy"],
            default="auto",
            help="exact: tolerances from the model's noise floor; lossy: metric floors; auto (default): lossy when "
            "the candidate has quantization, pruning or weight codebooks the original lacks, else exact",
        )
        p.add_argument(
            "--floor",
            action="append",
            metavar="METRIC=VALUE",
            default=[],
            help="lossy floor, e.g. cosine=0.995, channel_cosine=0.98, accuracy_drop=0.01 (repeatable)",
        )
        p.add_argument("--report", metavar="REPORT.json", help="write the JSON report here")
        p.add_argument("--json", action="store_true", help="print the JSON report instead of tables")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing when the check passes")
        _add_parity_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        _preflight(None, args.report, None, None)
        floors = {}
        for item in args.floor:
            key, eq, value = item.partition("=")
            try:
                floors[key.strip()] = float(value)
            except ValueError:
                raise UsageError(f"--floor {item!r}: write METRIC=NUMBER, e.g. cosine=0.995") from None
            if not eq:
                raise UsageError(f"--floor {item!r}: write METRIC=NUMBER, e.g. cosine=0.995")
        if floors and args.mode == "exact":
            raise UsageError("--floor applies to --mode lossy; drop --mode exact or use --atol/--rtol")
        if floors:
            args.mode = "lossy"
        result = _run_check(
            args,
            args.original,
            args.candidate,
            args.data,
            mode=args.mode,
            metric_floors=floors or None,
            seed=args.seed,
            shapes=args.shapes,
            synthetic_count=args.samples,
        )
        if args.report:
            from .report import dumps_json, write_json_atomic

            write_json_atomic(args.report, dumps_json(result.to_dict()))
        if not args.quiet or not result.passed:
            if args.json:
                from .report import dumps_json

                _out(dumps_json(result.to_dict()))
            else:
                from .report import Report

                _out(Report(parity=result.to_dict()).render_text(width=max(_text_width(), 100)))
        return 0 if result.passed else 1


def _preflight(output, report, model, check_data) -> None:
    """Everything that can be checked before work starts, so a bad run fails (exit 2) having written nothing:
    the output and report folders exist and are writable, and every eval feed fits the model."""
    from .model_save import check_writable

    if output is not None:
        check_writable(output)
    if report is not None:
        check_writable(report, "report")
    if check_data is not None:
        from .data import load_feeds
        from .graph import load_model

        feeds = load_feeds(check_data).bind(load_model(model).proto)
        if sum(1 for _ in feeds.samples()) == 0:  # validates every sample, one at a time
            raise BadInputError(f"{feeds.description} holds no feed dicts; give at least one")


_THRESHOLD_FLAGS = {
    "atol": "atol",
    "rtol": "rtol",
    "statistic": "statistic",
    "quantile": "quantile",
    "cosine_min": "cosine",
    "channel_cosine_min": "channel_cosine",
    "sample_cosine_min": "sample_cosine",
    "snr_min": "snr_db",
    "accuracy_drop_max": "accuracy_drop",
}


def _add_parity_arguments(p) -> None:
    p.add_argument(
        "--providers",
        default="cpu",
        metavar="LIST",
        help="execution providers, comma-separated, case-insensitive: cpu,cuda,tensorrt,openvino,... "
        "(default cpu); one not in this onnxruntime build is reported as skipped, one that is installed "
        "but cannot run the model fails the gate (exit 1)",
    )
    p.add_argument(
        "--require-providers",
        action="store_true",
        help="fail the gate (exit 1) also when a requested provider is not in this onnxruntime build",
    )
    p.add_argument(
        "--channel-axis",
        action="append",
        default=[],
        metavar="OUTPUT:AXIS",
        help="the axis whose slices are an output's channels in the worst-channel metrics (repeatable; AXIS alone "
        "for every output); default: axis 1 of feature maps, else the smallest fixed-size axis",
    )
    p.add_argument("--atol", type=float, help="absolute tolerance for every output (overrides the noise floor)")
    p.add_argument("--rtol", type=float, help="relative tolerance for every output")
    p.add_argument(
        "--statistic",
        choices=["max", "mean", "quantile"],
        help="how atol/rtol apply: every element (max, default), the mean, or a quantile",
    )
    p.add_argument("--quantile", type=float, help="quantile for --statistic quantile (default 0.999)")
    p.add_argument("--cosine-min", type=float, help="cosine similarity floor for every output")
    p.add_argument("--channel-cosine-min", type=float, help="floor for the worst channel's cosine")
    p.add_argument("--sample-cosine-min", type=float, help="floor for the worst sample's cosine")
    p.add_argument("--snr-min", type=float, help="SNR floor in dB")
    p.add_argument("--accuracy-drop-max", type=float, help="largest allowed accuracy drop (needs __label__ data)")
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="OUTPUT:KEY=V,...",
        help="per-output thresholds, e.g. logits:atol=1e-4,rtol=0,statistic=quantile (repeatable)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="find the first intermediate tensor where the models diverge and the worst layers",
    )
    p.add_argument("--label-output", metavar="OUTPUT", help="output compared with __label__ for accuracy")
    p.add_argument(
        "--metric",
        metavar="SCRIPT.py:FUNCTION",
        help="user metric fn(reference_outputs, candidate_outputs, samples) -> float or dict",
    )
    p.add_argument("--max-samples", type=int, help="use at most this many feeds")
    p.add_argument(
        "--noise-factor",
        type=float,
        default=10.0,
        help="exact mode: atol = this x the model's own noise floor (default 10)",
    )


def _thresholds_from_args(args: argparse.Namespace) -> dict:
    out: dict[str, dict] = {}
    every = {key: getattr(args, flag) for flag, key in _THRESHOLD_FLAGS.items() if getattr(args, flag) is not None}
    if every:
        out["*"] = every
    for item in args.threshold:
        name, sep, rest = item.partition(":")
        if not sep or not name or not rest:
            raise UsageError(f"--threshold {item!r}: write OUTPUT:key=value,... e.g. logits:atol=1e-4")
        d = out.setdefault(name, {})
        for kv in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = kv.partition("=")
            if not eq:
                raise UsageError(f"--threshold {item!r}: {kv!r} has no value; write key=value")
            d[key.strip().replace("-", "_")] = value.strip()
    return out


def _run_check(args: argparse.Namespace, original, candidate, data, progress=None, **kwargs):
    from .parity import check

    if progress is None:  # not inside another command's progress display (only one may be live)
        with progress_display(getattr(args, "quiet", False)) as own:
            return _run_check(args, original, candidate, data, progress=own or (lambda *a: None), **kwargs)
    return check(
        original,
        candidate,
        data,
        providers=args.providers,
        require_providers=args.require_providers,
        thresholds=_thresholds_from_args(args) or None,
        label_output=args.label_output,
        metric=args.metric,
        max_samples=args.max_samples,
        noise_factor=args.noise_factor,
        explain=args.explain,
        progress=progress,
        channel_axes=",".join(args.channel_axis) or None,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------ info
@command("info", "describe a model: inputs/outputs, opsets, op histogram, params, size, subgraphs")
class Info:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help=".onnx file")
        p.add_argument("--json", action="store_true", help="print JSON")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .graph import load_model
        from .pipeline import _file_size
        from .summary import summarize

        loaded = load_model(args.model)
        s = summarize(loaded.proto, _file_size(Path(args.model), loaded))
        if args.json:
            from .report import dumps_json

            _out(dumps_json(s.to_dict()))
            return 0
        _out(render_info(args.model, s, loaded.proto.producer_name, loaded.proto.producer_version))
        return 0


def render_info(path: str, s, producer: str, producer_version: str) -> str:
    import io

    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    con = Console(file=buf, width=100, color_system=None)
    con.print(f"{path}: IR {s.ir_version}, producer {producer or '?'} {producer_version}".rstrip())
    con.print("opsets: " + ", ".join(f"{d} {v}" for d, v in s.opsets.items()))
    if s.custom_domains:
        con.print("custom domains: " + ", ".join(s.custom_domains))
    io_table = Table(title="inputs / outputs", title_justify="left")
    for c in ("", "name", "dtype", "shape"):
        io_table.add_column(c)
    for kind, items in (("in", s.inputs), ("out", s.outputs)):
        for v in items:
            io_table.add_row(kind, v["name"], v["dtype"], str(v["shape"]))
    con.print(io_table)
    ops = Table(title=f"{s.nodes} nodes ({s.subgraphs} subgraphs, {s.functions} functions)", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in s.op_types.items():
        ops.add_row(op, str(n))
    con.print(ops)
    from .report import _bytes

    con.print(
        f"params {s.params:,}  initializers {s.initializers} ({_bytes(s.initializer_bytes)})  "
        f"file {_bytes(s.file_size)}" + ("  external data" if s.external_data else "")
    )
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ passes
@command("passes", "list every registered pass with its kind and options")
class Passes:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .pass_base import option_specs
        from .pipeline import DEFAULT_PASSES
        from .registry import available_passes

        rows = []
        for e in available_passes():
            if e.cls is None:
                rows.append({"name": e.name, "source": e.source, "error": e.error})
                continue
            rows.append(
                {
                    "name": e.name,
                    "kind": "exact" if e.cls.exact else "lossy",
                    "needs_calibration": e.cls.needs_calibration,
                    "requires": list(e.cls.requires),
                    "default": e.name in DEFAULT_PASSES,
                    "description": e.cls.describe(),
                    "options": [
                        {
                            "name": o.name,
                            "type": o.type,
                            "default": o.default,
                            "help": o.help,
                            **({"choices": list(o.choices)} if o.choices else {}),
                        }
                        for o in option_specs(e.cls.Options)
                    ],
                }
            )
        if args.json:
            _out(json.dumps(rows, indent=2, default=str))
            return 0
        import io

        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        t = Table(title="registered passes", title_justify="left", show_lines=True)
        # Pass and option names are never cut (they are what a user types); the description wraps instead.
        longest = max((len(r["name"]) for r in rows), default=4)
        t.add_column("pass", no_wrap=True, min_width=longest)
        t.add_column("kind", no_wrap=True)
        t.add_column("calib", no_wrap=True)
        t.add_column("options (default)", overflow="fold")
        t.add_column("description", ratio=1)
        for r in rows:
            if "error" in r:
                t.add_row(r["name"], "BROKEN", "", "", escape(str(r["error"])))
                continue
            # Escaped: docstrings and defaults hold brackets ("[/Mul/Add]", lists) that rich reads as markup.
            opts = "\n".join(f"{o['name']}={o['default']!r}" for o in r["options"]) or "-"
            kind = r["kind"] + (" (default)" if r["default"] else "")
            t.add_row(r["name"], kind, "yes" if r["needs_calibration"] else "", escape(opts), escape(r["description"]))
        buf = io.StringIO()
        Console(file=buf, width=120, color_system=None).print(t)
        _out(buf.getvalue())
        return 0


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxslim", description="Make ONNX models smaller and faster, and prove they still give the same answers."
    )
    parser.add_argument("--version", action="version", version=f"onnxslim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass and show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, run, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log each pass and show tracebacks on errors",
        )
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="onnxslim: %(levelname)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except OnnxSlimError as e:
        if verbose:
            traceback.print_exc()
        sys.stderr.write(f"onnxslim: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("onnxslim: interrupted\n")
        return 130
    except Exception as e:  # a bug: say so plainly
        if verbose:
            traceback.print_exc()
        sys.stderr.write(f"onnxslim: internal error: {type(e).__name__}: {e} (rerun with --verbose and report it)\n")
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
