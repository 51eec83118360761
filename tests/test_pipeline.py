"""The workflow's steps (lorabench.runs.pipeline) and training dispatch (lorabench.runs.dispatch)."""

import json
import operator

import pytest

from lorabench.runs import dispatch, pipeline
from lorabench.core.config import RunConfig
from lorabench.runs.experiments import Job
from lorabench.runs.runner import model_key, run_configs

SMALL = dict(width=8, batch_size=32, n_test=200, n_val=64, n_epochs=5, pretrained_epochs=5)


def configs(protocol):
    base = RunConfig(**SMALL, protocol=protocol, pretrained=1)
    return [base.replace(method="ours", rank=r) for r in (1, 4)] + [
        base.replace(method="sgd", rank=r, lr=lr) for r in (1, 4) for lr in (1e-2, 1e-3)
    ] + [RunConfig(**SMALL, protocol=protocol, exp="tfn", target_depth=1, frozen_depth=1, method="sgd", rank=2).validated()]


def write_spec(tmp_path, kind, cfgs, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(Job("x", cfgs[0].protocol, 0, kind, tuple(cfgs)).spec()))
    return str(path)


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_rows_from_model_files_equal_rows_from_the_runner(tmp_path, protocol):
    cfgs = configs(protocol)
    keys = list(dict.fromkeys(model_key(c) for c in cfgs))
    assert len(keys) == (2 if protocol == "paper" else 3)  # reference: the rank is part of the key
    models = str(tmp_path / "models.pt")
    pipeline.generate(write_spec(tmp_path, "models", keys, "models"), models)
    rows = pipeline.run_spec(write_spec(tmp_path, "train", cfgs, "train"), models)
    direct = list(run_configs(cfgs, device="cpu"))
    assert len(rows) == len(direct)
    for a, b in zip(rows, direct):
        assert a["experiment"] == "x"
        assert (a["config_hash"], a["checkpoint"]) == (b["config_hash"], b["checkpoint"])
        for metric in ("test_loss", "test_shift_loss", "val_loss", "train_loss"):
            assert a[metric] == b[metric]


def test_aggregate_and_select(tmp_path):
    from lorabench.runs.results import SELECTED_SCHEMA, read_rows, read_table, write_rows

    cfgs = [c for c in configs("paper") if c.exp == "fnn"]
    rows = [dict(r, experiment="x") for r in run_configs(cfgs, device="cpu")]
    write_rows(rows[:3], tmp_path / "a.parquet")
    write_rows(rows[3:], tmp_path / "b.parquet")
    pipeline.aggregate([str(tmp_path / "b.parquet"), str(tmp_path / "a.parquet")], str(tmp_path / "runs.parquet"))
    runs = read_rows(tmp_path / "runs.parquet")
    assert len(runs) == len(rows)
    pipeline.select(str(tmp_path / "runs.parquet"), str(tmp_path / "selected.parquet"))
    selected = read_table(tmp_path / "selected.parquet", SELECTED_SCHEMA).to_pandas()
    # per rank and checkpoint, one of the two learning rates; constructions as they are
    assert len(selected) == 2 + 2 * 2
    assert set(selected.loc[selected["method"] == "sgd", "n_candidates"]) == {2}


# submitit pickles functions by reference: use importable ones
add = operator.add
fail = int  # int("no luck") raises ValueError


def test_dispatch_local_and_submitit_local(tmp_path):
    assert dispatch.run(add, 2, 3, mode="local") == 5
    assert dispatch.run(add, 2, 3, mode="submitit-local", log_dir=str(tmp_path)) == 5
    assert list(tmp_path.glob("*_log.out"))


def test_dispatch_failure_names_the_job_and_its_log(tmp_path):
    with pytest.raises(dispatch.DispatchError, match=r"submitit-local job .* failed.*ValueError") as info:
        dispatch.run(fail, "no luck", mode="submitit-local", log_dir=str(tmp_path), name="doomed")
    assert "log:" in str(info.value) and "no luck" in str(info.value)


def test_train_command_fails_cleanly_when_the_job_fails(tmp_path, capsys):
    from lorabench.cli import main

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(Job("x", "paper", 0, "train", (RunConfig(**SMALL, method="sgd"),)).spec()))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--spec", str(spec), "--models", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o.parquet"),
              "--dispatch", "submitit-local", "--log-dir", str(tmp_path / "logs")])
    assert exit_info.value.code == 1
    assert "failed" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_a_train_job_copies_the_rows_another_experiments_job_trained(tmp_path, protocol):
    """Shared configs train once: a job given another job's output trains only the
    configs not found there, and its file equals that of training them all (a config's
    rows do not depend on its cell), but for computed_in, which names who trained each."""
    from lorabench.runs.results import read_table, write_rows

    cfgs = [c for c in configs(protocol) if c.method == "sgd"]
    keys = list(dict.fromkeys(model_key(c) for c in cfgs))
    models = str(tmp_path / "models.pt")
    pipeline.generate(write_spec(tmp_path, "models", keys, "models"), models)
    donor = tmp_path / "donor.parquet"
    write_rows([dict(r, experiment="fnn", computed_in="fnn") for r in run_configs(cfgs[::2], device="cpu")], donor)
    spec = {"experiment": "bias", "protocol": protocol, "seed": 0, "kind": "train", "configs": cfgs}
    pipeline.train(spec, models, str(tmp_path / "shared.parquet"), device="cpu", reuse=[str(donor)])
    pipeline.train(spec, models, str(tmp_path / "alone.parquet"), device="cpu")
    shared, alone = (read_table(tmp_path / f"{name}.parquet").to_pylist() for name in ("shared", "alone"))
    key = operator.itemgetter("config_hash", "checkpoint")
    shared, alone = sorted(shared, key=key), sorted(alone, key=key)
    copied = {c.config_hash() for c in cfgs[::2]}
    assert len(shared) == len(alone) == 2 * len(cfgs)
    # a config held by two of the given files (a job that copied it from another) comes once
    pipeline.train(spec, models, str(tmp_path / "twice.parquet"), device="cpu", reuse=[str(donor), str(donor)])
    assert len(read_table(tmp_path / "twice.parquet")) == len(shared)
    for a, b in zip(shared, alone):
        assert a["experiment"] == b["experiment"] == "bias" and b["computed_in"] == "bias"
        assert a["computed_in"] == ("fnn" if a["config_hash"] in copied else "bias")
        for column in ("test_loss", "test_shift_loss", "val_loss", "train_loss", "train_curve", "val_curve", "best_step"):
            assert a[column] == b[column], column
