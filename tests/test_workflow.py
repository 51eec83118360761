"""The Snakemake workflow end to end on the smoke preset, in temporary copies of the repo's
Snakefile, workflow/ and config.yaml (Snakemake runs as a subprocess; ~3-4 minutes on 2 cores).

Slurm tests (a single-node cluster brought up by .ci/slurm/up.sh) are opt-in:
LORABENCH_SLURM_TESTS=1.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lorabench.runs.results import RUNS_SCHEMA, SELECTED_SCHEMA, read_table

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())
# columns that legitimately differ between two runs of the same configs
VOLATILE = ["wall_time_s", "device_name", "torch_threads"]

pytestmark = pytest.mark.skipif(not Path(SNAKEMAKE).exists(), reason="snakemake is not installed next to python")


def make_workdir(path: Path, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "Snakefile", path / "Snakefile")
    shutil.copytree(ROOT / "workflow", path / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "envs", path / "envs")
    (path / "config.yaml").write_text(yaml.safe_dump(config if config is not None else CONFIG, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 1200) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "--directory", str(workdir), "--snakefile", str(workdir / "Snakefile"), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tiny_config(experiments=("fnn", "classification"), **top) -> dict:
    """The smoke preset restricted to a few experiments and the paper protocol."""
    config = copy.deepcopy(CONFIG)
    config["experiments"] = {name: config["experiments"][name] for name in experiments}
    for preset in config["presets"].values():  # per-experiment scaling of experiments left out
        overrides = (preset or {}).get("experiments") or {}
        for name in list(overrides):
            if name not in experiments:
                del overrides[name]
    config.update(preset="smoke", protocols=["paper"], **top)
    return config


def planned_outputs(workdir: Path, *args: str) -> list[str]:
    """The output files of the jobs a dry run would run."""
    proc = snakemake(workdir, "-n", *args)
    return [path for line in re.findall(r"^\s+output: (.+)$", proc.stdout, flags=re.M) for path in line.split(", ")]


def comparable(path: Path, schema=RUNS_SCHEMA) -> pd.DataFrame:
    df = read_table(path, schema).to_pandas().drop(columns=VOLATILE)
    keys = ["experiment", "config_hash", "checkpoint"]
    return df.sort_values(keys).reset_index(drop=True)


# --------------------------------------------------------------- the smoke run (conftest.py)
def test_smoke_writes_both_parquet_files_with_their_schemas(smoke_run):
    runs = read_table(smoke_run / "results/runs.parquet", RUNS_SCHEMA).to_pandas()
    selected = read_table(smoke_run / "results/selected.parquet", SELECTED_SCHEMA).to_pandas()
    assert set(runs["experiment"]) == set(CONFIG["experiments"])
    assert set(runs["protocol"]) == {"paper", "reference"}
    assert runs["experiment"].notna().all()
    assert set(runs["checkpoint"]) == {"construction", "last", "best"}
    assert len(selected) > 0 and set(selected["experiment"]) == set(runs["experiment"])
    assert (selected["n_candidates"] >= 1).all()


def test_smoke_writes_every_figure_under_each_protocol_that_ran(smoke_run):
    from lorabench.report.figures import FIGURE_NAMES

    paper_only = {name for name, spec in CONFIG["experiments"].items() if spec.get("protocols") == ["paper"]}
    assert paper_only == {"methods", "tfn_low_rank", "tfn_prenorm"}  # each its own figure's only experiment
    figures = smoke_run / "results/figures"
    for name in FIGURE_NAMES:
        for protocol in ("paper",) if name in paper_only else ("paper", "reference"):
            for ext in ("png", "pdf"):
                assert (figures / protocol / f"{name}.{ext}").stat().st_size > 0
    assert sorted(p.name for p in figures.iterdir()) == ["paper", "reference"]
    assert sorted(p.stem for p in (figures / "reference").glob("*.png")) == sorted(set(FIGURE_NAMES) - paper_only)
    for name in ("claims.md", "claims.csv", "protocol_comparison.png", "protocol_comparison.md"):
        assert (smoke_run / "results" / name).exists()


def test_smoke_writes_the_paper_tables_with_both_protocols(smoke_run):
    from lorabench.report.paper_tables import TABLES

    text = (smoke_run / "results/paper_tables.md").read_text()
    assert all(f"## {table.title}" in text for table in TABLES)
    line = next(line for line in text.splitlines() if line.startswith("| random: construction, R=1 |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert len(cells) == 4 and float(cells[2]) > 0 and float(cells[3]) > 0  # measured under both protocols


def test_smoke_writes_the_costs_of_every_rule(smoke_run):
    costs = pd.read_csv(smoke_run / "results/costs.csv")
    assert {"generate_models", "train", "construct", "aggregate_protocol", "aggregate_experiment", "aggregate", "claims",
            "paper_tables", "figure_fnn"} <= set(costs["rule"])
    trained = {name for name, spec in CONFIG["experiments"].items() if set(spec["methods"]) - {"ours"}}
    assert set(costs.loc[costs["rule"] == "train", "experiment"]) == trained  # threshold_law: constructions only
    assert set(costs.loc[costs["rule"] == "train", "protocol"]) == {"paper", "reference"}
    assert (costs["s"] > 0).all() and (costs["jobs"] >= 1).all()
    # the model, construction and training jobs' CPU time is their own record, not Snakemake's sample
    for rule in ("generate_models", "construct", "train"):
        records = sorted((smoke_run / "logs/benchmarks" / rule).rglob("*.tsv"))
        own = [json.loads((r.with_name(r.stem + ".cpu.json")).read_text())["cpu_s"] for r in records]
        assert records and len(own) == len(records)
        assert costs.loc[costs["rule"] == rule, "cpu_s"].sum() == pytest.approx(sum(own), abs=1e-2)


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_shared_configs_are_trained_once_and_copied(smoke_run, tmp_path, protocol):
    """bias's tuned-bias runs and all of training_curves' are fnn's configs: fnn's train
    job trains them and the others copy its rows (computed_in says so). Training bias's
    job in full, in its own cell with its own models file, gives those rows bit for bit."""
    from lorabench.runs import experiments as lbx, pipeline

    runs = read_table(smoke_run / "results/runs.parquet").to_pandas()
    runs = runs[runs["protocol"] == protocol]
    bias = runs[runs["experiment"] == "bias"]
    copied = bias[bias["computed_in"] == "fnn"]
    assert set(copied["tune_bias"]) == {1} and set(bias.loc[bias["computed_in"] == "bias", "tune_bias"]) == {0}
    assert set(runs.loc[runs["experiment"] == "training_curves", "computed_in"]) == {"fnn"}
    wf = lbx.load({**copy.deepcopy(CONFIG), "preset": "smoke"})
    job = next(j for j in wf.jobs() if (j.experiment, j.kind, j.protocol) == ("bias", "train", protocol))
    (models,) = (smoke_run / f"results/models/bias/{protocol}").glob("*.pt")
    pipeline.train(pipeline.job_spec(wf.job_ref(job)), str(models), str(tmp_path / "alone.parquet"), device="cpu")
    alone = read_table(tmp_path / "alone.parquet").to_pandas().set_index(["config_hash", "checkpoint"])
    keys = list(zip(copied["config_hash"], copied["checkpoint"]))
    assert len(keys) == 2 * 2 * 4 * 2  # pretrained x ranks x seeds, both checkpoints
    for column in ("test_loss", "test_shift_loss", "val_loss", "train_loss", "best_step", "train_curve"):
        assert [list(v) if column.endswith("curve") else v for v in copied[column]] == \
               [list(v) if column.endswith("curve") else v for v in alone.loc[keys, column]], column


def test_second_invocation_has_nothing_to_do(smoke_run):
    proc = snakemake(smoke_run, "-n", "all_figures", "--config", "preset=smoke")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert "lorabench: preset" not in proc.stdout + proc.stderr  # nothing to train: no cost block


def test_a_run_says_what_its_jobs_will_cost_before_the_first(tmp_path, monkeypatch):
    """A dry run prints the preset, the jobs still to run and, from a cached calibration,
    their projected core-hours and wall time on the given cores; without one it says so
    and names the command that measures it. A figure target counts its experiment's jobs."""
    import torch

    from lorabench.runs import plan
    from lorabench.training import native

    cache = tmp_path / "cache"
    monkeypatch.setenv("LORABENCH_CACHE_DIR", str(cache))
    workdir = make_workdir(tmp_path / "work", tiny_config(experiments=("fnn", "bias")))
    text = "\n".join(snakemake(workdir, "-n", "all_figures").stderr.splitlines())
    assert re.search(r"lorabench: preset smoke, \d+ jobs to run; no projection: this machine has no cached "
                     r"calibration of '[^']+'\. `lorabench plan --preset smoke` measures one", text), text[-2000:]
    assert not cache.exists() or not any(cache.iterdir())  # it never calibrates (nor builds) silently
    # a cache with every unit the run needs, as `lorabench plan` writes it
    rate = {"depths": [1, 2], "step_s": [1e-4, 2e-4], "config_s": [0.01, 0.02]}
    wf, jobs = plan.load_workflow(str(workdir / "config.yaml"))
    plan.make_plan(wf, jobs, [2], calibrate=lambda unit, example: {"seconds": 1.0} if unit == plan.STARTUP else rate,
                   native=lambda cfg: native.applies(cfg, torch.device("cpu")), path=cache / plan.CACHE_NAME)
    every = re.search(r"lorabench: preset smoke, (\d+) jobs to run: projected [\d.e-]+ core-hours, about [\d.]+ "
                      r"(s|min|h) on 2 cores", snakemake(workdir, "-n", "all_figures").stderr)
    fnn = re.search(r"lorabench: preset smoke, (\d+) jobs to run: projected",
                    snakemake(workdir, "-n", "results/figures/paper/fnn.png").stderr)
    assert every and fnn and int(fnn.group(1)) < int(every.group(1))  # fnn's jobs alone (bias reuses fnn's)
    for inspect in ("--unlock", "--list-rules", "--summary"):  # they run no job: no cost block
        assert "lorabench: preset" not in snakemake(workdir, inspect).stderr, inspect


def test_report_embeds_every_figure_with_a_caption_naming_its_protocol(smoke_report):
    from lorabench.report.figures import FIGURE_NAMES

    html = smoke_report.read_text()
    for name in FIGURE_NAMES:
        assert f"results/figures/paper/{name}.png" in html
    assert "results/figures/reference/tfn.png" in html and "results/figures/reference/methods.png" not in html
    assert "Transformer networks" in html  # a caption from workflow/report/tfn.rst
    assert "Paper protocol (the paper" in html and "Reference protocol (the authors" in html


def test_changing_one_experiment_reruns_only_its_jobs(smoke_run):
    path = smoke_run / "config.yaml"
    original = path.read_text()
    config = yaml.safe_load(original)
    config["experiments"]["bias"]["settings"]["pretrained_lr"] = 2.0e-3
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        outputs = planned_outputs(smoke_run, "all_figures", "--config", "preset=smoke")
    finally:
        path.write_text(original)
    per_job = [o for o in outputs if re.match(r"results/(models|constructions|cells)/", o)]
    assert per_job, outputs
    assert {o.split("/")[2] for o in per_job} == {"bias"}
    # both protocols' models and training of that experiment, then aggregation and figures
    assert len(per_job) == 4
    assert "results/runs.parquet" in outputs and "results/selected.parquet" in outputs


# --------------------------------------------------------------- the workflow without running it
def tree(path: Path) -> dict[str, float]:
    """Every file under path but Snakemake's own metadata, with its mtime."""
    return {str(p.relative_to(path)): p.stat().st_mtime for p in path.rglob("*")
            if p.is_file() and ".snakemake" not in p.relative_to(path).parts}


def test_lint_is_clean(tmp_path):
    workdir = make_workdir(tmp_path)
    proc = snakemake(workdir, "--lint", "--config", "preset=smoke", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_dry_run_leaves_the_tree_as_it_found_it(tmp_path):
    workdir = make_workdir(tmp_path)
    before = tree(workdir)
    for preset in ("smoke", "quick"):
        snakemake(workdir, "-n", "all_figures", "--config", f"preset={preset}")
    assert tree(workdir) == before


def test_selected_experiments_run_alone_and_only_their_figures_are_requested(tmp_path):
    workdir = make_workdir(tmp_path)
    outputs = planned_outputs(workdir, "all_figures", "--config", "preset=smoke", "experiments=[fnn,tfn]")
    per_job = [o for o in outputs if re.match(r"results/(models|constructions|cells)/", o)]
    assert {o.split("/")[2] for o in per_job} == {"fnn", "tfn"}
    figures = {o for o in outputs if o.startswith("results/figures/") and o.endswith(".png")}
    assert figures == {f"results/figures/{p}/{name}.png" for p in ("paper", "reference") for name in ("fnn", "fnn_log", "tfn")}
    assert "results/claims.md" in outputs and "results/costs.csv" in outputs


def test_a_selected_experiment_brings_the_train_jobs_it_reuses(tmp_path):
    workdir = make_workdir(tmp_path)
    outputs = planned_outputs(workdir, "all_figures", "--config", "preset=smoke", "experiments=[bias]")
    per_job = {tuple(o.split("/")[1:3]) for o in outputs if re.match(r"results/(models|constructions|cells)/", o)}
    assert per_job == {("models", "bias"), ("cells", "bias"), ("models", "fnn"), ("cells", "fnn")}
    assert {Path(o).stem for o in outputs if o.startswith("results/figures/")} == {"bias"}


def test_a_figure_target_runs_only_what_that_figure_needs(tmp_path):
    workdir = make_workdir(tmp_path)
    outputs = planned_outputs(workdir, "results/figures/reference/distribution_shift.png", "--config", "preset=smoke")
    assert {o.split("/")[2] for o in outputs if re.match(r"results/(models|constructions|cells)/", o)} == {"classification"}
    assert "results/runs.parquet" not in outputs and "results/figures/reference/fnn.png" not in outputs
    assert [o for o in outputs if o.startswith("results/figures/")] == ["results/figures/reference/distribution_shift.png",
                                                                       "results/figures/reference/distribution_shift.pdf"]
    proc = snakemake(workdir, "-n", "results/figures/reference/methods.png", "--config", "preset=smoke", check=False)
    assert proc.returncode != 0 and "figure methods is not drawn under protocol 'reference'" in proc.stdout + proc.stderr


def test_a_users_method_runs_through_the_workflow_to_the_methods_figure(tmp_path, monkeypatch):
    """A method written outside the package (the example of docs/methods.md), named by its
    module path in config.yaml, trains in the methods experiment beside the built-in
    ones and is drawn; editing it reruns its own jobs and nothing else."""
    from test_methods import user_method_source

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_methods.py").write_text(user_method_source())
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])))
    config = tiny_config(experiments=("fnn", "tfn", "methods"))
    config["experiments"]["methods"]["methods"]["my_methods:LoRAFA"] = {"rank": [1, 2, 8, 16], "scale": [1.0]}
    workdir = make_workdir(tmp_path / "work", config)
    snakemake(workdir, "all_figures", "--config", "experiments=[methods]")
    assert (workdir / "results/figures/paper/methods.png").stat().st_size > 10_000
    selected = read_table(workdir / "results/selected.parquet", SELECTED_SCHEMA).to_pandas()
    mine = selected[selected["experiment"] == "methods"]
    assert {"ours", "sgd", "flt", "full", "dora", "vera", "pissa", "my_methods:LoRAFA"} <= set(mine["method"])
    user = mine[mine["method"] == "my_methods:LoRAFA"]
    assert set(user["method_settings"]) == {'{"scale":1.0}'} and user["method_digest"].notna().all()
    assert set(user["exp"]) == {"fnn", "tfn"}
    claims = pd.read_csv(workdir / "results/claims.csv")
    assert set(claims.loc[claims["id"].str.startswith("methods_"), "status"]) <= {"pass", "fail"}

    (plugins / "my_methods.py").write_text(user_method_source() + "\n# edited\n")
    rerun = [o for o in planned_outputs(workdir, "all_runs", "--config", "experiments=[methods]")
             if o.startswith("results/cells/")]
    assert rerun and all(o.startswith("results/cells/methods/") for o in rerun)
    assert len(rerun) == 1  # the user's method's train job (one protocol, all seeds in the smoke preset)


def test_an_unknown_experiment_in_the_selection_is_named(tmp_path):
    workdir = make_workdir(tmp_path)
    proc = snakemake(workdir, "-n", "all_figures", "--config", "experiments=[fnn,fnx]", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "'fnx'" in out and "defined: linear, fnn, tfn" in out
    assert len(out.strip().splitlines()) < 10, out


def test_a_config_error_is_a_few_lines_naming_the_key(tmp_path):
    workdir = make_workdir(tmp_path)
    proc = snakemake(workdir, "-n", "all_figures", "--config", "treads=2", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "treads: unknown key" in out
    assert len(out.strip().splitlines()) < 10, out


@pytest.mark.parametrize("name", ["x'; touch PWNED; echo '", "gpu long"])
def test_slurm_names_that_are_not_slurm_names_are_refused(tmp_path, name):
    workdir = make_workdir(tmp_path)
    proc = snakemake(workdir, "-n", "all_results", "--config", "preset=smoke", f"slurm={{partition: \"{name}\"}}",
                     check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "slurm.partition: expected a Slurm name" in out, out
    assert len(out.strip().splitlines()) < 10, out
    assert not (workdir / "PWNED").exists() and not (workdir / "results").exists()


def test_pieces_per_protocol_combine_and_the_last_run_trains_nothing(tmp_path):
    config = tiny_config(experiments=("linear",))
    config["protocols"] = ["paper", "reference"]
    workdir = make_workdir(tmp_path, config)
    snakemake(workdir, "all_runs", "--config", "protocols=[paper]")
    paper = workdir / "results/selected/linear/paper.parquet"
    first = (paper.stat().st_mtime_ns, paper.read_bytes())
    assert not (workdir / "results/figures").exists()  # a piece draws nothing
    snakemake(workdir, "all_runs", "--config", "protocols=[reference]")
    assert (paper.stat().st_mtime_ns, paper.read_bytes()) == first  # the other protocol's piece left it alone
    outputs = planned_outputs(workdir, "all_figures")
    assert outputs and not [o for o in outputs if re.match(r"results/(models|constructions|cells|runs/linear/|selected/linear/)", o)]
    snakemake(workdir, "all_figures")
    for name in ("selected/linear.parquet", "selected.parquet"):
        table = read_table(workdir / "results" / name, SELECTED_SCHEMA).to_pandas()
        assert set(table["protocol"]) == {"paper", "reference"}
    assert "Nothing to be done" in snakemake(workdir, "-n", "all_figures").stdout


# --------------------------------------------------------------- refused configs
BAD = [
    (["preset=huge"], "huge"),
    (["dispatch=pbs"], "pbs"),
    (["device=tpu"], "tpu"),
    (["threads=two"], "threads"),
    (["colour=red"], "colour"),
    (["protocols=[paper,authors]"], "authors"),
]


@pytest.mark.parametrize("overrides, needle", BAD)
def test_malformed_config_is_refused_and_nothing_is_written(tmp_path, overrides, needle):
    workdir = make_workdir(tmp_path)
    proc = snakemake(workdir, "all_figures", "--config", *overrides, check=False)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr
    # nothing of the workflow's (Snakemake may keep its own log under .snakemake/)
    assert sorted(p.name for p in workdir.iterdir() if p.name != ".snakemake") == ["Snakefile", "config.yaml", "envs", "workflow"]


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda c: c["experiments"]["fnn"]["settings"].update(rnak=3), "rnak"),
        (lambda c: c["experiments"]["fnn"]["methods"]["sgd"].update(rank=[0, 1]), "rank"),
        (lambda c: c["experiments"]["fnn"]["settings"].update(pretrained="yes"), "pretrained"),
    ],
)
def test_malformed_experiment_is_refused(tmp_path, change, needle):
    config = tiny_config()
    change(config)
    workdir = make_workdir(tmp_path, config)
    proc = snakemake(workdir, "all_results", check=False)
    assert proc.returncode != 0 and needle in proc.stdout + proc.stderr
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


# --------------------------------------------------------------- dispatch and resumption
def test_submitit_local_dispatch(tmp_path):
    workdir = make_workdir(tmp_path, tiny_config(experiments=("fnn",), dispatch="submitit-local"))
    snakemake(workdir, "all_results")
    runs = read_table(workdir / "results/runs.parquet").to_pandas()
    assert set(runs["method"]) == {"ours", "sgd"}
    assert list((workdir / "logs/submitit").rglob("*_log.out")), "no submitit job logs"


def test_interrupted_run_resumes_with_rerun_incomplete(tmp_path):
    config = tiny_config(experiments=("fnn", "classification"))
    whole = make_workdir(tmp_path / "whole", config)
    snakemake(whole, "all_results")

    cut = make_workdir(tmp_path / "cut", config)
    cmd = [SNAKEMAKE, "--directory", str(cut), "--snakefile", str(cut / "Snakefile"), "--cores", "2", "all_results"]
    proc = subprocess.Popen(cmd, cwd=cut, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180  # kill once a training job has started, before it ends
        while time.time() < deadline and not list((cut / "logs/train").rglob("*.log")):
            time.sleep(0.05)
        assert list((cut / "logs/train").rglob("*.log")), "training never started"
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: Snakemake and its jobs
        proc.wait()
    assert not (cut / "results/runs.parquet").exists()
    snakemake(cut, "--unlock")
    snakemake(cut, "all_results", "--rerun-incomplete")
    for name, schema in (("runs", RUNS_SCHEMA), ("selected", SELECTED_SCHEMA)):
        pd.testing.assert_frame_equal(
            comparable(cut / f"results/{name}.parquet", schema), comparable(whole / f"results/{name}.parquet", schema)
        )
    assert "Nothing to be done" in snakemake(cut, "-n", "all_results").stdout
