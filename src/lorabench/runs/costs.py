"""What the workflow's jobs cost: Snakemake's benchmark records (one TSV per job, under
``logs/benchmarks/<rule>/<experiment>/<protocol>/<name>.tsv``) summed per experiment, rule
and protocol into ``results/costs.csv``.

Snakemake takes a job's CPU time from samples of the process, every 0.5 s for the first
15 s, then every 30 s, and keeps the last sample before the job ends: a 28-second job that
used 20 CPU-seconds is recorded at 11. The workflow's model, construction and training
jobs therefore write their own CPU time on success (``lorabench --cpu-record PATH``, the
process's and its waited-for children's user + system time, from ``getrusage``) beside
the record, as ``<name>.cpu.json``; where that file exists its figure replaces the
sampled one.

Seconds and CPU seconds add up over a group's jobs; memory is the largest peak resident
set of any one job (peaks of jobs that ran one after the other do not add). With
``dispatch: slurm`` a training record measures the local process that waits for the Slurm
job, not the job itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import pandas as pd

from .atomic import atomic_write

COLUMNS = ["experiment", "rule", "protocol", "jobs", "s", "cpu_s", "max_rss_mb"]
CPU_RECORD_SUFFIX = ".cpu.json"


def cpu_seconds_so_far() -> float:
    """User + system CPU time of this process and of its children it has waited for."""
    import resource  # POSIX only: the workflow's jobs ask for it, reading records does not

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_cpu_record(path) -> Path:
    """``path`` (JSON, written atomically): this process's CPU time so far."""
    text = json.dumps({"cpu_s": round(cpu_seconds_so_far(), 3)}) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def cpu_record_of(benchmark_path) -> Path:
    """Where the job of a benchmark record writes its own CPU time."""
    path = Path(benchmark_path)
    return path.with_name(path.stem + CPU_RECORD_SUFFIX)


def _number(value) -> float:
    """A benchmark field as a float; Snakemake writes '-' or NA where it could not measure."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def read_record(path) -> dict:
    """One benchmark file: its rule, experiment and protocol (from the path) and its
    measurements (the sum over repeats of the wall and CPU time, the peak memory); the CPU
    time is the job's own record where it wrote one (see the module's docstring)."""
    path = Path(path)
    parts = path.parts
    if len(parts) < 4:
        raise ValueError(f"{path}: not a benchmark path <rule>/<experiment>/<protocol>/<name>.tsv")
    rule, experiment, protocol = parts[-4], parts[-3], parts[-2]
    table = pd.read_csv(path, sep="\t")
    own = cpu_record_of(path)
    cpu_s = json.loads(own.read_text())["cpu_s"] if own.exists() else sum(_number(v) for v in table.get("cpu_time", []))
    return {
        "experiment": experiment,
        "rule": rule,
        "protocol": protocol,
        "s": sum(_number(v) for v in table.get("s", [])),
        "cpu_s": float(cpu_s),
        "max_rss_mb": max((_number(v) for v in table.get("max_rss", [])), default=math.nan),
    }


def costs_table(records: Iterable[dict]) -> pd.DataFrame:
    """Records summed per (experiment, rule, protocol): jobs, s, cpu_s; max_rss_mb is the
    largest of the group (NaN where no job could be measured)."""
    frame = pd.DataFrame(list(records), columns=["experiment", "rule", "protocol", "s", "cpu_s", "max_rss_mb"])
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    grouped = frame.groupby(["experiment", "rule", "protocol"], sort=True)
    out = grouped.agg(jobs=("s", "size"), s=("s", "sum"), cpu_s=("cpu_s", "sum"),
                      max_rss_mb=("max_rss_mb", "max")).reset_index()
    return out[COLUMNS].round({"s": 3, "cpu_s": 3, "max_rss_mb": 1})


def write_costs(paths: Iterable[str], out) -> Path:
    """``out`` (CSV): the costs of the benchmark files ``paths``, written atomically. A
    missing file (a job finished before records were kept) is left out."""
    table = costs_table(read_record(p) for p in sorted(paths) if Path(p).exists())
    return atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
