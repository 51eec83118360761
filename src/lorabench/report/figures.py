"""The paper's figures, drawn from the Parquet results alone (no training here).

Every figure is a function ``fig_<name>(selected, out_dir, *, protocol=None,
checkpoint="last") -> [png, pdf]`` that reads the selected rows (one per selection
group, lorabench.selection) and writes ``out_dir/<name>.png`` and ``.pdf``.

* Statistic: the paper's median over seeds, with the min-max band over seeds (which the
  paper's figures omit). Gradient runs are shown at ``checkpoint`` (default 'last', the
  final state, as the paper); constructions are the 'construction' rows.
* Diverged runs are never drawn as numbers: a seed whose every grid point diverged (NaN
  metrics, ``diverged``) is left out of the median and counted in a note, as are the
  diverged grid points the selection excluded (``n_excluded``).
* A panel without rows says "no data" instead of failing, so a partial run (smoke
  preset, one protocol) still gives every figure.
* Theory overlays: the linear optimum (1/D) sum_{i>RL} sigma_i(E)^2, computed per seed
  from the regenerated models (lorabench.generation, deterministic and cheap; never
  trained here), then the median over seeds; the threshold rank as a vertical line.
  For Lbar = 1 ReLU FNNs the same quantity bounds the construction's MSE (theory.py);
  the paper's bound for Lbar > 1 is not drawn (its constants are unverified).
* ``protocol=None`` draws the 'paper' protocol when it has rows, else 'reference'; the
  protocol is named in every title. comparison.py sets the two side by side.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from . import style
from ..core.config import PROTOCOLS, ConfigError, RunConfig

DEFAULT_PROTOCOL = "paper"
DEFAULT_CHECKPOINT = "last"
BAND = "minmax"  # or "iqr"
FOOTNOTE = "Median over seeds; band: min-max over seeds. Gradient update: grid point chosen by validation loss, final state ('{checkpoint}')."
FNN_PAIRS = ((1, 2), (2, 4))  # (Lbar, L)
CLASSIFICATION_TASKS = ("classification", "binary_classification")


# ------------------------------------------------------------------ selecting rows
def _has(df: pd.DataFrame, *columns: str) -> bool:
    return all(c in df.columns for c in columns)


def choose_protocol(selected: pd.DataFrame, experiment: str, protocol: Optional[str] = None) -> str:
    """The protocol to draw: ``protocol`` if given, else 'paper' if the experiment has
    rows under it, else the first protocol that has rows."""
    if protocol is not None:
        return protocol
    if _has(selected, "experiment", "protocol"):
        present = set(selected.loc[selected["experiment"] == experiment, "protocol"].dropna())
        for p in (DEFAULT_PROTOCOL,) + tuple(p for p in PROTOCOLS if p != DEFAULT_PROTOCOL):
            if p in present:
                return p
    return DEFAULT_PROTOCOL


def rows(
    selected: pd.DataFrame,
    experiment: str,
    protocol: str,
    method: str,
    checkpoint: str = DEFAULT_CHECKPOINT,
    **equal,
) -> pd.DataFrame:
    """Rows of one experiment, protocol and method; method 'ours' uses the construction
    rows, gradient methods the given checkpoint; ``equal`` filters further columns."""
    needed = ("experiment", "protocol", "method", "checkpoint") + tuple(equal)
    if selected is None or selected.empty or not _has(selected, *needed):
        return pd.DataFrame(columns=list(selected.columns) if selected is not None else [])
    mask = (
        (selected["experiment"] == experiment)
        & (selected["protocol"] == protocol)
        & (selected["method"] == method)
        & (selected["checkpoint"] == ("construction" if method == "ours" else checkpoint))
    )
    for column, value in equal.items():
        mask &= selected[column] == value
    return selected[mask]


def _one_per_seed(df: pd.DataFrame, x: str) -> pd.DataFrame:
    """One row per (x, seed): where a filter leaves several (settings the figure does not
    separate), keep the lowest validation loss, as the paper's notebooks do."""
    if df.duplicated([x, "seed"]).any():
        order = df.assign(_bad=df["diverged"].astype(bool), _val=df["val_loss"].astype(float))
        order = order.sort_values(["_bad", "_val"], na_position="last", kind="stable")
        df = order.drop_duplicates([x, "seed"]).drop(columns=["_bad", "_val"])
    return df


@dataclass
class Curve:
    """A median-over-seeds curve with its band, and what was left out of it."""

    x: np.ndarray = field(default_factory=lambda: np.array([]))
    median: np.ndarray = field(default_factory=lambda: np.array([]))
    low: np.ndarray = field(default_factory=lambda: np.array([]))
    high: np.ndarray = field(default_factory=lambda: np.array([]))
    n: np.ndarray = field(default_factory=lambda: np.array([], dtype=int))
    n_dropped: int = 0  # selected rows (seeds) not drawn: every grid point diverged, or a non-finite value
    n_grid_excluded: int = 0  # diverged grid points the selection excluded

    @property
    def empty(self) -> bool:
        return len(self.x) == 0

    def at(self, x) -> float:
        hit = np.nonzero(self.x == x)[0]
        return float(self.median[hit[0]]) if len(hit) else math.nan

    def as_series(self) -> pd.Series:
        return pd.Series(self.median, index=self.x)


def curve(df: pd.DataFrame, x: str, y: str, band: str = BAND) -> Curve:
    """Median over seeds of ``y`` at each value of ``x``, with the min-max (or IQR) band.
    Diverged rows and non-finite values are dropped and counted."""
    if df is None or df.empty or not _has(df, x, y, "seed"):
        return Curve()
    df = _one_per_seed(df, x)
    values = df[y].astype(float)
    diverged = df["diverged"].astype(bool) if "diverged" in df else pd.Series(False, index=df.index)
    ok = np.isfinite(values) & ~diverged
    grid_excluded = int(pd.to_numeric(df["n_excluded"], errors="coerce").fillna(0).sum()) if "n_excluded" in df else 0
    good = df.loc[ok].assign(_y=values[ok])
    if good.empty:
        return Curve(n_dropped=int((~ok).sum()), n_grid_excluded=grid_excluded)
    grouped = good.groupby(x)["_y"]
    med = grouped.median()
    if band == "iqr":
        low, high = grouped.quantile(0.25), grouped.quantile(0.75)
    else:
        low, high = grouped.min(), grouped.max()
    return Curve(
        x=med.index.to_numpy(), median=med.to_numpy(), low=low.to_numpy(), high=high.to_numpy(),
        n=grouped.size().to_numpy(), n_dropped=int((~ok).sum()), n_grid_excluded=grid_excluded,
    )


def median_by(df: pd.DataFrame, x: str = "rank", y: str = "test_loss") -> pd.Series:
    """The median-over-seeds curve as a Series indexed by ``x`` (claims use this)."""
    return curve(df, x, y).as_series()


def threshold(df: pd.DataFrame) -> Optional[int]:
    """The threshold rank of a panel's rows, if they agree on one."""
    if df is None or df.empty or "threshold_rank" not in df:
        return None
    values = pd.to_numeric(df["threshold_rank"], errors="coerce").dropna().unique()
    return int(values[0]) if len(values) == 1 else None


# ------------------------------------------------------------------ theory overlays
def config_of(row) -> RunConfig:
    """The RunConfig of a result row (a Series or dict with every config column)."""
    values = {}
    for name, spec in RunConfig.__dataclass_fields__.items():
        value = row[name]
        if name == "n_train":
            values[name] = None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
        elif isinstance(spec.default, str):
            values[name] = str(value)
        elif isinstance(spec.default, float):
            values[name] = float(value)
        else:
            values[name] = int(value)
    return RunConfig(**values)


def model_key(cfg: RunConfig) -> RunConfig:
    """The settings that define a seed's frozen and target models: adapter and optimiser
    settings are neutralised, so one generation serves every rank and grid point."""
    return cfg.replace(
        rank=1, rank_step=0, method="ours", lr=1e-3, weight_decay=0.0, tune_bias=1, last_layers=1,
        n_epochs=1, best_epoch=0, n_train=None,
    ).validated()


@functools.lru_cache(maxsize=512)
def _models(key: RunConfig):
    from ..core.generation import generate_models

    return generate_models(key)


@functools.lru_cache(maxsize=4096)
def _single_layer_optimum(key: RunConfig, rank: int) -> float:
    """(1/D) sum_{i > R L} sigma_i(E)^2 for a one-layer target: the linear optimum, and
    the bound on the Lbar = 1 ReLU construction (theory.py)."""
    from ..core import theory

    models = _models(key)
    return theory.linear_optimal_mse(models.frozen.weights.double(), models.target.weights[0].double(), rank)


@functools.lru_cache(maxsize=512)
def _target_scale(key: RunConfig) -> float:
    """Mean squared target output on the row's test inputs: the scale against which an
    MSE counts as exact."""
    import torch

    from ..core.models import FNN, fnn_forward, tfn_forward
    from ..core.protocols import protocol_of

    target = _models(key.replace(pretrained=0)).target
    x = protocol_of(key).eval_sets(key).test.double()
    with torch.no_grad():
        if isinstance(target, FNN):
            biases = None if target.biases is None else target.biases.double()
            y = fnn_forward(replace(target, weights=target.weights.double(), biases=biases), x)
        else:
            y = tfn_forward(replace(target, **{k: v.double() for k, v in target.tensors().items()}), x)
    return float((y**2).mean())


def theory_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per (seed, rank, pretrained, protocol) of ``df`` (one-layer targets): the linear
    optimum. Returns rows with those columns, value, diverged=False, ready for ``curve``."""
    columns = ["rank", "seed", "pretrained", "protocol", "value", "diverged", "val_loss"]
    out = []
    if df is None or df.empty:
        return pd.DataFrame(columns=columns)
    for _, row in df.drop_duplicates(["seed", "rank", "pretrained", "protocol"]).iterrows():
        key = model_key(config_of(row))
        if key.target_depth != 1:
            continue
        rank = int(row["rank"])
        out.append({"rank": rank, "seed": int(row["seed"]), "pretrained": int(row["pretrained"]), "protocol": row["protocol"],
                    "value": _single_layer_optimum(key, rank), "diverged": False, "val_loss": 0.0})
    return pd.DataFrame(out, columns=columns)


def relative_mse(df: pd.DataFrame, y: str = "test_loss") -> pd.Series:
    """MSE / mean squared target output, per row (the exactness measure)."""
    scale = [_target_scale(model_key(config_of(row))) for _, row in df.iterrows()]
    return df[y].astype(float) / np.asarray(scale, dtype=float)


# ------------------------------------------------------------------ drawing
def draw_curve(ax, c: Curve, key: str, *, log: bool = False, label: Optional[str] = None, band: bool = True, **override) -> bool:
    """Median line with markers and its band; returns False (nothing drawn) if empty."""
    if c.empty:
        return False
    st = style.series_style(key, **override)
    text = label or st.pop("label", key)
    st.pop("label", None)
    if c.n_dropped:
        text += f" ({c.n_dropped} diverged excl.)"
    fix = style.log_safe if log else np.asarray
    ax.plot(c.x, fix(c.median), label=text, **st)
    if band and len(c.x) and np.any(c.high > c.low):
        ax.fill_between(c.x, fix(c.low), fix(c.high), color=st.get("color"), alpha=style.BAND_ALPHA, linewidth=0)
    return True


def _theory_overlay(ax, source: pd.DataFrame, label: str, log: bool) -> Optional[Curve]:
    if source.empty:
        return None
    try:
        c = curve(theory_rows(source), "rank", "value")
    except (ConfigError, RuntimeError, ValueError) as error:
        style.note(ax, f"theory unavailable: {error}")
        return None
    if c.empty:
        return None
    style_ = dict(style.THEORY)
    style_.pop("label")
    fix = style.log_safe if log else np.asarray
    ax.plot(c.x, fix(c.median), label=label, **style_)
    return c


def excluded_note(curves: dict[str, Curve]) -> str:
    parts = [f"{name}: {c.n_grid_excluded} diverged grid pts excl." for name, c in curves.items() if c.n_grid_excluded]
    return "; ".join(parts)


def finish_panel(ax, drawn: bool, title: str, *, log: bool, xlabel: str, ylabel: str, thr: Optional[int] = None, note: str = "",
            legend: bool = True, integer_x: bool = True) -> None:
    ax.set_title(title)
    if not drawn:
        style.no_data(ax, title)
        return
    if log:
        ax.set_yscale("log")
    if integer_x:
        style.integer_ticks(ax)
    style.threshold_line(ax, thr)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    style.note(ax, note)
    if legend:
        style.legend(ax)


def _save(fig, out_dir, name: str, title: str, protocol: str, checkpoint: str, extra: str = "") -> list[Path]:
    foot = FOOTNOTE.format(checkpoint=checkpoint) + (f" {extra}" if extra else "")
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
        if p == "reference" and drawn:
            note = ("reference: step<0 increases the rank (authors' sign bug); " + note).strip("; ")
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
}
FIGURE_NAMES: list[str] = list(FIGURES)


def ensure_selected(runs: Optional[pd.DataFrame], selected: Optional[pd.DataFrame]) -> pd.DataFrame:
    """The selected rows: given, or selected from ``runs`` by validation loss."""
    if selected is not None:
        return selected
    from ..runs.selection import select_by_validation

    return select_by_validation(runs if runs is not None else pd.DataFrame())


def write_all_figures(runs: Optional[pd.DataFrame], selected: Optional[pd.DataFrame], out_dir,
                      *, protocol: Optional[str] = None, checkpoint: str = DEFAULT_CHECKPOINT,
                      names: Optional[Sequence[str]] = None) -> list[Path]:
    """Every figure of FIGURE_NAMES as ``out_dir/<name>.png`` and ``.pdf``.

    ``runs`` is only used when ``selected`` is None (the selection is then made here)."""
    selected = ensure_selected(runs, selected)
    paths: list[Path] = []
    for name in names or FIGURE_NAMES:
        paths.extend(FIGURES[name](selected, out_dir, protocol=protocol, checkpoint=checkpoint))
    return paths


# ------------------------------------------------------------------ command line
def read_inputs(runs_path, selected_path) -> tuple[Optional[pd.DataFrame], pd.DataFrame]:
    """runs.parquet (optional) and selected.parquet (made from the runs when not given)."""
    from ..runs.results import SELECTED_SCHEMA, read_rows

    runs = read_rows(runs_path) if runs_path else None
    selected = read_rows(selected_path, SELECTED_SCHEMA) if selected_path else None
    if runs is None and selected is None:
        from ..runs.results import ResultsError

        raise ResultsError("give --runs, --selected or both")
    return runs, ensure_selected(runs, selected)


def figures_command(args) -> int:
    """``lorabench figures``: every figure into --out; the protocol comparison too when
    --comparison_out names its folder."""
    runs, selected = read_inputs(args.runs, args.selected)
    paths = write_all_figures(runs, selected, args.out, protocol=args.protocol, checkpoint=args.checkpoint)
    if args.comparison_out:
        from .comparison import write_protocol_comparison

        paths += write_protocol_comparison(selected, args.comparison_out, checkpoint=args.checkpoint)
    for path in paths:
        print(path)
    return 0
