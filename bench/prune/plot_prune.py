"""Plots for bench/prune/run_prune.py, from bench/out/prune/results.json (needs matplotlib: bench/.venv-real).

    bench/.venv-real/bin/python bench/prune/plot_prune.py [bench/out/prune/results.json]

Per model, ``<model>_agreement_vs_sparsity.png``: top row agreement with the original's decisions, bottom row the
onnxruntime latency ratio at 1 thread; left column vs weight sparsity (unstructured, N:M), right column vs channel
fraction. One line per variant (colour = method; ours solid, onnxsim dashed, onnxsim without simplify dotted); the
lossless baselines are the grey marks at 0 (star: ours-lossless, x: onnxsim-simplify). ``prune_grid.png``: the
same four panels, one row per model. Written to bench/out/prune/ and copied to bench/prune/ (tracked, linked from
bench/RESULTS.md).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "bench" / "out" / "prune"
COLORS = {
    "magnitude": "tab:blue",
    "wanda": "tab:orange",
    "sparsegpt": "tab:green",
    "sparsegpt-uniform": "tab:olive",
    "nm": "tab:red",
    "channels": "tab:purple",
    "channels+recovery": "tab:brown",
}


def _style(name: str, tool: str) -> str:
    if tool == "ours":
        return "-"
    return ":" if "-raw-" in name else "--"


def _panels(axes, rows: list[dict], show_legend: bool) -> None:
    ok = [r for r in rows if not r.get("rc") and r.get("agreement") is not None]
    bases = [r for r in ok if r["method"] == "lossless"]
    for col, axis in enumerate(("sparsity", "channels")):
        lines: dict[str, list[dict]] = {}
        for r in ok:
            if r["axis"] == axis:
                lines.setdefault(r["name"], []).append(r)
        for row_i, key in enumerate(("agreement", "latency_ratio_1t")):
            ax = axes[row_i][col]
            for name, pts in lines.items():
                pts.sort(key=lambda r: r["level"])
                xs = [p["level"] for p in pts]
                ys = [p.get(key) for p in pts]
                ax.plot(
                    xs,
                    ys,
                    _style(name, pts[0]["tool"]),
                    marker="o",
                    ms=4,
                    lw=1.4,
                    color=COLORS.get(pts[0]["method"], "black"),
                    label=name,
                )
            for b in bases:
                if b.get(key) is not None:
                    ax.plot([0.0], [b[key]], "*" if b["tool"] == "ours" else "x", color="grey", ms=9, label=b["name"])
            if key == "agreement":
                ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
            else:
                ax.axhline(1.0, color="grey", lw=0.6)
            ax.set_xlabel("weight sparsity" if axis == "sparsity" else "channel fraction")
            ax.set_ylabel("agreement" if key == "agreement" else "latency ratio @1t")
            ax.grid(alpha=0.3)
            if show_legend and row_i == 0 and lines:
                ax.legend(fontsize=6, loc="lower left")


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT / "results.json"
    data = json.loads(path.read_text())
    models = sorted({r["model"] for r in data["rows"]})
    written = []
    for model in models:
        rows = [r for r in data["rows"] if r["model"] == model]
        fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
        _panels(axes, rows, True)
        failed = [r["variant"] for r in rows if r.get("rc") or r.get("eval_error")]
        title = model + (f"  (failed: {', '.join(failed[:6])}{' ...' if len(failed) > 6 else ''})" if failed else "")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        dst = OUT / f"{model}_agreement_vs_sparsity.png"
        fig.savefig(dst, dpi=80)
        plt.close(fig)
        written.append(dst)
    if models:
        fig, axes = plt.subplots(len(models), 4, figsize=(16, 3.2 * len(models)), squeeze=False)
        for i, model in enumerate(models):
            rows = [r for r in data["rows"] if r["model"] == model]
            grid = [[axes[i][0], axes[i][2]], [axes[i][1], axes[i][3]]]  # agreement, latency side by side per axis
            _panels(grid, rows, i == 0)
            axes[i][0].set_title(model, fontsize=9, loc="left")
        fig.tight_layout()
        dst = OUT / "prune_grid.png"
        fig.savefig(dst, dpi=70)
        plt.close(fig)
        written.append(dst)
    for f in written:
        shutil.copy2(f, HERE / f.name)
    print("plots: " + ", ".join(f"bench/prune/{f.name}" for f in written))


if __name__ == "__main__":
    main()
