"""The report's text for an automatic search: the candidates measured (the Pareto front and the choice marked),
then what was chosen and where the pictures are. The JSON has everything, the sensitivity table included."""

from __future__ import annotations

__all__ = ["auto_renderables"]


def auto_renderables(auto: dict, narrow: bool = False) -> list:
    from rich.table import Table

    metric = auto["metric"]
    t = Table(
        title=f"automatic search: budget {auto['budget']:g} drop of {metric['kind']} "
        f"(original {metric['base_value']:.4f}); objective {auto['objective']}",
        title_justify="left",
    )
    for col in ("#", "candidate", "layers", "size", "latency", metric["kind"], "drop", ""):
        t.add_column(col, overflow="fold", justify="right" if col in ("size", "latency", "drop") else "left")
    front = set(auto.get("pareto", []))
    cands = [c for c in auto["candidates"] if "size_ratio" in c or c.get("error")]
    for c in sorted(cands, key=lambda c: (c.get("size_ratio", 9e9), c["id"])):
        if c.get("error"):
            t.add_row(str(c["id"]), c["label"], "", "", "", "", "", f"failed: {c['error']}")
            continue
        mark = []
        if c["id"] == auto["chosen"]:
            mark.append("CHOSEN")
        if c["id"] in front:
            mark.append("front")
        if not c.get("meets_budget"):
            mark.append("over budget")
        lat = f"{c['latency_ratio']:.2f}x" if c.get("latency_ratio") is not None else "-"
        t.add_row(
            str(c["id"]),
            c["label"],
            "" if narrow else c.get("summary", ""),
            f"{c['size_ratio']:.3f}x",
            lat,
            f"{c['value']:.4f}",
            f"{c['drop']:+.4f}",
            ", ".join(mark),
        )
    out: list = [t]
    verdict = "within the budget" if auto["passed"] else "NO compressed candidate is within the budget"
    out.append(
        f"auto: {verdict}; {'chose' if auto['passed'] else 'best found (smallest drop)'} #{auto['chosen']} -> "
        f"{auto['output']}; {len(auto['candidates'])} candidates ({auto['cache']['hits']} from the cache) via "
        f"{auto['executor']} in {auto['search_seconds']:.1f}s, peak RSS {auto['peak_rss_mb']:.0f} MB"
    )
    out.append(f"auto: metric: {metric['description']}")
    for name, path in auto.get("plots", {}).items():
        out.append(f"auto: {name} plot: {path}")
    if auto["cache"].get("kept"):
        out.append(f"auto: evaluated candidates kept in {auto['cache']['folder']} (a rerun resumes from them)")
    return out
