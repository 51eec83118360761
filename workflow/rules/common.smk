# Config helpers and input functions. The logic lives in lorabench.runs.experiments: it expands
# the validated config into RunConfigs and cuts them into jobs named by a hash of their
# configs (results/<stage>/<experiment>/<protocol>/s<seed>-<hash>.*).
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from lorabench.runs import experiments as lbx
from lorabench.runs.atomic import atomic_write
from lorabench.core.config import ConfigError

try:
    WF = lbx.load(config)
except ConfigError as error:
    raise WorkflowError(f"config: {error}") from None

# The interpreter running Snakemake has lorabench installed; with --use-conda the
# environment's python is the one on PATH.
_conda = "conda" in str(getattr(workflow.deployment_settings, "deployment_method", "")).lower()
LB = "python -m lorabench" if _conda else f"{shlex.quote(sys.executable)} -m lorabench"
CONDA_ENV = "../../envs/lorabench.yaml"

JOBS = WF.jobs()
JOB_BY_ID = lbx.job_index(JOBS)
MODELS_JOB = lbx.models_jobs(JOBS)
STAGE_DIR = {"models": "models", "construct": "constructions", "train": "cells"}
SUFFIX = {"models": "pt", "construct": "parquet", "train": "parquet"}


wildcard_constraints:
    experiment="[A-Za-z0-9_]+",
    protocol="paper|reference",
    kind="models|construct|train",
    job=r"(s\d+|all)-[0-9a-f]{16}",


def job_path(job):
    return f"results/{STAGE_DIR[job.kind]}/{job.experiment}/{job.protocol}/{job.id}.{SUFFIX[job.kind]}"


def find_job(wildcards, kind):
    key = (wildcards.experiment, wildcards.protocol, kind, wildcards.job)
    if key not in JOB_BY_ID:
        raise WorkflowError(f"no {kind} job {wildcards.job} in experiment {wildcards.experiment} ({wildcards.protocol}) of this config")
    return JOB_BY_ID[key]


def models_of(kind):
    """Input function: the models file of a construct/train job's seed."""

    def inputs(wildcards):
        job = find_job(wildcards, kind)
        return job_path(MODELS_JOB[(job.experiment, job.protocol, job.seed)])

    return inputs


def result_files():
    """Every construction and training result file of the config."""
    return sorted(job_path(j) for j in JOBS if j.kind != "models")


def spec_path(job):
    return f"results/specs/{job.experiment}/{job.protocol}/{job.kind}/{job.id}.json"


def spec_of(kind):
    return lambda wildcards: spec_path(find_job(wildcards, kind))


def write_specs(jobs):
    """Each job's spec (its RunConfigs) as JSON, written here when the workflow is parsed:
    a spec is a pure function of the config and its path names its content, so an
    existing file is never rewritten (no mtime change, no rerun). Written here rather
    than by a rule because `run:` jobs cost a Snakemake process each."""
    for job in jobs:
        path = spec_path(job)
        if os.path.exists(path):
            continue
        text = json.dumps(job.spec(), sort_keys=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


write_specs(JOBS)
