"""``lorabench figures`` and ``lorabench claims``: read the Parquet results, write the report.

The one report module that uses the others: figures, claims and the protocol comparison
each depend only on report.analysis and report.style.
"""

from __future__ import annotations

from . import claims, comparison, figures
from .analysis import read_inputs


def figures_command(args) -> int:
    """Every figure (or those named by --name) into --out."""
    runs, selected = read_inputs(args.runs, args.selected)
    for path in figures.write_all_figures(runs, selected, args.out, protocol=args.protocol, checkpoint=args.checkpoint,
                                          names=args.name):
        print(path)
    return 0


def claims_command(args) -> int:
    """claims.md/.csv and the protocol comparison (protocol_comparison.*) into --out."""
    runs, selected = read_inputs(args.runs, args.selected)
    paths = claims.write_claims(runs, selected, args.out, checkpoint=args.checkpoint)
    both = claims.claims_frame(selected, comparison.PROTOCOL_PAIR, args.checkpoint)
    paths += comparison.write_protocol_comparison(selected, args.out, both, tolerances=claims.tolerances_text(),
                                                  checkpoint=args.checkpoint)
    for path in paths:
        print(path)
    return 0
