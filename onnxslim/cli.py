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
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .config import OptimizeSettings, load_config, settings_from_mapping
from .errors import BadInputError, OnnxSlimError

__all__ = ["main", "build_parser"]

log = logging.getLogger("onnxslim")

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str):
    def deco(cls):
        _COMMANDS[name] = (cls.add_arguments, cls.run, help)
        return cls

    return deco


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
        p.add_argument("-p", "--pass", dest="passes", action="append", metavar="NAME[:K=V,...]",
                       help="run this pass (repeatable, in order); without any, the default lossless pipeline runs")
        p.add_argument("--config", metavar="FILE", help="settings from a TOML/YAML/JSON file (flags override it)")
        p.add_argument("--calib", "--calibration", dest="calibration", metavar="DATA",
                       help="calibration data: a folder of .npz feeds, one .npz, or script.py:function")
        fp = p.add_mutually_exclusive_group()
        fp.add_argument("--fixed-point", dest="fixed_point", action="store_true", default=None,
                        help="repeat the passes until nothing changes (default when all passes are exact)")
        fp.add_argument("--no-fixed-point", dest="fixed_point", action="store_false", help="run each pass once")
        p.add_argument("--max-iterations", type=int, help="cap on fixed-point rounds (default 10)")
        p.add_argument("--check", choices=["auto", "full", "basic", "none"],
                       help="onnx.checker level for the result (default auto: as strict as the input passes)")
        p.add_argument("--strict", action="store_true",
                       help="stop on the first failing pass (default: roll it back, warn, and go on)")
        ext = p.add_mutually_exclusive_group()
        ext.add_argument("--external-data", dest="external_data", action="store_true", default=None,
                         help="write weights to OUTPUT.data next to the model")
        ext.add_argument("--no-external-data", dest="external_data", action="store_false",
                         help="keep all weights inside the .onnx file")
        p.add_argument("--seed", type=int, help="seed for anything random (default 0)")
        p.add_argument("--overwrite-input", action="store_true", help="allow OUTPUT to be the input file")
        p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    @staticmethod
    def settings(args: argparse.Namespace) -> OptimizeSettings:
        base = load_config(args.config) if args.config else OptimizeSettings()
        given = {k: getattr(args, k) for k in ("passes", "calibration", "fixed_point", "max_iterations", "check",
                                               "external_data", "seed") if getattr(args, k) is not None}
        if args.strict:
            given["on_pass_error"] = "raise"
        return settings_from_mapping(given, where="command line", base=base)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .pipeline import optimize

        settings = Optimize.settings(args)
        _, report = optimize(args.model, output=args.output, overwrite_input=args.overwrite_input,
                             **settings.api_kwargs())
        if args.report:
            report.write_json(args.report)
        if not args.quiet:
            _out(report.to_json() if args.json else report.render_text())
        return 0


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
            _out(json.dumps(s.to_dict(), indent=2))
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

    con.print(f"params {s.params:,}  initializers {s.initializers} ({_bytes(s.initializer_bytes)})  "
              f"file {_bytes(s.file_size)}" + ("  external data" if s.external_data else ""))
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
            rows.append({
                "name": e.name,
                "kind": "exact" if e.cls.exact else "lossy",
                "needs_calibration": e.cls.needs_calibration,
                "requires": list(e.cls.requires),
                "default": e.name in DEFAULT_PASSES,
                "description": e.cls.describe(),
                "options": [{"name": o.name, "type": o.type, "default": o.default, "help": o.help,
                             **({"choices": list(o.choices)} if o.choices else {})} for o in option_specs(e.cls.Options)],
            })
        if args.json:
            _out(json.dumps(rows, indent=2, default=str))
            return 0
        import io

        from rich.console import Console
        from rich.table import Table

        t = Table(title="registered passes", title_justify="left", show_lines=True)
        for c in ("pass", "kind", "calib", "options (default)", "description"):
            t.add_column(c)
        for r in rows:
            if "error" in r:
                t.add_row(r["name"], "BROKEN", "", "", r["error"])
                continue
            opts = "\n".join(f"{o['name']}={o['default']!r}" for o in r["options"]) or "-"
            kind = r["kind"] + (" (default)" if r["default"] else "")
            t.add_row(r["name"], kind, "yes" if r["needs_calibration"] else "", opts, r["description"])
        buf = io.StringIO()
        Console(file=buf, width=120, color_system=None).print(t)
        _out(buf.getvalue())
        return 0


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxslim", description="Make ONNX models smaller and faster, "
                                     "and prove they still give the same answers.")
    parser.add_argument("--version", action="version", version=f"onnxslim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass and show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, run, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log each pass and show tracebacks on errors")
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="onnxslim: %(levelname)s: %(message)s")
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
