"""The paper's figures, drawn from the Parquet results alone (no models, no training here).

Every figure is a function ``fig_<name>(selected, out_dir, *, protocol=None,
checkpoint="last") -> [png, pdf]`` that reads the selected rows (one per selection
group, lorabench.runs.selection) and writes ``out_dir/<name>.png`` and ``.pdf``.

* Statistic (report.analysis): the paper's median over seeds, with the min-max band over
  seeds (which the paper's figures omit). Gradient runs are shown at ``checkpoint``
  (default 'last', the final state, as the paper); constructions are the 'construction' rows.
* Diverged runs are never drawn as numbers: a seed whose every grid point diverged (NaN
  metrics, ``diverged``) is left out of the median and counted in a note, as are the
  diverged grid points the selection excluded (``n_excluded``).
* A panel without rows says "no data" instead of failing, so a partial run (smoke
  preset, one protocol) still gives every figure.
* Theory overlays: the linear optimum (1/D) sum_{i>RL} sigma_i(E)^2 that each row stores
  for its own models (``svd_optimum_mse``), median over seeds; the threshold rank as a
  vertical line. For Lbar = 1 ReLU FNNs the same quantity bounds the construction's MSE
  (core.theory); the paper's bound for Lbar > 1 is not drawn (its constants are unverified).
* ``protocol=None`` draws the 'paper' protocol when it has rows, else 'reference'; the
  protocol is named in every title. ``write_all_figures`` draws each protocol that has
  rows, one folder per protocol; comparison.py sets the two side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from matplotlib.ticker import NullFormatter

from . import style
from .analysis import (
    CLASSIFICATION_TASKS,
    DEFAULT_CHECKPOINT,
    DEFAULT_PROTOCOL,
    EXACT_RTOL,
    FNN_PAIRS,
    Curve,
    choose_protocol,
    curve,
    ensure_selected,
    excluded_note,
    experiment_protocols,
    below_threshold,
    measured_thresholds,
    plateau_rank,
    relative_mse,
    rows,
    theory_rows,
    threshold,
)
from .catalog import figure_protocols
from .style import draw_curve, finish_panel, g


def _theory_overlay(ax, source: pd.DataFrame, label: str, log: bool) -> Optional[Curve]:
    if source.empty:
        return None
    c = curve(theory_rows(source), "rank", "value")
    if c.empty:
        return None
    style_ = dict(style.THEORY)
    style_.pop("label")
    fix = style.log_safe if log else np.asarray
    ax.plot(c.x, fix(c.median), label=label, **style_)
    return c


def _save(fig, out_dir, name: str, title: str, protocol: str, checkpoint: str, extra: str = "") -> list[Path]:
    foot = style.FOOTNOTE.format(checkpoint=checkpoint) + (f" {extra}" if extra else "")
    style.suptitle(fig, f"{title} [{protocol} protocol]", foot)
    return style.save(fig, out_dir, name)


def _rank_panel(
    ax, selected, experiment, protocol, checkpoint, *, filters: dict, title: str, log: bool,
    gd_filters: Optional[dict] = None, theory_label: Optional[str] = None, y: str = "test_loss",
    ylabel: str = "test MSE",
) -> None:
    """One panel: construction and gradient update against the rank, with theory."""
    ours = rows(selected, experiment, protocol, "ours", **filters)
    gd = rows(selected, experiment, protocol, "sgd", checkpoint, **filters, **(gd_filters or {}))
    c_ours, c_gd = curve(ours, "rank", y), curve(gd, "rank", y)
    drawn = draw_curve(ax, c_ours, "construction", log=log)
    drawn = draw_curve(ax, c_gd, "gd", log=log) or drawn
    if drawn and theory_label:
        _theory_overlay(ax, ours if not ours.empty else gd, theory_label, log)
    both = pd.concat([d for d in (ours, gd) if not d.empty]) if drawn else ours
    finish_panel(ax, drawn, title, log=log, xlabel="rank $R$", ylabel=ylabel + (" (log)" if log else ""),
            thr=threshold(both), note=excluded_note({"GD": c_gd}))


# ------------------------------------------------------------------ figures
LINEAR_THEORY = r"SVD optimum $\frac{1}{D}\sum_{i>RL}\sigma_i(E)^2$"
FNN_BOUND = r"bound $\frac{1}{D}\sum_{i>RL}\sigma_i(E)^2$"


def fig_linear(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Linear model (Lbar=1, L=2), random and pretrained frozen model: construction vs
    gradient update, with the SVD optimum and the threshold."""
    p = choose_protocol(selected, "linear", protocol)
    fig, axes = style.panels(1, 2)
    for ax, pre in zip(axes[0], (0, 1)):
        _rank_panel(ax, selected, "linear", p, checkpoint, filters={"pretrained": pre}, title=style.FROZEN_LABEL[pre],
                    log=False, theory_label=LINEAR_THEORY)
    return _save(fig, out_dir, "linear", r"Linear model ($\bar L=1$, $L=2$)", p, checkpoint)


def fig_fnn(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT, log=False, name="fnn") -> list[Path]:
    """ReLU FNN, (Lbar, L) = (1, 2) and (2, 4) by rows, random and pretrained by columns;
    gradient update with tunable biases. Lbar = 1 panels carry the linear-part bound."""
    p = choose_protocol(selected, "fnn", protocol)
    fig, axes = style.panels(len(FNN_PAIRS), 2)
    for r, (lbar, depth) in enumerate(FNN_PAIRS):
        for c, pre in enumerate((0, 1)):
            _rank_panel(
                axes[r][c], selected, "fnn", p, checkpoint,
                filters={"target_depth": lbar, "frozen_depth": depth, "pretrained": pre}, gd_filters={"tune_bias": 1},
                title=rf"$\bar L={lbar}$, $L={depth}$, {style.FROZEN_LABEL[pre].lower()}", log=log,
                theory_label=FNN_BOUND if lbar == 1 else None,
            )
    return _save(fig, out_dir, name, "ReLU FNN approximation", p, checkpoint)


def fig_fnn_log(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """The FNN figure on a log scale (the paper's log_fnn_approx)."""
    return fig_fnn(selected, out_dir, protocol=protocol, checkpoint=checkpoint, log=True, name="fnn_log")


def fig_tfn(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """TFN (H=2, N=10), depth L=1 and L=2 by rows, random and pretrained by columns;
    log-scale MSE, threshold D/2."""
    p = choose_protocol(selected, "tfn", protocol)
    fig, axes = style.panels(2, 2)
    for r, depth in enumerate((1, 2)):
        for c, pre in enumerate((0, 1)):
            _rank_panel(axes[r][c], selected, "tfn", p, checkpoint, filters={"target_depth": depth, "pretrained": pre},
                        title=f"$L={depth}$, {style.FROZEN_LABEL[pre].lower()}", log=True)
    return _save(fig, out_dir, "tfn", "Transformer network (TFN) approximation", p, checkpoint)


def fig_flt(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """LoRA vs tuning the final layers of a (Lbar=1, L=8) FNN, against the number of
    tunable parameters (biases included, unlike the authors' notebook)."""
    p = choose_protocol(selected, "flt", protocol)
    fig, axes = style.panels(1, 2)
    for ax, pre in zip(axes[0], (0, 1)):
        lora = rows(selected, "flt", p, "sgd", checkpoint, pretrained=pre, tune_bias=1)
        flt = rows(selected, "flt", p, "flt", checkpoint, pretrained=pre)
        c_lora, c_flt = curve(lora, "n_trainable_params", "test_loss"), curve(flt, "n_trainable_params", "test_loss")
        drawn = draw_curve(ax, c_lora, "gd", label="LoRA")
        drawn = draw_curve(ax, c_flt, "flt") or drawn
        finish_panel(ax, drawn, style.FROZEN_LABEL[pre], log=False, xlabel="tunable parameters (incl. biases)",
                ylabel="test MSE", note=excluded_note({"LoRA": c_lora, "FLT": c_flt}), integer_x=False)
    return _save(fig, out_dir, "flt", r"LoRA vs final-layer tuning ($\bar L=1$, $L=8$)", p, checkpoint)


def fig_bias(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Gradient update with fixed vs updatable biases (Lbar=1, L=2), against the rank."""
    p = choose_protocol(selected, "bias", protocol)
    fig, axes = style.panels(1, 2)
    for ax, pre in zip(axes[0], (0, 1)):
        fixed = rows(selected, "bias", p, "sgd", checkpoint, pretrained=pre, tune_bias=0)
        free = rows(selected, "bias", p, "sgd", checkpoint, pretrained=pre, tune_bias=1)
        c_fixed, c_free = curve(fixed, "rank", "test_loss"), curve(free, "rank", "test_loss")
        drawn = draw_curve(ax, c_fixed, "fixed_bias")
        drawn = draw_curve(ax, c_free, "updatable_bias") or drawn
        both = pd.concat([d for d in (fixed, free) if not d.empty]) if drawn else fixed
        finish_panel(ax, drawn, style.FROZEN_LABEL[pre], log=False, xlabel="rank $R$", ylabel="test MSE", thr=threshold(both),
                note=excluded_note({"fixed": c_fixed, "updatable": c_free}))
    return _save(fig, out_dir, "bias", r"Fixed vs updatable biases ($\bar L=1$, $L=2$)", p, checkpoint)


def fig_rank_step(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Rank allocation across layers: per-layer rank R + step * l (Lbar=2, L=4, R=8)."""
    p = choose_protocol(selected, "rank_step", protocol)
    fig, axes = style.panels(1, 2)
    for ax, pre in zip(axes[0], (0, 1)):
        gd = rows(selected, "rank_step", p, "sgd", checkpoint, pretrained=pre)
        c = curve(gd, "rank_step", "test_loss")
        drawn = draw_curve(ax, c, "gd")
        note = excluded_note({"GD": c})
        if drawn and style.protocol_note(p, "rank_step"):
            note = (style.protocol_note(p, "rank_step") + "; " + note).strip("; ")
        finish_panel(ax, drawn, style.FROZEN_LABEL[pre], log=True, xlabel="rank step (rank of layer $l$: $R$ + step$\\cdot l$)",
                ylabel="test MSE (log)", note=note)
    return _save(fig, out_dir, "rank_step", r"Rank allocation across layers ($\bar L=2$, $L=4$, $R=8$)", p, checkpoint)


def _chance(ax, task: str, width: Optional[int]) -> None:
    level = 0.5 if task == "binary_classification" else (1.0 / width if width else None)
    if level is not None:
        ax.axhline(level, label="uniform guess", **style.CHANCE)


def _classification_grid(selected, out_dir, name, title, protocol, checkpoint, series) -> list[Path]:
    p = choose_protocol(selected, "classification", protocol)
    fig, axes = style.panels(len(CLASSIFICATION_TASKS), len(FNN_PAIRS))
    for r, task in enumerate(CLASSIFICATION_TASKS):
        for c, (lbar, depth) in enumerate(FNN_PAIRS):
            ax = axes[r][c]
            filters = {"task": task, "target_depth": lbar, "frozen_depth": depth, "pretrained": 0}
            drawn, curves, frames = False, {}, []
            for method, metric, key in series:
                df = rows(selected, "classification", p, method, checkpoint, **filters)
                frames.append(df)
                cv = curve(df, "rank", metric)
                curves[key] = cv
                drawn = draw_curve(ax, cv, key) or drawn
            if drawn:
                width = int(frames[0]["width"].iloc[0]) if not frames[0].empty else next(
                    (int(f["width"].iloc[0]) for f in frames if not f.empty), None)
                _chance(ax, task, width)
            both = pd.concat([f for f in frames if not f.empty]) if drawn else frames[0]
            finish_panel(ax, drawn, f"{task.replace('_', ' ')}, " + rf"$\bar L={lbar}$, $L={depth}$", log=False,
                    xlabel="rank $R$", ylabel="test accuracy", thr=threshold(both),
                    note=excluded_note({k: v for k, v in curves.items() if k.startswith("gd")}))
    return _save(fig, out_dir, name, title, p, checkpoint)


def fig_classification(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Multi-class and binary classification accuracy against the rank (random frozen
    model); rank 0 is the construction's R = 0 baseline."""
    return _classification_grid(selected, out_dir, "classification", "Classification accuracy", protocol, checkpoint,
                                (("ours", "test_accuracy", "construction"), ("sgd", "test_accuracy", "gd")))


def fig_distribution_shift(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Accuracy in distribution (x ~ N(0, I)) and under the shift x ~ N(0, 25 I)."""
    return _classification_grid(
        selected, out_dir, "distribution_shift", "Accuracy with and without distribution shift", protocol, checkpoint,
        (("sgd", "test_accuracy", "gd"), ("sgd", "test_shift_accuracy", "gd_shift"),
         ("ours", "test_accuracy", "construction"), ("ours", "test_shift_accuracy", "construction_shift")),
    )


def fig_depth(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Frozen-depth sweep (Lbar=1, L=2..14): gradient update against the rank, one curve
    per L, each with its threshold ceil(D/L)."""
    p = choose_protocol(selected, "depth", protocol)
    fig, axes = style.panels(1, 1)
    ax = axes[0][0]
    gd = rows(selected, "depth", p, "sgd", checkpoint)
    depths = sorted(int(v) for v in gd["frozen_depth"].unique()) if not gd.empty else []
    drawn, curves = False, {}
    for colour, depth in zip(style.colours(len(depths)), depths):
        part = gd[gd["frozen_depth"] == depth]
        c = curve(part, "rank", "test_loss")
        curves[f"L={depth}"] = c
        if draw_curve(ax, c, "gd", log=True, label=f"$L={depth}$", color=colour, marker="o"):
            drawn = True
            style.threshold_line(ax, threshold(part), label=False, color=colour, linestyle=":")
    finish_panel(ax, drawn, r"$\bar L=1$, random frozen model", log=True, xlabel="rank $R$", ylabel="test MSE (log)",
            note=excluded_note(curves))
    return _save(fig, out_dir, "depth", "Frozen depth sweep (dotted: thresholds)", p, checkpoint)


def fig_generalization(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Finite training set: gradient update's train and test MSE, and the construction's
    test MSE, against the rank (log scale)."""
    p = choose_protocol(selected, "generalization", protocol)
    fig, axes = style.panels(1, len(FNN_PAIRS))
    for ax, (lbar, depth) in zip(axes[0], FNN_PAIRS):
        filters = {"target_depth": lbar, "frozen_depth": depth}
        ours = rows(selected, "generalization", p, "ours", **filters)
        gd = rows(selected, "generalization", p, "sgd", checkpoint, **filters)
        c_train, c_test, c_ours = curve(gd, "rank", "train_loss"), curve(gd, "rank", "test_loss"), curve(ours, "rank", "test_loss")
        drawn = draw_curve(ax, c_train, "gd_train", log=True)
        drawn = draw_curve(ax, c_test, "gd", log=True, label="Gradient update (test)") or drawn
        drawn = draw_curve(ax, c_ours, "construction", log=True, label="Our construction (test)") or drawn
        n_train = pd.to_numeric(gd["n_train"], errors="coerce").dropna().unique() if not gd.empty else []
        title = rf"$\bar L={lbar}$, $L={depth}$" + (f", $n={int(n_train[0])}$" if len(n_train) == 1 else "")
        both = pd.concat([d for d in (ours, gd) if not d.empty]) if drawn else ours
        finish_panel(ax, drawn, title, log=True, xlabel="rank $R$", ylabel="MSE (log)", thr=threshold(both),
                note=excluded_note({"GD": c_test}))
    return _save(fig, out_dir, "generalization", "Generalization with a finite training set", p, checkpoint)


def _stack_curves(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """Training curves of several seeds on their common step grid: (steps, (S, T) losses,
    number of rows left out: diverged, or on another step grid)."""
    usable = [r for _, r in df.iterrows() if not bool(r["diverged"]) and r["curve_steps"] is not None and len(r["curve_steps"])]
    if not usable:
        return np.array([]), np.empty((0, 0)), len(df)
    grids = pd.Series([tuple(np.asarray(r["curve_steps"]).tolist()) for r in usable])
    common = grids.mode().iloc[0]
    kept = [np.asarray(r["train_curve"], dtype=float) for r, g in zip(usable, grids) if g == common]
    return np.asarray(common), np.vstack(kept), len(df) - len(kept)


def fig_training_curves(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Training loss against the step, one curve per rank (median over seeds of the
    selected runs; the authors drew the single best run)."""
    p = choose_protocol(selected, "training_curves", protocol)
    fig, axes = style.panels(1, len(FNN_PAIRS))
    for ax, (lbar, depth) in zip(axes[0], FNN_PAIRS):
        gd = rows(selected, "training_curves", p, "sgd", checkpoint, target_depth=lbar, frozen_depth=depth)
        ranks = sorted(int(v) for v in gd["rank"].unique()) if not gd.empty else []
        drawn, dropped = False, 0
        for colour, rank in zip(style.colours(len(ranks)), ranks):
            steps, losses, left_out = _stack_curves(gd[gd["rank"] == rank])
            dropped += left_out
            if not len(steps):
                continue
            losses = np.where(np.isfinite(losses), losses, np.nan)
            with np.errstate(all="ignore"):
                med, lo, hi = np.nanmedian(losses, 0), np.nanmin(losses, 0), np.nanmax(losses, 0)
            ax.plot(steps, style.log_safe(med), color=colour, label=f"$R={rank}$")
            if losses.shape[0] > 1:
                ax.fill_between(steps, style.log_safe(lo), style.log_safe(hi), color=colour, alpha=style.BAND_ALPHA, linewidth=0)
            drawn = True
        finish_panel(ax, drawn, rf"$\bar L={lbar}$, $L={depth}$", log=True, xlabel="step", ylabel="training loss (log)",
                note=f"{dropped} runs excluded (diverged)" if dropped else "", integer_x=False)
    return _save(fig, out_dir, "training_curves", "Training curves by rank", p, checkpoint)


def fig_uniform_sv(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Uniform singular values of the discrepancy (every sigma_i(E) = s): the worst case,
    where the optimum s^2 (D - R L)_+ / D falls linearly in R."""
    p = choose_protocol(selected, "uniform_sv", protocol)
    fig, axes = style.panels(1, 1)
    _rank_panel(axes[0][0], selected, "uniform_sv", p, checkpoint, filters={"pretrained": 0},
                title=r"ReLU FNN $\bar L=1$, $L=2$, random", log=False,
                theory_label=r"bound $s^2(D-RL)_+/D$")
    return _save(fig, out_dir, "uniform_sv", "Uniform singular values of the discrepancy", p, checkpoint)


THRESHOLD_MARKERS = "osD^vP"  # one per (Lbar, L) pair or TFN depth, in sorted order


def _threshold_panel(ax, table: pd.DataFrame, family: str, title: str) -> None:
    """Measured against predicted threshold rank on log2 axes, colour by width, marker by
    depth setting; a setting never exact at the largest tested rank is drawn at the top
    edge as an open marker."""
    from matplotlib.ticker import FixedLocator, NullLocator

    part = table[table["exp"] == family]
    if part.empty:
        finish_panel(ax, False, title, log=False, xlabel="", ylabel="")
        return
    widths = sorted(int(w) for w in part["width"].unique())
    colour = dict(zip(widths, style.colours(len(widths))))
    depths = sorted({(int(r.target_depth), int(r.frozen_depth)) for r in part.itertuples()})
    top = 2.0 * float(part["width"].max())
    for k, (lbar, depth) in enumerate(depths):
        mine = part[(part["target_depth"] == lbar) & (part["frozen_depth"] == depth)]
        # a small horizontal offset per depth setting keeps coinciding points apart
        x = mine["predicted"].astype(float).to_numpy() * 2 ** (0.06 * (k - (len(depths) - 1) / 2))
        y = mine["measured"].astype(float).to_numpy()
        never = ~np.isfinite(y)
        marker = THRESHOLD_MARKERS[k % len(THRESHOLD_MARKERS)]
        colours_ = np.array([colour[int(w)] for w in mine["width"]])
        if (~never).any():
            ax.scatter(x[~never], y[~never], c=colours_[~never], marker=marker, s=30, edgecolors="black", linewidths=0.4, zorder=3)
        if never.any():
            ax.scatter(x[never], np.full(never.sum(), top), facecolors="none", edgecolors=colours_[never], marker=marker,
                       s=30, linewidths=1.1, zorder=3)
        label = f"$L={lbar}$" if family == "tfn" else rf"$(\bar L, L)=({lbar},{depth})$"
        ax.scatter([], [], marker=marker, s=30, color="0.6", edgecolors="black", linewidths=0.4, label=label)
    for w in widths:
        ax.scatter([], [], color=colour[w], marker="s", s=22, label=f"$D={w}$")
    lims = (1.0, top * 1.3)
    ax.plot(lims, lims, **{**style.THEORY, "label": "$y = x$ (theorem)"})
    ticks = [2.0**k for k in range(int(np.log2(top)) + 1)]
    for axis, scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
        scale("log", base=2)
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_minor_locator(NullLocator())
        axis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.set_xlim(*lims)
    ax.set_ylim(*lims)
    n_never = int((~np.isfinite(part["measured"].astype(float))).sum())
    title += f"; open, at {top:g}: {n_never} never exact" if n_never else ""
    finish_panel(ax, True, title, log=False, xlabel="theorem's threshold rank $R^*$",
                 ylabel="measured smallest exact rank", integer_x=False, legend=False)
    ax.legend(loc="lower right", fontsize=5.5, ncol=2)


def fig_threshold_law(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Beyond the paper: the smallest rank from which the construction is exact (median
    over seeds) against the theorems' threshold, FNN (ceil(D/floor(L/Lbar))) and TFN
    (ceil(D/2)) panels, one marker per (D, depth setting); on the diagonal the law holds."""
    p = choose_protocol(selected, "threshold_law", protocol)
    table = measured_thresholds(rows(selected, "threshold_law", p, "ours"))
    fig, axes = style.panels(1, 2)
    _threshold_panel(axes[0][0], table, "fnn", "ReLU FNN")
    _threshold_panel(axes[0][1], table, "tfn", "TFN ($H=2$, $N=10$)")
    style.suptitle(fig, f"The threshold law: smallest exact rank vs the theorem's [{p} protocol]",
                   f"Median over seeds of the smallest rank from which every tested rank is exact "
                   f"(test MSE / mean squared target output <= {EXACT_RTOL:g}); constructions only.")
    return style.save(fig, out_dir, "threshold_law")


LOW_RANK_WIDTHS = (8, 16, 32)


def fig_tfn_low_rank(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Beyond the paper: the transformer below its threshold. Relative test MSE against
    R / R* (R* = D/2), depth 1 and 2 by rows, D by columns: the construction, gradient
    LoRA, and gradient LoRA started from the construction; the dotted line is the
    attention products' SVD tail (theory.tfn_product_tail) scaled to the construction at
    the lowest rank, the FNN bound's shape."""
    p = choose_protocol(selected, "tfn_low_rank", protocol)
    fig, axes = style.panels(2, len(LOW_RANK_WIDTHS))
    for r, depth in enumerate((1, 2)):
        for c, width in enumerate(LOW_RANK_WIDTHS):
            ax, curves, drawn = axes[r][c], {}, False
            for name in ("ours", "sgd", "lora_from_construction"):
                df = below_threshold(rows(selected, "tfn_low_rank", p, name, checkpoint, width=width, target_depth=depth))
                curves[name] = curve(df, "r_over_rstar", "rel")
                key, override = style.method_series(name)
                drawn = draw_curve(ax, curves[name], key, log=True, **override) or drawn
            ours = below_threshold(rows(selected, "tfn_low_rank", p, "ours", width=width, target_depth=depth))
            tail = curve(ours.assign(tail=ours["attention_tail"].astype(float)) if "attention_tail" in ours else ours,
                         "r_over_rstar", "tail")
            if drawn and not tail.empty and not curves["ours"].empty and tail.median[0] > 0:
                scale = curves["ours"].median[0] / tail.median[0]
                ax.plot(tail.x, style.log_safe(tail.median * scale), **{k: v for k, v in style.SERIES["tail"].items()})
            finish_panel(ax, drawn, f"$D={width}$, $L={depth}$", log=True, xlabel="$R / R^*$",
                         ylabel="test MSE / mean squared target (log)", integer_x=False, legend=(r, c) == (0, 0),
                         note=excluded_note({"GD": curves["sgd"], "from construction": curves["lora_from_construction"]}))
    return _save(fig, out_dir, "tfn_low_rank", "The transformer below its threshold $R^*=D/2$", p, checkpoint)


def fig_tfn_prenorm(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Beyond the paper: gradient LoRA on transformers with pre-norm residual blocks and
    LayerNorm against the plain transformer, relative test MSE (the two models' outputs
    differ in scale) against the rank (log), depth 1 and 2; the construction is drawn for the plain transformer only (it does not cover
    residual blocks: not applicable)."""
    p = choose_protocol(selected, "tfn_prenorm", protocol)
    fig, axes = style.panels(1, 2)
    for ax, depth in zip(axes[0], (1, 2)):
        plain = dict(target_depth=depth, prenorm=0)
        relative = lambda df: df.assign(rel=relative_mse(df)) if not df.empty else df  # noqa: E731
        ours = relative(rows(selected, "tfn_prenorm", p, "ours", **plain))
        gd = relative(rows(selected, "tfn_prenorm", p, "sgd", checkpoint, **plain))
        pre = relative(rows(selected, "tfn_prenorm", p, "sgd", checkpoint, target_depth=depth, prenorm=1))
        c_gd, c_pre = curve(gd, "rank", "rel"), curve(pre, "rank", "rel")
        drawn = draw_curve(ax, curve(ours, "rank", "rel"), "construction", log=True,
                           label="Our construction (plain)")
        drawn = draw_curve(ax, c_gd, "gd", log=True, label="Gradient update (plain)") or drawn
        drawn = draw_curve(ax, c_pre, "prenorm", log=True) or drawn
        plateaus = {name: plateau_rank(c.as_series()) for name, c in (("plain", c_gd), ("pre-norm", c_pre)) if not c.empty}
        stops = ", ".join(f"{name} R={r}" for name, r in plateaus.items() if r is not None)
        note = "construction: not applicable to pre-norm blocks" + (f"\nGD stops falling at: {stops}" if stops else "")
        finish_panel(ax, drawn, f"$L={depth}$", log=True,
                     xlabel="rank $R$", ylabel="test MSE / mean squared target (log)",
                     thr=threshold(gd if ours.empty else ours), note=note)
    return _save(fig, out_dir, "tfn_prenorm", "Transformers with pre-norm residual blocks and LayerNorm", p, checkpoint)


# The methods experiment's panels: (title, filters), by column; random and pretrained by row.
METHOD_PANELS = (
    (r"FNN $\bar L=1$, $L=2$", dict(exp="fnn", target_depth=1, frozen_depth=2)),
    (r"FNN $\bar L=2$, $L=4$", dict(exp="fnn", target_depth=2, frozen_depth=4)),
    ("TFN $L=1$", dict(exp="tfn", target_depth=1)),
)


def method_curves(selected, experiment: str, protocol: str, checkpoint: str, **filters) -> dict[str, tuple[Curve, pd.DataFrame]]:
    """Every method's test MSE against its count of trainable parameters in one setting,
    in the order the methods first appear: {method: (median curve, its rows)}."""
    if selected is None or selected.empty or "method" not in selected:
        return {}
    names = selected.loc[selected["experiment"] == experiment, "method"].drop_duplicates()
    out = {}
    for name in names:
        df = rows(selected, experiment, protocol, name, checkpoint, **filters)
        c = curve(df, "n_trainable_params", "test_loss")
        if not c.empty:
            out[name] = (c, df)
    return out


def fig_methods(selected, out_dir, *, protocol=None, checkpoint=DEFAULT_CHECKPOINT) -> list[Path]:
    """Beyond the paper: every method's test MSE against its count of trainable parameters
    (log-log), FNN (1, 2), (2, 4) and TFN L=1 by columns, random and pretrained by rows;
    a vertical line at LoRA's count at the threshold rank R*."""
    p = choose_protocol(selected, "methods", protocol)
    fig, axes = style.panels(2, len(METHOD_PANELS))
    present = selected["method"].dropna().unique() if selected is not None and "method" in selected else []
    users = {name: i for i, name in enumerate(sorted(set(present) - set(style.METHOD_SERIES)))}
    for r, pre in enumerate((0, 1)):
        for c, (title, filters) in enumerate(METHOD_PANELS):
            ax = axes[r][c]
            curves = method_curves(selected, "methods", p, checkpoint, pretrained=pre, **filters)
            drawn = False
            for name, (cv, _) in curves.items():
                key, override = style.method_series(name, users.get(name, 0))
                drawn = draw_curve(ax, cv, key, log=True, **override) or drawn
            floor, clipped = _floor_at_trained(curves) if drawn else (None, "")
            if drawn:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: the minor labels collide
                _threshold_budget(ax, curves)
            finish_panel(ax, drawn, f"{title}, {style.FROZEN_LABEL[pre].lower()}", log=True,
                         xlabel="trainable parameters (incl. biases)", ylabel="test MSE (log)", integer_x=False,
                         note="; ".join(filter(None, [clipped, excluded_note({m: cv for m, (cv, _) in curves.items()})])),
                         legend=False)
            if floor is not None:
                ax.set_ylim(bottom=floor)
    # one legend for the six panels, beside them: inside a panel it covers the curves
    by_label = {label: handle for ax in (a for row in axes for a in row)
                for handle, label in zip(*ax.get_legend_handles_labels())}
    if by_label:
        fig.legend(list(by_label.values()), list(by_label), loc="outside right upper", fontsize=7)
    return _save(fig, out_dir, "methods", "Methods against their parameter budget", p, checkpoint)


def _floor_at_trained(curves: dict) -> tuple[Optional[float], str]:
    """Keep the trained methods readable: an exact construction (~1e-25) would squash them
    into one line at the top. (The axis' lower end, a decade below the lowest trained
    median, and a note saying how far the constructions go below it), or (None, "")."""
    trained = [cv.median for cv, df in curves.values() if not (df["checkpoint"] == "construction").all()]
    built = [cv.median for cv, df in curves.values() if (df["checkpoint"] == "construction").all()]
    positive = [v for m in trained for v in m if v > 0]
    if not positive or not built:
        return None, ""
    floor = min(positive) / 10
    below = [v for m in built for v in m if 0 <= v < floor]
    if not below:
        return None, ""
    return floor, f"construction below the axis at {len(below)} budgets (to {g(min(below))})"


def _threshold_budget(ax, curves: dict) -> None:
    """A vertical line at the parameter count of LoRA at R* (from LoRA's rows, or the
    construction's: the same count)."""
    for found in (curves.get("sgd"), curves.get("ours")):
        if found is not None:
            df = found[1]
            at = df.loc[df["rank"] == df["threshold_rank"], "n_trainable_params"]
            if not at.empty:
                ax.axvline(float(at.iloc[0]), label=f"LoRA at $R^*={int(df['threshold_rank'].iloc[0])}$",
                           **style.THRESHOLD)
                return


FIGURES: dict[str, Callable[..., list[Path]]] = {
    "linear": fig_linear,
    "fnn": fig_fnn,
    "fnn_log": fig_fnn_log,
    "tfn": fig_tfn,
    "flt": fig_flt,
    "bias": fig_bias,
    "rank_step": fig_rank_step,
    "classification": fig_classification,
    "distribution_shift": fig_distribution_shift,
    "depth": fig_depth,
    "generalization": fig_generalization,
    "training_curves": fig_training_curves,
    "uniform_sv": fig_uniform_sv,
    "threshold_law": fig_threshold_law,
    "methods": fig_methods,
    "tfn_low_rank": fig_tfn_low_rank,
    "tfn_prenorm": fig_tfn_prenorm,
}
FIGURE_NAMES: list[str] = list(FIGURES)


def write_all_figures(runs: Optional[pd.DataFrame], selected: Optional[pd.DataFrame], out_dir,
                      *, protocols: Optional[Sequence[str]] = None, checkpoint: str = DEFAULT_CHECKPOINT,
                      names: Optional[Sequence[str]] = None) -> list[Path]:
    """Every figure of FIGURE_NAMES as ``out_dir/<protocol>/<name>.png`` and ``.pdf``, under
    each of ``protocols``, or by default under each protocol that has rows for all the
    figure's experiments (catalog.figure_protocols); a figure none has rows for is drawn
    under the paper protocol, its panels saying "no data".

    ``runs`` is only used when ``selected`` is None (the selection is then made here)."""
    selected = ensure_selected(runs, selected)
    present = experiment_protocols(selected)
    paths: list[Path] = []
    for name in names or FIGURE_NAMES:
        for p in protocols or figure_protocols(name, present) or [DEFAULT_PROTOCOL]:
            paths.extend(FIGURES[name](selected, Path(out_dir) / p, protocol=p, checkpoint=checkpoint))
    return paths
