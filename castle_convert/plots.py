"""Pictures (PNG) of what a conversion measured: fidelity and latency against resolution (the fidelity block), and
stage 1's per-layer error before and after. matplotlib is optional (``pip install matplotlib``): it is imported only
here, when a picture is drawn; :func:`available` says whether it can be."""

from __future__ import annotations

import os
from typing import Optional


class PlotError(ValueError):
    """A picture cannot be drawn (matplotlib missing, nothing to draw); the message says what to do."""


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotError("drawing pictures needs matplotlib: pip install matplotlib") from e
    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def fidelity_plot(block: dict, path: str, title: Optional[str] = None) -> str:
    """Two panels against input resolution: patch-token and CLS cosine to the teacher (left); batch-1 latency of
    teacher and student with their interquartile ranges, and the MACs ratio (right). ``block``: a fidelity block
    (``FidelityReport.to_dict()``, ``report.json``'s ``fidelity``)."""
    rows = sorted((r for r in (block or {}).get("rows") or [] if isinstance(r, dict)), key=lambda r: r["resolution"])
    if not rows:
        raise PlotError("the fidelity block has no rows to draw")
    plt = _pyplot()
    res = [r["resolution"] for r in rows]
    timed = [r for r in rows if r.get("teacher_ms") and r.get("student_ms")]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(10.5 if timed else 5.5, 4.0), squeeze=False)
    ax = axes[0][0]
    for key, label, marker in (("patch_cosine", "patch tokens", "o"), ("cls_cosine", "CLS / pooled", "s"),
                               ("agree", None, None)):
        pts = [(r["resolution"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts and label:
            ax.plot(*zip(*pts), marker=marker, label=label)
    ax.set_xticks(res, [str(r) for r in res])
    ax.set_xlabel("input resolution (px)")
    ax.set_ylabel("cosine to the teacher")
    where = "held-out natural photos" if block.get("data") == "natural" else f"held-out images ({block.get('data')})"
    ax.set_title(f"fidelity on {where}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if timed:
        ax = axes[0][1]
        x = [r["resolution"] for r in timed]
        for who, label, marker in (("teacher", "teacher (softmax)", "o"), ("student", "converted", "s")):
            ms = [r[f"{who}_ms"] for r in timed]
            iqr = [(r.get(f"{who}_iqr_ms") or 0.0) / 2 for r in timed]
            ax.errorbar(x, ms, yerr=iqr, marker=marker, capsize=3, label=label)
        for r in timed:
            ratio = r["student_ms"] / r["teacher_ms"]
            macs = f", MACs ×{r['macs_ratio']:.2f}" if isinstance(r.get("macs_ratio"), (int, float)) else ""
            ax.annotate(f"time ×{ratio:.2f}{macs}", (r["resolution"], r["student_ms"]), textcoords="offset points",
                        xytext=(0, -14), ha="center", fontsize=7)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_yscale("log")
        import matplotlib.ticker
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.08, y=0.25)                      # room for the ratio labels below the points
        ax.set_xlabel("input resolution (px)")
        ax.set_ylabel("latency, batch 1 (ms, median ± IQR/2)")
        ax.set_title(f"speed, {block.get('device', 'cpu')}, {block.get('threads', '?')} threads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    path = _save(fig, path)
    plt.close(fig)
    return path


def stage1_plot(stage1: dict, path: str, title: Optional[str] = None) -> str:
    """Stage 1's per-layer normalised error of the converted attention against the softmax one, before and after
    fitting (``report.json``'s ``stage1``: ``errors_before``, ``errors``); layers kept softmax are marked."""
    after = (stage1 or {}).get("errors") or {}
    before = (stage1 or {}).get("errors_before") or {}
    if not after:
        raise PlotError("no stage-1 errors to draw (the recipe ran no stage 1)")
    plt = _pyplot()
    names = list(after)
    short = [n.replace("encoder.layer.", "").replace("blocks.", "").replace(".attention", "").replace(".attn", "")
             for n in names]
    kept = set((stage1 or {}).get("kept_softmax") or [])
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * len(names) + 2), 3.8))
    idx = range(len(names))
    ax.bar([i - 0.2 for i in idx], [before.get(n, float("nan")) for n in names], width=0.4, label="before (start)")
    ax.bar([i + 0.2 for i in idx], [after[n] for n in names], width=0.4, label="after stage 1")
    for i, n in enumerate(names):
        if n in kept:
            ax.annotate("kept softmax", (i, after[n]), textcoords="offset points", xytext=(0, 3), ha="center",
                        fontsize=7, rotation=90)
    ax.set_xticks(list(idx), short)
    ax.set_xlabel("attention layer")
    ax.set_ylabel("normalised output error vs softmax")
    ax.set_title(title or "stage 1: each converted layer fitted to its softmax layer")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    path = _save(fig, path)
    plt.close(fig)
    return path


def draw_report(report: dict, folder: str, name: str = "") -> list[str]:
    """Every picture a report (``report.json`` of an output directory) has data for, into ``folder``:
    ``fidelity.png`` and ``stage1.png``, as the main job draws them."""
    out = []
    if ((report or {}).get("fidelity") or {}).get("rows"):
        out.append(fidelity_plot(report["fidelity"], os.path.join(folder, "fidelity.png"),
                                 title=f"{name}: converted vs teacher" if name else None))
    if ((report or {}).get("stage1") or {}).get("errors"):
        out.append(stage1_plot({**report["stage1"], "kept_softmax": report.get("keep_softmax")},
                               os.path.join(folder, "stage1.png")))
    if not out:
        raise PlotError("the report has no fidelity block and no stage-1 errors to draw")
    return out


if __name__ == "__main__":       # python -m castle_convert.plots REPORT.json FOLDER: e.g. an output written before
    import json                  # pictures existed
    import sys
    if len(sys.argv) != 3:
        sys.exit("usage: python -m castle_convert.plots REPORT.json FOLDER")
    with open(sys.argv[1]) as f:
        data = json.load(f)
    for written in draw_report(data, sys.argv[2], str(data.get("model") or "")):
        print(f"wrote {written}")
