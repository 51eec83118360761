"""The jobs' benchmark records summed per experiment, rule and protocol (lorabench.runs.costs)."""

import math

import pandas as pd

from lorabench.runs import costs

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def record(root, rule, experiment, protocol, name, s, rss, cpu):
    path = root / rule / experiment / protocol / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{s}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")
    return str(path)


def test_costs_sum_time_and_keep_the_largest_memory_per_group(tmp_path):
    paths = [
        record(tmp_path, "train", "fnn", "paper", "s0-a", 10.0, 300.5, 9.0),
        record(tmp_path, "train", "fnn", "paper", "s1-b", 20.0, 200.0, 19.0),
        record(tmp_path, "train", "fnn", "reference", "s0-c", 5.0, 100.0, 4.0),
        record(tmp_path, "aggregate", "all", "all", "runs", 1.5, "-", "-"),  # too short to measure memory
    ]
    out = tmp_path / "costs.csv"
    costs.write_costs(paths + [str(tmp_path / "train/fnn/paper/missing.tsv")], out)
    table = pd.read_csv(out)
    assert list(table.columns) == costs.COLUMNS
    rows = {(r.experiment, r.rule, r.protocol): r for r in table.itertuples()}
    paper = rows[("fnn", "train", "paper")]
    assert (paper.jobs, paper.s, paper.cpu_s, paper.max_rss_mb) == (2, 30.0, 28.0, 300.5)
    assert rows[("fnn", "train", "reference")].s == 5.0
    assert math.isnan(rows[("all", "aggregate", "all")].max_rss_mb)
    assert len(table) == 3


def test_no_records_give_an_empty_table_with_the_columns(tmp_path):
    costs.write_costs([], tmp_path / "costs.csv")
    assert list(pd.read_csv(tmp_path / "costs.csv").columns) == costs.COLUMNS


def test_a_jobs_own_cpu_record_replaces_the_sampled_cpu_time(tmp_path):
    """Snakemake samples a job's CPU time every 30 s after its first 15 s, and keeps the last
    sample: the job's own record (written on success) is the figure that counts."""
    sampled = record(tmp_path, "train", "tfn", "paper", "s0-a", 28.0, 300.0, 11.08)
    (tmp_path / "train/tfn/paper/s0-a.cpu.json").write_text('{"cpu_s": 20.01}\n')
    assert costs.cpu_record_of(sampled) == tmp_path / "train/tfn/paper/s0-a.cpu.json"
    assert costs.read_record(sampled)["cpu_s"] == 20.01
    other = record(tmp_path, "train", "tfn", "paper", "s1-b", 5.0, 300.0, 4.5)  # no own record: the sample
    assert costs.read_record(other)["cpu_s"] == 4.5


def test_the_cpu_record_counts_this_process_and_is_written_on_success_only(tmp_path, capsys):
    import json

    from lorabench.cli import main

    before = costs.cpu_seconds_so_far()
    sum(i * i for i in range(2_000_000))  # some CPU work
    assert costs.cpu_seconds_so_far() > before
    path = tmp_path / "records" / "job.cpu.json"
    assert main(["--cpu-record", str(path), "costs", "--out", str(tmp_path / "costs.csv")]) == 0
    assert json.loads(path.read_text())["cpu_s"] >= before
    failed = tmp_path / "records" / "failed.cpu.json"
    try:
        main(["--cpu-record", str(failed), "claims", "--out", str(tmp_path / "x")])  # neither --runs nor --selected
    except SystemExit as exit_:
        assert exit_.code != 0
    assert not failed.exists()
