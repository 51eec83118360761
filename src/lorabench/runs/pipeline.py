"""The workflow's steps; ``lorabench <step>`` (cli.py) calls these, and the Snakemake rules
call only those subcommands.

    lorabench models    --job REF --out M.pt          frozen + target models of one job
    lorabench construct --job REF --models M.pt --out C.parquet
    lorabench train     --job REF --models M.pt --out T.parquet [--reuse C.parquet ...] [--dispatch ...]
    lorabench aggregate --out runs.parquet [--selected selected.parquet] FILE...
    lorabench select    --runs results/runs.parquet --out results/selected.parquet
    lorabench costs     --out results/costs.csv BENCHMARK.tsv...

A job is given either as a reference (``--job``, JSON from
``experiments.WorkflowConfig.job_ref``: the step expands the job's experiment again) or as
a spec file (``--spec``, JSON of ``experiments.Job.spec``: the job's experiment, protocol,
seed and RunConfigs). Every output is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .atomic import atomic_write
from ..core.config import ConfigError, RunConfig
from .dispatch import SlurmSettings
from .results import ResultsError


# ------------------------------------------------------------------- helpers
def read_spec(path: str) -> dict:
    """A job spec; a missing or malformed one is refused with one line naming the file."""
    try:
        with open(path) as f:
            spec = json.load(f)
        spec["configs"] = [RunConfig(**values) for values in spec["configs"]]
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job spec") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}: not a lorabench job spec ({type(error).__name__}: {error})") from None
    return spec


def job_spec(ref: str) -> dict:
    """The spec of the job a workflow job reference names (``experiments.resolve_job``)."""
    from .experiments import resolve_job

    job = resolve_job(ref)
    return {"experiment": job.experiment, "protocol": job.protocol, "seed": job.seed, "kind": job.kind,
            "configs": list(job.configs)}


def _spec(spec) -> dict:
    """A spec given as a file path (read_spec) or already read."""
    return spec if isinstance(spec, dict) else read_spec(spec)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def save_models(models: dict, path: str) -> None:
    """``{model key: Models}`` -> one torch file, written atomically."""
    import torch

    payload = [(key.to_dict(), value) for key, value in models.items()]
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_models(path: str) -> dict:
    """``{model key: Models}`` from a models file. A missing file raises
    FileNotFoundError as usual; an unreadable one (e.g. left truncated by a killed run) is
    refused with one line naming it."""
    import torch

    try:
        payload = torch.load(path, weights_only=False)
        return {RunConfig(**key): value for key, value in payload}
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises many types on a truncated or foreign file
        raise ResultsError(
            f"{path}: not a readable models file, corrupt or truncated "
            f"({type(error).__name__}: {error}); delete it and rerun"
        ) from None


def _rows_with_experiment(rows, experiment: str) -> list[dict]:
    out = []
    for row in rows:
        row["experiment"] = row["computed_in"] = experiment
        out.append(row)
    return out


def reused_rows(paths, cfgs) -> dict[str, list[dict]]:
    """Config hash -> its rows in other train jobs' result files, for the configs of
    ``cfgs`` found there (their ``computed_in`` names the experiment that trained them).
    A config held by several files (one job may have copied it from another) is taken
    from the first, so its rows are never doubled."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .results import read_table

    wanted = pa.array(sorted({c.config_hash() for c in cfgs}), pa.string())
    found: dict[str, list[dict]] = {}
    for path in paths:
        table = read_table(path)
        here: dict[str, list[dict]] = {}
        for row in table.filter(pc.is_in(table["config_hash"], value_set=wanted)).to_pylist():
            here.setdefault(row["config_hash"], []).append(row)
        found.update({key: rows for key, rows in here.items() if key not in found})
    return found


# ------------------------------------------------------------------- steps
def generate(spec, out: str, threads: int = 1) -> None:
    from ..core.protocols import generate_models

    _set_threads(threads)
    spec = _spec(spec)
    save_models({key: generate_models(key) for key in spec["configs"]}, out)


def run_spec(spec, models_path: str, device: str = "auto", threads: int = 1) -> list[dict]:
    """Result rows of every config of a spec (a path or a read spec), from the job's
    pre-generated models.

    Module-level so that submitit can pickle it (training may run in another process or
    on a cluster node)."""
    from .runner import run_configs

    _set_threads(threads)
    spec = _spec(spec)
    models = load_models(models_path)
    return _rows_with_experiment(run_configs(spec["configs"], device=device, models=models), spec["experiment"])


def construct(spec, models_path: str, out: str, device: str = "auto", threads: int = 1) -> None:
    from .results import check_writable, write_rows

    check_writable(out)
    write_rows(run_spec(spec, models_path, device, threads), out)


def train(spec, models_path: str, out: str, device: str = "auto", threads: int = 1, *, reuse: Sequence[str] = (),
          dispatch: str = "local", log_dir: Optional[str] = None, slurm: Optional[SlurmSettings] = None) -> None:
    """``run_spec`` where ``dispatch`` says (this process, submitit-local or Slurm), then
    its rows to ``out``. Configs whose rows are in a ``reuse`` file (another experiment's
    train job that holds them too) are taken from there instead of trained again."""
    from . import dispatch as dispatching
    from .results import check_writable, write_rows

    check_writable(out)
    spec = _spec(spec)
    reused = reused_rows(reuse, spec["configs"])
    rest = [c for c in spec["configs"] if c.config_hash() not in reused]
    rows = dispatching.run(
        run_spec, {**spec, "configs": rest}, models_path, device, threads,
        mode=dispatch, log_dir=log_dir, name=f"lorabench-{Path(out).stem}", slurm=slurm,
    ) if rest else []
    for found in reused.values():
        rows.extend({**row, "experiment": spec["experiment"]} for row in found)
    write_rows(rows, out)


def aggregate(inputs: list[str], out: str, selected: Optional[str] = None) -> None:
    """The result files as one table in ``out``; with ``selected``, its selection too (one
    process for both)."""
    import pyarrow as pa

    from .results import RUNS_SCHEMA, atomic_write_table, read_table, validate_table

    tables = [read_table(path) for path in sorted(inputs)]
    table = pa.concat_tables(tables) if tables else RUNS_SCHEMA.empty_table()
    table = table.replace_schema_metadata(RUNS_SCHEMA.metadata)
    validate_table(table, out)
    atomic_write_table(table, out)
    if selected:
        select(out, selected)


def select(runs_path: str, out: str) -> None:
    import pyarrow as pa

    from .results import SELECTED_SCHEMA, atomic_write_table, read_rows, validate_table
    from .selection import select_by_validation

    selected = select_by_validation(read_rows(runs_path))
    table = pa.Table.from_pandas(selected[SELECTED_SCHEMA.names], schema=SELECTED_SCHEMA, preserve_index=False)
    validate_table(table, out, SELECTED_SCHEMA)
    atomic_write_table(table, out)
