"""Side-by-side static int8 quantization: ours vs ONNX Runtime ``quantize_static`` vs NNCF.

Every quantization runs in its own subprocess under ``/usr/bin/time -v`` (wall time, peak RSS), one at a
time.  Tools:

- ``ours``          ``.venv/bin/onnxslim optimize M -o OUT --quantize int8 --calib sample_models/<m>/calib``
                    (default lossless pipeline + ``quantize_int8_static`` with its default options);
- ``ort-minmax``    in ``bench/.venv-quant-peers``: ``quant_pre_process`` then ``quantize_static`` (QDQ,
                    per-channel, activations QUInt8, weights QInt8, ``CalibrationMethod.MinMax``);
- ``ort-percentile`` the same with ``CalibrationMethod.Percentile`` (ORT's default percentile 99.999);
- ``nncf``          in ``bench/.venv-quant-peers``: ``nncf.quantize(onnx_model, nncf.Dataset(feeds))`` (ONNX
                    backend, defaults, ``subset_size`` = number of calibration feeds).

Per (model, tool): output size, task metric (accuracy against ``__label__`` on ``sample_models/<m>/eval``),
latency ratio vs the fp32 original with ORT default graph optimizations at 1 and 2 intra-op threads
(fp32 and int8 timed interleaved in one process, median over ``--latency-runs`` passes over all eval
batches), quantization wall time and peak RSS, and the first error line on failure.  Writes
``bench/out/int8_results.json`` and the ``## Static int8 quantization`` section of ``bench/RESULTS.md``.

    bash bench/setup_quant_peers.sh
    .venv/bin/python bench/run_int8.py                  # all sample models, all tools
    .venv/bin/python bench/run_int8.py --models cnn_digits --tools ours,nncf
    .venv/bin/python bench/run_int8.py --report-only    # re-render the section from the JSON
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
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
PEERS_PY = BENCH / ".venv-quant-peers" / "bin" / "python"
SAMPLES = ROOT / "sample_models"
TOOLS = ("ours", "ort-minmax", "ort-percentile", "nncf")
PEERS = ("ort-minmax", "ort-percentile", "nncf")
JSON_OUT = OUT / "int8_results.json"


# ============================================================================== workers (subprocesses)
def _load_npz_dir(d: str) -> list[dict]:
    import numpy as np

    feeds = []
    for f in sorted(glob.glob(str(Path(d) / "*.npz"))):
        with np.load(f) as z:
            feeds.append({k: z[k] for k in z.files})
    return feeds


def _peer_worker(tool: str, src: str, dst: str, calib: str) -> None:
    """Runs inside bench/.venv-quant-peers with ``python -I``."""
    import onnx

    t0 = time.perf_counter()
    info: dict = {}
    feeds = [{k: v for k, v in f.items() if not k.startswith("__")} for f in _load_npz_dir(calib)]
    if tool.startswith("ort-"):
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(feeds)

            def get_next(self):
                return next(self._it, None)

            def rewind(self):
                self._it = iter(feeds)

        pre = dst + ".pre.onnx"
        try:
            quant_pre_process(src, pre)
            qin = pre
        except Exception as e:  # noqa: BLE001 -- recorded, then quantize the original as ORT would without it
            info["pre_process_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            qin = src
        method = CalibrationMethod.MinMax if tool == "ort-minmax" else CalibrationMethod.Percentile
        quantize_static(
            qin,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=method,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        Path(pre).unlink(missing_ok=True)
    elif tool == "nncf":
        import nncf

        model = onnx.load(src)
        q = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))
        onnx.save(q, dst)
        info["nncf"] = nncf.__version__
    else:
        raise SystemExit(f"unknown peer tool {tool!r}")
    info["seconds_inside"] = round(time.perf_counter() - t0, 3)
    print("BENCH_INFO " + json.dumps(info))


def _session(path: str, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()  # ORT default graph optimizations (ORT_ENABLE_ALL)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _eval_worker(fp32: str, quant: str, eval_dir: str, label_output: str, kind: str, runs: int) -> None:
    """Accuracy of ``quant`` (and of ``fp32``) plus interleaved latency at 1 and 2 threads."""
    import numpy as np

    batches = _load_npz_dir(eval_dir)
    info: dict = {}

    def predict(sess):
        """(accuracy, predictions, the label output's values) over all eval batches."""
        names = {i.name for i in sess.get_inputs()}
        outs = [o.name for o in sess.get_outputs()]
        idx = outs.index(label_output) if label_output in outs else 0
        preds, values = [], []
        for b in batches:
            y = sess.run(None, {k: v for k, v in b.items() if k in names})[idx]
            preds.append((np.argmax(y, axis=-1) if kind == "logits" else np.asarray(y)).reshape(-1))
            values.append(np.asarray(y, dtype=np.float64).reshape(-1))
        labels = np.concatenate([b["__label__"].reshape(-1) for b in batches])
        pred = np.concatenate(preds)
        info.setdefault("correct", "".join("1" if ok else "0" for ok in (pred == labels)))  # the int8 run's
        return float((pred == labels).mean()), pred, np.concatenate(values)

    info["accuracy"], q_pred, q_val = predict(_session(quant))
    info["fp32_accuracy"], f_pred, f_val = predict(_session(fp32))
    # Fidelity to fp32, independent of the labels: how many predictions changed, and the output's SNR.
    info["agreement"] = float((q_pred == f_pred).mean())
    err = float(np.sum((q_val - f_val) ** 2))
    info["snr_db"] = round(10 * np.log10(float(np.sum(f_val**2)) / err), 2) if err > 0 else None
    for t in (1, 2):
        sessions = {"fp32": _session(fp32, t), "quant": _session(quant, t)}
        feeds = {
            k: [{n: v for n, v in b.items() if n in {i.name for i in s.get_inputs()}} for b in batches]
            for k, s in sessions.items()
        }
        times: dict[str, list[float]] = {"fp32": [], "quant": []}
        for r in range(runs + 3):  # 3 warm-up passes, then fp32 and int8 alternate so drift hits both
            for k in ("fp32", "quant") if r % 2 == 0 else ("quant", "fp32"):
                t0 = time.perf_counter()
                for f in feeds[k]:
                    sessions[k].run(None, f)
                if r >= 3:
                    times[k].append(time.perf_counter() - t0)
        f_med, q_med = statistics.median(times["fp32"]), statistics.median(times["quant"])
        info[f"fp32_ms_{t}t"] = round(f_med * 1e3, 4)
        info[f"quant_ms_{t}t"] = round(q_med * 1e3, 4)
        info[f"ratio_{t}t"] = round(q_med / f_med, 4)
    print("BENCH_INFO " + json.dumps(info))


# ============================================================================== driver
def _run_timed(cmd: list[str], timeout: float) -> dict:
    import re

    tfile = OUT / ".time_int8.txt"
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            ["/usr/bin/time", "-v", "-o", str(tfile), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(OUT),
        )
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = -9, "", f"TimeoutExpired: no result after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    rss = None
    if tfile.exists():
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", tfile.read_text())
        rss = round(int(m.group(1)) / 1024, 1) if m else None
        tfile.unlink()
    info: dict = {}
    for line in out.splitlines():
        if line.startswith("BENCH_INFO "):
            info.update(json.loads(line[len("BENCH_INFO ") :]))
    return {
        "rc": rc,
        "wall_s": round(wall, 3),
        "peak_rss_mb": rss,
        "info": info,
        "error": _first_error_line(err, out) if rc != 0 else None,
        "stderr_tail": err[-3000:] if rc else "",
    }


def _first_error_line(err: str, out: str) -> str:
    import re

    lines = [ln.strip() for ln in err.splitlines() + out.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^([\w.]+(Error|Exception|Exit)\b|error:|onnxslim: error)", ln, re.I):
            return ln[:300]
    return lines[-1][:300] if lines else "failed without output"


def _long_error(err: str) -> str | None:
    """ORT load errors put the cause at the end of a long line: keep its head and its tail."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    if not lines:
        return None
    ln = lines[-1]
    return ln if len(ln) <= 260 else ln[:110] + " ... " + ln[-140:]


def _size(path: Path) -> int:
    n = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return n + (data.stat().st_size if data.exists() else 0)


def _quant_cmd(tool: str, src: Path, dst: Path, calib: Path) -> list[str]:
    if tool == "ours":
        return [
            str(OURS_CLI),
            "optimize",
            str(src),
            "-o",
            str(dst),
            "--quantize",
            "int8",
            "--calib",
            str(calib),
            "--report",
            str(dst.with_suffix(".report.json")),
        ]
    return [str(PEERS_PY), "-I", str(Path(__file__).resolve()), "_quant", tool, str(src), str(dst), str(calib)]


def _op_summary(path: Path) -> dict:
    """Node counts (every graph), Q/DQ-family nodes, and weights stored as 8-bit integers (initializers or
    Constant values of rank >= 2), however they are decoded (DequantizeLinear, or Cast + Mul for weights-only
    layers)."""
    import onnx

    from onnxslim.graph import iter_graphs

    m = onnx.load(str(path), load_external_data=False)
    graphs = list(iter_graphs(m.graph))
    c = collections.Counter(n.op_type for g in graphs for n in g.node)
    tensors = [t for g in graphs for t in g.initializer] + [
        a.t for g in graphs for x in g.node if x.op_type == "Constant" for a in x.attribute if a.name == "value"
    ]
    int8 = sum(
        1 for t in tensors if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) >= 2
    )
    q = sum(
        v
        for k, v in c.items()
        if k
        in (
            "QuantizeLinear",
            "DequantizeLinear",
            "QLinearConv",
            "QLinearMatMul",
            "MatMulInteger",
            "ConvInteger",
            "DynamicQuantizeLinear",
        )
    )
    return {"nodes": sum(c.values()), "q_nodes": q, "int8_weights": int8}


def _versions() -> dict:
    def ask(py: Path, code: str) -> str:
        try:
            return subprocess.run(
                [str(py), "-I", "-c", code], capture_output=True, text=True, timeout=120, cwd=str(OUT)
            ).stdout.strip()
        except Exception as e:  # noqa: BLE001
            return f"unavailable ({e})"

    code = (
        "import importlib.metadata as md\nfor d in ('onnxruntime','onnx','numpy','sympy','nncf','torch'):\n"
        "    try: print(f'{d}=={md.version(d)}')\n    except md.PackageNotFoundError: print(f'{d}==NOT-INSTALLED')"
    )
    ours = ask(OURS_PY, code.replace("'sympy','nncf','torch'", "'onnxslim','onnx_graphsurgeon'"))
    peers = ask(PEERS_PY, code) if PEERS_PY.exists() else "bench/.venv-quant-peers missing"
    git = subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True, cwd=str(ROOT)).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=str(ROOT)).stdout
    return {
        "ours": ours.splitlines(),
        "peers": peers.splitlines(),
        "git": git.strip() + (" (+uncommitted changes)" if dirty.strip() else ""),
    }


def run(models: list[dict], tools: list[str], timeout: float, runs: int, repeat: int, log=print) -> list[dict]:
    rows = []
    for m in models:
        src = SAMPLES / m["path"]
        calib, evald = SAMPLES / m["calib"], SAMPLES / m["eval"]
        eval_cmd = [str(OURS_PY), str(Path(__file__).resolve()), "_eval", str(src)]
        tail = [str(evald), m["label_output"], m["label_output_kind"], str(runs)]
        base = _run_timed([*eval_cmd, str(src), *tail], timeout)
        rows.append(
            {
                "model": m["name"],
                "tool": "fp32",
                "ok": base["rc"] == 0,
                "bytes": _size(src),
                **_op_summary(src),
                "accuracy": base["info"].get("accuracy"),
                "manifest_metric": m.get("float_metric"),
                "error": base["error"],
            }
        )
        log(f"[{m['name']}] fp32 acc={base['info'].get('accuracy')} {base['error'] or ''}")
        for tool in tools:
            dst = OUT / "int8" / m["name"] / tool / "model.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            for f in dst.parent.iterdir():
                f.unlink()
            walls, rsss = [], []
            for _ in range(max(1, repeat)):  # wall: median, RSS: max over the repeats
                res = _run_timed(_quant_cmd(tool, src, dst, calib), timeout)
                walls.append(res["wall_s"])
                rsss.append(res["peak_rss_mb"] or 0.0)
                if res["rc"] != 0:
                    break
            row = {
                "model": m["name"],
                "tool": tool,
                "rc": res["rc"],
                "wall_s": statistics.median(walls),
                "walls_s": walls,
                "peak_rss_mb": max(rsss) or None,
                "info": res["info"],
                "error": res["error"],
                "stderr_tail": res["stderr_tail"],
            }
            if res["rc"] == 0 and not dst.exists():
                row["error"] = "finished but wrote no output file"
            if row["error"] is None:
                row["bytes"] = _size(dst)
                row.update(_op_summary(dst))
                rep = dst.with_suffix(".report.json")
                if rep.exists():
                    rj = json.loads(rep.read_text())
                    row["warnings"] = [str(w)[:300] for w in rj.get("warnings", [])][:5]
                    row["quant_stats"] = [
                        p.get("stats") for p in rj.get("passes", []) if "quantize" in str(p.get("name", ""))
                    ]
                evs = []
                for _ in range(max(1, repeat)):  # separate processes; the median of each number is kept
                    ev = _run_timed([*eval_cmd, str(dst), *tail], timeout)
                    if ev["rc"] != 0:
                        row["eval_error"] = _long_error(ev["stderr_tail"]) or ev["error"]
                        break
                    evs.append(ev["info"])
                if evs and "eval_error" not in row:
                    for k in evs[0]:
                        if isinstance(evs[0][k], str):
                            row[k] = evs[0][k]  # per-sample correctness: deterministic, the same each repeat
                            continue
                        vals = [e[k] for e in evs if e[k] is not None]
                        row[k] = statistics.median(vals) if vals else None
                    row["ratios_1t"] = [e["ratio_1t"] for e in evs]
                    row["ratios_2t"] = [e["ratio_2t"] for e in evs]
            row["ok"] = row["error"] is None and "eval_error" not in row
            log(
                f"    {tool}: ok={row['ok']} bytes={row.get('bytes')} q_nodes={row.get('q_nodes')} "
                f"acc={row.get('accuracy')} r1={row.get('ratio_1t')} r2={row.get('ratio_2t')} "
                f"wall={row['wall_s']}s rss={row['peak_rss_mb']}MB {row['error'] or row.get('eval_error') or ''}"
            )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_quant":
        return _peer_worker(*argv[1:5])
    if argv and argv[0] == "_eval":
        return _eval_worker(*argv[1:6], int(argv[6]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="samples", help="'samples' or comma-separated sample model names")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--latency-runs", type=int, default=30, help="timed passes over the eval batches per model")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="quantize and measure each (model, tool) this many times in separate processes "
        "(median wall time and latency ratios, max RSS)",
    )
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--summary-file",
        help="hand-written markdown put under '### Summary' (kept in the JSON; a new measurement drops the "
        "old summary, since it described other numbers)",
    )
    a = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(BENCH))
    import int8_report

    if a.report_only:
        data = json.loads(JSON_OUT.read_text())
    else:
        manifest = json.loads((SAMPLES / "manifest.json").read_text())["models"]
        models = manifest if a.models == "samples" else [m for m in manifest if m["name"] in a.models.split(",")]
        tools = [t for t in a.tools.split(",") if t]
        bad = [t for t in tools if t not in TOOLS]
        if bad:
            raise SystemExit(f"unknown tools {bad}; choose from {TOOLS}")
        rows = run(models, tools, a.timeout, a.latency_runs, a.repeat)
        data = {
            "machine": int8_report.machine(),
            "versions": _versions(),
            "latency_runs": a.latency_runs,
            "repeat": a.repeat,
            "tools": tools,
            "rows": rows,
        }
    if a.summary_file:
        data["summary"] = Path(a.summary_file).read_text()
    JSON_OUT.write_text(json.dumps(data, indent=1))
    int8_report.write_section(BENCH / "RESULTS.md", int8_report.render(data))
    print(f"wrote {BENCH / 'RESULTS.md'} and {JSON_OUT}")


if __name__ == "__main__":
    main()
