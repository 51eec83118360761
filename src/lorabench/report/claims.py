"""The paper's checkable claims, each measured on the selected results: pass, fail or not run.

Each claim is a small function of a ``View`` (the selected rows of one protocol, gradient
runs at one checkpoint) returning ``(status, measured)``: the numbers it measured, as
text, and whether they meet the claim. Nothing is hard-coded: a claim whose rows are
absent is 'not run'. Statistic as in the figures: the median over seeds.

Tolerances (module constants, stated in claims.md):
* exact: median over seeds of MSE / mean squared target output <= EXACT_RTOL;
* SVD optimum: median relative gap between construction and optimum <= OPTIMUM_RTOL
  (the test set is finite: 5,000 samples give ~1% sampling error);
* bound: construction <= (1 + BOUND_SLACK) x bound for every seed and rank;
* generalization gap: median test / median train >= GAP_FACTOR above the threshold;
* methods: one method at or below another means median test MSE <= (1 + METHODS_RTOL)
  times the other's, at each compared point (equal rank, or equal parameter count).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import pandas as pd

from . import analysis, style
from .analysis import ERROR, EXACT_RTOL, FAIL, NOT_RUN, PASS
from .style import g, markdown_table

OPTIMUM_RTOL = 0.05
GD_MATCH_RTOL = 0.10
BOUND_SLACK = 0.05
GAP_FACTOR = 10.0
METHODS_RTOL = 0.05
CLASSIFICATION_EXACT = 0.99
FROZEN = {0: "random", 1: "pretrained"}
COLUMNS = ["id", "claim", "source", "protocol", "status", "measured"]


class View:
    """The selected rows of one protocol; gradient runs at ``checkpoint``."""

    def __init__(self, selected: pd.DataFrame, protocol: str, checkpoint: str = analysis.DEFAULT_CHECKPOINT):
        self.selected, self.protocol, self.checkpoint = selected, protocol, checkpoint

    def rows(self, experiment: str, method: str, **equal) -> pd.DataFrame:
        return analysis.rows(self.selected, experiment, self.protocol, method, self.checkpoint, **equal)

    def median(self, experiment: str, method: str, *, x: str = "rank", y: str = "test_loss", **equal) -> pd.Series:
        return analysis.median_by(self.rows(experiment, method, **equal), x, y)


def _finite(df: pd.DataFrame, y: str = "test_loss") -> pd.DataFrame:
    if df.empty:
        return df
    values = df[y].astype(float)
    return df[np.isfinite(values) & ~df["diverged"].astype(bool)]


def _verdict(ok: Iterable[bool]) -> str:
    ok = list(ok)
    if not ok:
        return NOT_RUN
    return PASS if all(ok) else FAIL


# ------------------------------------------------------------------ claims
def linear_optimum(v: View):
    ours = _finite(v.rows("linear", "ours"))
    if ours.empty:
        return NOT_RUN, "no linear construction rows"
    below = ours[ours["rank"] < ours["threshold_rank"]]
    theory = analysis.theory_rows(below)
    merged = below.merge(theory, on=["seed", "rank", "pretrained", "protocol"])
    merged = merged[merged["value"] > 0]
    if merged.empty:
        return NOT_RUN, "no rank below the threshold"
    gap = (merged["test_loss"].astype(float) - merged["value"]).abs() / merged["value"]
    parts = [f"{FROZEN.get(int(k), k)}: median {g(gap[merged['pretrained'] == k].median())}, max {g(gap[merged['pretrained'] == k].max())}"
             for k in sorted(merged["pretrained"].unique())]
    med = float(gap.median())
    return (PASS if med <= OPTIMUM_RTOL else FAIL), f"relative gap to optimum over seeds x ranks < R*: {'; '.join(parts)} (tol {OPTIMUM_RTOL:g})"


def _exact(experiment: str, **filters):
    def check(v: View):
        ours = _finite(v.rows(experiment, "ours", **filters))
        thr = analysis.threshold(ours)
        if ours.empty or thr is None:
            return NOT_RUN, "no construction rows"
        above = ours[ours["rank"] >= thr]
        if above.empty:
            return NOT_RUN, f"no rank >= R*={thr}"
        above = above.assign(rel=analysis.relative_mse(above).to_numpy())
        med = above.groupby(["pretrained", "rank"])["rel"].median()
        worst_key = med.idxmax()
        at = above[above["rank"] == thr].groupby("pretrained")["test_loss"].median()
        at_text = ", ".join(f"{FROZEN.get(int(k), k)} {g(val)}" for k, val in at.items())
        text = (f"R*={thr}; worst median relative MSE at R>=R*: {g(med.max())} ({FROZEN.get(int(worst_key[0]), worst_key[0])}, "
                f"R={int(worst_key[1])}); median MSE at R*: {at_text} (tol {EXACT_RTOL:g})")
        return (PASS if med.max() <= EXACT_RTOL else FAIL), text
    return check


def _bound(experiment: str, **filters):
    def check(v: View):
        ours = _finite(v.rows(experiment, "ours", **filters))
        if ours.empty:
            return NOT_RUN, "no construction rows"
        below = ours[ours["rank"] < ours["threshold_rank"]]
        merged = below.merge(analysis.theory_rows(below), on=["seed", "rank", "pretrained", "protocol"])
        merged = merged[merged["value"] > 0]
        if merged.empty:
            return NOT_RUN, "no rank below the threshold"
        ratio = merged["test_loss"].astype(float) / merged["value"]
        ok = bool((ratio <= 1 + BOUND_SLACK).all())
        return (PASS if ok else FAIL), (f"construction / bound over {len(ratio)} seed x rank points: median {g(ratio.median())}, "
                                        f"max {g(ratio.max())} (allowed {1 + BOUND_SLACK:g})")
    return check


def linear_gd_matches(v: View):
    parts, ok = [], []
    for pre in (0, 1):
        ours, gd = v.median("linear", "ours", pretrained=pre), v.median("linear", "sgd", pretrained=pre)
        thr = analysis.threshold(v.rows("linear", "ours", pretrained=pre))
        common = [r for r in ours.index.intersection(gd.index) if thr is not None and r < thr and ours[r] > 0]
        if not common:
            continue
        gap = pd.Series({r: abs(gd[r] - ours[r]) / ours[r] for r in common})
        ok.append(bool(gap.max() <= GD_MATCH_RTOL))
        parts.append(f"{FROZEN[pre]}: max relative gap {g(gap.max())} (R={int(gap.idxmax())})")
    if not ok:
        return NOT_RUN, "no linear GD and construction rows below the threshold"
    return _verdict(ok), "; ".join(parts) + f" (tol {GD_MATCH_RTOL:g})"


def gd_beats_construction_low_rank(v: View):
    parts, ok = [], []
    for pre in (0, 1):
        f = dict(target_depth=2, frozen_depth=4, pretrained=pre)
        ours, gd = v.median("fnn", "ours", **f), v.median("fnn", "sgd", tune_bias=1, **f)
        if 1 in ours.index and 1 in gd.index:
            ok.append(bool(gd[1] < ours[1]))
            parts.append(f"{FROZEN[pre]} R=1: GD {g(gd[1])} vs construction {g(ours[1])}")
    return _verdict(ok), "; ".join(parts) or "no FNN (2,4) rows at rank 1"


GD_SETTINGS = (
    ("FNN (1,2)", "fnn", dict(target_depth=1, frozen_depth=2, tune_bias=1)),
    ("FNN (2,4)", "fnn", dict(target_depth=2, frozen_depth=4, tune_bias=1)),
    ("TFN L=1", "tfn", dict(target_depth=1)),
    ("TFN L=2", "tfn", dict(target_depth=2)),
)


def gd_not_exact(v: View):
    parts, ok = [], []
    for label, experiment, f in GD_SETTINGS:
        for pre in (0, 1):
            gd = _finite(v.rows(experiment, "sgd", pretrained=pre, **f))
            thr = analysis.threshold(gd)
            above = gd[gd["rank"] >= thr] if thr is not None else gd.iloc[0:0]
            if above.empty:
                continue
            rel = above.assign(rel=analysis.relative_mse(above).to_numpy()).groupby("rank")["rel"].median()
            ok.append(bool(rel.min() > EXACT_RTOL))
            parts.append(f"{label} {FROZEN[pre]}: {g(rel.min())}")
    if not ok:
        return NOT_RUN, "no gradient rows at or above the threshold"
    return _verdict(ok), "smallest median relative MSE at R>=R*: " + "; ".join(parts) + f" (exact means <= {EXACT_RTOL:g})"


def lora_beats_flt(v: View):
    parts, ok = [], []
    for pre in (0, 1):
        lora = v.median("flt", "sgd", x="n_trainable_params", pretrained=pre, tune_bias=1)
        flt = v.median("flt", "flt", x="n_trainable_params", pretrained=pre)
        if lora.empty or flt.empty:
            continue
        wins, total, example = 0, 0, ""
        for params, flt_mse in flt.items():
            cheaper = lora[lora.index <= params]
            if cheaper.empty:
                continue
            lora_mse = cheaper.iloc[-1]  # the LoRA run with the most parameters not above FLT's
            total += 1
            wins += bool(lora_mse < flt_mse)
            if not example:
                example = f", e.g. LoRA {int(cheaper.index[-1])} params {g(lora_mse)} vs FLT {int(params)} params {g(flt_mse)}"
        if total:
            ok.append(wins == total)
            parts.append(f"{FROZEN[pre]}: LoRA lower at {wins}/{total} FLT sizes{example}")
    if not ok:
        return NOT_RUN, "no comparable LoRA and FLT rows"
    return _verdict(ok), "; ".join(parts) + " (LoRA with at most as many tunable parameters)"


def bias_helps(v: View):
    parts, ok = [], []
    for pre in (0, 1):
        fixed, free = v.median("bias", "sgd", pretrained=pre, tune_bias=0), v.median("bias", "sgd", pretrained=pre, tune_bias=1)
        thr = analysis.threshold(v.rows("bias", "sgd", pretrained=pre))
        low = [r for r in fixed.index.intersection(free.index) if thr is None or r < thr]
        if not low:
            continue
        better = sum(bool(free[r] < fixed[r]) for r in low)
        ok.append(better == len(low))
        r0 = min(low)
        parts.append(f"{FROZEN[pre]}: updatable lower at {better}/{len(low)} ranks < R*; R={r0}: {g(free[r0])} vs fixed {g(fixed[r0])}")
    return _verdict(ok), "; ".join(parts) or "no bias rows"


def pretrained_lower(v: View):
    parts, ok = [], []
    for label, experiment, f in (("linear", "linear", {}), ("FNN (1,2)", "fnn", dict(target_depth=1, frozen_depth=2)),
                                 ("FNN (2,4)", "fnn", dict(target_depth=2, frozen_depth=4))):
        rand, pre = v.median(experiment, "ours", pretrained=0, **f), v.median(experiment, "ours", pretrained=1, **f)
        if 1 in rand.index and 1 in pre.index:
            ok.append(bool(pre[1] < rand[1]))
            parts.append(f"{label}: pretrained {g(pre[1])} vs random {g(rand[1])}")
    return _verdict(ok), ("construction MSE at R=1: " + "; ".join(parts)) if parts else "no random and pretrained construction rows"


def _classification_settings(v: View):
    for task in analysis.CLASSIFICATION_TASKS:
        for lbar, depth in analysis.FNN_PAIRS:
            yield f"{task.replace('_classification', '')} ({lbar},{depth})", dict(task=task, target_depth=lbar, frozen_depth=depth)


def shift_lowers_accuracy(v: View):
    parts, ok = [], []
    for label, f in _classification_settings(v):
        gd = v.rows("classification", "sgd", **f)
        gd = gd[np.isfinite(gd["test_accuracy"].astype(float)) & np.isfinite(gd["test_shift_accuracy"].astype(float))] if not gd.empty else gd
        if gd.empty:
            continue
        acc, shift = gd["test_accuracy"].astype(float).median(), gd["test_shift_accuracy"].astype(float).median()
        ok.append(bool(shift < acc))
        parts.append(f"{label}: {g(acc)} -> {g(shift)}")
    return _verdict(ok), ("GD median accuracy over ranks x seeds, in distribution -> shifted: " + "; ".join(parts)) if parts else "no classification rows"


def classification_construction_exact(v: View):
    parts, ok = [], []
    for label, f in _classification_settings(v):
        ours = v.rows("classification", "ours", **f)
        thr = analysis.threshold(ours)
        acc = analysis.median_by(ours[ours["rank"] >= thr], "rank", "test_accuracy") if thr is not None else pd.Series(dtype=float)
        if acc.empty:
            continue
        ok.append(bool(acc.min() >= CLASSIFICATION_EXACT))
        parts.append(f"{label}: {g(acc.min())}")
    return _verdict(ok), ("lowest median construction accuracy at R>=R*: " + "; ".join(parts) + f" (need >= {CLASSIFICATION_EXACT:g})") if parts else "no classification construction rows"


def generalization_gap(v: View):
    parts, ok = [], []
    for lbar, depth in analysis.FNN_PAIRS:
        gd = v.rows("generalization", "sgd", target_depth=lbar, frozen_depth=depth)
        thr = analysis.threshold(gd)
        if gd.empty or thr is None:
            continue
        above = gd[gd["rank"] >= thr]
        train, test = analysis.median_by(above, "rank", "train_loss"), analysis.median_by(above, "rank", "test_loss")
        common = train.index.intersection(test.index)
        if not len(common):
            continue
        ratio = (test[common] / train[common]).min()
        parts.append(f"({lbar},{depth}): min test/train {g(ratio)} at R>=R*")
        if (lbar, depth) == (1, 2):
            ok.append(bool(ratio >= GAP_FACTOR))
    return _verdict(ok), ("; ".join(parts) + f" (claim on (1,2): >= {GAP_FACTOR:g})") if parts else "no generalization rows"


def depth_lowers_rank(v: View):
    gd = v.rows("depth", "sgd")
    if gd.empty:
        return NOT_RUN, "no depth rows"
    depths = sorted(int(d) for d in gd["frozen_depth"].unique())
    if len(depths) < 2:
        return NOT_RUN, "one frozen depth only"
    rank = analysis.threshold(gd[gd["frozen_depth"] == depths[-1]])
    med = {d: analysis.median_by(gd[gd["frozen_depth"] == d]).get(rank, math.nan) for d in depths}
    if any(math.isnan(med[d]) for d in (depths[0], depths[-1])):
        return NOT_RUN, f"rank {rank} missing"
    text = f"GD median MSE at R={rank} (threshold of L={depths[-1]}): " + ", ".join(f"L={d}: {g(m)}" for d, m in med.items())
    return (PASS if med[depths[-1]] < med[depths[0]] else FAIL), text


def setting_label(row) -> str:
    """'FNN D=16 (2,4)' or 'TFN D=16 L=2': one threshold-law setting."""
    if row["exp"] == "tfn":
        return f"TFN D={int(row['width'])} L={int(row['target_depth'])}"
    return f"FNN D={int(row['width'])} ({int(row['target_depth'])},{int(row['frozen_depth'])})"


def threshold_law(v: View):
    # every row, diverged ones included: a diverged construction is not exact (not absent)
    table = analysis.measured_thresholds(v.rows("threshold_law", "ours"))
    if table.empty:
        return NOT_RUN, "no threshold_law construction rows"
    ok = table["measured"] <= table["predicted"]
    equal, below = int((table["measured"] == table["predicted"]).sum()), int((table["measured"] < table["predicted"]).sum())
    failing = [f"{setting_label(r)}: {g(r['measured']) if math.isfinite(r['measured']) else 'never exact'} vs R*={int(r['predicted'])}"
               for _, r in table[~ok].iterrows()]
    text = (f"{int(ok.sum())}/{len(table)} settings exact from R* on (median over seeds of the smallest rank from which "
            f"every tested rank is exact); measured = R* in {equal}, < R* in {below}")
    if failing:  # the first few; the figure shows them all
        text += "; not: " + ", ".join(failing[:6]) + (f" and {len(failing) - 6} more" if len(failing) > 6 else "")
    return (PASS if ok.all() else FAIL), text + f" (tol {EXACT_RTOL:g})"


# ----------------------------------------------------------- the methods experiment
METHOD_SETTINGS = (("FNN (1,2)", dict(exp="fnn", target_depth=1, frozen_depth=2)),
                   ("FNN (2,4)", dict(exp="fnn", target_depth=2, frozen_depth=4)),
                   ("TFN L=1", dict(exp="tfn", target_depth=1)))


def _method_settings():
    for label, filters in METHOD_SETTINGS:
        for pre in (0, 1):
            yield f"{label} {FROZEN[pre]}", dict(filters, pretrained=pre)


def full_at_or_below_adapters(v: View):
    """Full fine-tuning's median test MSE against every gradient adapter's best budget."""
    parts, ok = [], []
    trained = v.rows("methods", "full").iloc[:0]  # the columns, for an empty selection
    if {"experiment", "checkpoint", "method"} <= set(v.selected.columns):
        trained = v.selected[(v.selected["experiment"] == "methods") & (v.selected["checkpoint"] != "construction")]
    adapters = [m for m in trained["method"].drop_duplicates() if m != "full"] if "method" in trained else []
    for label, f in _method_settings():
        full = v.median("methods", "full", x="n_trainable_params", **f)
        if full.empty:
            continue
        best = {m: v.median("methods", m, x="n_trainable_params", **f) for m in adapters}
        best = {m: float(c.min()) for m, c in best.items() if not c.empty}
        if not best:
            continue
        lowest = min(best, key=best.get)
        value = float(full.iloc[0])
        ok.append(value <= (1 + METHODS_RTOL) * best[lowest])
        parts.append(f"{label}: full {g(value)} vs best adapter {lowest} {g(best[lowest])}")
    if not ok:
        return NOT_RUN, "no full fine-tuning and adapter rows in the methods experiment"
    return _verdict(ok), f"{sum(ok)}/{len(ok)} settings; " + "; ".join(parts) + f" (tol {METHODS_RTOL:g})"


def _at_or_below_lora_at_equal_rank(method: str):
    def check(v: View):
        points, worst = [], None
        for label, f in _method_settings():
            mine, lora = v.median("methods", method, **f), v.median("methods", "sgd", **f)
            for rank in mine.index.intersection(lora.index):
                ratio = mine[rank] / lora[rank] if lora[rank] > 0 else math.inf
                points.append(ratio <= 1 + METHODS_RTOL)
                if worst is None or ratio > worst[0]:
                    worst = (ratio, label, int(rank))
        if not points:
            return NOT_RUN, f"no {method} and LoRA rows at a common rank in the methods experiment"
        text = (f"{sum(points)}/{len(points)} (setting, rank) points at or below LoRA; largest {method}/LoRA "
                f"ratio {g(worst[0])} ({worst[1]}, R={worst[2]}) (tol {METHODS_RTOL:g})")
        return _verdict(points), text
    return check


def vera_vs_lora_equal_parameters(v: View):
    """VeRA against LoRA where their parameter counts are equal (VeRA at R = D has 2D per
    matrix, LoRA's count at R = 1)."""
    parts, points = [], []
    for label, f in _method_settings():
        vera = v.median("methods", "vera", x="n_trainable_params", **f)
        lora = v.median("methods", "sgd", x="n_trainable_params", **f)
        for count in vera.index.intersection(lora.index):
            points.append(vera[count] <= (1 + METHODS_RTOL) * lora[count])
            parts.append(f"{label} at {int(count)} parameters: VeRA {g(vera[count])}, LoRA {g(lora[count])}")
    if not points:
        return NOT_RUN, "no VeRA and LoRA rows with equal parameter counts in the methods experiment"
    return _verdict(points), f"{sum(points)}/{len(points)} points; " + "; ".join(parts) + f" (tol {METHODS_RTOL:g})"


# ------------------------------------------------------- the transformer's open questions
TAIL_FACTOR = 10.0  # the construction's error and the scaled tail agree within this factor


def _low_rank_settings(v: View):
    rows = v.rows("tfn_low_rank", "ours")
    if rows.empty:
        return []
    return sorted({(int(w), int(d)) for w, d in zip(rows["width"], rows["target_depth"])})


def low_rank_start_from_construction(v: View):
    """Below R*, LoRA started from the construction against the construction and LoRA's
    default start, at each (D, depth, R < R*)."""
    points, worst = [], None
    for width, depth in _low_rank_settings(v):
        f = dict(width=width, target_depth=depth)
        ours, gd = v.median("tfn_low_rank", "ours", **f), v.median("tfn_low_rank", "sgd", **f)
        start = v.median("tfn_low_rank", "lora_from_construction", **f)
        thr = width // 2
        for rank in start.index.intersection(ours.index).intersection(gd.index):
            if rank >= thr:
                continue
            best_other = min(ours[rank], gd[rank])
            ratio = start[rank] / best_other if best_other > 0 else math.inf
            points.append(ratio <= 1 + METHODS_RTOL)
            if worst is None or ratio > worst[0]:
                worst = (ratio, width, depth, int(rank))
    if not points:
        return NOT_RUN, "no tfn_low_rank rows of the three methods below R*"
    return _verdict(points), (f"{sum(points)}/{len(points)} (D, L, R < R*) points where LoRA from the construction is at "
                              f"or below both; largest ratio to the better of the two {g(worst[0])} (D={worst[1]}, "
                              f"L={worst[2]}, R={worst[3]}) (tol {METHODS_RTOL:g})")


def low_rank_tail_shape(v: View):
    """The construction's relative error below R* against the attention products' SVD
    tail, both normalised at the lowest rank: the largest factor between the two."""
    parts, ok = [], []
    for width, depth in _low_rank_settings(v):
        ours = _finite(v.rows("tfn_low_rank", "ours", width=width, target_depth=depth))
        ours = ours[ours["rank"] < ours["threshold_rank"]]
        if ours.empty or "attention_tail" not in ours:
            continue
        mse = analysis.median_by(ours, "rank", "test_loss")
        tail = analysis.median_by(ours.assign(tail=ours["attention_tail"].astype(float)), "rank", "tail")
        common = mse.index.intersection(tail.index)
        if len(common) < 2 or mse[common[0]] <= 0 or tail[common[0]] <= 0:
            continue
        shape = (mse[common] / mse[common[0]]) / (tail[common] / tail[common[0]])
        factor = float(np.exp(np.abs(np.log(shape.astype(float).clip(lower=1e-300))).max()))
        ok.append(factor <= TAIL_FACTOR)
        parts.append(f"D={width} L={depth}: {g(factor)}")
    if not ok:
        return NOT_RUN, "no tfn_low_rank construction rows with their attention tail below R*"
    return _verdict(ok), ("largest factor between the construction's error and the attention-product tail, both "
                          f"relative to R=1, over R < R*: {'; '.join(parts)} (within {TAIL_FACTOR:g})")


def prenorm_threshold(v: View):
    """Where gradient LoRA's error stops falling with pre-norm blocks, against the plain
    transformer's R* = D/2 (and the plain model's own plateau)."""
    parts, ok = [], []
    for depth in (1, 2):
        pre_rows = v.rows("tfn_prenorm", "sgd", target_depth=depth, prenorm=1)
        if pre_rows.empty:
            continue
        pre = analysis.median_by(pre_rows.assign(rel=analysis.relative_mse(pre_rows)), "rank", "rel")
        plain_rows = v.rows("tfn_prenorm", "sgd", target_depth=depth, prenorm=0)
        plain = analysis.median_by(plain_rows.assign(rel=analysis.relative_mse(plain_rows)), "rank", "rel") \
            if not plain_rows.empty else pd.Series(dtype=float)
        thr = analysis.threshold(pre_rows)
        at = analysis.plateau_rank(pre)
        ok.append(at is not None and thr is not None and at <= thr)
        plain_at = analysis.plateau_rank(plain) if not plain.empty else None
        parts.append(f"L={depth}: pre-norm stops falling at R={at}, plain at R={plain_at}, R*={thr}; "
                     f"lowest median relative MSE pre-norm {g(float(pre.min()))}, "
                     f"plain {g(float(plain.min())) if not plain.empty else 'nan'}")
    if not ok:
        return NOT_RUN, "no tfn_prenorm rows"
    return _verdict(ok), "; ".join(parts) + f" (stops falling: within {analysis.PLATEAU_FACTOR:g}x of the lowest median)"


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    source: str
    check: Callable[[View], tuple[str, str]]


CLAIMS: list[Claim] = [
    Claim("linear_optimum", "Linear model: the construction attains the SVD optimum (1/D) sum_{i>RL} sigma_i(E)^2 below the threshold",
          "Lemma 1; Fig. linear", linear_optimum),
    Claim("linear_exact", "Linear model: the construction is exact for R >= ceil(D*Lbar/L)", "Lemma 1", _exact("linear")),
    Claim("linear_gd_matches", "Linear model: gradient update matches the construction below the threshold", "Fig. linear",
          linear_gd_matches),
    Claim("fnn_exact_1_2", "FNN Lbar=1, L=2: the construction is exact for R >= ceil(D*Lbar/L)", "FNN theorem; Fig. fnn",
          _exact("fnn", target_depth=1, frozen_depth=2)),
    Claim("fnn_exact_2_4", "FNN Lbar=2, L=4: the construction is exact for R >= ceil(D*Lbar/L)", "FNN theorem; Fig. fnn",
          _exact("fnn", target_depth=2, frozen_depth=4)),
    Claim("fnn_bound_1_2", "FNN Lbar=1, L=2: construction MSE below the linear-part bound (1/D) sum_{i>RL} sigma_i(E)^2",
          "theory.fnn_single_layer_mse_bound", _bound("fnn", target_depth=1, frozen_depth=2)),
    Claim("tfn_exact_1", "TFN L=1: the construction is exact for R >= D/2", "TFN theorem; Fig. tfn", _exact("tfn", target_depth=1)),
    Claim("tfn_exact_2", "TFN L=2: the construction is exact for R >= D/2", "TFN theorem; Fig. tfn", _exact("tfn", target_depth=2)),
    Claim("gd_beats_construction_low_rank", "FNN Lbar=2, L=4: gradient update beats the construction at R=1 (below threshold)",
          "Fig. fnn (figure2)", gd_beats_construction_low_rank),
    Claim("gd_not_exact", "Gradient update is never exact at or above the threshold (the optimizer is suboptimal)",
          "Table 1 finding 6", gd_not_exact),
    Claim("lora_beats_flt", "LoRA beats final-layer tuning at equal (or fewer) tunable parameters", "Table 1 finding 3; Fig. flt",
          lora_beats_flt),
    Claim("bias_helps", "Updatable biases beat fixed biases at every rank below the threshold", "Table 1 finding 4; Fig. bias",
          bias_helps),
    Claim("pretrained_lower", "A pretrained (closer) frozen model needs a lower rank: lower construction error at R=1",
          "Table 1 finding 2", pretrained_lower),
    Claim("shift_lowers_accuracy", "Distribution shift (x ~ N(0, 25 I)) lowers the gradient update's accuracy",
          "Fig. distribution_shift", shift_lowers_accuracy),
    Claim("classification_exact", "Classification: the construction reaches accuracy 1 for R >= threshold",
          "Fig. classification", classification_construction_exact),
    Claim("generalization_gap", "Finite training set, Lbar=1, L=2: train MSE far below test MSE above the threshold (overfitting)",
          "Fig. generalization", generalization_gap),
    Claim("depth_lowers_rank", "A deeper frozen model reaches a lower error at a small rank (threshold ceil(D/L))",
          "lorabench depth sweep; Table 1 finding 1 (synthetic analogue)", depth_lowers_rank),
    Claim("threshold_law", "The construction is exact from the theorem's threshold rank on, for every width and depth tested "
          "(FNN: ceil(D/floor(L/Lbar)); TFN: ceil(D/2))", "FNN and TFN theorems (Sec. 4, 5); beyond the paper: D = 8..64",
          threshold_law),
    Claim("uniform_sv_bound", "Uniform singular values: construction MSE below s^2 (D-RL)_+/D", "uniform_sv", _bound("uniform_sv")),
    Claim("methods_full_lowest", "Full fine-tuning of the adapted matrices is at or below every gradient adapter's best budget",
          "beyond the paper: methods experiment", full_at_or_below_adapters),
    Claim("methods_dora_vs_lora", "DoRA is at or below LoRA at equal rank",
          "beyond the paper: methods experiment (Liu et al., 2024)", _at_or_below_lora_at_equal_rank("dora")),
    Claim("methods_vera_vs_lora", "VeRA is at or below LoRA at equal parameter counts",
          "beyond the paper: methods experiment (Kopiczko et al., 2024)", vera_vs_lora_equal_parameters),
    Claim("methods_pissa_vs_lora", "PiSSA's initialisation is at or below LoRA's default initialisation at equal rank",
          "beyond the paper: methods experiment (Meng et al., 2024)", _at_or_below_lora_at_equal_rank("pissa")),
    Claim("tfn_low_rank_start", "Below the transformer's threshold, gradient LoRA started from the construction ends at "
          "or below both the construction and gradient LoRA from its default start",
          "beyond the paper: open question of Sec. 5 (no bound below R*)", low_rank_start_from_construction),
    Claim("tfn_low_rank_tail", "Below the transformer's threshold, the construction's error falls with R as the FNN bound's "
          "form (1/D) sum_{i>2R} sigma_i(E)^2 on the attention products does (within a factor 10)",
          "beyond the paper: open question of Sec. 5", low_rank_tail_shape),
    Claim("tfn_prenorm_threshold", "With pre-norm residual blocks and LayerNorm, gradient LoRA's error stops falling at or "
          "below the plain transformer's threshold R* = D/2",
          "beyond the paper: open question of Sec. 5 (no skip connections or LayerNorm)", prenorm_threshold),
]


@dataclass(frozen=True)
class ClaimResult:
    id: str
    claim: str
    source: str
    protocol: str
    status: str
    measured: str


def evaluate(selected: pd.DataFrame, protocol: str, checkpoint: str = analysis.DEFAULT_CHECKPOINT,
             claims: Optional[list[Claim]] = None) -> list[ClaimResult]:
    """Every claim on the rows of one protocol. A claim that raises is reported as
    'error' with the message, so one broken claim does not hide the others."""
    view = View(selected, protocol, checkpoint)
    out = []
    for claim in claims or CLAIMS:
        try:
            status, measured = claim.check(view)
        except Exception as error:  # noqa: BLE001 - reported in the table
            status, measured = ERROR, f"{type(error).__name__}: {error}"
        out.append(ClaimResult(claim.id, claim.text, claim.source, protocol, status, measured))
    return out


def claims_frame(selected: pd.DataFrame, protocols: Optional[Iterable[str]] = None,
                 checkpoint: str = analysis.DEFAULT_CHECKPOINT) -> pd.DataFrame:
    """One row per (claim, protocol)."""
    results = [asdict(r) for p in (protocols or analysis.present_protocols(selected)) for r in evaluate(selected, p, checkpoint)]
    return pd.DataFrame(results, columns=COLUMNS)


def tolerances_text() -> str:
    return (f"Tolerances: exact = median over seeds of MSE / mean squared target output <= {EXACT_RTOL:g}; "
            f"SVD optimum: median relative gap <= {OPTIMUM_RTOL:g}; linear GD vs construction: relative gap <= {GD_MATCH_RTOL:g}; "
            f"bound: construction <= {1 + BOUND_SLACK:g} x bound; generalization gap: test/train >= {GAP_FACTOR:g}; "
            f"classification exact: accuracy >= {CLASSIFICATION_EXACT:g}; methods: at or below = median test MSE "
            f"<= {1 + METHODS_RTOL:g} x the other's; low-rank tail: within {TAIL_FACTOR:g}x; "
            f"'stops falling': within {analysis.PLATEAU_FACTOR:g}x of the lowest median.")


def write_claims(runs: Optional[pd.DataFrame], selected: Optional[pd.DataFrame], out_dir,
                 *, checkpoint: str = analysis.DEFAULT_CHECKPOINT, note: str = "",
                 table: Optional[pd.DataFrame] = None) -> list[Path]:
    """``out_dir/claims.md`` and ``out_dir/claims.csv``: every claim under every protocol
    present in the results; ``note`` (Markdown) ends claims.md. ``table`` is those claims
    already evaluated (claims_frame), for a caller that needs them for more than this."""
    selected = analysis.ensure_selected(runs, selected)
    if table is None:
        table = claims_frame(selected, checkpoint=checkpoint)
    out = Path(out_dir)
    csv_path = out / "claims.csv"
    style.atomic_write_text(csv_path, table.to_csv(index=False))
    if runs is None:  # drawn from selected rows alone (a run made in pieces): no count of all rows to give
        source = f"{len(selected)} selected rows"
    else:
        n_diverged = int(runs["diverged"].astype(bool).sum())  # a non-nullable column of the runs schema
        source = f"{len(runs)} result rows ({n_diverged} diverged) and {len(selected)} selected rows"
    lines = [
        "# Claims of Zeng & Lee (ICLR 2024), measured",
        "",
        f"Generated by `lorabench claims` from {source}; "
        f"gradient runs at checkpoint '{checkpoint}', selected by validation loss; statistic: median over seeds.",
        "",
        tolerances_text(),
        "",
    ]
    for protocol, part in table.groupby("protocol", sort=False):
        counts = part["status"].value_counts()
        summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in (PASS, FAIL, NOT_RUN, ERROR) if counts.get(s, 0) or s != ERROR)
        lines += [f"## Protocol `{protocol}` ({summary})", "", markdown_table(part, ["id", "claim", "status", "measured", "source"]), ""]
    md_path = style.atomic_write_text(out / "claims.md", "\n".join(lines) + note)
    return [md_path, csv_path]
