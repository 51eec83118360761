import json
import subprocess
import sys

import pytest

from lorabench.cli import main, parse_values, UsageError

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
