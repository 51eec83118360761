"""Selection by validation loss: per (rank, seed, ...) the grid point (lr, weight decay)
with the lowest validation loss, as the paper reports.

Diverged runs and runs with a non-finite validation loss are never selected; how many
were excluded is kept in the selected row, so a figure can say so.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .results import CONFIG, IDENTITY, column_role

HYPERPARAMETERS = ("lr", "weight_decay")


def group_columns(runs: pd.DataFrame) -> list[str]:
    """The columns that define a selection group: the config without the hyperparameters
    selected over, plus the identity columns (experiment, checkpoint). Metrics and
    provenance, and any column outside the schema, differ within a group."""
    return [c for c in runs.columns if c not in HYPERPARAMETERS and column_role(c) in (CONFIG, IDENTITY)]


def select_by_validation(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group: the candidate with the lowest finite validation loss.

    Adds ``n_candidates`` (grid points in the group) and ``n_excluded`` (diverged or
    non-finite ones). A group whose every candidate is excluded yields a row with NaN
    metrics and ``diverged = True``, so it is visible rather than silently dropped.
    """
    if runs.empty:
        return runs.assign(n_candidates=pd.Series(dtype="int64"), n_excluded=pd.Series(dtype="int64"))
    keys = group_columns(runs)
    usable = ~runs["diverged"].astype(bool) & np.isfinite(runs["val_loss"].astype(float))
    runs = runs.assign(_usable=usable)
    chosen = []
    for _, group in runs.groupby(keys, dropna=False, sort=True):
        candidates = group[group["_usable"]]
        if candidates.empty:
            row = group.iloc[[0]].copy()
            for metric in ("test_loss", "test_shift_loss", "val_loss", "train_loss", "test_accuracy", "test_shift_accuracy"):
                if metric in row:
                    row[metric] = math.nan
            row["diverged"] = True
        else:
            row = candidates.loc[[candidates["val_loss"].astype(float).idxmin()]].copy()
        row["n_candidates"] = len(group)
        row["n_excluded"] = int((~group["_usable"]).sum())
        chosen.append(row)
    out = pd.concat(chosen, ignore_index=True).drop(columns="_usable")
    return out
