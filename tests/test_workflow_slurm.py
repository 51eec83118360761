"""The smoke workflow on a real (single-node, local) Slurm cluster: through the Snakemake
Slurm executor profile (workflow/profiles/slurm) and through ``dispatch: slurm`` (submitit).

Opt-in (about 2-4 minutes, and it starts daemons as root): LORABENCH_SLURM_TESTS=1.
The cluster comes from .ci/slurm/up.sh; when it cannot be brought up the tests are skipped
with up.sh's error.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from lorabench.runs.results import read_table
from test_workflow import ROOT, make_workdir, snakemake, tiny_config

pytestmark = pytest.mark.skipif(
    os.environ.get("LORABENCH_SLURM_TESTS") != "1", reason="Slurm tests are opt-in: set LORABENCH_SLURM_TESTS=1"
)


@pytest.fixture(scope="module")
def slurm_cluster():
    up = ROOT / ".ci/slurm/up.sh"
    if not up.exists():
        pytest.skip(".ci/slurm/up.sh is missing")
    if shutil.which("sinfo"):
        already = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
        was_up = already.returncode == 0 and already.stdout.strip() in ("idle", "mix", "alloc")
    else:
        was_up = False
    try:
        proc = subprocess.run(["bash", str(up)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("Slurm could not be brought up: .ci/slurm/up.sh timed out")
    if proc.returncode != 0:
        pytest.skip(f"Slurm could not be brought up (.ci/slurm/up.sh): {proc.stderr.strip()[-1500:]}")
    yield
    if not was_up:
        subprocess.run(["bash", str(ROOT / ".ci/slurm/down.sh")], capture_output=True, timeout=120)


def test_slurm_executor_profile(slurm_cluster, tmp_path):
    workdir = make_workdir(tmp_path / "run", tiny_config(experiments=("fnn",)))
    profile = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    profile.update({"jobs": 4, "latency-wait": 5, "slurm-init-seconds-before-status-checks": 2})
    # the test cluster: partition debug, account lorabench, no GPUs
    profile["default-resources"].update(slurm_partition="debug", slurm_account="lorabench", runtime=10, mem_mb=1000)
    for resources in profile["set-resources"].values():
        resources.pop("slurm_partition", None)
    profile["set-resources"]["train"].update(gpu=0, mem_mb=1000, runtime=10)
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile/config.yaml").write_text(yaml.safe_dump(profile))
    snakemake(workdir, "--workflow-profile", str(tmp_path / "profile"), "all_results", timeout=600)
    runs = read_table(workdir / "results/runs.parquet").to_pandas()
    assert set(runs["method"]) == {"ours", "sgd"}


def test_dispatch_slurm(slurm_cluster, tmp_path):
    slurm = {"partition": "debug", "gpus": 0, "cpus": 1, "mem_gb": 1, "time_min": 10, "account": "", "qos": ""}
    workdir = make_workdir(tmp_path, tiny_config(experiments=("fnn",), dispatch="slurm", slurm=slurm))
    snakemake(workdir, "all_results", timeout=600)
    runs = read_table(workdir / "results/runs.parquet").to_pandas()
    assert set(runs["method"]) == {"ours", "sgd"}
    assert list((workdir / "logs/submitit").rglob("*_log.out"))


def test_dispatch_slurm_failure_fails_the_job_cleanly(slurm_cluster, tmp_path):
    slurm = {"partition": "no_such_partition", "gpus": 0, "cpus": 1, "mem_gb": 1, "time_min": 10, "account": "", "qos": ""}
    workdir = make_workdir(tmp_path, tiny_config(experiments=("fnn",), dispatch="slurm", slurm=slurm))
    proc = snakemake(workdir, "all_results", check=False, timeout=600)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (workdir / "logs/train").rglob("*.log"))
    assert "could not submit" in logs and "no_such_partition" in logs
    assert not list((workdir / "results/cells").rglob("*.parquet"))
