"""The compression shortcuts of ``onnxslim optimize``: ``--quantize int8``, ``--prune S``, ``--prune-nm N:M``,
``--prune-channels F``, ``--share BITS`` (and their ``--*-option KEY=VALUE``), turned into passes appended to the
pipeline.

Order, whatever the order of the flags: the lossless pipeline (or the ``-p`` passes), then ``smooth_activations``
with ``--smooth`` (exact; it reads float weights), ``prune_channels``,
``prune_by_magnitude``, ``share_weights`` (pruned zeros keep a zero centroid), ``quantize_int8_static`` (pruned
zeros stay zero), ``distill_layers`` with ``--distill`` (refits what compression left; on by default after
pruning by weight and int8 with ``--calib``, ``--no-distill`` off), and
``pack_sparse_weights`` last, which stores mostly-zero weights as bitmask + values (the file shrinks; onnxruntime
rebuilds them at load). With ``--quantize``, shared weights stack: the quantizer makes each codebook int8 and
keeps the b-bit codes, so the layer runs as an int8 kernel from a b-bit file; per-channel codebooks
(``--share-option per_channel=true``) are written dense instead (``decode=dense``), quantized as plain weights.
"""

from __future__ import annotations

import argparse

from .errors import UsageError

__all__ = ["add_compression_arguments", "apply_compression_arguments"]

_QUANTIZE = "quantize_int8_static"
_PRUNE = "prune_by_magnitude"
_CHANNELS = "prune_channels"
_PACK = "pack_sparse_weights"
_SHARE = "share_weights"
_DISTILL = "distill_layers"
_SMOOTH = "smooth_activations"
_TARGETS = ["auto", "x86-vnni", "x86-avx2", "arm-dotprod", "arm", "generic"]


def add_compression_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression (lossy; appended after the lossless passes)")
    g.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8: append quantize_int8_static to the passes (default: the lossless pipeline); needs --calib",
    )
    g.add_argument(
        "--quantize-option",
        dest="quantize_options",
        action="append",
        metavar="KEY=VALUE",
        help="with --quantize int8: an option of quantize_int8_static (repeatable; the default "
        "lossless pipeline still runs first, unlike -p); `onnxslim passes` lists them",
    )
    g.add_argument(
        "--target-cpu",
        dest="target_cpu",
        metavar="NAME",
        choices=_TARGETS,
        help="with --quantize int8: the CPU the model will run on (auto = this machine; x86-avx2 "
        "uses 7-bit weights, arm* int8 activations); same as -p quantize_int8_static:target=NAME",
    )
    g.add_argument(
        "--smooth",
        nargs="?",
        type=float,
        const=0.5,
        metavar="ALPHA",
        help="with --quantize int8: first move outlier activation scales into the next MatMul/Gemm weights "
        "(smooth_activations, SmoothQuant; exact in float; ALPHA = migration strength, default 0.5)",
    )
    g.add_argument(
        "--prune",
        type=float,
        metavar="SPARSITY",
        help="zero this fraction of each layer's weights (prune_by_magnitude; SparseGPT with --calib, else by "
        "magnitude) and store them packed (pack_sparse_weights)",
    )
    g.add_argument(
        "--prune-nm",
        dest="prune_nm",
        metavar="N:M",
        help="N:M semi-structured pruning, e.g. 2:4 (at most N non-zeros in every M input channels)",
    )
    g.add_argument(
        "--prune-channels",
        dest="prune_channels",
        type=float,
        metavar="FRACTION",
        help="remove this fraction of output channels / neurons (prune_channels; the model gets cheaper to run; "
        "least-squares recovery of the next layers with --calib)",
    )
    g.add_argument(
        "--share",
        type=int,
        metavar="BITS",
        help="weight sharing: cluster each layer's weights into 2^BITS shared values (share_weights; k-means, "
        "refined from --calib) and store BITS-bit indices plus the codebook",
    )
    g.add_argument(
        "--share-option",
        dest="share_options",
        action="append",
        metavar="KEY=VALUE",
        help="with --share: an option of share_weights (repeatable)",
    )
    g.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after compression, refit the layers' remaining parameters (biases, codebooks, surviving weights, "
        "int8 values on their grid) block by block to the original model's outputs on --calib (distill_layers); "
        "on by default after --prune / --prune-nm and --quantize int8 with --calib, "
        "off otherwise; --no-distill turns it off",
    )
    g.add_argument(
        "--prune-option",
        dest="prune_options",
        action="append",
        metavar="KEY=VALUE",
        help="an option of prune_by_magnitude or prune_channels (repeatable; each goes to the pass that has it)",
    )


def apply_compression_arguments(args: argparse.Namespace, settings) -> None:
    """Append the passes the flags ask for to ``settings.passes`` (in the fixed order), with their options."""
    from .pipeline import DEFAULT_PASSES, PassSpec
    from .registry import get_pass

    quantize = getattr(args, "quantize", None) == "int8"
    prune = getattr(args, "prune", None)
    nm = getattr(args, "prune_nm", None)
    channels = getattr(args, "prune_channels", None)
    share = getattr(args, "share", None)
    if getattr(args, "share_options", None) and share is None:
        raise UsageError("--share-option applies to weight sharing; add --share BITS (or drop --share-option)")
    if not quantize:
        for flag, given in (
            ("--target-cpu", args.target_cpu),
            ("--quantize-option", args.quantize_options),
            ("--smooth", getattr(args, "smooth", None) is not None),
        ):
            if given:
                raise UsageError(
                    f"{flag} applies to int8 quantization; add --quantize int8 --calib DIR (or drop {flag})"
                )
    if quantize and not settings.calibration:
        raise UsageError(
            "--quantize int8 needs calibration data; give --calib DIR (a folder of .npz feeds, one .npz, or "
            "script.py:function)"
        )
    if prune is not None and nm is not None:
        raise UsageError("--prune and --prune-nm are two patterns for the same pass; give one of them")
    magnitude = prune is not None or nm is not None
    if getattr(args, "prune_options", None) and not (magnitude or channels is not None):
        raise UsageError("--prune-option applies to pruning; add --prune S, --prune-nm N:M or --prune-channels F")
    if not (quantize or magnitude or channels is not None or share is not None):
        if getattr(args, "distill", False) and not getattr(args, "auto", False):
            raise UsageError("--distill refits what compression changed; add --quantize, --prune or --share")
        return
    passes = list(settings.passes) if settings.passes is not None else [PassSpec(n) for n in DEFAULT_PASSES]
    wanted: dict[str, dict] = {}
    if channels is not None:
        wanted[_CHANNELS] = {"fraction": channels}
    if magnitude:
        wanted[_PRUNE] = {"sparsity": prune} if prune is not None else {"pattern": nm}
    if share is not None:
        wanted[_SHARE] = {"bits": share, **PassSpec.parse(_SHARE + ":" + ",".join(args.share_options or [])).options}
        if quantize and str(wanted[_SHARE].get("per_channel", "false")).lower() in ("true", "1", "yes"):
            wanted[_SHARE].setdefault("decode", "dense")  # the quantizer stacks one codebook per tensor only
    if quantize and getattr(args, "smooth", None) is not None:
        wanted[_SMOOTH] = {"alpha": args.smooth}
    if quantize:
        q = PassSpec.parse(_QUANTIZE + ":" + ",".join(args.quantize_options or [])).options
        if args.target_cpu:
            q["target"] = args.target_cpu
        wanted[_QUANTIZE] = q
    for item in args.prune_options or []:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise UsageError(f"--prune-option {item!r}: write KEY=VALUE")
        owners = [n for n in (_CHANNELS, _PRUNE) if n in wanted and key in _option_names(get_pass(n))]
        if not owners:
            active = " or ".join(n for n in (_CHANNELS, _PRUNE) if n in wanted)
            raise UsageError(f"--prune-option {key}: {active} has no option '{key}'; `onnxslim passes` lists them")
        for n in owners:
            wanted[n][key] = value.strip()
    distill = getattr(args, "distill", None)
    if distill and not settings.calibration:
        raise UsageError("--distill refits layers to the original's outputs on data; give --calib DIR")
    if distill is None:  # measured gains on the real models (README: Pruning, Quantization); channels and
        # codebooks refit themselves already (distillation on top: no gain measured)
        distill = bool(settings.calibration) and (magnitude or quantize)
    if distill:
        wanted[_DISTILL] = {}
    if magnitude:
        wanted[_PACK] = {}
    for name in (_SMOOTH, _CHANNELS, _PRUNE, _SHARE, _QUANTIZE, _DISTILL, _PACK):
        if name not in wanted:
            continue
        given = next((p for p in passes if p.name == name), None)
        if given is None:
            passes.append(PassSpec(name, wanted[name]))
        else:
            given.options = {**given.options, **wanted[name]}
    settings.passes = passes


def _option_names(cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls.Options)}
