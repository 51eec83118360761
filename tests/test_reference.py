"""The reference protocol against numbers computed with the authors' own code.

tests/data/authors_reference.json holds results of the authors' run_exp.py (commit
eaeb7d3, torch 2.13.0 CPU, minimal crash fixes listed in the file) for constructions and
short gradient runs. The reference protocol must reproduce them: gradient runs to float32
round-off (their file notes that thread counts alone move the last digits), constructions
to the round-off of their float32 matrix inverses.
"""

import json
import math
from pathlib import Path

import pytest

from lorabench.training import native
from lorabench.core.config import RunConfig
from lorabench.runs.runner import run_configs

RUNS = json.loads((Path(__file__).parent / "data" / "authors_reference.json").read_text())["runs"]


def _config(args: dict) -> RunConfig:
    args = {k: v for k, v in args.items() if k != "wandb"}
    args["n_train"] = None if args["n_train"] == "inf" else int(args["n_train"])
    args["pretrained_level"] = float(args["pretrained_level"])
    return RunConfig(**args, protocol="reference").validated()


def _label(run: dict) -> str:
    a = run["args"]
    extras = [f"{k}={a[k]}" for k in ("pretrained", "rank_step", "best_epoch", "better_optim") if a[k]]
    extras += [a["task"]] if a["task"] != "regression" else []
    extras += [f"n_train={a['n_train']}"] if a["n_train"] != "inf" else []
    extras += ["linear"] if a["activation"] == "linear" else []
    return "-".join([a["exp"], a["method"], f"{a['target_depth']}x{a['frozen_depth']}", f"r{a['rank']}",
                     f"lr{a['lr']:g}", f"wd{a['weight_decay']:g}", f"tb{a['tune_bias']}", *map(str, extras)])


def _is_slow(run: dict) -> bool:
    # Depth-2 TFN runs take ~10 s each on 2 cores; two of them are kept.
    a = run["args"]
    return a["exp"] == "tfn" and a["target_depth"] == 2 and not (a["rank"] == 2 and a["weight_decay"] == 0)


SELECTED = [run for run in RUNS if not _is_slow(run)]
# FNN regression runs at the native step's widths also run with the native step (its own
# float32 summation order; LORABENCH_ENGINE=native, as `auto` keeps this protocol on
# torch). The classification runs are left out: their training batch is chosen by a
# validation accuracy, a discrete decision that round-off differences can flip.
CASES = [(run, "torch") for run in SELECTED] + [
    (run, "native") for run in SELECTED
    if run["args"]["method"] != "ours" and run["args"]["width"] in native.WIDTHS
    and run["args"]["task"] == "regression" and not run["args"]["better_optim"]
]


def _close(ours: float, theirs: float, rel: float, abs_: float) -> bool:
    return math.isclose(ours, theirs, rel_tol=rel, abs_tol=abs_)


@pytest.mark.parametrize("run, engine", CASES, ids=[f"{_label(r)}-{e}" for r, e in CASES])
def test_reference_protocol_reproduces_the_authors_code(run, engine, monkeypatch):
    if engine == "native" and not native.available():
        pytest.skip("no C compiler: the native step cannot be built")
    monkeypatch.setenv("LORABENCH_ENGINE", engine)
    cfg = _config(run["args"])
    rows = {r["checkpoint"]: r for r in run_configs([cfg], device="cpu")}
    theirs = run["results"]
    if cfg.method == "ours":
        row = rows["construction"]
        # Above the threshold both are float32 round-off of an exact representation:
        # compare on the scale of the target's outputs (MSE ~1 for FNN, ~1e3 for TFN).
        floor = 1e-5 if cfg.exp == "fnn" else 2e-2
        for key in ("test_loss", "test_shift_loss"):
            assert _close(row[key], theirs[key], 5e-3, floor * (25 if "shift" in key else 1)), key
        return
    reported = rows["best" if cfg.best_epoch else "last"]
    # The depth-2 TFN (outputs ~1e3, products of N(0,1) matrices) amplifies the different
    # float32 association of our attention products to ~1e-4.
    rel = 1e-3 if (cfg.exp == "tfn" and cfg.target_depth == 2) else 1e-5
    if engine == "native":  # its summation order, amplified by training (measured: FNN up to 2e-5)
        rel = max(rel, 1e-4)
        assert {r["engine"] for r in rows.values()} == {"native"}
    for key in ("test_loss", "test_shift_loss", "test_accuracy", "test_shift_accuracy"):
        if theirs.get(key) is not None:
            assert _close(reported[key], theirs[key], rel, 1e-9), key
    # Their val_loss and train_loss are the last logged values, whatever best_epoch says.
    for key in ("val_loss", "train_loss"):
        assert _close(rows["last"][key], theirs[key], rel, 1e-9), key
    # Their best step counts from 0 and may be absent when no improvement was recorded.
    if theirs.get("best_step") is not None:
        assert reported["best_step"] == theirs["best_step"] + 1 or not cfg.best_epoch
    if theirs.get("pretrain_stop_iter") is not None:
        assert rows["last"]["pretrain_steps"] == theirs["pretrain_stop_iter"]
