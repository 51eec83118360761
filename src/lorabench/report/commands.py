"""The report as the workflow writes it: the one report module that uses the others
(figures, claims and the protocol comparison each depend only on report.analysis and
report.style, and figures on report.catalog's table of the experiments each reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from . import analysis, claims, comparison
from .analysis import DEFAULT_CHECKPOINT


def write_claims_and_comparison(runs: Optional[pd.DataFrame], selected: pd.DataFrame, out_dir,
                                *, checkpoint: str = DEFAULT_CHECKPOINT, note: str = "",
                                baseline: Optional[pd.DataFrame] = None, baseline_label: str = "baseline") -> list[Path]:
    """claims.md/.csv and the protocol comparison (protocol_comparison.*) into ``out_dir``;
    ``note`` (Markdown) ends claims.md. With ``baseline`` (another run's selected rows),
    also claims_vs_<baseline_label>.md/.csv."""
    present = analysis.present_protocols(selected)
    # One evaluation serves all three documents: the claims of every protocol present, and
    # of the comparison's pair (an absent protocol's claims read 'not run').
    evaluated = claims.claims_frame(selected, list(dict.fromkeys([*present, *comparison.PROTOCOL_PAIR])), checkpoint)
    here = evaluated[evaluated["protocol"].isin(present)].reset_index(drop=True)
    paths = claims.write_claims(runs, selected, out_dir, checkpoint=checkpoint, note=note, table=here)
    pair = evaluated[evaluated["protocol"].isin(comparison.PROTOCOL_PAIR)].reset_index(drop=True)
    paths += comparison.write_protocol_comparison(selected, out_dir, pair, tolerances=claims.tolerances_text(),
                                                  checkpoint=checkpoint)
    if baseline is not None:
        paths += comparison.write_baseline_comparison(
            selected, baseline, out_dir, here, claims.claims_frame(baseline, present, checkpoint),
            label=baseline_label, tolerances=claims.tolerances_text())
    return paths
