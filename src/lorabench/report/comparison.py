"""Claims side by side: under the two protocols, 'paper' (the paper's text) vs
'reference' (the authors' published code, with its data-stream and evaluation quirks),
and in one run against another (a baseline, e.g. a preset with fewer seeds).

``write_protocol_comparison`` writes ``protocol_comparison.png/.pdf`` (FNN and TFN median
curves under both protocols, construction and gradient update) and ``.md/.csv`` (every
claim evaluated under each protocol, from the claims table it is given, with a column
saying whether the verdict changes). ``write_baseline_comparison`` writes
``claims_vs_<label>.md/.csv``: every claim of this run next to the baseline's, per
protocol, with the seeds each run holds per experiment.
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


def seeds_table(selected: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Per experiment and protocol of either run: the seeds each holds ('1-4' style)."""
    def seeds(df: pd.DataFrame) -> dict:
        return {key: sorted(int(s) for s in part["seed"].unique()) for key, part in df.groupby(["experiment", "protocol"])}

    here, there = seeds(selected), seeds(baseline)
    keys = sorted(set(here) | set(there))
    return pd.DataFrame([{"experiment": e, "protocol": p, "seeds": _seed_text(here.get((e, p), [])),
                          "baseline_seeds": _seed_text(there.get((e, p), []))} for e, p in keys],
                        columns=["experiment", "protocol", "seeds", "baseline_seeds"])


def _seed_text(seeds: list[int]) -> str:
    """[0, 1, 2, 4] -> '0-2, 4'; [] -> 'none'."""
    if not seeds:
        return "none"
    spans = [[seeds[0], seeds[0]]]
    for seed in seeds[1:]:
        if seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def baseline_table(claims_table: pd.DataFrame, baseline_claims: pd.DataFrame) -> pd.DataFrame:
    """One row per (claim, protocol) of ``claims_table``, in its order, with the
    baseline's status and measurement for the same claim and protocol ('not run' where
    the baseline has none) and 'changes?' (yes/no when both decided it, n/a otherwise)."""
    there = baseline_claims[["id", "protocol", "status", "measured"]].rename(
        columns={"status": "baseline_status", "measured": "baseline_measured"})
    table = claims_table.merge(there, on=["id", "protocol"], how="left")
    table["baseline_status"] = table["baseline_status"].fillna(analysis.NOT_RUN)
    table["baseline_measured"] = table["baseline_measured"].fillna("")
    table["changes?"] = [_changes(a, b) for a, b in zip(table["status"], table["baseline_status"])]
    return table[["id", "claim", "protocol", "status", "baseline_status", "changes?", "measured", "baseline_measured"]]


def write_baseline_comparison(selected: pd.DataFrame, baseline: pd.DataFrame, out_dir, claims_table: pd.DataFrame,
                              baseline_claims: pd.DataFrame, *, label: str, tolerances: str = "") -> list[Path]:
    """claims_vs_<label>.md and .csv in ``out_dir``: ``claims_table`` (this run's claims,
    claims.claims_frame) next to ``baseline_claims`` (the same for the ``baseline`` rows),
    the claims whose verdict changes first, then the seeds behind each."""
    table = baseline_table(claims_table, baseline_claims)
    out = Path(out_dir)
    csv_path = style.atomic_write_text(out / f"claims_vs_{label}.csv", table.to_csv(index=False))
    changed = table[table["changes?"] == "yes"]
    lines = [
        f"# Claims against `{label}`",
        "",
        f"Every claim measured on this run's selected rows ({len(selected)}) next to the same claim on "
        f"`{label}`'s ({len(baseline)}), per protocol; statistic: median over each run's seeds. " + tolerances,
        "",
        "## Conclusions that change",
        "",
    ]
    lines += [f"- **{r['id']}** ({r['protocol']}): {r['claim']}: here {r['status']}, `{label}` {r['baseline_status']}"
              for _, r in changed.iterrows()] or ["No claim decided in both runs changes its verdict."]
    lines += ["", "## Every claim", "",
              markdown_table(table, ["id", "protocol", "status", "baseline_status", "changes?", "measured",
                                     "baseline_measured"]),
              "", "## Seeds per experiment", "",
              markdown_table(seeds_table(selected, baseline), ["experiment", "protocol", "seeds", "baseline_seeds"]), ""]
    md_path = style.atomic_write_text(out / f"claims_vs_{label}.md", "\n".join(lines))
    return [md_path, csv_path]
