"""What to try next when a lossy run fails its parity gate: the layers the pass's own measurements blame, and the
option of that pass that would spare them. Read from the report (the passes' per-layer facts and, with
``--explain``, the first tensor that diverges); nothing is rerun."""

from __future__ import annotations

from .report import PassRecord, Report

__all__ = ["next_steps"]

_ERROR_KEYS = ("loss_alone_at_target", "output_error", "kmeans_output_error")
_TOP = 3


def _blamed(p: PassRecord) -> list[tuple[str, float]]:
    """The layers with the largest measured output error (largest first)."""
    rows = []
    for layer in p.layers:
        name = layer.get("layer") or layer.get("name")
        err = next((layer[k] for k in _ERROR_KEYS if isinstance(layer.get(k), (int, float))), None)
        if name and err is not None:
            rows.append((str(name), float(err)))
    rows.sort(key=lambda r: -r[1])
    return rows[:_TOP]


def _names(rows: list[tuple[str, float]]) -> str:
    return ",".join(n for n, _ in rows)


def next_steps(report: Report) -> list[str]:
    steps: list[str] = []
    first = ((report.parity or {}).get("explain") or {}).get("first_divergent") or {}
    diverging = first.get("node")
    for p in report.pass_totals():
        if p.exact or not p.modified:
            continue
        blamed = _blamed(p)
        where = (
            "the layers its measurements blame most: "
            + ", ".join(f"{n} (output error {e:.3g})" for n, e in blamed)
            + "; "
            if blamed
            else ""
        )
        if p.name == "prune_by_magnitude":
            if blamed:
                steps.append(
                    f"prune_by_magnitude: {where}keep them dense with --prune-option exclude_nodes={_names(blamed)}, "
                    "or prune less (a lower --prune)"
                )
            else:
                steps.append("prune_by_magnitude: prune less (a lower --prune), or give --calib for SparseGPT")
        elif p.name == "share_weights":
            steps.append(
                f"share_weights: {where}"
                + (f"leave them unshared with --share-option exclude_nodes={_names(blamed)}, " if blamed else "")
                + "or use --share-option per_channel=true / more bits (--share 6)"
            )
        elif p.name == "prune_channels":
            node = diverging or (blamed[0][0] if blamed else None)
            steps.append(
                "prune_channels: "
                + (f"keep the channels of {node} with --prune-option exclude_nodes={node}, " if node else "")
                + "or remove fewer channels (a lower --prune-channels)"
            )
        elif p.name == "quantize_int8_static":
            steps.append(
                "quantize_int8_static: --quantize-option auto_precision=true lets the precision ladder keep the "
                "most sensitive layers at higher precision"
                + (f"; or keep {diverging} float with --quantize-option float_nodes={diverging}" if diverging else "")
            )
        else:
            steps.append(f"{p.name}: try its options with gentler settings (onnxslim passes lists them)")
    if steps and not diverging:
        steps.append("rerun with --explain to find the first tensor that diverges from the original")
    return steps
