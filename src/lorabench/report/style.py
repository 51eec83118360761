"""How results look, in one place: colours, labels, per-protocol line styles, panel sizes,
the shared panel drawing, number and table formatting, and atomic PNG/PDF/text output.

Matplotlib runs with the Agg backend and mathtext only (no LaTeX installation needed).
Every report module draws through these helpers, so a change of look is made here once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..runs.atomic import atomic_write  # noqa: E402

PNG_DPI = 120
FORMATS = ("png", "pdf")  # every figure is written in each
PANEL_SIZE = (3.3, 2.6)  # inches per panel

RC = {
    "text.usetex": False,
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8,
    "legend.fontsize": 6.5,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.4,
    "lines.markersize": 3.5,
    "legend.frameon": False,
    "pdf.fonttype": 42,
    "svg.fonttype": "none",
}

# Series styles: the same method looks the same in every figure.
SERIES = {
    "construction": dict(color="#1f77b4", marker="o", label="Our construction"),
    "gd": dict(color="#d62728", marker="s", label="Gradient update"),
    "gd_train": dict(color="#ff7f0e", marker="^", label="Gradient update (train)"),
    "gd_shift": dict(color="#d62728", marker="s", linestyle="--", markerfacecolor="none", label="Gradient update, shifted"),
    "construction_shift": dict(color="#1f77b4", marker="o", linestyle="--", markerfacecolor="none", label="Our construction, shifted"),
    "flt": dict(color="#2ca02c", marker="D", label="Tuning final layers"),
    "fixed_bias": dict(color="#9467bd", marker="v", label="Fixed biases"),
    "updatable_bias": dict(color="#d62728", marker="s", label="Updatable biases"),
    "full": dict(color="black", marker="*", markersize=7, linestyle="none", label="Full fine-tuning"),
    "dora": dict(color="#8c564b", marker="P", label="DoRA"),
    "vera": dict(color="#e377c2", marker="X", label="VeRA"),
    "pissa": dict(color="#17becf", marker="h", label="PiSSA"),
    "from_construction": dict(color="#9467bd", marker="^", label="LoRA from the construction"),
    "prenorm": dict(color="#ff7f0e", marker="D", linestyle="--", label="Gradient update, pre-norm blocks"),
    "tail": dict(color="black", marker="", linestyle=":", linewidth=1.2, label="attention-product tail (scaled)"),
}
# A method's series (the ``method`` column -> SERIES key); a method of the user's gets
# one of USER_COLOURS, labelled by its name.
METHOD_SERIES = {"ours": "construction", "sgd": "gd", "flt": "flt", "full": "full", "dora": "dora", "vera": "vera",
                 "pissa": "pissa", "lora_from_construction": "from_construction"}
METHOD_LABEL = {"sgd": "LoRA (gradient)"}
USER_COLOURS = ("#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a")
# Protocols drawn side by side: line overrides, and whether the min-max band is drawn
# (one band per panel keeps the comparison readable).
PROTOCOL_STYLE = {
    "paper": dict(line=dict(linestyle="-"), band=True),
    "reference": dict(line=dict(linestyle="--", markerfacecolor="none"), band=False),
}
# Per-protocol caveats a figure states in its panels: {protocol: {figure name: note}}.
PROTOCOL_NOTES = {
    "reference": {"rank_step": "reference: step<0 increases the rank (authors' sign bug)"},
}
FOOTNOTE = ("Median over seeds; band: min-max over seeds. Gradient update: grid point chosen by validation loss, "
            "final state ('{checkpoint}').")
THEORY = dict(color="black", linestyle=":", linewidth=1.2, label="Theory")
THRESHOLD = dict(color="0.45", linestyle="--", linewidth=0.9)
CHANCE = dict(color="0.6", linestyle="-.", linewidth=0.8)
BAND_ALPHA = 0.18
RANK_CMAP = "viridis"

FROZEN_LABEL = {0: "Random", 1: "Pretrained"}


def protocol_line(protocol: str) -> dict:
    return dict(PROTOCOL_STYLE.get(protocol, {}).get("line", {}))


def protocol_band(protocol: str) -> bool:
    return bool(PROTOCOL_STYLE.get(protocol, {}).get("band", True))


def protocol_note(protocol: str, figure: str) -> str:
    return PROTOCOL_NOTES.get(protocol, {}).get(figure, "")


def apply() -> None:
    plt.rcParams.update(RC)


def panels(nrows: int, ncols: int, *, sharey: bool = False) -> tuple[Figure, list[list[Axes]]]:
    """A figure of nrows x ncols panels; axes always returned as a 2-d list."""
    apply()
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.35),
        squeeze=False, sharey=sharey, constrained_layout=True,
    )
    return fig, [list(row) for row in axes]


def method_series(name: str, user_index: int = 0) -> tuple[str, dict]:
    """(SERIES key, overrides) of a method's curve: lorabench's own by METHOD_SERIES; a
    user's method (its module path) in the ``user_index``-th of USER_COLOURS, labelled by
    its name."""
    key = METHOD_SERIES.get(name)
    if key is None:
        return name, dict(color=USER_COLOURS[user_index % len(USER_COLOURS)], marker="o", markerfacecolor="none",
                          label=name)
    label = METHOD_LABEL.get(name)
    return key, ({"label": label} if label else {})


def series_style(key: str, **override) -> dict:
    style = dict(SERIES.get(key, {}))
    style.update(override)
    return style


def colours(n: int) -> list:
    cmap = plt.get_cmap(RANK_CMAP)
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]


def no_data(ax: Axes, what: str = "") -> None:
    """Mark a panel that has nothing to draw, visibly."""
    ax.text(0.5, 0.5, "no data" + (f"\n{what}" if what else ""), ha="center", va="center",
            transform=ax.transAxes, color="0.4", fontsize=9, style="italic")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def note(ax: Axes, text: str) -> None:
    """A small note in the panel's lower left corner (e.g. excluded runs)."""
    if text:
        ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=6, color="0.35", ha="left", va="bottom")


def threshold_line(ax: Axes, rank: Optional[float], label: bool = True, **override) -> None:
    if rank is None:
        return
    style = dict(THRESHOLD)
    style.update(override)
    ax.axvline(rank, label=f"threshold $R^*={rank:g}$" if label else None, **style)


def legend(ax: Axes, **kwargs) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(**{"loc": "best", **kwargs})


_note, _legend = note, legend  # finish_panel's parameters shadow these names


def suptitle(fig: Figure, text: str, footnote: str = "") -> None:
    """Title on top; the footnote as the figure's x label, so the layout makes room for it."""
    fig.suptitle(text, fontsize=9.5)
    if footnote:
        fig.supxlabel(footnote, fontsize=6, color="0.35")


def integer_ticks(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _atomic_savefig(fig: Figure, path: Path, fmt: str) -> None:
    kwargs = {"dpi": PNG_DPI} if fmt == "png" else {"metadata": {"CreationDate": None}}
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def save(fig: Figure, out_dir, name: str, formats: Optional[Sequence[str]] = None) -> list[Path]:
    """Write ``out_dir/name.<fmt>`` for each format (default FORMATS), each atomically;
    closes the figure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for fmt in formats or FORMATS:
            path = out / f"{name}.{fmt}"
            _atomic_savefig(fig, path, fmt)
            paths.append(path)
    finally:
        plt.close(fig)
    return paths


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def log_safe(values: Iterable[float]):
    """Values for a log axis: non-positive ones (an exact zero) become gaps, not numbers."""
    arr = np.asarray(list(values), dtype=float)
    return np.where(arr > 0, arr, np.nan)


# ------------------------------------------------------------------ panels
def draw_curve(ax: Axes, c, key: str, *, log: bool = False, label: Optional[str] = None, band: bool = True, **override) -> bool:
    """A median curve (analysis.Curve) with markers and its band; returns False (nothing
    drawn) if empty."""
    if c.empty:
        return False
    st = series_style(key, **override)
    text = label or st.pop("label", key)
    st.pop("label", None)
    if c.n_dropped:
        text += f" ({c.n_dropped} diverged excl.)"
    fix = log_safe if log else np.asarray
    ax.plot(c.x, fix(c.median), label=text, **st)
    if band and len(c.x) and np.any(c.high > c.low):
        ax.fill_between(c.x, fix(c.low), fix(c.high), color=st.get("color"), alpha=BAND_ALPHA, linewidth=0)
    return True


def finish_panel(ax: Axes, drawn: bool, title: str, *, log: bool, xlabel: str, ylabel: str, thr: Optional[int] = None,
                 note: str = "", legend: bool = True, integer_x: bool = True) -> None:
    """Title, scales, threshold line, labels, note and legend; 'no data' if nothing was drawn."""
    ax.set_title(title)
    if not drawn:
        no_data(ax, title)
        return
    if log:
        ax.set_yscale("log")
    if integer_x:
        integer_ticks(ax)
    threshold_line(ax, thr)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _note(ax, note)
    if legend:
        _legend(ax)


# ------------------------------------------------------------------ text
def g(x: float) -> str:
    """A measured number in tables: three significant digits, 'nan' for a missing one."""
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(df, columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_escape(row[c]) for c in columns) + " |" for _, row in df.iterrows()]
    return "\n".join(lines)
