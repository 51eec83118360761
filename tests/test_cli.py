import io
import json
import os
import re
import subprocess
import sys

import pytest

from lorabench.cli import ProgressBar, UsageError, available_cores, build_parser, exit_code, main, parse_values

SMALL = ["--width", "8", "--batch_size", "32", "--n_test", "200", "--seed", "0", "--no_progress"]


@pytest.mark.parametrize(
    "text, kind, expected",
    [("3", int, [3]), ("1-4", int, [1, 2, 3, 4]), ("1,4-5", int, [1, 4, 5]), ("1e-2,1e-3", float, [1e-2, 1e-3])],
)
def test_parse_values(text, kind, expected):
    assert parse_values(text, kind, "x") == expected


@pytest.mark.parametrize("text", ["", "1,", "4-1", "a", "1-x"])
def test_parse_values_rejects(text):
    with pytest.raises(UsageError):
        parse_values(text, int, "rank")


def test_json_sweep_prints_one_object_per_config(capsys):
    code = main(["run", "--method", "sgd", "--rank", "1-2", "--lr", "1e-2,1e-3", "--n_epochs", "5", "--json", *SMALL])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4
    assert {(row["rank"], row["lr"]) for row in lines} == {(1, 1e-2), (1, 1e-3), (2, 1e-2), (2, 1e-3)}
    for row in lines:
        assert {"test_loss", "test_shift_loss", "val_loss", "config_hash", "protocol"} <= row.keys()
        assert row["checkpoint"] == "last"


def test_classification_rows_carry_accuracies(capsys):
    main(["run", "--method", "ours", "--rank", "2", "--task", "binary_classification", "--json", *SMALL])
    row = json.loads(capsys.readouterr().out)
    assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["test_shift_accuracy"] <= 1


BAD = [
    (["--method", "adam"], "method"),
    (["--rank", "0", "--method", "sgd"], "rank"),
    (["--rank", "-1"], "rank"),
    (["--width", "0"], "width"),
    (["--rank", "9"], "exceeds width"),
    (["--exp", "tfn", "--method", "ours", "--target_depth", "1", "--frozen_depth", "2"], "target_depth == frozen_depth"),
    (["--lr", "abc"], "--lr"),
    (["--rank", "5-2"], "empty range"),
    (["--n_epochs", "0", "--method", "sgd"], "n_epochs"),
    (["--wandb", "1"], "wandb"),
    (["--method", "flt", "--use_bias", "0", "--last_layers", "1"], "use_bias"),
    (["--exp", "tfn", "--task", "classification", "--method", "sgd"], "classification"),
]


@pytest.mark.parametrize("flags, needle", BAD)
def test_bad_flags_give_one_error_line_and_exit_2(flags, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "lorabench", "run", *SMALL, *flags], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert needle in lines[-1]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ newcomer habits
def lorabench(*args):
    return subprocess.run([sys.executable, "-m", "lorabench", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "-1e-3"], "lr must be finite and > 0, got -0.001"),
    (["--lr", "-1e-3,1e-2"], "lr must be finite and > 0, got -0.001"),
    (["--std", "-0.5"], "std must be finite and >= 0, got -0.5"),
    (["--weight-decay", "-.1"], "weight_decay must be finite and >= 0, got -0.1"),
])
def test_negative_numbers_are_values_not_flags(capsys, flags, needle):
    with pytest.raises(SystemExit) as info:
        main(["run", *SMALL, *flags])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err  # the value reached validation


def test_bare_lorabench_lists_the_commands():
    proc = lorabench()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for command in ("run", "models", "construct", "train", "aggregate", "select", "figures", "claims"):
        assert f"\n    {command} " in proc.stderr or f"\n    {command}\n" in proc.stderr, command


def test_version():
    import lorabench as package

    proc = lorabench("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"lorabench {package.__version__}"


def test_every_run_flag_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    options = capsys.readouterr().out.split("options:\n", 1)[1]
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    flags = {b.split()[0].rstrip(",") for b in blocks} - {"-h"}
    assert {f"--{name}" for name in ("lr", "n_epochs", "threads", "no_progress", "n_train", "json")} <= flags
    assert len(flags) == 34 + 7  # the RunConfig fields but n_val and curve_every; wandb, device, json, ...; threads
    for block in blocks:
        if not block.lstrip().startswith("-h"):
            assert "(default: " in " ".join(block.split()), block


@pytest.mark.parametrize("argv, dest, value", [
    (["run", "--n-epochs", "7"], "n_epochs", 7),
    (["run", "--n_epochs", "7"], "n_epochs", 7),
    (["run", "--no-progress"], "no_progress", True),
    (["run", "--no_progress"], "no_progress", True),
    (["run", "--weight-decay", "1e-3"], "weight_decay", "1e-3"),
    (["run", "--all-checkpoints"], "all_checkpoints", True),
    (["train", "--spec", "s", "--models", "m", "--out", "o", "--log_dir", "x"], "log_dir", "x"),
    (["train", "--spec", "s", "--models", "m", "--out", "o", "--log-dir", "x"], "log_dir", "x"),
    (["train", "--spec", "s", "--models", "m", "--out", "o", "--slurm_mem_gb", "3"], "slurm_mem_gb", 3),
    (["aggregate", "--out", "o", "--selected", "s"], "selected", "s"),
])
def test_both_spellings_of_multi_word_flags(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_run_uses_every_core_and_workflow_steps_one_thread_by_default():
    parser = build_parser()
    assert parser.parse_args(["run"]).threads == available_cores() == len(os.sched_getaffinity(0))
    for step in (["models"], ["construct", "--models", "m"], ["train", "--models", "m"]):
        assert parser.parse_args([*step, "--spec", "s", "--out", "o"]).threads == 1


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_only_on_a_terminal():
    log, terminal = io.StringIO(), _Terminal()
    for stream in (log, terminal):
        bar = ProgressBar(stream)
        for done in range(1001):
            bar("training", done, 1000)
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == [f"    training {n}/1000" for n in (0, 250, 500, 750, 1000)]
    assert terminal.getvalue().count("\r") == 101 and terminal.getvalue().endswith("1000/1000\n")


def test_errors_are_classified_by_type_not_by_message(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        main(["run", *SMALL, "--device", "cuda"])
    assert info.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    assert exit_code(RuntimeError("device lost")) is None  # a bug keeps its traceback
