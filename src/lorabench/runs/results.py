"""Result rows <-> Parquet, with a versioned schema checked on write and on read.

A Parquet file is the contract between training and figures: every row carries its full
config, its hash, the protocol, versions, device and wall time. Files are written to a
temporary name in the target folder and renamed, so a file either exists whole or not at
all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Union

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write
from ..core.config import FIELD_TYPES

if TYPE_CHECKING:  # pandas only where rows are read: training jobs never import it (~0.5 s each)
    import pandas as pd

SCHEMA_VERSION = "6"  # 2: the engine column; 3: the theory columns (svd_optimum_mse, target_mse_scale); 4: val_every, computed_in; 5: method_settings, method_digest; 6: prenorm, attention_tail
SCHEMA_KEY = b"lorabench.schema_version"


class ResultsError(ValueError):
    """A results file that cannot be used; the message names the file and the problem."""


_ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string()}
# One column per RunConfig field, typed by its annotation (Optional: nullable).
CONFIG_COLUMNS = tuple(FIELD_TYPES)
_CONFIG_FIELDS = [pa.field(name, _ARROW_TYPES[kind], nullable=optional) for name, (kind, optional) in FIELD_TYPES.items()]

_RESULT_FIELDS = [
    pa.field("experiment", pa.string()),  # the workflow's experiment name; null for CLI runs
    # the experiment whose job trained the row: its own, or the first of those sharing its config
    pa.field("computed_in", pa.string()),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("checkpoint", pa.string(), nullable=False),  # construction | last | best
    pa.field("test_loss", pa.float64()),
    pa.field("test_shift_loss", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("train_loss", pa.float64()),
    pa.field("test_accuracy", pa.float64()),
    pa.field("test_shift_accuracy", pa.float64()),
    pa.field("val_accuracy", pa.float64()),
    pa.field("best_step", pa.int64()),
    pa.field("diverged", pa.bool_(), nullable=False),
    pa.field("diverged_step", pa.int64()),
    pa.field("n_trainable_params", pa.int64(), nullable=False),
    pa.field("threshold_rank", pa.int64(), nullable=False),
    pa.field("pretrain_steps", pa.int64()),
    # theory for the row's own models (runner.theory_columns), so reporting needs no models
    pa.field("svd_optimum_mse", pa.float64()),  # (1/D) sum_{i>RL} sigma_i(E)^2; null unless a one-layer FNN target
    pa.field("attention_tail", pa.float64()),  # the same form on a plain TFN's attention products; null for FNNs
    pa.field("target_mse_scale", pa.float64()),  # mean squared target output on the test inputs
    pa.field("curve_steps", pa.list_(pa.int64())),
    pa.field("train_curve", pa.list_(pa.float64())),
    pa.field("val_curve", pa.list_(pa.float64())),
    # provenance
    pa.field("lorabench_version", pa.string(), nullable=False),
    pa.field("torch_version", pa.string(), nullable=False),
    pa.field("device", pa.string(), nullable=False),
    pa.field("device_name", pa.string()),
    pa.field("torch_threads", pa.int64()),
    pa.field("engine", pa.string()),  # native | native-keep-subnormals | torch: the trainer that produced the row
    pa.field("method_digest", pa.string()),  # a user's method: SHA-256 of its source; null for lorabench's own
    pa.field("wall_time_s", pa.float64(), nullable=False),
    pa.field("cell_size", pa.int64(), nullable=False),
]

# Each result column's role. Config columns say what was run; identity columns say which
# row of a run it is (with the config, they name the row); provenance says how and where
# it was produced; every other result column is a metric. A new column is a metric
# unless listed here, so it never silently becomes part of a row's identity.
CONFIG, IDENTITY, PROVENANCE, METRIC = "config", "identity", "provenance", "metric"
IDENTITY_COLUMNS = ("experiment", "checkpoint")
PROVENANCE_COLUMNS = (
    "computed_in", "config_hash", "lorabench_version", "torch_version", "device", "device_name", "torch_threads", "engine",
    "method_digest", "wall_time_s", "cell_size",
)


def column_role(name: str) -> str:
    if name in CONFIG_COLUMNS:
        return CONFIG
    if name in IDENTITY_COLUMNS:
        return IDENTITY
    return PROVENANCE if name in PROVENANCE_COLUMNS else METRIC


RUNS_SCHEMA = pa.schema(_CONFIG_FIELDS + _RESULT_FIELDS, metadata={SCHEMA_KEY: SCHEMA_VERSION.encode()})
SELECTED_SCHEMA = pa.schema(
    list(RUNS_SCHEMA) + [pa.field("n_candidates", pa.int64(), nullable=False), pa.field("n_excluded", pa.int64(), nullable=False)],
    metadata={SCHEMA_KEY: SCHEMA_VERSION.encode()},
)
REQUIRED_PROVENANCE = ("config_hash", "seed", "protocol", "lorabench_version", "torch_version", "device", "wall_time_s")


def rows_to_table(rows: Iterable[dict], schema: pa.Schema = RUNS_SCHEMA) -> pa.Table:
    rows = list(rows)
    names = set(schema.names)
    for i, row in enumerate(rows):
        extra = set(row) - names
        if extra:
            raise ResultsError(f"row {i} has columns outside the schema: {sorted(extra)}")
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    try:
        table = pa.table(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ResultsError(f"result rows do not match the schema: {error}") from None
    validate_table(table, "result rows")
    return table


def validate_table(table: pa.Table, where: str, schema: pa.Schema = RUNS_SCHEMA) -> None:
    for field in schema:
        if field.name not in table.column_names:
            raise ResultsError(f"{where}: missing column {field.name!r}")
        if not table.schema.field(field.name).type.equals(field.type):
            raise ResultsError(
                f"{where}: column {field.name!r} has type {table.schema.field(field.name).type}, expected {field.type}"
            )
        if not field.nullable and table.column(field.name).null_count:
            raise ResultsError(f"{where}: column {field.name!r} has missing values")


def atomic_write_table(table: pa.Table, path: Union[str, os.PathLike]) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_rows(rows: Iterable[dict], path: Union[str, os.PathLike], schema: pa.Schema = RUNS_SCHEMA) -> None:
    atomic_write_table(rows_to_table(rows, schema), path)


def check_writable(path: Union[str, os.PathLike]) -> None:
    """Fail before any work if the folder of ``path`` cannot take a new file.

    Creates nothing (a refused run writes nothing): the nearest existing ancestor must be
    a writable folder, in which the atomic write will later create the rest."""
    folder = Path(path).parent
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ResultsError(f"cannot create results folder {folder}: {existing.name} is not a folder")
    if not os.access(existing, os.W_OK):
        raise ResultsError(f"results folder {folder} is not writable")


def read_table(path: Union[str, os.PathLike], schema: pa.Schema = RUNS_SCHEMA) -> pa.Table:
    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise ResultsError(f"{path}: not a readable Parquet file ({error})") from None
    version = (table.schema.metadata or {}).get(SCHEMA_KEY)
    expected = (schema.metadata or {}).get(SCHEMA_KEY)
    if expected == SCHEMA_VERSION.encode():
        for older, upgrade in ((b"3", _from_version_3), (b"4", _from_version_4), (b"5", _from_version_5)):
            if version == older:
                table = upgrade(table)
                version = (table.schema.metadata or {}).get(SCHEMA_KEY)
    if version != expected:
        found = version.decode() if version else "none"
        raise ResultsError(f"{path}: schema version {found}, this lorabench reads version {expected.decode()} "
                           "(written by another lorabench version: rerun the runs that made it)")
    validate_table(table, str(path), schema)
    return table


def _from_version_3(table: pa.Table) -> pa.Table:
    """A version-3 table as version 4: its runs predate val_every (they validated every
    step) and shared configs (each experiment trained its own rows)."""
    table = _inserted_after(table, "curve_every", "val_every", pa.array([1] * table.num_rows, pa.int64()))
    if "experiment" in table.column_names:
        table = _inserted_after(table, "experiment", "computed_in", table.column("experiment"))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), SCHEMA_KEY: b"4"})


def _from_version_4(table: pa.Table) -> pa.Table:
    """A version-4 table as version 5: its runs are of lorabench's own methods, none of
    which had settings of its own."""
    table = _inserted_after(table, "method", "method_settings", pa.array([""] * table.num_rows, pa.string()))
    table = _inserted_after(table, "engine", "method_digest", pa.nulls(table.num_rows, pa.string()))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), SCHEMA_KEY: b"5"})


def _from_version_5(table: pa.Table) -> pa.Table:
    """A version-5 table as version 6: its transformers were plain (prenorm 0), and the
    attention products' tail was not stored (null)."""
    table = _inserted_after(table, "dropout", "prenorm", pa.array([0] * table.num_rows, pa.int64()))
    table = _inserted_after(table, "svd_optimum_mse", "attention_tail", pa.nulls(table.num_rows, pa.float64()))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), SCHEMA_KEY: b"6"})


def _inserted_after(table: pa.Table, after: str, name: str, values) -> pa.Table:
    at = table.schema.get_field_index(after) + 1 if after in table.column_names else table.num_columns
    return table.add_column(at, RUNS_SCHEMA.field(name), values)


def read_rows(path: Union[str, os.PathLike], schema: pa.Schema = RUNS_SCHEMA) -> "pd.DataFrame":
    return read_table(path, schema).to_pandas()


def read_pieces(paths: "Iterable[Union[str, os.PathLike]]", schema: pa.Schema = SELECTED_SCHEMA) -> "pd.DataFrame":
    """The rows of a run made in pieces, one results file per piece (whole experiments, or
    some of an experiment's jobs). A row (experiment, protocol, config, checkpoint) must
    come from one piece only, so that no part of the run is counted twice."""
    import pandas as pd

    frames, source = [], {}
    identity = ["experiment", "protocol", "config_hash", "checkpoint"]
    for path in paths:
        frame = read_rows(path, schema)
        for key in frame[identity].drop_duplicates().itertuples(index=False):
            if tuple(key) in source:
                raise ResultsError(f"{path}: experiment {key[0]!r} under protocol {key[1]!r} (config {key[2]}, "
                                   f"checkpoint {key[3]!r}) is also in {source[tuple(key)]}; "
                                   "each piece must hold different rows")
            source[tuple(key)] = path
        frames.append(frame)
    if not frames:
        raise ResultsError("no results files given")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
