"""The workflow's steps as ``lorabench`` subcommands; the Snakemake rules only call these.

    lorabench models    --job REF --out M.pt          frozen + target models of one job
    lorabench construct --job REF --models M.pt --out C.parquet
    lorabench train     --job REF --models M.pt --out T.parquet [--dispatch ...]
    lorabench aggregate --out runs.parquet [--selected selected.parquet] FILE...
    lorabench select    --runs results/runs.parquet --out results/selected.parquet
    lorabench costs     --out results/costs.csv BENCHMARK.tsv...

A job is given either as a reference (``--job``, JSON from
``experiments.WorkflowConfig.job_ref``: the step expands the job's experiment again) or as
a spec file (``--spec``, JSON of ``experiments.Job.spec``: the job's experiment, protocol,
seed and RunConfigs). Every output is written atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from .atomic import atomic_write
from ..core.config import ConfigError, RunConfig
from .dispatch import DISPATCHES, SlurmSettings
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
        row["experiment"] = experiment
        out.append(row)
    return out


# ------------------------------------------------------------------- steps
def generate(spec, out: str) -> None:
    from ..core.generation import generate_models

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


# ------------------------------------------------------------------- CLI
def _add_job(p) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", help="the workflow's job reference (JSON)")
    which.add_argument("--spec", help="a job spec file (JSON)")


def add_subparsers(sub) -> None:
    """Add the workflow's subcommands to ``lorabench``'s subparsers."""
    p = sub.add_parser("models", help="workflow: generate the frozen and target models of a job")
    _add_job(p)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)

    for name, text in (("construct", "run the constructions (method ours) of a job"),
                       ("train", "train the gradient runs of a job")):
        p = sub.add_parser(name, help=f"workflow: {text}")
        _add_job(p)
        p.add_argument("--models", required=True, help="the job's models file (lorabench models)")
        p.add_argument("--out", required=True, help="Parquet file of result rows")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        if name == "train":
            p.add_argument("--dispatch", choices=DISPATCHES, default="local")
            p.add_argument("--log-dir", default="logs/submitit", help="submitit's job logs")
            defaults = SlurmSettings()
            p.add_argument("--slurm-partition", default=defaults.partition)
            p.add_argument("--slurm-gpus", type=int, default=defaults.gpus)
            p.add_argument("--slurm-cpus", type=int, default=defaults.cpus)
            p.add_argument("--slurm-mem-gb", type=int, default=defaults.mem_gb)
            p.add_argument("--slurm-time-min", type=int, default=defaults.time_min)
            p.add_argument("--slurm-account", default=defaults.account)
            p.add_argument("--slurm-qos", default=defaults.qos)

    p = sub.add_parser("aggregate", help="workflow: concatenate result files into one Parquet file")
    p.add_argument("--out", required=True)
    p.add_argument("--selected", help="also write the selection by validation loss here")
    p.add_argument("inputs", nargs="*")

    p = sub.add_parser("select", help="workflow: select per group the lr x weight decay point with the lowest validation loss")
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("costs", help="workflow: sum the jobs' benchmark records per experiment, rule and protocol")
    p.add_argument("--out", required=True, help="CSV file")
    p.add_argument("inputs", nargs="*", help="Snakemake benchmark files (<rule>/<experiment>/<protocol>/<name>.tsv)")


COMMANDS = ("models", "construct", "train", "aggregate", "select", "costs")


def main(args: argparse.Namespace) -> int:
    from .results import check_writable, write_rows

    if getattr(args, "threads", 1) < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.command in ("models", "construct", "train"):
        spec = job_spec(args.job) if args.job is not None else args.spec
    if args.command == "models":
        _set_threads(args.threads)
        generate(spec, args.out)
    elif args.command == "construct":
        check_writable(args.out)
        write_rows(run_spec(spec, args.models, args.device, args.threads), args.out)
    elif args.command == "train":
        from . import dispatch

        check_writable(args.out)
        slurm = SlurmSettings(
            partition=args.slurm_partition, gpus=args.slurm_gpus, cpus=args.slurm_cpus, mem_gb=args.slurm_mem_gb,
            time_min=args.slurm_time_min, account=args.slurm_account, qos=args.slurm_qos,
        )
        rows = dispatch.run(
            run_spec, spec, args.models, args.device, args.threads,
            mode=args.dispatch, log_dir=args.log_dir, name=f"lorabench-{Path(args.out).stem}", slurm=slurm,
        )
        write_rows(rows, args.out)
    elif args.command == "aggregate":
        aggregate(args.inputs, args.out, args.selected)
    elif args.command == "select":
        select(args.runs, args.out)
    elif args.command == "costs":
        from .costs import write_costs

        write_costs(args.inputs, args.out)
    return 0
