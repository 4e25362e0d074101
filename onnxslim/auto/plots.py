"""The two pictures of an automatic search: the sensitivity heat map and the Pareto front (PNG, matplotlib's
non-interactive backend; written atomically). Their data is the report's ``auto`` section."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["plot_sensitivity", "plot_pareto"]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-onnxslim.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_sensitivity(auto: dict, path: str | os.PathLike) -> None:
    """Rows: layers (graph order); columns: levels; colour: log10 of the probe's loss (grey: not applicable)."""
    import numpy as np

    plt = _figure()
    layers = [x["name"] for x in auto["layers"]]
    levels = auto["levels"]
    table = auto["sensitivity"]
    data = np.full((len(layers), len(levels)), np.nan)
    for i, x in enumerate(layers):
        for j, lv in enumerate(levels):
            v = table.get(x, {}).get(lv)
            if v is not None and math.isfinite(v):
                data[i, j] = math.log10(max(v, 1e-6))
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(levels), 1.5 + 0.22 * len(layers)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=-6, vmax=0)
    ax.set_xticks(range(len(levels)), levels)
    ax.set_yticks(range(len(layers)), [_short(x) for x in layers], fontsize=7)
    ax.set_title("loss of each layer alone at each level (log10 of 1 - score)", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 loss")
    _save(fig, path)
    plt.close(fig)


def plot_pareto(auto: dict, path: str | os.PathLike) -> None:
    """Metric drop against size (and against latency where measured); the front joined, the choice ringed, the
    budget a dashed line."""
    plt = _figure()
    cands = [c for c in auto["candidates"] if c.get("error") is None]
    with_latency = [c for c in cands if c.get("latency_ratio") is not None]
    axes_n = 2 if with_latency else 1
    fig, axes = plt.subplots(1, axes_n, figsize=(6 * axes_n, 4.2), squeeze=False)
    from .plan_search import pareto_front

    for ax, key, label in zip(
        axes[0], ("size_ratio", "latency_ratio"), ("file size / original", "latency / original (1 thread)")
    ):
        pts = [c for c in cands if c.get(key) is not None]
        ax.scatter([c[key] for c in pts], [c["drop"] for c in pts], s=18, c="tab:blue", label="candidates")
        # the front of this panel's own axes: the fastest within a drop is not the smallest
        front = [pts[i] for i in pareto_front([(c[key], max(c["drop"], 0.0)) for c in pts])]
        on_front = sorted(front, key=lambda c: c[key])
        ax.plot([c[key] for c in on_front], [c["drop"] for c in on_front], "-o", c="tab:orange", ms=4, label="front")
        for c in pts:
            if c.get("source") == "single":
                ax.annotate(c["label"], (c[key], c["drop"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        chosen = [c for c in pts if c["id"] == auto.get("chosen")]
        if chosen:
            ax.scatter(
                [chosen[0][key]], [chosen[0]["drop"]], s=140, facecolors="none", edgecolors="red", label="chosen"
            )
        ax.axhline(auto["budget"], ls="--", c="grey", lw=1, label=f"budget {auto['budget']:g}")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{auto['metric']['kind']} drop")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"automatic compression of {Path(auto.get('input') or 'model').name}", fontsize=10)
    _save(fig, path)
    plt.close(fig)


def _short(name: str, width: int = 36) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]
