"""Figures, returned as PNG bytes: matplotlib ``Figure`` objects rendered by the Agg backend
(no pyplot, so no display and no change to the caller's global backend)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence


def layer_widths_png(widths: Mapping[str, Sequence[int]], full_width: int,
                     scores: Mapping[str, Sequence[float]] | None = None, title: str = "") -> bytes:
    """Per-layer residual widths (one line per schedule) and, if given, per-layer scores.

    ``widths``: label → kept width of each layer's input; ``scores``: label → one value per
    layer (e.g. ``{"LR": lr, "BI": bi}``), drawn in a panel above the widths.
    """
    from matplotlib.figure import Figure  # no pyplot: rendered by Agg, no global backend change

    panels = 2 if scores else 1
    fig = Figure(figsize=(8, 2.6 * panels + 0.6), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    if scores:
        ax = axes[0]
        for label, values in scores.items():
            ax.plot(range(len(values)), list(values), marker="o", ms=3, label=label)
        ax.set_ylabel("score")
        ax.set_title("layer scores (LR = mean cos(input, output), BI = 1 − LR)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    for label, values in widths.items():
        ax.step(range(len(values)), list(values), where="mid", marker="o", ms=3, label=label)
    ax.axhline(full_width, color="grey", lw=0.8, ls="--", label=f"full width {full_width}")
    ax.set_ylabel("kept residual width")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def summary_widths_png(summary: Mapping, title: str = "") -> bytes | None:
    """The plot for a method's :class:`CompressionResult` summary, or None if it has no widths."""
    widths = summary.get("attn_in_widths")
    if not widths or summary.get("hidden_size") is None:
        return None
    scores = summary.get("layer_scores")
    label = str(summary.get("schedule", "widths"))
    return layer_widths_png({label: widths}, int(summary["hidden_size"]),
                            {"LR": scores["lr"], "BI": scores["bi"]} if scores else None, title)
