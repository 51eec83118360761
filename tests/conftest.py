import time
from pathlib import Path

import pytest
import torch

# The models are tiny: one thread is fastest and keeps the suite's numbers independent of
# how many cores the machine has.
torch.set_num_threads(1)


# The smoke workflow takes minutes: one run for the whole tests folder (package scope),
# shared by every test file that needs its outputs (test_workflow.py, test_report_browser.py).
@pytest.fixture(scope="package")
def smoke_run(tmp_path_factory):
    from test_workflow import SNAKEMAKE, make_workdir, snakemake

    if not Path(SNAKEMAKE).exists():
        pytest.skip("snakemake is not installed next to python")
    workdir = make_workdir(tmp_path_factory.mktemp("smoke"))
    start = time.perf_counter()
    snakemake(workdir, "all_figures", "--config", "preset=smoke")
    print(f"smoke workflow: {time.perf_counter() - start:.0f} s")
    return workdir


@pytest.fixture(scope="package")
def smoke_report(smoke_run):
    """The smoke run's Snakemake report, report.html in its working directory."""
    from test_workflow import snakemake

    snakemake(smoke_run, "--report", "report.html", "--config", "preset=smoke")
    return smoke_run / "report.html"
