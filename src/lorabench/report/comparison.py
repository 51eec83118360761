"""The two protocols side by side: 'paper' (the paper's text) vs 'reference' (the
authors' published code, with its data-stream and evaluation quirks).

``write_protocol_comparison`` writes ``protocol_comparison.png/.pdf`` (FNN and TFN median
curves under both protocols, construction and gradient update) and ``.md/.csv`` (every
claim evaluated under each protocol, with a column saying whether the verdict changes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from . import claims, figures, style

PROTOCOL_PAIR = ("paper", "reference")
PANELS = (
    (r"FNN $\bar L=1$, $L=2$", "fnn", dict(target_depth=1, frozen_depth=2), dict(tune_bias=1)),
    (r"FNN $\bar L=2$, $L=4$", "fnn", dict(target_depth=2, frozen_depth=4), dict(tune_bias=1)),
    ("TFN $L=1$", "tfn", dict(target_depth=1), {}),
    ("TFN $L=2$", "tfn", dict(target_depth=2), {}),
)


def fig_protocol_comparison(selected: pd.DataFrame, out_dir, *, checkpoint: str = figures.DEFAULT_CHECKPOINT) -> list[Path]:
    """Rows: random, pretrained frozen model; columns: FNN (1,2), (2,4), TFN L=1, L=2.
    Solid: paper protocol; dashed: reference protocol. Log-scale test MSE."""
    fig, axes = style.panels(2, len(PANELS))
    for r, pre in enumerate((0, 1)):
        for c, (title, experiment, filters, gd_filters) in enumerate(PANELS):
            ax = axes[r][c]
            drawn, frames, curves = False, [], {}
            for protocol in PROTOCOL_PAIR:
                line = style.SERIES[protocol]
                for method, key, extra in (("ours", "construction", {}), ("sgd", "gd", gd_filters)):
                    df = figures.rows(selected, experiment, protocol, method, checkpoint, pretrained=pre, **filters, **extra)
                    frames.append(df)
                    cv = figures.curve(df, "rank", "test_loss")
                    if method == "sgd":
                        curves[f"GD {protocol}"] = cv
                    label = f"{style.SERIES[key]['label']} ({protocol})"
                    drawn = figures.draw_curve(ax, cv, key, log=True, label=label, band=protocol == "paper",
                                               linestyle=line["linestyle"], **({"markerfacecolor": "none"} if protocol == "reference" else {})) or drawn
            both = pd.concat([f for f in frames if not f.empty]) if drawn else frames[0]
            figures.finish_panel(ax, drawn, f"{title}, {style.FROZEN_LABEL[pre].lower()}", log=True, xlabel="rank $R$",
                            ylabel="test MSE (log)", thr=figures.threshold(both), note=figures.excluded_note(curves),
                            legend=c == 0)
    style.suptitle(fig, "Protocols compared: paper (solid, band: min-max over seeds) vs reference (dashed)",
                   figures.FOOTNOTE.format(checkpoint=checkpoint))
    return style.save(fig, out_dir, "protocol_comparison")


def _changes(a: str, b: str) -> str:
    decided = (claims.PASS, claims.FAIL)
    if a in decided and b in decided:
        return "yes" if a != b else "no"
    return "n/a"


def comparison_table(selected: pd.DataFrame, *, checkpoint: str = figures.DEFAULT_CHECKPOINT) -> pd.DataFrame:
    """One row per claim: status and measurement under each protocol, and 'changes?'
    (yes/no when both protocols decided it, n/a otherwise)."""
    table = claims.claims_frame(selected, PROTOCOL_PAIR, checkpoint)
    wide = table.pivot(index="id", columns="protocol", values=["status", "measured"])
    order = [c.id for c in claims.CLAIMS]
    out = pd.DataFrame({"id": order, "claim": [c.text for c in claims.CLAIMS]})
    for protocol in PROTOCOL_PAIR:
        out[f"{protocol}_status"] = [wide.loc[i, ("status", protocol)] for i in order]
        out[f"{protocol}_measured"] = [wide.loc[i, ("measured", protocol)] for i in order]
    out["changes?"] = [_changes(a, b) for a, b in zip(out["paper_status"], out["reference_status"])]
    return out


def curve_summary(selected: pd.DataFrame, *, checkpoint: str = figures.DEFAULT_CHECKPOINT) -> pd.DataFrame:
    """Median test MSE at R=1, R*-1, R* and the largest rank, per panel, method and protocol."""
    out = []
    for title, experiment, filters, gd_filters in PANELS:
        for pre in (0, 1):
            for method, extra in (("ours", {}), ("sgd", gd_filters)):
                for protocol in PROTOCOL_PAIR:
                    df = figures.rows(selected, experiment, protocol, method, checkpoint, pretrained=pre, **filters, **extra)
                    med = figures.median_by(df)
                    if med.empty:
                        continue
                    thr = figures.threshold(df)
                    ranks = {"R=1": 1, "R*-1": (thr - 1) if thr else None, "R*": thr, "R max": int(med.index.max())}
                    row = {"setting": f"{title.replace('$', '').replace(chr(92) + 'bar ', '')}, {style.FROZEN_LABEL[pre].lower()}",
                           "method": "construction" if method == "ours" else "GD", "protocol": protocol}
                    row.update({k: (claims.g(float(med[r])) if r in med.index else "") for k, r in ranks.items()})
                    out.append(row)
    return pd.DataFrame(out, columns=["setting", "method", "protocol", "R=1", "R*-1", "R*", "R max"])


def write_protocol_comparison(selected: pd.DataFrame, out_dir, *, checkpoint: str = figures.DEFAULT_CHECKPOINT,
                              runs: Optional[pd.DataFrame] = None) -> list[Path]:
    """protocol_comparison.png, .pdf, .md and .csv in ``out_dir``."""
    selected = figures.ensure_selected(runs, selected)
    paths = fig_protocol_comparison(selected, out_dir, checkpoint=checkpoint)
    table = comparison_table(selected, checkpoint=checkpoint)
    out = Path(out_dir)
    csv_path = style.atomic_write_text(out / "protocol_comparison.csv", table.to_csv(index=False))
    changed = table[table["changes?"] == "yes"]
    present = claims.present_protocols(selected)
    lines = [
        "# Protocol comparison: `paper` vs `reference`",
        "",
        "`paper` follows the paper's text (fresh data, a fixed independent validation set); `reference` reproduces the "
        "authors' published code (reseeded data streams, validation = first test samples, its rank_step sign). "
        f"Protocols with results: {', '.join(present)}. " + claims.tolerances_text(),
        "",
        "## Conclusions that change",
        "",
    ]
    lines += [f"- **{r['id']}**: {r['claim']}: paper {r['paper_status']}, reference {r['reference_status']}"
              for _, r in changed.iterrows()] or ["None of the claims decided under both protocols changes its verdict."]
    lines += ["", "## Every claim under each protocol", "",
              claims.markdown_table(table, ["id", "claim", "paper_status", "reference_status", "changes?", "paper_measured", "reference_measured"]),
              "", "## Median test MSE of the FNN and TFN curves", "",
              claims.markdown_table(curve_summary(selected, checkpoint=checkpoint), ["setting", "method", "protocol", "R=1", "R*-1", "R*", "R max"]),
              "", "Figure: `protocol_comparison.png` / `.pdf`.", ""]
    md_path = style.atomic_write_text(out / "protocol_comparison.md", "\n".join(lines))
    return paths + [md_path, csv_path]
