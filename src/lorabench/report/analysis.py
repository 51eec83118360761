"""Statistics of the result rows that figures, claims and the protocol comparison share.

A pure function of the Parquet rows: no model is generated or trained here. The theory
the report compares with was stored in each row when it was made (runs.runner's
``theory_columns``): ``svd_optimum_mse``, the linear optimum (1/D) sum_{i>RL} sigma_i(E)^2
of a one-layer target, and ``target_mse_scale``, the target's mean squared test output.

* Statistic: the paper's median over seeds, with the min-max band over seeds (which the
  paper's figures omit). Gradient runs are taken at a checkpoint (default 'last', the
  final state, as the paper); constructions are the 'construction' rows.
* Diverged runs are never numbers: a seed whose every grid point diverged (NaN metrics,
  ``diverged``) is left out of the median and counted, as are the diverged grid points
  the selection excluded (``n_excluded``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from ..core.config import PROTOCOLS

DEFAULT_PROTOCOL = "paper"
DEFAULT_CHECKPOINT = "last"
FNN_PAIRS = ((1, 2), (2, 4))  # (Lbar, L)
CLASSIFICATION_TASKS = ("classification", "binary_classification")
PASS, FAIL, NOT_RUN, ERROR = "pass", "fail", "not run", "error"  # a claim's status
EXACT_RTOL = 1e-6  # exact: MSE / mean squared target output at most this
THRESHOLD_KEYS = ("exp", "width", "target_depth", "frozen_depth")  # one threshold-law setting


# ------------------------------------------------------------------ inputs
def ensure_selected(runs: Optional[pd.DataFrame], selected: Optional[pd.DataFrame]) -> pd.DataFrame:
    """The selected rows: given, or selected from ``runs`` by validation loss."""
    if selected is not None:
        return selected
    from ..runs.selection import select_by_validation

    return select_by_validation(runs if runs is not None else pd.DataFrame())


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


def present_protocols(selected: pd.DataFrame) -> list[str]:
    """The protocols with rows, in PROTOCOLS order; 'paper' when there are none."""
    found = set(selected["protocol"].dropna()) if selected is not None and "protocol" in selected else set()
    return [p for p in PROTOCOLS if p in found] or [DEFAULT_PROTOCOL]


def experiment_protocols(selected: pd.DataFrame) -> dict[str, list[str]]:
    """Each experiment's protocols with rows, in PROTOCOLS order."""
    if not _has(selected, "experiment", "protocol"):
        return {}
    pairs = selected[["experiment", "protocol"]].dropna().drop_duplicates()
    return {experiment: [p for p in PROTOCOLS if p in set(group["protocol"])]
            for experiment, group in pairs.groupby("experiment", sort=False)}


def rows(
    selected: pd.DataFrame,
    experiment: str,
    protocol: str,
    method: str,
    checkpoint: str = DEFAULT_CHECKPOINT,
    **equal,
) -> pd.DataFrame:
    """Rows of one experiment, protocol and method: a closed-form method's construction
    rows, a gradient method's rows at the given checkpoint; ``equal`` filters further
    columns."""
    needed = ("experiment", "protocol", "method", "checkpoint") + tuple(equal)
    if selected is None or selected.empty or not _has(selected, *needed):
        return pd.DataFrame(columns=list(selected.columns) if selected is not None else [])
    mask = (
        (selected["experiment"] == experiment)
        & (selected["protocol"] == protocol)
        & (selected["method"] == method)
        # a closed-form method's rows are its constructions; a gradient method's, checkpoints
        & selected["checkpoint"].isin(("construction", checkpoint))
    )
    for column, value in equal.items():
        mask &= selected[column] == value
    return selected[mask]


# ------------------------------------------------------------------ medians over seeds
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


def curve(df: pd.DataFrame, x: str, y: str) -> Curve:
    """Median over seeds of ``y`` at each value of ``x``, with the min-max band over seeds.
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
    low, high = grouped.min(), grouped.max()
    return Curve(
        x=med.index.to_numpy(), median=med.to_numpy(), low=low.to_numpy(), high=high.to_numpy(),
        n=grouped.size().to_numpy(), n_dropped=int((~ok).sum()), n_grid_excluded=grid_excluded,
    )


def median_by(df: pd.DataFrame, x: str = "rank", y: str = "test_loss") -> pd.Series:
    """The median-over-seeds curve as a Series indexed by ``x`` (claims use this)."""
    return curve(df, x, y).as_series()


def excluded_note(curves: dict[str, Curve]) -> str:
    """'<name>: <n> diverged grid pts excl.' for each curve that lost grid points."""
    parts = [f"{name}: {c.n_grid_excluded} diverged grid pts excl." for name, c in curves.items() if c.n_grid_excluded]
    return "; ".join(parts)


# ------------------------------------------------------------------ theory, as stored
def threshold(df: pd.DataFrame) -> Optional[int]:
    """The threshold rank of a panel's rows, if they agree on one."""
    if df is None or df.empty or "threshold_rank" not in df:
        return None
    values = pd.to_numeric(df["threshold_rank"], errors="coerce").dropna().unique()
    return int(values[0]) if len(values) == 1 else None


def theory_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per (seed, rank, pretrained, protocol) of ``df`` with a one-layer target: the stored
    linear optimum as ``value``, with diverged=False, ready for ``curve``."""
    columns = ["rank", "seed", "pretrained", "protocol", "value", "diverged", "val_loss"]
    if df is None or df.empty or "svd_optimum_mse" not in df:
        return pd.DataFrame(columns=columns)
    keys = ["seed", "rank", "pretrained", "protocol"]
    known = df[pd.to_numeric(df["svd_optimum_mse"], errors="coerce").notna()].drop_duplicates(keys)
    out = known[keys].astype({"seed": int, "rank": int, "pretrained": int})
    out = out.assign(value=known["svd_optimum_mse"].astype(float), diverged=False, val_loss=0.0)
    return out[columns].reset_index(drop=True)


def relative_mse(df: pd.DataFrame, y: str = "test_loss") -> pd.Series:
    """MSE / mean squared target output, per row (the exactness measure)."""
    return df[y].astype(float) / df["target_mse_scale"].astype(float)


def below_threshold(df: pd.DataFrame) -> pd.DataFrame:
    """Rows below their threshold with two columns for the low-rank figure and claims:
    ``r_over_rstar`` (R / R*) and ``rel`` (the relative test MSE)."""
    if df is None or df.empty or not _has(df, "rank", "threshold_rank", "target_mse_scale"):
        return pd.DataFrame(columns=list(df.columns if df is not None else []) + ["r_over_rstar", "rel"])
    out = df.assign(r_over_rstar=df["rank"].astype(float) / df["threshold_rank"].astype(float),
                    rel=relative_mse(df))
    return out[out["r_over_rstar"] <= 1.0]


PLATEAU_FACTOR = 2.0  # "stops falling": within this factor of the lowest median over the ranks tried


def plateau_rank(curve_: pd.Series) -> Optional[int]:
    """The smallest rank from which the median error stays within PLATEAU_FACTOR of its
    lowest value over the ranks tried (``curve_``: median by rank); None if empty."""
    finite = curve_[np.isfinite(curve_.astype(float))]
    if finite.empty:
        return None
    floor = float(finite.min())
    within = [int(r) for r in finite.index if all(finite[finite.index >= r] <= PLATEAU_FACTOR * floor)]
    return min(within) if within else None


def is_exact(df: pd.DataFrame, y: str = "test_loss") -> pd.Series:
    """Per row: relative MSE <= EXACT_RTOL (a diverged or non-finite row is not exact)."""
    rel = relative_mse(df, y)
    diverged = df["diverged"].astype(bool) if "diverged" in df else pd.Series(False, index=df.index)
    return (rel <= EXACT_RTOL) & ~diverged


def smallest_exact_rank(df: pd.DataFrame) -> float:
    """Of one seed's construction rows at several ranks: the smallest tested rank from
    which every tested rank is exact; inf when the largest tested rank is not exact."""
    if df is None or df.empty:
        return math.nan
    exact = is_exact(df).to_numpy()
    ranks = df["rank"].astype(int).to_numpy()
    order = np.argsort(ranks, kind="stable")
    ranks, exact = ranks[order], exact[order]
    inexact = np.nonzero(~exact)[0]
    if not len(inexact):
        return float(ranks[0])
    last = inexact[-1]
    return float(ranks[last + 1]) if last + 1 < len(ranks) else math.inf


def rank_budget_threshold(width: int, frozen_depth: int, target_depth: int) -> int:
    """ceil(D Lbar / L): the smallest R whose total rank R L covers the Lbar target layers'
    D each. The theorem's threshold (``threshold_rank``) when Lbar divides L; below it
    otherwise, where the uniform partition's smaller groups (floor(L / Lbar) layers) set it."""
    return math.ceil(width * target_depth / frozen_depth)


def measured_thresholds(df: pd.DataFrame) -> pd.DataFrame:
    """Per setting (THRESHOLD_KEYS) of construction rows: the theorem's threshold as
    stored (``predicted``), ceil(D Lbar / L) (``budget``, FNN only), and the median over
    seeds of ``smallest_exact_rank`` (``measured``; inf: not exact at the largest rank
    tested, for most seeds), with the seeds' min and max and how many seeds were never exact."""
    columns = list(THRESHOLD_KEYS) + ["predicted", "budget", "measured", "low", "high", "n_seeds", "n_never"]
    if df is None or df.empty or not _has(df, *THRESHOLD_KEYS, "rank", "seed", "threshold_rank"):
        return pd.DataFrame(columns=columns)
    out = []
    for key, part in df.groupby(list(THRESHOLD_KEYS), sort=True):
        per_seed = np.array([smallest_exact_rank(s) for _, s in part.groupby("seed")])
        exp, width, lbar, depth = key
        out.append(dict(
            zip(THRESHOLD_KEYS, (exp, int(width), int(lbar), int(depth))),
            predicted=threshold(part),
            budget=rank_budget_threshold(int(width), int(depth), int(lbar)) if exp == "fnn" else None,
            measured=float(np.median(per_seed)), low=float(per_seed.min()), high=float(per_seed.max()),
            n_seeds=len(per_seed), n_never=int(np.isinf(per_seed).sum()),
        ))
    return pd.DataFrame(out, columns=columns)
