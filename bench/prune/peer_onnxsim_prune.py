"""Apply onnxsim's (PyPI onnx-simplifier 0.8.x) own pruning API to one model, as its source documents it.

Run with the peers' venv, isolated so nothing in this checkout can shadow the PyPI package:

    bench/.venv-peers/bin/python -I bench/prune/peer_onnxsim_prune.py --model M --out OUT \
        --method {magnitude,wanda,sparsegpt,nm,structured,none} --sparsity S [--nm 2:4] [--calib DIR] [--finetune]

What each method calls (all are top-level ``onnxsim`` functions, defined in ``onnxsim/pruning.py`` as thin
aliases of the C++ ports in ``onnxsim/onnx_simplifier.py``; each returns a new ``onnx.ModelProto``, which this
script saves with ``onnx.save``):

- ``magnitude``  ``apply_magnitude_pruning(model, sparsity=S)``  (data-free, per output row/filter)
- ``wanda``      ``apply_wanda_pruning(model, calibration_data=feeds, sparsity=S)``
- ``sparsegpt``  ``apply_sparsegpt_pruning(model, calibration_data=feeds, sparsity=S)``  (Hessian-compensated)
- ``nm``         N:M via the same three functions' ``n=, m=`` arguments (``sparsity`` is then ignored by onnxsim);
                 ``--nm-importance`` picks which (default: sparsegpt with --calib, magnitude without)
- ``structured`` whole channels: ``apply_structured_wanda_pruning(model, calibration_data=feeds, sparsity=F)``
                 with --calib, ``apply_structured_pruning(model, sparsity=F)`` (L2 norm, data-free) without;
                 ``--structured-importance`` forces one
- ``none``       no pruning call (with ``--simplify-first``: onnxsim.simplify alone, the peer's lossless baseline)
- ``--finetune`` afterwards ``apply_pruning_finetune(original, pruned, calibration_data=feeds)`` (onnxsim's
                 closed-form per-layer ridge refit, MatMul/Gemm layers only -- its README's "for pruning, try
                 this first")

The pruning functions write each rewritten weight as a new initializer (``_v_<n>``) and rewire the node, but
leave the original weight (a ``Constant`` node or initializer) in the graph, unread: the saved file holds both.
``--simplify-after`` runs ``onnxsim.simplify`` on the result (which drops them) -- not part of the pruning call.

Without ``--calib`` the data-driven functions fall back to onnxsim's own default,
``generate_random_calibration_data(model, num_samples=8)``; the JSON records which was used.

Writes OUT and ``OUT`` with ``.peer.json`` (what was called, seconds, weight sparsity before/after via
``onnxsim.weight_sparsity``, parameter counts of the weights nodes read, how many were rewritten, dead Constant
nodes / initializers left in the file, and for
``structured`` the dry-run ``analyze_pruning_sensitivity`` summary: chains matched, channels dropped, nodes it
declined). Prints the same JSON as a ``BENCH_INFO`` line. On failure: the JSON has ``error`` and the last stderr
line is ``onnxsim-peer error: Type: message``; exit status 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graphs(sub)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float tensors of rank >= 2 that some node reads, held as initializers or Constant values, by name."""
    graphs = list(_graphs(model.graph))
    used = {i for g in graphs for n in g.node for i in n.input} | {o.name for g in graphs for o in g.output}
    out = {}
    for g in graphs:
        tensors = [(t.name, t) for t in g.initializer] + [
            (n.output[0], a.t) for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
        ]
        for name, t in tensors:
            if name in used and t.data_type in _FLOAT and len(t.dims) >= 2:
                out[name] = numpy_helper.to_array(t)
    return out


def _dead(model: onnx.ModelProto) -> tuple[int, int]:
    """(Constant nodes, initializers) that nothing reads -- left behind by a rewrite that renames weights."""
    graphs = list(_graphs(model.graph))
    used = {i for g in graphs for n in g.node for i in n.input} | {o.name for g in graphs for o in g.output}
    consts = sum(1 for g in graphs for n in g.node if n.op_type == "Constant" and n.output[0] not in used)
    inits = sum(1 for g in graphs for t in g.initializer if t.name not in used)
    return consts, inits


def _feeds(folder: str | None, model: onnx.ModelProto) -> list[dict[str, np.ndarray]] | None:
    if not folder:
        return None
    inits = {t.name for t in model.graph.initializer}
    names = {i.name for i in model.graph.input if i.name not in inits}
    feeds = []
    for f in sorted(glob.glob(str(Path(folder) / "*.npz"))):
        with np.load(f) as z:
            feeds.append({k: z[k] for k in z.files if k in names and not k.startswith("__")})
    if not feeds:
        raise SystemExit(f"no .npz feeds in {folder}")
    return feeds


def _prune(model, method: str, sparsity: float, nm: tuple[int, int] | None, feeds, args, info: dict):
    import onnxsim

    data = {"calibration_data": feeds} if feeds is not None else {}
    info["calibration"] = f"{len(feeds)} feeds from {args.calib}" if feeds is not None else "none"
    if method == "none":  # no pruning: the baseline (with --simplify-first: what onnxsim.simplify alone does)
        info["call"] = "none"
        return model
    if method == "magnitude":
        info["call"] = f"onnxsim.apply_magnitude_pruning(model, sparsity={sparsity})"
        return onnxsim.apply_magnitude_pruning(model, sparsity=sparsity)
    if method in ("wanda", "sparsegpt"):
        fn = onnxsim.apply_wanda_pruning if method == "wanda" else onnxsim.apply_sparsegpt_pruning
        if feeds is None:
            info["calibration"] = "onnxsim default: generate_random_calibration_data(num_samples=8)"
        info["call"] = f"onnxsim.{fn.__name__}(model, calibration_data=<{info['calibration']}>, sparsity={sparsity})"
        return fn(model, sparsity=sparsity, **data)
    if method == "nm":
        n, m = nm or (2, 4)
        imp = args.nm_importance or ("sparsegpt" if feeds is not None else "magnitude")
        info["nm_importance"] = imp
        if imp == "magnitude":
            info["call"] = f"onnxsim.apply_magnitude_pruning(model, n={n}, m={m})"
            return onnxsim.apply_magnitude_pruning(model, n=n, m=m)
        fn = onnxsim.apply_wanda_pruning if imp == "wanda" else onnxsim.apply_sparsegpt_pruning
        if feeds is None:
            info["calibration"] = "onnxsim default: generate_random_calibration_data(num_samples=8)"
        info["call"] = f"onnxsim.{fn.__name__}(model, calibration_data=<{info['calibration']}>, n={n}, m={m})"
        return fn(model, n=n, m=m, **data)
    if method == "structured":
        imp = args.structured_importance or ("wanda" if feeds is not None else "l2")
        info["structured_importance"] = imp
        if imp == "l2":
            fn, kw = onnxsim.apply_structured_pruning, {"sparsity": sparsity}
            info["call"] = f"onnxsim.apply_structured_pruning(model, sparsity={sparsity})"
        else:
            fn, kw = onnxsim.apply_structured_wanda_pruning, {"sparsity": sparsity, **data}
            if feeds is None:
                info["calibration"] = "onnxsim default: generate_random_calibration_data(num_samples=8)"
            info["call"] = (
                f"onnxsim.apply_structured_wanda_pruning(model, calibration_data=<{info['calibration']}>, "
                f"sparsity={sparsity})"
            )
        if args.analyze:
            try:  # the dry run of the same call: what it matched and what it declined
                rep = onnxsim.analyze_pruning_sensitivity(model, fn, **kw)
                info["analysis"] = {
                    "chains": len(rep.layers),
                    "channels_total": int(sum(x.total for x in rep.layers)),
                    "channels_dropped": int(sum(x.would_drop for x in rep.layers)),
                    "families": sorted({x.family for x in rep.layers}),
                    "not_eligible": len(rep.not_eligible),
                    "not_eligible_first": list(rep.not_eligible)[:8],
                }
            except Exception as e:  # noqa: BLE001 -- a result, not a reason to skip the real call
                info["analysis_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return fn(model, **kw)
    raise SystemExit(f"unknown method {method!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", required=True, choices=("magnitude", "wanda", "sparsegpt", "nm", "structured", "none"))
    ap.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights (or channels) to remove")
    ap.add_argument("--nm", default="2:4", help="N:M pattern for --method nm (keep N of every M)")
    ap.add_argument("--calib", help="folder of .npz calibration feeds (keys = graph input names)")
    ap.add_argument("--nm-importance", choices=("magnitude", "wanda", "sparsegpt"))
    ap.add_argument("--structured-importance", choices=("l2", "wanda"))
    ap.add_argument("--finetune", action="store_true", help="then onnxsim.apply_pruning_finetune (ridge refit)")
    ap.add_argument("--simplify-first", action="store_true", help="run onnxsim.simplify before pruning")
    ap.add_argument(
        "--simplify-after", action="store_true", help="run onnxsim.simplify on the result (drops dead weights)"
    )
    ap.add_argument("--no-analyze", dest="analyze", action="store_false", help="skip the structured dry run")
    ap.add_argument("--json", help="report path (default: OUT with suffix .peer.json)")
    args = ap.parse_args()

    import onnxsim

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jpath = Path(args.json) if args.json else out.with_suffix(".peer.json")
    info: dict = {"tool": "onnxsim", "version": getattr(onnxsim, "__version__", "?"), "method": args.method}
    info["onnxsim_file"] = onnxsim.__file__
    assert "site-packages" in onnxsim.__file__, onnxsim.__file__
    t0 = time.perf_counter()
    try:
        model = onnx.load(args.model)
        if args.simplify_first:
            model, ok = onnxsim.simplify(model)
            info["simplify_check"] = bool(ok)
        original = model
        before = _weights(original)
        sparsity_before = float(onnxsim.weight_sparsity(original))
        feeds = _feeds(args.calib, model)
        nm = tuple(int(x) for x in args.nm.split(":")) if args.method == "nm" else None
        t1 = time.perf_counter()
        pruned = _prune(model, args.method, args.sparsity, nm, feeds, args, info)
        if args.finetune:
            info["finetune_call"] = "onnxsim.apply_pruning_finetune(original, pruned, calibration_data=feeds)"
            pruned = onnxsim.apply_pruning_finetune(original, pruned, **({"calibration_data": feeds} if feeds else {}))
        info["seconds_pruning"] = round(time.perf_counter() - t1, 3)
        after = _weights(pruned)
        changed = [
            k
            for k in after
            if k not in before or before[k].shape != after[k].shape or not np.array_equal(before[k], after[k])
        ]
        reshaped = [k for k in after if k in before and before[k].shape != after[k].shape]
        dead_c, dead_i = _dead(pruned)
        info.update(
            weight_sparsity_before=round(sparsity_before, 6),
            weight_sparsity_after=round(float(onnxsim.weight_sparsity(pruned)), 6),
            weights=len(before),
            weights_after=len(after),
            weights_rewritten=len(changed),
            weights_reshaped_same_name=len(reshaped),
            params_before=int(sum(v.size for v in before.values())),
            params_after=int(sum(v.size for v in after.values())),
            zeros_after=int(sum(int((v == 0).sum()) for v in after.values())),
            dead_constant_nodes=dead_c,
            dead_initializers=dead_i,
        )
        if args.simplify_after:
            pruned, ok = onnxsim.simplify(pruned)
            info["simplify_after_check"] = bool(ok)
            info["dead_after_simplify"] = list(_dead(pruned))
        if pruned.ByteSize() > 2**31 - 2**20:
            onnx.save(pruned, str(out), save_as_external_data=True, location=out.name + ".data")
        else:
            onnx.save(pruned, str(out))
        info["seconds_total"] = round(time.perf_counter() - t0, 3)
        jpath.write_text(json.dumps(info, indent=1))
        print("BENCH_INFO " + json.dumps(info), flush=True)
    except BaseException as e:  # noqa: BLE001 -- recorded, then a non-zero exit
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        traceback.print_exc()
        info["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        info["seconds_total"] = round(time.perf_counter() - t0, 3)
        jpath.write_text(json.dumps(info, indent=1))
        print("BENCH_INFO " + json.dumps(info), flush=True)
        print(f"onnxsim-peer error: {info['error']}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
