"""Benchmark onnxslim's lossless pipeline against the PyPI peers OnnxSlim and onnxsim.

Every (model, tool) run is its own subprocess under ``/usr/bin/time -v`` (peak RSS, wall time); nothing
runs in parallel, so big models are optimized one tool at a time.  Tools:

- ``ours``       ``/work/main/.venv/bin/onnxslim optimize`` with whatever ``DEFAULT_PASSES`` is now;
- ``ours-all``   the same CLI with ``-p`` for every registered exact, calibration-free pass
                 (``onnxslim passes --json``; default passes first, in their order);
- ``ours-custom`` the pass list given with ``--passes a,b,c``;
- ``onnxslim``   PyPI OnnxSlim, ``onnxslim.slim(in, output_model=out)`` inside ``bench/.venv-peers``;
- ``onnxsim``    PyPI onnxsim, ``onnxsim.simplify(in, output_path=out)`` inside ``bench/.venv-peers``.

Per result: node count (subgraphs included), op histogram, file size (model + its external data), parity
(max abs error vs the original on the model's eval feeds, ORT CPU with graph optimizations disabled;
reference outputs are computed once per model in their own subprocess), wall time, peak RSS, and the
first line of the error for failures.  Writes ``bench/RESULTS.md`` (see ``lossless_report.py``) and
``bench/out/results.json``.

    .venv/bin/python bench/run_lossless.py                      # sample models + large_300M
    .venv/bin/python bench/run_lossless.py --models large_600M --tools ours,onnxslim
    .venv/bin/python bench/run_lossless.py --profile large_300M  # RSS per stage of our pipeline
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
OURS_PY = ROOT / ".venv" / "bin" / "python"
OURS_CLI = ROOT / ".venv" / "bin" / "onnxslim"
PEERS_PY = BENCH / ".venv-peers" / "bin" / "python"
SAMPLES = ROOT / "sample_models"
BIG_BYTES = 512 * 2**20  # models with more weight bytes than this are "large": reference on 2 inputs
PEER_TOOLS = ("onnxslim", "onnxsim")


# ============================================================================== workers (subprocesses)
def _peer_worker(tool: str, src: str, dst: str) -> None:
    """Runs inside bench/.venv-peers (python -I, so our checkout cannot shadow the peer)."""
    t0 = time.perf_counter()
    info: dict = {}
    if tool == "onnxslim":
        import onnxslim  # the PyPI package

        assert "site-packages" in onnxslim.__file__, f"wrong onnxslim imported: {onnxslim.__file__}"
        onnxslim.slim(src, output_model=dst)
    elif tool == "onnxsim":
        import onnxsim

        _, ok = onnxsim.simplify(src, output_path=dst)
        info["check_ok"] = bool(ok)
    else:
        raise SystemExit(f"unknown peer tool {tool!r}")
    info["seconds_inside"] = time.perf_counter() - t0
    print("BENCH_INFO " + json.dumps(info))


def _session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feeds(eval_dir: str, limit: int | None):
    import numpy as np

    files = sorted(Path(eval_dir).glob("*.npz"))[:limit]
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            yield f.stem, {k: z[k] for k in z.files if not k.startswith("__")}


def _reference_worker(model: str, eval_dir: str, ref_dir: str, limit: int | None) -> None:
    import numpy as np

    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    Path(ref_dir).mkdir(parents=True, exist_ok=True)
    for stem, feed in _feeds(eval_dir, limit):
        outs = sess.run(None, feed)
        np.savez(Path(ref_dir) / f"{stem}.npz", **{n: np.asarray(o) for n, o in zip(names, outs)})


def _parity_worker(model: str, eval_dir: str, ref_dir: str, limit: int | None) -> None:
    import numpy as np

    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    worst, mismatched, n = 0.0, 0, 0
    for stem, feed in _feeds(eval_dir, limit):
        outs = sess.run(None, feed)
        with np.load(Path(ref_dir) / f"{stem}.npz") as ref:
            for name, got in zip(names, outs):
                want = ref[name]
                got = np.asarray(got)
                if got.shape != want.shape:
                    raise SystemExit(f"output {name} shape {got.shape} != reference {want.shape}")
                if want.dtype.kind in "iub":
                    mismatched += int((got != want).sum())
                    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0))
                else:
                    err = float(np.nanmax(np.abs(got.astype(np.float64) - want.astype(np.float64)), initial=0))
                    if np.isnan(got).sum() != np.isnan(want).sum():
                        err = float("inf")
                worst = max(worst, err)
        n += 1
    print("BENCH_INFO " + json.dumps({"max_abs_err": worst, "int_mismatches": mismatched, "feeds": n}))


# ============================================================================== measuring in the parent
def _run_timed(cmd: list[str], timeout: float, cwd: Path = OUT) -> dict:
    tfile = OUT / ".time.txt"
    full = ["/usr/bin/time", "-v", "-o", str(tfile), *cmd]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd=str(cwd))
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -9, e.stdout or "", f"TimeoutExpired: no result after {timeout:.0f} s"
        out = out.decode() if isinstance(out, bytes) else out
        err = err if isinstance(err, str) else err.decode()
    wall = time.perf_counter() - t0
    rss_kb = None
    if tfile.exists():
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", tfile.read_text())
        rss_kb = int(m.group(1)) if m else None
        tfile.unlink()
    info = {}
    for line in (out or "").splitlines():
        if line.startswith("BENCH_INFO "):
            info.update(json.loads(line[len("BENCH_INFO ") :]))
    return {
        "rc": rc,
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(rss_kb / 1024, 1) if rss_kb else None,
        "info": info,
        "error": _first_error_line(err, out) if rc != 0 else None,
        "stderr_tail": (err or "")[-3000:] if rc else "",
    }


def _first_error_line(err: str, out: str) -> str:
    lines = [l.strip() for l in (err or "").splitlines() + (out or "").splitlines() if l.strip()]
    for l in reversed(lines):
        if re.match(r"^([\w.]+(Error|Exception|Exit)|error:|onnxslim: error)", l, re.I):
            return l[:300]
    return lines[-1][:300] if lines else "failed without output"


def _model_stats(path: Path) -> dict:
    import onnx

    from onnxslim.graph import iter_graphs

    m = onnx.load(str(path), load_external_data=False)
    graphs = list(iter_graphs(m.graph))
    hist = collections.Counter(
        (n.domain + "." if n.domain not in ("", "ai.onnx") else "") + n.op_type for g in graphs for n in g.node
    )
    locs = set()
    n_init = 0
    for g in graphs:
        n_init += len(g.initializer)
        for t in g.initializer:
            for e in t.external_data:
                if e.key == "location":
                    locs.add(e.value)
    size = path.stat().st_size + sum((path.parent / l).stat().st_size for l in locs if (path.parent / l).exists())
    docs = (
        len(m.doc_string)
        + len(m.domain)
        + sum(len(g.doc_string) + sum(len(n.doc_string) for n in g.node) for g in graphs)
    )
    return {
        "nodes": sum(hist.values()),
        "ops": dict(sorted(hist.items())),
        "bytes": size,
        "initializers": n_init,
        "external_files": sorted(locs),
        "proto_bytes": path.stat().st_size,
        "doc_bytes": docs,
        "value_info": sum(len(g.value_info) for g in graphs),
        "metadata_bytes": sum(len(p.key) + len(p.value) for p in m.metadata_props),
    }


def _models(selection: list[str]) -> list[dict]:
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    samples = {
        m["name"]: {
            "name": m["name"],
            "path": SAMPLES / m["path"],
            "eval": SAMPLES / m["eval"],
            "limit": None,
            "large": False,
        }
        for m in manifest["models"]
    }
    out = []
    for s in selection:
        if s == "samples":
            out.extend(samples.values())
        elif s in samples:
            out.append(samples[s])
        else:  # a large model made by make_large_model.py: bench/out/<s>.onnx
            path = OUT / f"{s}.onnx"
            if not path.exists():
                raise SystemExit(f"{path} not found; run bench/make_large_model.py first")
            meta = json.loads((OUT / f"{s}.json").read_text())
            out.append(
                {
                    "name": s,
                    "path": path,
                    "eval": Path(meta["eval"]),
                    "limit": 2,
                    "large": True,
                    "params": meta["params"],
                    "weight_bytes": meta["weight_bytes"],
                }
            )
    return out


def _registered_passes() -> list[dict]:
    p = subprocess.run([str(OURS_CLI), "passes", "--json"], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def _default_passes() -> list[str]:
    p = subprocess.run(
        [str(OURS_PY), "-c", "from onnxslim.pipeline import DEFAULT_PASSES; print(','.join(DEFAULT_PASSES))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(ROOT),
    )
    return [s for s in p.stdout.strip().split(",") if s]


# A sensible order for "every exact pass" (the pipeline then repeats it to a fixed point); passes not
# named here run after these, in registry order; `requires` is honoured either way.
_PREFERRED_ORDER = (
    "infer_shapes",
    "fold_constants",
    "fold_shape_computations",
    "inline_constant_if",
    "eliminate_identity_ops",
    "collapse_reshape_chains",
    "fuse_pad_into_conv",
    "fuse_batchnorm_into_conv",
    "fuse_scale_into_conv",
    "fuse_bias_add_into_conv",
    "fuse_matmul_add_into_gemm",
    "eliminate_common_subexpressions",
    "share_identical_weights",
    "eliminate_dead_nodes",
)


def _all_exact_passes() -> list[str]:
    reg = {p["name"]: p for p in _registered_passes() if p.get("kind") == "exact" and not p.get("needs_calibration")}
    wanted = [n for n in _PREFERRED_ORDER if n in reg] + [n for n in reg if n not in _PREFERRED_ORDER]
    names: list[str] = []

    def place(n, stack=()):
        if n in names or n in stack or n not in reg:
            return
        for req in reg[n].get("requires", []):
            place(req, (*stack, n))
        names.append(n)

    for n in wanted:
        place(n)
    return names


def _tool_cmd(tool: str, src: Path, dst: Path, passes: list[str] | None) -> list[str]:
    if tool.startswith("ours"):
        cmd = [
            str(OURS_CLI),
            "optimize",
            str(src),
            "-o",
            str(dst),
            "--report",
            str(dst.with_suffix(".report.json")),
            "-q",
        ]
        for p in passes or []:
            cmd += ["-p", p]
        return cmd
    return [str(PEERS_PY), "-I", str(Path(__file__).resolve()), "_peer", tool, str(src), str(dst)]


def _clean(dst: Path) -> None:
    for f in dst.parent.glob(dst.name + "*"):
        f.unlink()


def _versions(pass_lists: dict) -> dict:
    v = {}
    peer = OUT / "peer_versions.txt"
    if PEERS_PY.exists():
        p = subprocess.run(
            [
                str(PEERS_PY),
                "-I",
                "-c",
                "import importlib.metadata as m\nfor d in ('onnxslim','onnxsim','onnxruntime','onnx'):\n"
                "  print(d, m.version(d))",
            ],
            capture_output=True,
            text=True,
        )
        for line in p.stdout.splitlines():
            k, _, ver = line.partition(" ")
            v[f"peer {k}"] = ver
    elif peer.exists():
        v["peers"] = peer.read_text()
    p = subprocess.run(
        [
            str(OURS_PY),
            "-c",
            "import onnxslim,onnx,onnxruntime,onnx_graphsurgeon as g;"
            "print(onnxslim.__version__, onnx.__version__, onnxruntime.__version__, g.__version__)",
        ],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
    )
    a = p.stdout.split()
    if len(a) == 4:
        v.update({"ours onnxslim": a[0], "ours onnx": a[1], "ours onnxruntime": a[2], "ours onnx_graphsurgeon": a[3]})
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        v["ours git"] = rev + (" (+uncommitted changes)" if dirty else "")
    except OSError:
        pass
    v.update({f"pass list {k}": ",".join(p) if p else "(default pipeline)" for k, p in pass_lists.items()})
    return v


def _machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return {
        "nproc": os.cpu_count(),
        "ram": mem,
        "cpu": cpu,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ============================================================================== the run
def run(
    models: list[dict], tools: list[str], pass_lists: dict, timeout: float, repeat: int = 1, log=print
) -> list[dict]:
    rows = []
    for m in models:
        src = Path(m["path"])
        stats0 = _model_stats(src)
        ref_dir = OUT / "ref" / m["name"]
        shutil.rmtree(ref_dir, ignore_errors=True)
        r = _run_timed(
            [
                str(OURS_PY),
                str(Path(__file__).resolve()),
                "_reference",
                str(src),
                str(m["eval"]),
                str(ref_dir),
                str(m["limit"] or 0),
            ],
            timeout,
        )
        ref_ok = r["rc"] == 0
        if not ref_ok:
            log(f"[{m['name']}] reference run failed: {r['error']}")
        rows.append(
            {
                "model": m["name"],
                "tool": "original",
                **stats0,
                "ok": True,
                "max_abs_err": 0.0 if ref_ok else None,
                "weight_bytes": m.get("weight_bytes"),
                "params": m.get("params"),
            }
        )
        for tool in tools:
            dst = OUT / "results" / m["name"] / tool / "model.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            _clean(dst)
            log(f"[{m['name']}] {tool} ...")
            walls, rss = [], []
            for _ in range(max(1, repeat)):
                _clean(dst)
                res = _run_timed(_tool_cmd(tool, src, dst, pass_lists.get(tool)), timeout)
                if res["rc"] != 0:
                    break
                walls.append(res["wall_s"])
                rss.append(res["peak_rss_mb"] or 0)
            row = {
                "model": m["name"],
                "tool": tool,
                "rc": res["rc"],
                "wall_s": statistics.median(walls) if walls else res["wall_s"],
                "walls_s": walls,
                "peak_rss_mb": max(rss) if rss else res["peak_rss_mb"],
                "info": res["info"],
                "error": res["error"],
            }
            if res["rc"] == 0 and not dst.exists():
                row["error"] = "finished but wrote no output file"
            row["ok"] = row["error"] is None
            if row["ok"]:
                row.update(_model_stats(dst))
                rep = dst.with_suffix(".report.json")
                if rep.exists():
                    rj = json.loads(rep.read_text())
                    row["pass_seconds"] = _pass_seconds(rj)
                    row["warnings"] = rj.get("warnings", [])
                if ref_ok:
                    p = _run_timed(
                        [
                            str(OURS_PY),
                            str(Path(__file__).resolve()),
                            "_parity",
                            str(dst),
                            str(m["eval"]),
                            str(ref_dir),
                            str(m["limit"] or 0),
                        ],
                        timeout,
                    )
                    if p["rc"] == 0:
                        row["max_abs_err"] = p["info"].get("max_abs_err")
                        row["int_mismatches"] = p["info"].get("int_mismatches")
                    else:
                        row["parity_error"] = p["error"]
            else:
                row["stderr_tail"] = res["stderr_tail"]
            log(
                f"    -> ok={row['ok']} nodes={row.get('nodes')} bytes={row.get('bytes')} wall={row['wall_s']}s "
                f"rss={row['peak_rss_mb']}MB err={row.get('max_abs_err')} {row['error'] or ''}"
            )
            rows.append(row)
            if m["large"]:  # free the disk: large outputs are not needed after measuring
                _clean(dst)
    return rows


def _pass_seconds(report: dict) -> dict:
    out: dict = collections.defaultdict(float)
    for p in report.get("passes", []):
        out[p.get("name", "?")] += float(p.get("seconds") or 0)
    return {k: round(v, 3) for k, v in out.items()}


# ============================================================================== profiling our pipeline
def _profile_worker(model: str, dst: str, passes: str) -> None:
    """RSS per stage of our pipeline (runs in /work/main/.venv): sampled every 10 ms by a thread."""
    import threading

    import onnxslim.pipeline as pl

    def rss_mb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
        return 0.0

    peak = [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.01)

    stages = []

    def wrap(owner, name, label=None):
        fn = getattr(owner, name)

        def inner(*a, **k):
            lab = label or name
            if name == "_run_pass":
                lab = f"pass {a[0].name}"
            before = rss_mb()
            peak[0] = before
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                after = rss_mb()
                stages.append(
                    {
                        "stage": lab,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "rss_before_mb": round(before),
                        "peak_mb": round(max(peak[0], after)),
                        "rss_after_mb": round(after),
                    }
                )

        setattr(owner, name, inner)

    for n in (
        "load_model",
        "_input_check_level",
        "import_graph",
        "_run_pass",
        "export_graph",
        "save_model",
        "_check_output",
        "summarize",
        "load_feeds",
    ):
        if hasattr(pl, n):
            wrap(pl, n)
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    pl.optimize(model, [p for p in passes.split(",") if p] or None, output=dst)
    stop.set()
    print("BENCH_INFO " + json.dumps({"stages": stages, "total_s": round(time.perf_counter() - t0, 2)}))


def profile(name: str, passes: list[str] | None, timeout: float) -> dict:
    m = _models([name])[0]
    dst = OUT / "results" / m["name"] / "profile" / "model.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    _clean(dst)
    r = _run_timed(
        [str(OURS_PY), str(Path(__file__).resolve()), "_profile", str(m["path"]), str(dst), ",".join(passes or [])],
        timeout,
    )
    _clean(dst)
    return {
        "model": m["name"],
        "weight_mb": round((m.get("weight_bytes") or 0) / 2**20),
        "peak_rss_mb": r["peak_rss_mb"],
        "wall_s": r["wall_s"],
        "error": r["error"],
        "stages": r["info"].get("stages", []),
        "stderr_tail": r["stderr_tail"],
    }


# ============================================================================== main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_peer", "_reference", "_parity", "_profile"):
        cmd, *a = argv
        if cmd == "_peer":
            _peer_worker(*a)
        elif cmd == "_profile":
            _profile_worker(*a)
        else:
            worker = _reference_worker if cmd == "_reference" else _parity_worker
            worker(a[0], a[1], a[2], int(a[3]) or None)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        default="samples,large_300M",
        help="comma list: 'samples', sample model names, or large model stems in bench/out (default samples,large_300M)",  # noqa: E501
    )
    ap.add_argument(
        "--tools",
        default="ours,ours-all,onnxslim,onnxsim",
        help="comma list of ours, ours-all, ours-custom, onnxslim, onnxsim",
    )
    ap.add_argument("--passes", help="comma list of passes for the ours-custom tool (added to --tools)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="run each tool this many times; wall = median, peak RSS = max (default 1)"
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    ap.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="MODEL",
        help="also sample our pipeline's RSS per stage on this model (repeatable)",
    )
    ap.add_argument("--results", default=str(BENCH / "RESULTS.md"))
    ap.add_argument("--json", default=str(OUT / "results.json"))
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="re-render --results from the measurements saved in --json; runs nothing",
    )
    args = ap.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    if args.report_only:
        # Re-render RESULTS.md from the last measurement (bench/out/results.json), measuring nothing.
        from lossless_report import profile_markdown, write_markdown  # bench/, next to this script

        saved = json.loads(Path(args.json).read_text())
        extra = "\n\n".join(profile_markdown(p) for p in saved.get("profiles", []))
        write_markdown(saved["rows"], saved["machine"], saved["versions"], Path(args.results), extra)
        print(f"wrote {args.results} from {args.json}")
        return
    tools = [t for t in args.tools.split(",") if t]
    pass_lists: dict = {"ours": None}
    if "ours-all" in tools:
        pass_lists["ours-all"] = _all_exact_passes()
    if args.passes:
        pass_lists["ours-custom"] = [p for p in args.passes.split(",") if p]
        if "ours-custom" not in tools:
            tools.insert(1, "ours-custom")
    pass_lists = {k: v for k, v in pass_lists.items() if k in tools}
    if any(t in PEER_TOOLS for t in tools) and not PEERS_PY.exists():
        raise SystemExit(f"{PEERS_PY} missing; run bench/setup_peers.sh first")
    models = _models([s for s in args.models.split(",") if s])
    machine, versions = _machine(), _versions(pass_lists)
    versions["default pipeline (DEFAULT_PASSES)"] = ",".join(_default_passes())
    rows = run(models, tools, pass_lists, args.timeout, args.repeat)
    versions["repeats per tool run"] = str(args.repeat)
    profiles = []
    for name in args.profile:
        for tool in [t for t in tools if t.startswith("ours")]:
            print(f"[profile] {name} {tool} ...")
            prof = profile(name, pass_lists.get(tool), args.timeout)
            prof["tool"] = tool
            profiles.append(prof)
    from lossless_report import profile_markdown, write_markdown  # bench/, next to this script

    extra = "\n\n".join(profile_markdown(p) for p in profiles)
    Path(args.json).write_text(
        json.dumps(
            {"machine": machine, "versions": versions, "rows": rows, "profiles": profiles}, indent=1, default=str
        )
    )
    write_markdown(rows, machine, versions, Path(args.results), extra)
    print(f"wrote {args.results} and {args.json}")


if __name__ == "__main__":
    main()
