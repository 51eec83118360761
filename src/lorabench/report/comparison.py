"""The two protocols side by side: 'paper' (the paper's text) vs 'reference' (the
authors' published code, with its data-stream and evaluation quirks).

``write_protocol_comparison`` writes ``protocol_comparison.png/.pdf`` (FNN and TFN median
curves under both protocols, construction and gradient update) and ``.md/.csv`` (every
claim evaluated under each protocol, from the claims table it is given, with a column
saying whether the verdict changes).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import analysis, style
from .analysis import DEFAULT_CHECKPOINT, FAIL, PASS
from .style import g, markdown_table

PROTOCOL_PAIR = ("paper", "reference")
PANELS = (
    (r"FNN $\bar L=1$, $L=2$", "fnn", dict(target_depth=1, frozen_depth=2), dict(tune_bias=1)),
    (r"FNN $\bar L=2$, $L=4$", "fnn", dict(target_depth=2, frozen_depth=4), dict(tune_bias=1)),
    ("TFN $L=1$", "tfn", dict(target_depth=1), {}),
    ("TFN $L=2$", "tfn", dict(target_depth=2), {}),
)


def fig_protocol_comparison(selected: pd.DataFrame, out_dir, *, checkpoint: str = DEFAULT_CHECKPOINT) -> list[Path]:
    """Rows: random, pretrained frozen model; columns: FNN (1,2), (2,4), TFN L=1, L=2.
    Solid: paper protocol; dashed: reference protocol. Log-scale test MSE."""
    fig, axes = style.panels(2, len(PANELS))
    for r, pre in enumerate((0, 1)):
        for c, (title, experiment, filters, gd_filters) in enumerate(PANELS):
            ax = axes[r][c]
            drawn, frames, curves = False, [], {}
            for protocol in PROTOCOL_PAIR:
                for method, key, extra in (("ours", "construction", {}), ("sgd", "gd", gd_filters)):
                    df = analysis.rows(selected, experiment, protocol, method, checkpoint, pretrained=pre, **filters, **extra)
                    frames.append(df)
                    cv = analysis.curve(df, "rank", "test_loss")
                    if key == "gd":  # only gradient runs can diverge
                        curves[f"GD {protocol}"] = cv
                    label = f"{style.SERIES[key]['label']} ({protocol})"
                    drawn = style.draw_curve(ax, cv, key, log=True, label=label, band=style.protocol_band(protocol),
                                             **style.protocol_line(protocol)) or drawn
            both = pd.concat([f for f in frames if not f.empty]) if drawn else frames[0]
            style.finish_panel(ax, drawn, f"{title}, {style.FROZEN_LABEL[pre].lower()}", log=True, xlabel="rank $R$",
                               ylabel="test MSE (log)", thr=analysis.threshold(both), note=analysis.excluded_note(curves),
                               legend=c == 0)
    style.suptitle(fig, "Protocols compared: paper (solid, band: min-max over seeds) vs reference (dashed)",
                   style.FOOTNOTE.format(checkpoint=checkpoint))
    return style.save(fig, out_dir, "protocol_comparison")


def _changes(a: str, b: str) -> str:
    decided = (PASS, FAIL)
    if a in decided and b in decided:
        return "yes" if a != b else "no"
    return "n/a"


def comparison_table(claims_table: pd.DataFrame) -> pd.DataFrame:
    """One row per claim of ``claims_table`` (claims.claims_frame under PROTOCOL_PAIR), in
    its order: status and measurement under each protocol, and 'changes?' (yes/no when
    both protocols decided it, n/a otherwise)."""
    wide = claims_table.pivot(index="id", columns="protocol", values=["status", "measured"])
    first = claims_table.drop_duplicates("id")
    order = list(first["id"])
    out = pd.DataFrame({"id": order, "claim": list(first["claim"])})
    for protocol in PROTOCOL_PAIR:
        out[f"{protocol}_status"] = [wide.loc[i, ("status", protocol)] for i in order]
        out[f"{protocol}_measured"] = [wide.loc[i, ("measured", protocol)] for i in order]
    out["changes?"] = [_changes(a, b) for a, b in zip(out["paper_status"], out["reference_status"])]
    return out


def curve_summary(selected: pd.DataFrame, *, checkpoint: str = DEFAULT_CHECKPOINT) -> pd.DataFrame:
    """Median test MSE at R=1, R*-1, R* and the largest rank, per panel, method and protocol."""
    out = []
    for title, experiment, filters, gd_filters in PANELS:
        for pre in (0, 1):
            for method, label, extra in (("ours", "construction", {}), ("sgd", "GD", gd_filters)):
                for protocol in PROTOCOL_PAIR:
                    df = analysis.rows(selected, experiment, protocol, method, checkpoint, pretrained=pre, **filters, **extra)
                    med = analysis.median_by(df)
                    if med.empty:
                        continue
                    thr = analysis.threshold(df)
                    ranks = {"R=1": 1, "R*-1": (thr - 1) if thr else None, "R*": thr, "R max": int(med.index.max())}
                    row = {"setting": f"{title.replace('$', '').replace(chr(92) + 'bar ', '')}, {style.FROZEN_LABEL[pre].lower()}",
                           "method": label, "protocol": protocol}
                    row.update({k: (g(float(med[r])) if r in med.index else "") for k, r in ranks.items()})
                    out.append(row)
    return pd.DataFrame(out, columns=["setting", "method", "protocol", "R=1", "R*-1", "R*", "R max"])


def write_protocol_comparison(selected: pd.DataFrame, out_dir, claims_table: pd.DataFrame, *, tolerances: str = "",
                              checkpoint: str = DEFAULT_CHECKPOINT) -> list[Path]:
    """protocol_comparison.png, .pdf, .md and .csv in ``out_dir``; ``claims_table`` is
    every claim under both protocols (claims.claims_frame), ``tolerances`` their text."""
    paths = fig_protocol_comparison(selected, out_dir, checkpoint=checkpoint)
    table = comparison_table(claims_table)
    out = Path(out_dir)
    csv_path = style.atomic_write_text(out / "protocol_comparison.csv", table.to_csv(index=False))
    changed = table[table["changes?"] == "yes"]
    present = analysis.present_protocols(selected)
    lines = [
        "# Protocol comparison: `paper` vs `reference`",
        "",
        "`paper` follows the paper's text (fresh data, a fixed independent validation set); `reference` reproduces the "
        "authors' published code (reseeded data streams, validation = first test samples, its rank_step sign). "
        f"Protocols with results: {', '.join(present)}. " + tolerances,
        "",
        "## Conclusions that change",
        "",
    ]
    lines += [f"- **{r['id']}**: {r['claim']}: paper {r['paper_status']}, reference {r['reference_status']}"
              for _, r in changed.iterrows()] or ["None of the claims decided under both protocols changes its verdict."]
    lines += ["", "## Every claim under each protocol", "",
              markdown_table(table, ["id", "claim", "paper_status", "reference_status", "changes?", "paper_measured", "reference_measured"]),
              "", "## Median test MSE of the FNN and TFN curves", "",
              markdown_table(curve_summary(selected, checkpoint=checkpoint), ["setting", "method", "protocol", "R=1", "R*-1", "R*", "R max"]),
              "", "Figure: `protocol_comparison.png` / `.pdf`.", ""]
    md_path = style.atomic_write_text(out / "protocol_comparison.md", "\n".join(lines))
    return paths + [md_path, csv_path]
