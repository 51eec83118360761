"""Claims and the protocol comparison on synthetic results built to pass (protocol 'paper')
and to fail (protocol 'reference'): every claim must say so, with its numbers."""

from __future__ import annotations

import pandas as pd
import pytest

from lorabench.report import claims, comparison, figures
from lorabench.cli import main
from lorabench.core.config import RunConfig
from lorabench.runs.runner import threshold_rank

from test_figures import BASE, LRS, default_metrics, stored_theory, synthetic_runs, to_frames

# Pretraining that really moves the frozen model towards the target, so a pretrained
# frozen model's SVD optimum is lower than a random one's.
CLAIM_BASE = {**BASE, "pretrained_lr": 0.05, "pretrained_epochs": 200}


def _scale(cfg: RunConfig) -> float:
    return stored_theory(cfg)["target_mse_scale"]


def _optimum(cfg: RunConfig) -> float:
    return stored_theory(cfg)["svd_optimum_mse"]


def _low_rank_mse(cfg: RunConfig, good: bool) -> float:
    """Below R*: the construction follows the attention tail's shape (or drifts from it by
    1e3 per rank), gradient LoRA sits at 0.02 of the target's scale, and LoRA from the
    construction ends below both (or above both)."""
    scale = _scale(cfg)
    tail, first = stored_theory(cfg)["attention_tail"], stored_theory(cfg.replace(rank=1))["attention_tail"]
    ours = 0.05 * scale * tail / first * (1.0 if good else 1e3 ** (cfg.rank - 1))
    if cfg.method == "ours":
        return ours
    if cfg.method == "sgd":
        return 0.02 * scale
    return 0.5 * min(ours, 0.02 * scale) if good else 3.0 * max(ours, 0.02 * scale)


def built_metrics(experiment: str, cfg: RunConfig) -> dict:
    """Numbers meeting every claim under 'paper' and breaking every claim under 'reference'."""
    good = cfg.protocol == "paper"
    out = default_metrics(experiment, cfg)
    thr = threshold_rank(cfg)
    below = cfg.rank < thr
    one_layer = experiment in ("linear", "uniform_sv") or (experiment == "fnn" and cfg.target_depth == 1)
    if cfg.task != "regression":
        acc = 0.5 + 0.5 * min(cfg.rank / thr, 1.0) if cfg.method == "ours" else 0.85
        if cfg.method == "ours" and not good and not below:
            acc = 0.9
        out.update(test_accuracy=acc, val_accuracy=acc, test_shift_accuracy=acc + (-0.1 if good else 0.05))
        return out
    if experiment == "tfn_low_rank":
        test = _low_rank_mse(cfg, good)
    elif cfg.method == "ours":
        if below and one_layer:
            factor = (1.0 if experiment == "linear" else 0.5) if good else 3.0 * (10 if cfg.pretrained else 1)
            test = _optimum(cfg) * factor
        elif below:
            test = 0.1 * (thr - cfg.rank) / thr * ((0.5 if good else 2.0) if cfg.pretrained else 1.0)
        else:
            test = (1e-12 if good else 1e-3) * _scale(cfg)
    elif cfg.method == "flt":
        test = 0.1
    elif experiment == "tfn_prenorm" and cfg.prenorm:
        # relative MSE flat from R* = 2 on (or still falling at R = 4)
        test = _scale(cfg) * (0.1 / min(cfg.rank, 2) if good else 0.1 / 10 ** cfg.rank)
    elif experiment == "methods" and cfg.method != "sgd":
        lora = built_metrics(experiment, cfg.replace(method="sgd", method_settings=""))["test_loss"]
        if cfg.method == "full":
            test = 1e-6 if good else 1.0
        elif cfg.method == "vera":  # compared at equal parameter counts: VeRA at R = D with LoRA at R = 1
            test = built_metrics(experiment, cfg.replace(method="sgd", method_settings="", rank=1))["test_loss"]
            test *= 0.5 if good else 2.0
        else:
            test = lora * (0.9 if good else 1.5)
    elif experiment == "flt":
        test = 0.01 if good else 0.2
    elif experiment == "depth":
        test = 0.1 * max(thr - cfg.rank, 0.01) / thr if good else 0.01 * cfg.frozen_depth
    elif experiment == "bias":
        test = 0.05 * (2.0 if (cfg.tune_bias == 0) == good else 1.0)
    else:
        ours = built_metrics(experiment, cfg.replace(method="ours", lr=1e-3, tune_bias=1))["test_loss"]
        if below:
            test = (0.5 if good else 2.0) * ours if experiment != "linear" else ours * (1.02 if good else 2.0)
        else:
            test = (1e-3 if good else 1e-12) * _scale(cfg)
    out.update(test_loss=test, test_shift_loss=25 * test, val_loss=test, train_loss=test / (100 if good else 1))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    rows = synthetic_runs(metrics=built_metrics, lrs=LRS[:1], base=CLAIM_BASE)
    return to_frames(rows, tmp_path_factory.mktemp("claims"), select=False)


def _status(table: pd.DataFrame, protocol: str) -> dict:
    part = table[table["protocol"] == protocol]
    return dict(zip(part["id"], part["status"]))


def test_every_claim_passes_on_data_built_to_pass(built):
    _, selected = built
    results = {r.id: r for r in claims.evaluate(selected, "paper")}
    failing = {k: (r.status, r.measured) for k, r in results.items() if r.status != claims.PASS}
    assert not failing
    assert set(results) == {c.id for c in claims.CLAIMS}


def test_every_claim_fails_on_data_built_to_fail(built):
    _, selected = built
    results = {r.id: r for r in claims.evaluate(selected, "reference")}
    passing = {k: (r.status, r.measured) for k, r in results.items() if r.status != claims.FAIL}
    assert not passing


def test_measured_numbers_are_reported(built):
    _, selected = built
    results = {r.id: r for r in claims.evaluate(selected, "paper")}
    assert "R*=2" in results["fnn_exact_2_4"].measured
    assert "0.85 -> 0.75" in results["shift_lowers_accuracy"].measured
    assert "LoRA lower at" in results["lora_beats_flt"].measured


def test_missing_experiments_are_not_run(tmp_path):
    _, selected = to_frames(synthetic_runs(["bias"], protocols=("paper",), lrs=LRS[:1]), tmp_path, select=False)
    status = {r.id: r.status for r in claims.evaluate(selected, "paper")}
    assert status.pop("bias_helps") == claims.PASS
    assert set(status.values()) == {claims.NOT_RUN}
    # and an empty selection has no protocol: every claim is 'not run' under 'paper'
    empty = selected.iloc[0:0]
    assert {r.status for r in claims.evaluate(empty, "paper")} == {claims.NOT_RUN}


def test_diverged_seeds_are_left_out_of_the_medians(tmp_path):
    def metrics(experiment, cfg):
        out = default_metrics(experiment, cfg)
        if cfg.method == "sgd" and cfg.seed == 0:
            out["diverged"] = True
        return out

    _, selected = to_frames(synthetic_runs(["bias"], protocols=("paper",), metrics=metrics), tmp_path)
    result = {r.id: r for r in claims.evaluate(selected, "paper")}["bias_helps"]
    assert result.status == claims.PASS and "nan" not in result.measured


def test_write_claims_and_protocol_comparison(built, tmp_path):
    runs, selected = built
    md, csv = claims.write_claims(runs, selected, tmp_path)
    table = pd.read_csv(csv)
    assert list(table.columns) == claims.COLUMNS
    assert len(table) == 2 * len(claims.CLAIMS)
    assert set(_status(table, "paper").values()) == {claims.PASS}
    text = md.read_text()
    assert "## Protocol `paper`" in text and "## Protocol `reference`" in text
    note = "\n## Experiments not run\n\nNot run: tfn.\n"
    md, _ = claims.write_claims(runs, selected, tmp_path, note=note)
    assert md.read_text() == text + note
    assert f"from {len(runs)} result rows (0 diverged) and {len(selected)} selected rows;" in text
    md, _ = claims.write_claims(None, selected, tmp_path)  # a run in pieces: selected rows only
    assert f"from {len(selected)} selected rows;" in md.read_text() and "n/a" not in md.read_text()

    both = claims.claims_frame(selected, comparison.PROTOCOL_PAIR)
    paths = comparison.write_protocol_comparison(selected, tmp_path, both, tolerances=claims.tolerances_text())
    assert sorted(p.name for p in paths) == sorted(f"protocol_comparison.{e}" for e in ("png", "pdf", "md", "csv"))
    assert all(p.stat().st_size > 200 for p in paths)
    table = pd.read_csv(tmp_path / "protocol_comparison.csv")
    assert (table["changes?"] == "yes").all()
    assert "## Conclusions that change" in (tmp_path / "protocol_comparison.md").read_text()


def test_changes_column():
    assert comparison._changes("pass", "fail") == "yes"
    assert comparison._changes("pass", "pass") == "no"
    assert comparison._changes("pass", "not run") == "n/a"


def test_claims_against_a_baseline_say_which_verdicts_change(built, tmp_path):
    """A baseline whose rows pass where these fail (the protocols swapped) changes every
    decided verdict; the same rows as baseline change none; the seeds of each are listed."""
    from lorabench.runs.results import SELECTED_SCHEMA, atomic_write_table
    import pyarrow as pa

    def write(df: pd.DataFrame, path):
        atomic_write_table(pa.Table.from_pandas(df, schema=SELECTED_SCHEMA, preserve_index=False), path)

    _, selected = built
    path = tmp_path / "selected.parquet"
    write(selected, path)
    swapped = selected.assign(protocol=selected["protocol"].map({"paper": "reference", "reference": "paper"}))
    write(swapped[swapped["seed"] != swapped["seed"].max()], tmp_path / "baseline.parquet")
    assert main(["claims", "--selected", str(path), "--out", str(tmp_path / "out"), "--baseline",
                 str(tmp_path / "baseline.parquet"), "--baseline-label", "full_length"]) == 0
    table = pd.read_csv(tmp_path / "out" / "claims_vs_full_length.csv")
    decided = table[table["status"].isin([claims.PASS, claims.FAIL]) & table["baseline_status"].isin([claims.PASS, claims.FAIL])]
    assert len(decided) >= len(claims.CLAIMS)
    assert (decided["changes?"] == "yes").all()
    text = (tmp_path / "out" / "claims_vs_full_length.md").read_text()
    assert "## Conclusions that change" in text and "**fnn_exact_2_4** (paper)" in text
    seeds = sorted(selected["seed"].unique())
    assert f"| fnn | paper | {seeds[0]}-{seeds[-1]} | {seeds[0]}-{seeds[-2]} |" in text

    assert main(["claims", "--selected", str(path), "--out", str(tmp_path / "same"), "--baseline", str(path)]) == 0
    same = pd.read_csv(tmp_path / "same" / "claims_vs_baseline.csv")
    assert set(same["changes?"]) <= {"no", "n/a"} and (same["changes?"] == "no").sum() >= len(claims.CLAIMS)
    assert "No claim decided in both runs changes its verdict." in (tmp_path / "same" / "claims_vs_baseline.md").read_text()

    with pytest.raises(SystemExit):
        main(["claims", "--selected", str(path), "--out", str(tmp_path / "bad"), "--baseline", str(path),
              "--baseline-label", "../x"])
    assert not (tmp_path / "bad").exists()


def test_seed_spans():
    assert comparison._seed_text([0, 1, 2, 4]) == "0-2, 4"
    assert comparison._seed_text([3]) == "3"
    assert comparison._seed_text([]) == "none"


def test_cli_figures_and_claims(tmp_path, monkeypatch, capsys):
    from lorabench.report import style

    monkeypatch.setattr(style, "FORMATS", ("png",))
    runs, _ = to_frames(synthetic_runs(["bias"], protocols=("paper",)), tmp_path)
    assert main(["claims", "--runs", str(tmp_path / "runs.parquet"), "--out", str(tmp_path / "results")]) == 0
    for name in ("claims.md", "claims.csv", "protocol_comparison.md", "protocol_comparison.csv", "protocol_comparison.png"):
        assert (tmp_path / "results" / name).exists()
    figs = tmp_path / "results" / "figures"
    assert main(["figures", "--runs", str(tmp_path / "runs.parquet"), "--selected", str(tmp_path / "selected.parquet"),
                 "--out", str(figs)]) == 0
    # the rows are the paper protocol's: every figure under it, those of other experiments saying "no data"
    assert sorted(p.relative_to(figs).with_suffix("").as_posix() for p in figs.rglob("*.png")) == \
        sorted(f"paper/{name}" for name in figures.FIGURE_NAMES)
    assert "bias.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["claims", "--out", str(tmp_path)])  # neither --runs nor --selected


# ------------------------------------------------------------------ the paper's tables
def tiny_linear_selected() -> pd.DataFrame:
    """Three seeds of a linear panel at R=1 and R*=2: construction and gradient update."""
    out = []
    values = [(0.3, 1e-12, 0.1, 0.05), (0.1, 1e-12, 0.15, 0.01), (0.2, 3e-12, 0.12, 0.02)]  # per seed
    for seed, (o1, o2, g1, g2) in enumerate(values):
        for rank, ours, gd in ((1, o1, g1), (2, o2, g2)):
            base = dict(experiment="linear", protocol="paper", seed=seed, rank=rank, pretrained=0, threshold_rank=2,
                        diverged=False, val_loss=0.0, n_excluded=0, n_trainable_params=64 * rank)
            out.append({**base, "method": "ours", "checkpoint": "construction", "test_loss": ours})
            out.append({**base, "method": "sgd", "checkpoint": "last", "test_loss": gd})
    return pd.DataFrame(out)


def _table_row(text: str, quantity: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {quantity} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_paper_tables_put_the_paper_next_to_the_medians_over_seeds():
    from lorabench.report import paper_tables

    text = paper_tables.paper_tables_markdown(tiny_linear_selected())
    for table in paper_tables.TABLES:  # every figure has its table, citing the paper
        assert f"## {table.title}" in text and table.source in text
    assert "| quantity | the paper | measured (paper) |" in text and "measured (reference)" not in text
    assert _table_row(text, "threshold rank R* = ceil(D/L)")[1:] == ["8 (D=16, L=2)", "2"]
    assert _table_row(text, "random: construction, R=1")[1:] == ["~0.28", "0.2"]
    assert _table_row(text, "random: construction, R=R*")[2] == "1e-12"
    assert _table_row(text, "random: gradient update, R=1")[2] == "0.12"
    assert _table_row(text, "random: gradient update, R=R*")[2] == "0.02"
    assert _table_row(text, "random: construction, R=16")[2] == "not run"  # no such rank here
    assert _table_row(text, "random: first rank where the construction is at or below the gradient update")[2] == "R=2"
    assert _table_row(text, "pretrained: construction, R=1")[2] == "not run"
    assert _table_row(text, "random: fixed biases, R=1")[2] == "not run"  # experiment absent
    assert "Seeds measured: paper: 3." in text


def test_paper_tables_command_reads_parquet_and_writes_markdown(tmp_path):
    to_frames(synthetic_runs(["fnn"], metrics=built_metrics, lrs=LRS[:1], base=CLAIM_BASE), tmp_path, select=False)
    out = tmp_path / "tables" / "paper_tables.md"
    assert main(["paper-tables", "--selected", str(tmp_path / "selected.parquet"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "measured (paper)" in text and "measured (reference)" in text
    row = _table_row(text, "(2, 4) random: gradient update, R=1")
    assert row[1].startswith("~0.009") and row[2] != "not run" and row[3] != "not run"


def test_pieces_of_a_run_combine_into_one_report_and_never_overlap(tmp_path):
    """A run made in pieces (here one per protocol, each with its own selected rows)
    reports as the whole run does; two pieces holding the same part are refused."""
    from lorabench.runs.results import SELECTED_SCHEMA, atomic_write_table
    import pyarrow as pa

    to_frames(synthetic_runs(["fnn"], metrics=built_metrics, lrs=LRS[:1], base=CLAIM_BASE), tmp_path, select=False)
    whole = pd.read_parquet(tmp_path / "selected.parquet")
    pieces, by_seed = [], []  # one piece per protocol; one per seed (some of an experiment's jobs)
    for protocol, part in whole.groupby("protocol"):
        pieces.append(tmp_path / f"piece_{protocol}.parquet")
        atomic_write_table(pa.Table.from_pandas(part, schema=SELECTED_SCHEMA, preserve_index=False), pieces[-1])
    for seed, part in whole.groupby("seed"):
        by_seed.append(tmp_path / f"piece_seed{seed}.parquet")
        atomic_write_table(pa.Table.from_pandas(part, schema=SELECTED_SCHEMA, preserve_index=False), by_seed[-1])
    assert len(pieces) == 2 and len(by_seed) > 1
    for name, selected in (("whole", [tmp_path / "selected.parquet"]), ("pieces", pieces), ("by_seed", by_seed)):
        assert main(["paper-tables", "--selected", *map(str, selected), "--out", str(tmp_path / name / "tables.md")]) == 0
        assert main(["claims", "--selected", *map(str, selected), "--out", str(tmp_path / name)]) == 0
    for name in ("pieces", "by_seed"):
        assert (tmp_path / name / "tables.md").read_text() == (tmp_path / "whole" / "tables.md").read_text()
    statuses = [pd.read_csv(tmp_path / name / "claims.csv").sort_values(["protocol", "id"]).reset_index(drop=True)
                for name in ("whole", "pieces", "by_seed")]
    pd.testing.assert_frame_equal(statuses[0], statuses[1])
    pd.testing.assert_frame_equal(statuses[0], statuses[2])

    with pytest.raises(SystemExit) as error:
        main(["claims", "--selected", str(pieces[0]), str(tmp_path / "selected.parquet"), "--out", str(tmp_path / "bad")])
    assert error.value.code == 2
    assert not (tmp_path / "bad" / "claims.md").exists()


def test_the_plateau_rank_is_where_the_curve_stays_near_its_floor():
    from lorabench.report.analysis import plateau_rank

    assert plateau_rank(pd.Series({1: 1.0, 2: 0.3, 4: 0.1, 8: 0.09, 16: 0.11})) == 4
    assert plateau_rank(pd.Series({1: 1.0, 2: 0.15, 4: 0.3, 8: 0.1})) == 8  # back above 2x at R = 4
    assert plateau_rank(pd.Series({1: 0.1, 2: 0.1})) == 1
    assert plateau_rank(pd.Series(dtype=float)) is None
