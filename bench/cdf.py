"""The completion-time CDF of a fan-out run as a PNG: one look shows how far each mode's
fleet is from the floor, and whether the tail or the bulk of the nodes is late.

matplotlib is imported here, lazily, and only here: the bench runs (and writes its
JSON and Markdown) without it; `pip install -e '.[bench]'` brings it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

# One colour per mode, the same in every picture.
COLOURS = {"p2p": "tab:blue", "central": "tab:orange"}


def write_cdf(
    path: Path,
    curves: Mapping[str, Sequence[float]],
    bound: float,
    title: str,
    bound_label: str = "T_min",
) -> Path:
    """Plot each mode's completion times (seconds) as a step CDF, and `bound` as a vertical
    line, into `path` (PNG). Raises ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")  # no display: this runs on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    try:
        top = bound
        for mode, times in curves.items():
            xs = sorted(times)
            if not xs:
                continue
            n = len(xs)
            ys = [(i + 1) / n for i in range(n)]
            ax.step(
                [0.0, *xs],
                [0.0, *ys],
                where="post",
                label=f"{mode} (n={n}, max {xs[-1]:.1f} s)",
                color=COLOURS.get(mode),
                linewidth=1.8,
            )
            top = max(top, xs[-1])
        ax.axvline(bound, color="black", linestyle="--", linewidth=1.2)
        ax.text(
            bound,
            0.02,
            f" {bound_label} = {bound:.1f} s",
            rotation=90,
            va="bottom",
            ha="right",
            fontsize=8,
        )
        ax.set_xlim(0.0, top * 1.05)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("seconds from the assign until the node is ready")
        ax.set_ylabel("fraction of nodes ready")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
