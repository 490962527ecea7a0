"""The completion-time CDF of a fan-out run as a PNG: one look shows how far each mode's
fleet is from the floor, and whether the tail or the bulk of the nodes is late.

matplotlib is imported here, lazily, and only here: the bench runs (and writes its
JSON and Markdown) without it; `pip install -e '.[bench]'` brings it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.cluster import MIB

# One colour per mode, the same in every picture.
COLOURS = {"p2p": "tab:blue", "central": "tab:orange"}
SPREAD = 8.0


def write_cdf(
    path: Path,
    curves: Mapping[str, Sequence[float]],
    bound: float,
    title: str,
    bound_label: str = "T_min",
    marks: Mapping[str, float] | None = None,
) -> Path:
    """Plot each mode's completion times (seconds) as a step CDF, `bound` as a vertical line
    and each of `marks` ({label: seconds}, e.g. the central floor) as a dotted one, into
    `path` (PNG). When the slowest curve ends more than SPREAD times later than the
    fastest begins (central against p2p at large N), the time axis is logarithmic, so
    the p2p curve is not squashed against zero. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # no display: this runs on servers and in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    lines = {bound_label: bound, **(marks or {})}
    every = [t for times in curves.values() for t in times if t > 0]
    low = min([*every, *lines.values()])
    log_x = bool(every) and max([*every, *lines.values()]) > SPREAD * low
    try:
        top = bound
        for mode, times in curves.items():
            xs = sorted(times)
            if not xs:
                continue
            n = len(xs)
            ys = [(i + 1) / n for i in range(n)]
            ax.step(
                [low / 2 if log_x else 0.0, *xs],
                [0.0, *ys],
                where="post",
                label=f"{mode} (n={n}, max {xs[-1]:.1f} s)",
                color=COLOURS.get(mode),
                linewidth=1.8,
            )
            top = max(top, xs[-1])
        for i, (label, x) in enumerate(lines.items()):
            ax.axvline(x, color="black", linestyle="--" if i == 0 else ":", linewidth=1.2)
            ax.text(x, 0.98, f"{label} = {x:.1f} s ", rotation=90, va="top", ha="right", fontsize=8)
            top = max(top, x)
        if log_x:
            ax.set_xscale("log")
            ax.set_xlim(low / 1.5, top * 1.3)
            plain = FuncFormatter(lambda x, _: f"{x:g}")  # 30, not 3 x 10^1
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            ax.tick_params(axis="x", which="both", labelsize=7)
        else:
            ax.set_xlim(0.0, top * 1.05)
        ax.set_ylim(0.0, 1.02)
        scale = " (log scale)" if log_x else ""
        ax.set_xlabel(f"seconds from the assign until the node is ready{scale}")
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


def read_result(path: Path) -> dict[str, Any]:
    """A bench result JSON (bench.fanout's); ValueError naming the file and what is wrong
    with it otherwise. Callers check the fields they use."""
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a bench.fanout result")
    return doc


def replot(result: Path) -> Path:
    """Draw the PNG of a bench result JSON again (after a change to the picture, or to get
    it where matplotlib was missing during the run), beside the JSON."""
    doc = read_result(result)
    try:
        curves = {mode: list(r["times"].values()) for mode, r in doc["modes"].items()}
        marks = {"central floor": doc["central_floor"]} if "central" in curves else {}
        if "bound" in doc:  # a workload run (bench/workload.py)
            bound, label = doc["bound"]["seconds"], "T_bound"
            title = doc.get("title", result.stem)
        else:
            c = doc["config"]
            bound, label = doc["t_min"], "T_min"
            size, rate = c["size"] / MIB, c["rate"] / MIB
            title = f"Fan-out: N={c['nodes']}, S={size:g} MiB, B={rate:g} MiB/s"
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{result}: not a bench.fanout result") from None
    return write_cdf(result.with_suffix(".png"), curves, bound, title, label, marks)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m bench.cdf",
        description="Redraw the completion-time CDF PNG of bench.fanout result JSON files.",
    )
    p.add_argument("results", nargs="+", type=Path, help="bench/results/*.json of bench.fanout")
    for path in p.parse_args(argv).results:
        try:
            print(f"wrote {replot(path)}")
        except ValueError as e:
            p.exit(1, f"bench.cdf: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
