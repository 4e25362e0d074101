"""``onnxslim optimize IN -o OUT --auto --calib CALIB --check-data EVAL --budget 0.01``: the automatic search
(``onnxslim.auto``) from the command line. Exit 0: a compressed model within the budget was written to OUT;
exit 1: none was, and the best one found (smallest drop) was written to ``OUT.failed.onnx``; exit 2: bad input."""

from __future__ import annotations

import argparse

from .errors import UsageError

__all__ = ["add_auto_arguments", "run_auto"]


def add_auto_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("automatic compression (--auto: the smallest model within a metric budget on EVAL)")
    g.add_argument(
        "--auto",
        action="store_true",
        help="search per-layer int8 / weight-sharing / pruning levels for the smallest model whose task metric on "
        "--check-data drops by at most --budget; needs --calib and --check-data",
    )
    g.add_argument(
        "--budget",
        type=float,
        default=0.01,
        help="largest allowed drop: accuracy (fraction) with __label__ data, else 1 - agreement with the "
        "original's decisions, or of --metric (default 0.01)",
    )
    g.add_argument(
        "--objective",
        default="size",
        metavar="size|latency|size:W,latency:W",
        help="what the search minimizes among candidates within the budget (default size)",
    )
    g.add_argument(
        "--auto-levels",
        dest="auto_levels",
        metavar="LIST",
        help="levels a layer may take, e.g. int8,share6,share5,share4,share3 (default), prune0.5+share4, prune0.5",
    )
    g.add_argument(
        "--auto-executor",
        dest="auto_executor",
        default="local",
        metavar="local|serial|ray|ray:ADDRESS",
        help="where candidates are evaluated: local worker processes (default), in-process, or Ray "
        "(pip install 'onnxslim[ray]'; ray = a local instance, ray:auto / ray:ray://HOST:PORT a cluster)",
    )
    g.add_argument("--workers", type=int, help="parallel candidate evaluations (default: this machine's cores)")
    g.add_argument(
        "--auto-cache",
        dest="auto_cache",
        metavar="DIR",
        help="keep evaluated candidates here so a rerun resumes (default OUT.auto-cache, removed after success)",
    )
    g.add_argument(
        "--auto-min-weights",
        dest="auto_min_weights",
        type=int,
        default=2048,
        help="layers with fewer weights stay float (default 2048)",
    )
    g.add_argument("--no-plots", dest="plots", action="store_false", help="do not draw the PNG pictures")


_CONFLICTS = ("quantize", "prune", "prune_nm", "prune_channels", "share")


def run_auto(args: argparse.Namespace, settings, progress) -> tuple[int, object]:
    """Run the search for ``optimize --auto``; returns (exit code, report)."""
    from .auto import auto_compress

    given = [f"--{k.replace('_', '-')}" for k in _CONFLICTS if getattr(args, k, None) is not None]
    if given:
        raise UsageError(f"--auto chooses the compression itself; drop {', '.join(given)} (or drop --auto)")
    if args.passes:
        raise UsageError("--auto runs the lossless pipeline and then its own search; drop -p (or drop --auto)")
    if not settings.calibration or not args.check_data:
        raise UsageError(
            "--auto needs --calib DIR (calibration data) and --check-data DIR (evaluation data the budget is "
            "judged on; with __label__ for accuracy)"
        )
    from .auto.levels import DEFAULT_LEVELS

    result = auto_compress(
        args.model,
        args.output,
        calibration=settings.calibration,
        eval_data=args.check_data,
        budget=args.budget,
        metric=args.metric,
        label_output=args.label_output,
        objective=args.objective,
        levels=args.auto_levels or DEFAULT_LEVELS,
        min_weights=args.auto_min_weights,
        distill=bool(args.distill),
        executor=args.auto_executor,
        workers=args.workers,
        cache_dir=args.auto_cache,
        latency=args.latency,
        plots=args.plots,
        seed=settings.seed,
        progress=progress,
    )
    if not result.passed:
        result.report.warnings.append(
            f"no compressed model keeps the metric within --budget {args.budget:g}; the best found (smallest drop) "
            f"is in {result.output}; raise --budget, add gentler --auto-levels (e.g. share6) or more --calib data"
        )
    return (0 if result.passed else 1), result.report
