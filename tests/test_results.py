import itertools
import dataclasses
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorabench.core.config import RunConfig
from lorabench.runs.results import RUNS_SCHEMA, SCHEMA_KEY, ResultsError, column_role, read_rows, read_table, write_rows
from lorabench.runs.runner import run_configs
from lorabench.runs.selection import group_columns, select_by_validation

SMALL = dict(width=8, batch_size=32, n_test=100, n_epochs=5, seed=0)


@pytest.fixture(scope="module")
def rows():
    cfgs = [RunConfig(**SMALL, method="sgd", rank=r, lr=lr) for r in (1, 2) for lr in (1e-2, 1e-3)]
    cfgs.append(RunConfig(**SMALL, method="ours", rank=2))
    return list(run_configs(cfgs, device="cpu"))


def test_rows_round_trip_with_provenance(tmp_path, rows):
    path = tmp_path / "runs.parquet"
    write_rows(rows, path)
    frame = read_rows(path)
    assert len(frame) == len(rows) == 9
    for column in ("config_hash", "seed", "protocol", "lorabench_version", "torch_version", "device", "wall_time_s"):
        assert frame[column].notna().all(), column
    assert set(frame["checkpoint"]) == {"last", "best", "construction"}
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_rerun_gives_bit_identical_rows(tmp_path, rows):
    cfgs = [RunConfig(**SMALL, method="sgd", rank=r, lr=lr) for r in (1, 2) for lr in (1e-2, 1e-3)]
    cfgs.append(RunConfig(**SMALL, method="ours", rank=2))
    again = list(run_configs(cfgs, device="cpu"))
    numbers = ("test_loss", "test_shift_loss", "val_loss", "train_loss")
    key = lambda r: (r["config_hash"], r["checkpoint"])
    first = {key(r): r for r in rows}
    for row in again:
        for column in numbers:
            a, b = first[key(row)][column], row[column]
            assert (a is None and b is None) or a == b, column


def test_wrong_schema_version_is_refused(tmp_path, rows):
    path = tmp_path / "runs.parquet"
    write_rows(rows, path)
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({SCHEMA_KEY: b"0"}), path)
    with pytest.raises(ResultsError, match="schema version 0"):
        read_table(path)


def test_files_before_the_theory_columns_are_refused(tmp_path, rows):
    """A version-2 file (no svd_optimum_mse, target_mse_scale) is refused by name, not read
    with the theory missing."""
    path = tmp_path / "runs.parquet"
    write_rows(rows, path)
    table = pq.read_table(path).drop(["svd_optimum_mse", "target_mse_scale"])
    pq.write_table(table.replace_schema_metadata({SCHEMA_KEY: b"2"}), path)
    with pytest.raises(ResultsError, match="schema version 2, this lorabench reads version 6 .*rerun"):
        read_table(path)


def test_version_3_files_read_as_validated_every_step_and_trained_in_their_experiment(tmp_path, rows):
    """A version-3 file (no val_every column: every run validated each step; no
    computed_in: every experiment trained its own rows; no method columns: lorabench's own
    methods, without settings) reads as the current version with val_every 1,
    computed_in its experiment, no method settings, its rows otherwise unchanged."""
    path = tmp_path / "runs.parquet"
    write_rows([dict(r, experiment=name, computed_in=name) for r, name in zip(rows, itertools.cycle(["a", "b"]))],
               path)
    current = pq.read_table(path)
    older = current.drop(["val_every", "computed_in", "method_settings", "method_digest", "prenorm", "attention_tail"])
    pq.write_table(older.replace_schema_metadata({SCHEMA_KEY: b"3"}), path)
    upgraded = read_table(path)
    assert upgraded.schema.names == current.schema.names
    assert upgraded.column("val_every").to_pylist() == [1] * len(rows)
    assert upgraded.equals(current)


def test_version_4_files_read_as_lorabench_methods_without_settings(tmp_path, rows):
    """A version-4 file (before methods were plug-ins) reads with method_settings '' and
    no method digest, its rows otherwise unchanged; a file of the current version whose
    method columns are missing is refused by name."""
    path = tmp_path / "runs.parquet"
    write_rows(rows, path)
    current = pq.read_table(path)
    older = current.drop(["method_settings", "method_digest", "prenorm", "attention_tail"])
    pq.write_table(older.replace_schema_metadata({SCHEMA_KEY: b"4"}), path)
    upgraded = read_table(path)
    assert upgraded.column("method_settings").to_pylist() == [""] * len(rows)
    assert upgraded.column("method_digest").null_count == len(rows)
    assert upgraded.equals(current)
    pq.write_table(older.replace_schema_metadata({SCHEMA_KEY: b"6"}), path)
    with pytest.raises(ResultsError, match="missing column 'method_settings'"):
        read_table(path)


def test_version_5_files_read_as_plain_transformers_without_the_attention_tail(tmp_path, rows):
    path = tmp_path / "runs.parquet"
    write_rows(rows, path)
    current = pq.read_table(path)
    pq.write_table(current.drop(["prenorm", "attention_tail"]).replace_schema_metadata({SCHEMA_KEY: b"5"}), path)
    upgraded = read_table(path)
    assert upgraded.column("prenorm").to_pylist() == [0] * len(rows)
    assert upgraded.column("attention_tail").null_count == len(rows)
    assert upgraded.equals(current)


def test_rows_carry_the_theory_of_their_models(rows):
    """The stored SVD optimum and target scale are theory's values for the row's models."""
    from lorabench.core import theory
    from lorabench.core.protocols import protocol_of
    from lorabench.core.protocols import generate_models

    for row in rows:
        cfg = RunConfig(**SMALL, method=row["method"], rank=row["rank"], lr=row["lr"])
        models = generate_models(cfg)
        optimum = theory.linear_optimal_mse(models.frozen.weights.double(), models.target.weights[0].double(), cfg.rank)
        assert row["svd_optimum_mse"] == pytest.approx(optimum, rel=1e-12, abs=1e-15)
        y = fnn_forward_double(models.target, protocol_of(cfg).eval_sets(cfg).test)
        assert row["target_mse_scale"] == pytest.approx(float((y**2).mean()), rel=1e-12)
        assert row["target_mse_scale"] > 0


def fnn_forward_double(model, x):
    from dataclasses import replace

    from lorabench.core.models import fnn_forward

    biases = None if model.biases is None else model.biases.double()
    return fnn_forward(replace(model, weights=model.weights.double(), biases=biases), x.double())


def test_missing_column_and_corrupt_file_are_refused(tmp_path, rows):
    path = tmp_path / "runs.parquet"
    write_rows(rows, path)
    table = pq.read_table(path)
    pq.write_table(table.drop(["config_hash"]), path)
    with pytest.raises(ResultsError, match="config_hash"):
        read_table(path)
    path.write_bytes(b"not parquet")
    with pytest.raises(ResultsError, match="not a readable Parquet"):
        read_table(path)


def test_rows_outside_the_schema_are_refused(tmp_path, rows):
    with pytest.raises(ResultsError, match="outside the schema"):
        write_rows([{**rows[0], "surprise": 1}], tmp_path / "x.parquet")
    with pytest.raises(ResultsError, match="missing values"):
        write_rows([{**rows[0], "config_hash": None}], tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_selection_takes_lowest_validation_and_skips_diverged(rows):
    frame = pd.DataFrame([r for r in rows if r["checkpoint"] == "last"])
    frame.loc[frame.index[0], "diverged"] = True
    frame.loc[frame.index[0], "val_loss"] = -1.0  # would win if diverged runs were eligible
    selected = select_by_validation(frame)
    assert len(selected) == 2  # ranks 1 and 2
    for _, row in selected.iterrows():
        group = frame[(frame["rank"] == row["rank"]) & ~frame["diverged"]]
        assert row["val_loss"] == group["val_loss"].min()
        assert row["n_candidates"] == 2
    assert selected["n_excluded"].sum() == 1


def test_group_with_only_diverged_runs_stays_visible_as_nan(rows):
    frame = pd.DataFrame([r for r in rows if r["checkpoint"] == "last" and r["rank"] == 1])
    frame["diverged"] = True
    selected = select_by_validation(frame)
    assert len(selected) == 1 and bool(selected["diverged"].iloc[0])
    assert math.isnan(selected["test_loss"].iloc[0]) and selected["n_excluded"].iloc[0] == 2


# The grouping keys of a runs table as they were when they were listed by hand: every
# RunConfig field but lr and weight_decay, then the workflow's experiment and checkpoint.
GROUP_KEYS = [
    "exp", "width", "target_depth", "frozen_depth", "rank", "use_bias", "activation", "std", "method", "method_settings",
    "batch_size",
    "n_epochs", "n_test", "init_mode", "pretrained", "pretrained_epochs", "pretrained_lr", "pretrained_level",
    "tune_bias", "last_layers", "seed", "rank_step", "task", "n_train", "best_epoch", "n_head", "seq_length",
    "better_optim", "dropout", "prenorm", "protocol", "n_val", "curve_every", "val_every", "experiment", "checkpoint",
]


def test_group_columns_of_a_runs_table_are_the_config_without_hyperparameters_plus_identity(tmp_path, rows):
    write_rows(rows, tmp_path / "runs.parquet")
    assert group_columns(read_rows(tmp_path / "runs.parquet")) == GROUP_KEYS
    assert group_columns(RUNS_SCHEMA.empty_table().to_pandas()) == GROUP_KEYS


def test_config_columns_are_typed_by_the_runconfig_annotations():
    assert RUNS_SCHEMA.field("n_train").type == pa.int64() and RUNS_SCHEMA.field("n_train").nullable
    assert RUNS_SCHEMA.field("lr").type == pa.float64() and not RUNS_SCHEMA.field("lr").nullable
    assert RUNS_SCHEMA.field("method").type == pa.string()
    assert RUNS_SCHEMA.names[: len(dataclasses.fields(RunConfig))] == [f.name for f in dataclasses.fields(RunConfig)]


def test_every_result_column_has_a_role_and_new_columns_are_metrics():
    roles = {name: column_role(name) for name in RUNS_SCHEMA.names}
    assert {n for n, r in roles.items() if r == "identity"} == {"experiment", "checkpoint"}
    assert roles["test_loss"] == roles["val_curve"] == "metric"
    assert roles["wall_time_s"] == roles["config_hash"] == "provenance"
    assert column_role("a_column_added_later") == "metric"


def test_an_extra_metric_column_selects_identically(rows):
    frame = pd.DataFrame([r for r in rows if r["checkpoint"] == "last"])
    extra = frame.assign(new_metric=range(len(frame)))  # differs on every row, like a metric
    assert group_columns(extra) == group_columns(frame)
    pd.testing.assert_frame_equal(select_by_validation(extra).drop(columns="new_metric"), select_by_validation(frame))


def test_rows_name_the_commit_and_the_cpu_that_computed_them():
    """In a git checkout the version names the commit; the CPU is named by its model."""
    import re
    import subprocess

    from lorabench import __version__
    from lorabench.runs import provenance

    version = provenance.code_version()
    commit = subprocess.run(["git", "-C", str(provenance.PACKAGE), "rev-parse", "--short=12", "HEAD"],
                            capture_output=True, text=True)
    if commit.returncode:
        assert version == __version__
    else:
        assert re.fullmatch(re.escape(__version__) + r"\+g[0-9a-f]{12}(\.dirty)?", version)
        assert version.split("+g")[1].startswith(commit.stdout.strip())
    assert provenance.cpu_model()
