"""The workflow's steps as ``lorabench`` subcommands; the Snakemake rules only call these.

    lorabench models    --spec S --out M.pt          frozen + target models of one job
    lorabench construct --spec S --models M.pt --out C.parquet
    lorabench train     --spec S --models M.pt --out T.parquet [--dispatch ...]
    lorabench aggregate --out results/runs.parquet FILE...
    lorabench select    --runs results/runs.parquet --out results/selected.parquet

A spec is a JSON file written by the workflow (``experiments.Job.spec``): the job's
experiment, protocol, seed and RunConfigs. Every output is written atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
def generate(spec_path: str, out: str) -> None:
    from ..core.generation import generate_models

    spec = read_spec(spec_path)
    save_models({key: generate_models(key) for key in spec["configs"]}, out)


def run_spec(spec_path: str, models_path: str, device: str = "auto", threads: int = 1) -> list[dict]:
    """Result rows of every config of a spec, from the job's pre-generated models.

    Module-level so that submitit can pickle it (training may run in another process or
    on a cluster node)."""
    from .runner import run_configs

    _set_threads(threads)
    spec = read_spec(spec_path)
    models = load_models(models_path)
    return _rows_with_experiment(run_configs(spec["configs"], device=device, models=models), spec["experiment"])


def aggregate(inputs: list[str], out: str) -> None:
    import pyarrow as pa

    from .results import RUNS_SCHEMA, atomic_write_table, read_table, validate_table

    tables = [read_table(path) for path in sorted(inputs)]
    table = pa.concat_tables(tables) if tables else RUNS_SCHEMA.empty_table()
    table = table.replace_schema_metadata(RUNS_SCHEMA.metadata)
    validate_table(table, out)
    atomic_write_table(table, out)


def select(runs_path: str, out: str) -> None:
    import pyarrow as pa

    from .results import SELECTED_SCHEMA, atomic_write_table, read_rows, validate_table
    from .selection import select_by_validation

    selected = select_by_validation(read_rows(runs_path))
    table = pa.Table.from_pandas(selected[SELECTED_SCHEMA.names], schema=SELECTED_SCHEMA, preserve_index=False)
    validate_table(table, out, SELECTED_SCHEMA)
    atomic_write_table(table, out)


# ------------------------------------------------------------------- CLI
def add_subparsers(sub) -> None:
    """Add the workflow's subcommands to ``lorabench``'s subparsers."""
    p = sub.add_parser("models", help="workflow: generate the frozen and target models of a job spec")
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)

    for name, text in (("construct", "run the constructions (method ours) of a job spec"),
                       ("train", "train the gradient runs of a job spec")):
        p = sub.add_parser(name, help=f"workflow: {text}")
        p.add_argument("--spec", required=True)
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
    p.add_argument("inputs", nargs="*")

    p = sub.add_parser("select", help="workflow: select per group the lr x weight decay point with the lowest validation loss")
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)


COMMANDS = ("models", "construct", "train", "aggregate", "select")


def main(args: argparse.Namespace) -> int:
    from .results import check_writable, write_rows

    if getattr(args, "threads", 1) < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.command == "models":
        _set_threads(args.threads)
        generate(args.spec, args.out)
    elif args.command == "construct":
        check_writable(args.out)
        write_rows(run_spec(args.spec, args.models, args.device, args.threads), args.out)
    elif args.command == "train":
        from . import dispatch

        check_writable(args.out)
        slurm = SlurmSettings(
            partition=args.slurm_partition, gpus=args.slurm_gpus, cpus=args.slurm_cpus, mem_gb=args.slurm_mem_gb,
            time_min=args.slurm_time_min, account=args.slurm_account, qos=args.slurm_qos,
        )
        rows = dispatch.run(
            run_spec, args.spec, args.models, args.device, args.threads,
            mode=args.dispatch, log_dir=args.log_dir, name=f"lorabench-{Path(args.out).stem}", slurm=slurm,
        )
        write_rows(rows, args.out)
    elif args.command == "aggregate":
        aggregate(args.inputs, args.out)
    elif args.command == "select":
        select(args.runs, args.out)
    return 0
