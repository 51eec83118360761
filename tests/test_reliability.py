"""Reliability beyond what test_cli, test_results, test_train and test_workflow
already cover: more bad inputs (each: one error line naming the problem, non-zero exit,
nothing written), determinism across processes and dispatch modes, NaN/inf in weights and
inputs, and Snakemake's lock against a second invocation.

The kill -9 / --rerun-incomplete fault is tests/test_workflow.py
(test_interrupted_run_resumes_with_rerun_incomplete) and, bit for bit, the script
tests/faults/kill_and_resume.sh.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from lorabench.runs import dispatch, pipeline
from lorabench.core.config import RunConfig
from lorabench.runs.experiments import Job
from lorabench.core.protocols import generate_models
from lorabench.runs.results import SCHEMA_KEY, read_rows, write_rows
from lorabench.runs.runner import model_key, run_configs

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SMALL = ["--width", "4", "--n_test", "50", "--batch_size", "16", "--n_epochs", "3", "--no_progress"]
TINY = dict(width=4, batch_size=16, n_test=50, n_val=32, n_epochs=4, pretrained_epochs=3)
# Columns that legitimately differ between two runs of the same configs.
VOLATILE = ["wall_time_s", "device_name", "torch_threads"]


def lorabench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lorabench", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------ bad inputs
@pytest.fixture
def leftovers(tmp_path):
    """A folder holding what an earlier, killed run may leave: a corrupt Parquet file, a
    corrupt models file, a Parquet file of another schema version, a regular file where a
    folder is expected, and valid job specs."""
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1\x00\x00 truncated")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04 truncated torch file")
    (tmp_path / "a_file").write_text("not a folder")
    rows = list(run_configs([RunConfig(**TINY, method="ours", rank=1)], device="cpu"))
    write_rows(rows, tmp_path / "good.parquet")
    table = pq.read_table(tmp_path / "good.parquet")
    pq.write_table(table.replace_schema_metadata({SCHEMA_KEY: b"0"}), tmp_path / "old_schema.parquet")
    (tmp_path / "good.parquet").unlink()
    cfg = RunConfig(**TINY, method="sgd", rank=1)
    (tmp_path / "spec.json").write_text(json.dumps(Job("x", "paper", 0, "train", (cfg,)).spec()))
    spec = Job("x", "paper", 0, "train", (cfg,)).spec()
    spec["configs"][0]["rnak"] = 3
    (tmp_path / "typo_spec.json").write_text(json.dumps(spec))
    (tmp_path / "not_json.json").write_text("{configs: oops")
    return tmp_path


BAD_CLI = [
    # (arguments, text the one error line must contain)
    (["run", *SMALL, "--output", "a_file/sub/out.parquet"], "cannot create results folder a_file/sub"),
    (["run", *SMALL, "--rank", ""], "--rank: empty value"),  # empty grid
    (["run", *SMALL, "--seed", "1,,2"], "--seed: empty value"),
    (["run", *SMALL, "--weight_decay", "1e-3,"], "--weight_decay: empty value"),
    (["run", *SMALL, "--device", "tpu"], "--device"),
    (["run", *SMALL, "--protocol", "authors"], "--protocol"),
    (["run", *SMALL, "--batch_size", "-3"], "batch_size must be >= 1"),
    (["run", *SMALL, "--n_test", "0"], "n_test must be >= 1"),
    (["run", *SMALL, "--width", "two"], "--width: invalid int value"),
    (["run", *SMALL, "--lr=-1e-3"], "lr must be finite and > 0"),
    (["run", *SMALL, "--lr", "nan"], "lr must be finite"),
    (["run", *SMALL, "--n_train", "0", "--method", "sgd"], "n_train must be >= 1"),
    (["run", *SMALL, "--threads", "0"], "--threads must be >= 1"),
    (["run", *SMALL, "--exp", "tfn", "--method", "sgd", "--n_head", "0"], "n_head must be >= 1"),
    (["run", *SMALL, "--exp", "tfn", "--method", "ours", "--target_depth", "2", "--frozen_depth", "1"],
     "target_depth == frozen_depth"),
    (["figures", "--runs", "corrupt.parquet", "--out", "figs"], "corrupt.parquet: not a readable Parquet file"),
    (["claims", "--runs", "corrupt.parquet", "--out", "claims"], "corrupt.parquet: not a readable Parquet file"),
    (["figures", "--runs", "old_schema.parquet", "--out", "figs"], "schema version 0, this lorabench reads version 6"),
    (["figures", "--out", "figs"], "give --runs, --selected or both"),
    (["aggregate", "--out", "runs.parquet", "corrupt.parquet"], "corrupt.parquet: not a readable Parquet file"),
    (["select", "--runs", "corrupt.parquet", "--out", "selected.parquet"], "corrupt.parquet: not a readable Parquet file"),
    (["train", "--spec", "spec.json", "--models", "corrupt.pt", "--out", "cells/t.parquet"],
     "corrupt.pt: not a readable models file"),
    (["construct", "--spec", "spec.json", "--models", "corrupt.pt", "--out", "cells/c.parquet"],
     "corrupt.pt: not a readable models file"),
    (["models", "--spec", "not_json.json", "--out", "models/m.pt"], "not_json.json: not a lorabench job spec"),
    (["models", "--spec", "typo_spec.json", "--out", "models/m.pt"], "rnak"),
    (["models", "--spec", "missing.json", "--out", "models/m.pt"], "missing.json: no such job spec"),
    (["train", "--spec", "spec.json", "--models", "corrupt.pt", "--out", "t.parquet", "--dispatch", "pbs"], "--dispatch"),
]


@pytest.mark.parametrize("args, needle", BAD_CLI, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_CLI])
def test_bad_input_gives_one_error_line_exits_nonzero_and_writes_nothing(leftovers, monkeypatch, capsys, args, needle):
    """In-process for speed (an unexpected exception fails the test with its traceback);
    test_cli.py runs its cases as subprocesses, and so does the next test."""
    from lorabench.cli import main

    monkeypatch.chdir(leftovers)
    before = tree(leftovers)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorabench: error:"), err
    assert needle in lines[0]
    assert out == ""
    assert tree(leftovers) == before  # no output, no folder, no temporary file


@pytest.mark.parametrize("args, needle", [BAD_CLI[0], BAD_CLI[20], BAD_CLI[21]], ids=["unwritable", "corrupt_parquet", "corrupt_models"])
def test_bad_input_in_a_fresh_process(leftovers, args, needle):
    before = tree(leftovers)
    proc = lorabench(*args, cwd=leftovers)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and needle in proc.stderr, proc.stderr
    assert proc.stdout == "" and tree(leftovers) == before


# Workflow configs that test_workflow.py does not try (it has preset, dispatch, device,
# threads type, unknown top-level key, protocol, unknown setting, rank 0, pretrained type).
def _tfn_mismatch(c):
    c["experiments"]["tfn"]["variants"] = [{"target_depth": 1, "frozen_depth": 2}]


BAD_WORKFLOW = [
    (lambda c: c["experiments"]["fnn"]["methods"]["sgd"].update(rank=[]), "rank"),  # empty grid
    (lambda c: c["defaults"].update(width="16"), "width"),
    (lambda c: c["defaults"].update(n_epochs=-5), "n_epochs"),
    (lambda c: c["experiments"]["fnn"]["methods"].update(adam={"rank": 1}), "adam"),
    (lambda c: c["experiments"]["fnn"]["methods"]["ours"].update(rank=[17]), "exceeds width"),
    (_tfn_mismatch, "target_depth == frozen_depth"),
]


@pytest.mark.skipif(not Path(SNAKEMAKE).exists(), reason="snakemake is not installed next to python")
@pytest.mark.parametrize("change, needle", BAD_WORKFLOW, ids=["empty_rank", "width_str", "neg_epochs", "unknown_method",
                                                              "rank_gt_width", "tfn_depths"])
def test_malformed_workflow_config_is_refused(tmp_path, change, needle):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config = copy.deepcopy(config)
    config["preset"] = "smoke"
    change(config)
    shutil.copy(ROOT / "Snakefile", tmp_path / "Snakefile")
    shutil.copytree(ROOT / "workflow", tmp_path / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run([SNAKEMAKE, "--cores", "1", "all_results"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


# ------------------------------------------------------------------ determinism
def _comparable(rows) -> pd.DataFrame:
    from lorabench.runs.results import RUNS_SCHEMA

    df = pd.DataFrame(rows)
    df = df.reindex(columns=[n for n in RUNS_SCHEMA.names if n not in VOLATILE + ["experiment"]])
    return df.sort_values(["config_hash", "checkpoint"]).reset_index(drop=True)


def assert_bit_identical(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in a.columns:
        for x, y in zip(a[column], b[column]):
            if isinstance(x, float) or isinstance(y, float):
                # bit for bit: same float64 bytes (NaN == NaN, 0.0 != -0.0)
                assert np.float64(x).tobytes() == np.float64(y).tobytes(), (column, x, y)
            elif isinstance(x, (list, np.ndarray)):
                assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), column
            else:
                assert (x is None and y is None) or (x != x and y != y) or x == y, (column, x, y)


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_another_process_gives_bit_identical_rows(tmp_path, protocol):
    flags = ["--width", "4", "--n_test", "50", "--batch_size", "16", "--n_epochs", "6", "--pretrained", "1",
             "--pretrained_epochs", "3", "--protocol", protocol, "--seed", "3"]
    out = tmp_path / "sgd.parquet"
    proc = lorabench("run", *flags, "--method", "sgd", "--rank", "1-2", "--lr", "1e-2,1e-3", "--no_progress",
                     "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfgs = [RunConfig(width=4, n_test=50, batch_size=16, n_epochs=6, pretrained=1, pretrained_epochs=3, protocol=protocol,
                      seed=3, method="sgd", rank=r, lr=lr) for r in (1, 2) for lr in (1e-2, 1e-3)]
    here = list(run_configs(cfgs, device="cpu"))
    theirs = read_rows(out).to_dict("records")
    assert_bit_identical(_comparable(theirs), _comparable([{**r, "experiment": None} for r in here]))


def test_local_and_submitit_local_dispatch_give_bit_identical_rows(tmp_path):
    cfgs = [RunConfig(**TINY, method="sgd", rank=r, lr=lr, pretrained=1) for r in (1, 3) for lr in (1e-2, 1e-3)]
    keys = list(dict.fromkeys(model_key(c) for c in cfgs))
    spec_models, spec_train = tmp_path / "m.json", tmp_path / "t.json"
    spec_models.write_text(json.dumps(Job("x", "paper", 0, "models", tuple(keys)).spec()))
    spec_train.write_text(json.dumps(Job("x", "paper", 0, "train", tuple(cfgs)).spec()))
    pipeline.generate(str(spec_models), str(tmp_path / "m.pt"))
    args = (pipeline.run_spec, str(spec_train), str(tmp_path / "m.pt"), "cpu", 1)
    local = dispatch.run(*args, mode="local")
    remote = dispatch.run(*args, mode="submitit-local", log_dir=str(tmp_path / "logs"))
    assert_bit_identical(_comparable(local), _comparable(remote))


# ------------------------------------------------------------------ numerical faults
def _poisoned(cfg: RunConfig, what: str):
    """cfg's models with one non-finite number in the frozen weights, the target weights,
    or the finite training set."""
    key = model_key(cfg)
    models = generate_models(key)
    if what == "frozen_nan":
        w = models.frozen.weights.clone()
        w[0, 0, 0] = math.nan
        models = dataclasses.replace(models, frozen=dataclasses.replace(models.frozen, weights=w))
    elif what == "target_inf":
        w = models.target.weights.clone()
        w[0, 0, 0] = math.inf
        models = dataclasses.replace(models, target=dataclasses.replace(models.target, weights=w))
    elif what == "input_nan":
        x = models.x_train.clone()
        x[5, 0] = math.nan
        models = dataclasses.replace(models, x_train=x)
    return {key: models}


@pytest.mark.parametrize("what", ["frozen_nan", "target_inf", "input_nan"])
def test_non_finite_weights_or_inputs_are_recorded_as_diverged(tmp_path, what):
    n_train = 64 if what == "input_nan" else None
    cfgs = [RunConfig(**TINY, method="sgd", rank=r, lr=lr, n_train=n_train) for r in (1, 2) for lr in (1e-2, 1e-3)]
    if what != "input_nan":
        cfgs.append(RunConfig(**TINY, method="ours", rank=2))
    rows = list(run_configs(cfgs, device="cpu", models=_poisoned(cfgs[0], what)))
    assert rows and all(r["diverged"] for r in rows), [(r["method"], r["checkpoint"], r["test_loss"]) for r in rows]
    assert all(r["diverged_step"] is not None for r in rows if r["method"] == "sgd")
    # written and read back as diverged (the schema accepts NaN metrics)
    write_rows([{**r, "experiment": "fnn"} for r in rows], tmp_path / "runs.parquet")
    assert read_rows(tmp_path / "runs.parquet")["diverged"].all()


def test_diverged_runs_are_excluded_counted_and_never_plotted(tmp_path):
    from lorabench.report import analysis

    good_seed, bad_seed = 0, 1
    cfgs = {s: [RunConfig(**TINY, seed=s, method="sgd", rank=r, lr=lr) for r in (1, 2) for lr in (1e-2, 1e-3)]
            + [RunConfig(**TINY, seed=s, method="ours", rank=r) for r in (1, 2)] for s in (good_seed, bad_seed)}
    rows = list(run_configs(cfgs[good_seed], device="cpu"))
    rows += list(run_configs(cfgs[bad_seed], device="cpu", models=_poisoned(cfgs[bad_seed][0], "frozen_nan")))
    # one grid point of the good seed diverges too: excluded, but its group still has a winner
    lr_diverges = [r for r in rows if r["seed"] == good_seed and r["method"] == "sgd" and r["rank"] == 1 and r["lr"] == 1e-2]
    for r in lr_diverges:
        r.update(diverged=True, diverged_step=2, val_loss=-1.0, test_loss=math.inf)
    rows = [{**r, "experiment": "fnn"} for r in rows]
    write_rows(rows, tmp_path / "runs.parquet")
    pipeline.select(str(tmp_path / "runs.parquet"), str(tmp_path / "selected.parquet"))
    from lorabench.runs.results import SELECTED_SCHEMA

    selected = read_rows(tmp_path / "selected.parquet", SELECTED_SCHEMA)
    sgd_last = selected[(selected["method"] == "sgd") & (selected["checkpoint"] == "last")]
    good = sgd_last[sgd_last["seed"] == good_seed].set_index("rank")
    assert good.loc[1, "n_excluded"] == 1 and good.loc[1, "lr"] == 1e-3 and not good.loc[1, "diverged"]
    assert good.loc[2, "n_excluded"] == 0
    bad = sgd_last[sgd_last["seed"] == bad_seed]
    assert bad["diverged"].all() and bad["test_loss"].isna().all() and (bad["n_excluded"] == 2).all()

    # the curve a figure draws: only the good seed's numbers, the rest counted
    gd = analysis.rows(selected, "fnn", "paper", "sgd", "last", target_depth=1, pretrained=0)
    c = analysis.curve(gd, "rank", "test_loss")
    assert np.isfinite(c.median).all() and np.isfinite(c.low).all() and np.isfinite(c.high).all()
    assert list(c.n) == [1, 1] and c.n_dropped == 2 and c.n_grid_excluded == 1 + 2 + 2
    # the figure renders from these rows
    out = tmp_path / "figs"
    proc = lorabench("figures", "--selected", str(tmp_path / "selected.parquet"), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "paper" / "fnn.png").stat().st_size > 0


# ------------------------------------------------------------------ concurrency
SLEEPY = """
rule all:
    output: "done.txt"
    shell: "if [ -e slow ]; then sleep 30; fi; touch {output}"
"""


@pytest.mark.skipif(not Path(SNAKEMAKE).exists(), reason="snakemake is not installed next to python")
def test_second_snakemake_on_the_same_directory_is_refused_by_the_lock(tmp_path):
    (tmp_path / "Snakefile").write_text(SLEEPY)
    (tmp_path / "slow").touch()
    first = subprocess.Popen([SNAKEMAKE, "--cores", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list((tmp_path / ".snakemake/locks").glob("*")):
            time.sleep(0.2)
        assert list((tmp_path / ".snakemake/locks").glob("*")), "the first snakemake never took its lock"
        second = subprocess.run([SNAKEMAKE, "--cores", "1", "--forceall"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode != 0
        text = second.stdout + second.stderr
        assert "LockException" in text and "--unlock" in text, text[-2000:]
    finally:
        os.killpg(first.pid, 9)
        first.wait()
    # the stale lock (the first one was killed) is still there and still refuses a real run ...
    again = subprocess.run([SNAKEMAKE, "--cores", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "LockException" in again.stdout + again.stderr
    assert not (tmp_path / "done.txt").exists()
    # ... until --unlock, as the README says; then the run goes through
    (tmp_path / "slow").unlink()
    subprocess.run([SNAKEMAKE, "--unlock", "--cores", "1"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    subprocess.run([SNAKEMAKE, "--cores", "1", "--rerun-incomplete"], cwd=tmp_path, check=True, capture_output=True,
                   timeout=60)
    assert (tmp_path / "done.txt").exists()


def test_the_docs_say_how_to_recover_from_a_stale_lock():
    """The README names the two commands and links the section of docs/workflow.md that
    gives them in full."""
    readme = (ROOT / "README.md").read_text()
    assert "snakemake --unlock" in readme and "--rerun-incomplete" in readme
    assert "docs/workflow.md#interrupted-runs-and-stale-locks" in readme
    workflow = (ROOT / "docs" / "workflow.md").read_text()
    assert "## Interrupted runs and stale locks" in workflow
    section = workflow.split("## Interrupted runs and stale locks", 1)[1]
    assert "snakemake --unlock" in section and "--rerun-incomplete" in section


# ------------------------------------------------------------------ file modes
def _modes(paths) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_outputs_honour_the_umask(tmp_path, umask):
    """Temporary files are created 0600; outputs get what open() would give them."""
    import matplotlib.pyplot as plt

    from lorabench.cli import main
    from lorabench.report import style

    cfg = RunConfig(**TINY, method="ours", rank=1)
    (tmp_path / "spec.json").write_text(json.dumps(Job("x", "paper", 0, "models", (model_key(cfg),)).spec()))
    pipeline.generate(str(tmp_path / "spec.json"), str(tmp_path / "m.pt"))
    write_rows(list(run_configs([cfg], device="cpu")), tmp_path / "runs.parquet")
    assert main(["claims", "--runs", str(tmp_path / "runs.parquet"), "--out", str(tmp_path / "claims")]) == 0
    fig = plt.figure()
    style.save(fig, tmp_path / "figures", "empty")
    plt.close(fig)
    outputs = [tmp_path / "m.pt", tmp_path / "runs.parquet", *(tmp_path / "claims").iterdir(), *(tmp_path / "figures").iterdir()]
    assert {p.suffix for p in outputs} == {".pt", ".parquet", ".md", ".csv", ".png", ".pdf"}
    assert _modes(outputs) == {p.name: 0o666 & ~umask for p in outputs}


def test_native_library_honours_the_umask(tmp_path):
    """The build's own steps on a one-line source: the real one takes minutes to compile,
    and the tests that train build it once into the shared cache."""
    from lorabench.training import native

    if shutil.which(native._compiler()) is None:
        pytest.skip("no C compiler")
    old = os.umask(0o022)
    try:
        native._compile(native._compiler(), b"int one(void) { return 1; }\n", tmp_path / "cache" / "one.so", 16, 16)
    finally:
        os.umask(old)
    assert _modes((tmp_path / "cache").iterdir()) == {"one.so": 0o755}
    assert ctypes.CDLL(str(tmp_path / "cache" / "one.so")).one() == 1
