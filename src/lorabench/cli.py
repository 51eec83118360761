"""``lorabench run``: the authors' ``run_exp.py`` command line, plus sweeps and JSON output.

Every flag of ``run_exp.py`` keeps its name, default and meaning. ``--rank``, ``--lr``,
``--weight_decay`` and ``--seed`` also take lists (``1e-2,1e-3``) and integer ranges
(``1-16``); a sweep runs the whole product, batched cell by cell, and prints one JSON
object per configuration and checkpoint with ``--json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from typing import Callable, Optional, Sequence

from .runs.results import ResultsError
from .core.config import (
    ACTIVATIONS,
    DEVICES,
    EXPERIMENTS,
    INIT_MODES,
    METHODS,
    PROTOCOLS,
    TASKS,
    ConfigError,
    RunConfig,
)

SWEPT = ("rank", "lr", "weight_decay", "seed")


class UsageError(Exception):
    pass


def parse_values(text: str, kind: Callable, flag: str) -> list:
    """'3' -> [3]; '1e-2,1e-3' -> [0.01, 0.001]; '1-16' -> [1..16] (integers only)."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"--{flag}: empty value in {text!r}")
        span = re.fullmatch(r"(\d+)-(\d+)", part) if kind is int else None
        if span:
            low, high = int(span.group(1)), int(span.group(2))
            if high < low:
                raise UsageError(f"--{flag}: empty range {part!r}")
            values.extend(range(low, high + 1))
            continue
        try:
            values.append(kind(part))
        except ValueError:
            raise UsageError(f"--{flag}: invalid {kind.__name__} value {part!r}") from None
    return values


def _n_train(text: str) -> Optional[int]:
    if text == "inf":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value or 'inf': {text!r}") from None


class OneLineParser(argparse.ArgumentParser):
    """Bad input gets one line naming the problem (no usage dump) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"lorabench: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lorabench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = sub.add_parser("run", help="run configurations (the authors' run_exp.py flags)")
    d = RunConfig()
    run.add_argument("--exp", choices=EXPERIMENTS, default=d.exp)
    run.add_argument("--width", type=int, default=d.width)
    run.add_argument("--target_depth", type=int, default=d.target_depth)
    run.add_argument("--frozen_depth", type=int, default=d.frozen_depth)
    run.add_argument("--rank", default=str(d.rank), help="rank, list (1,4,8) or range (1-16)")
    run.add_argument("--use_bias", type=int, choices=[0, 1], default=d.use_bias)
    run.add_argument("--activation", choices=ACTIVATIONS, default=d.activation)
    run.add_argument("--std", type=float, default=d.std, help="std of the LoRA B initialisation")
    run.add_argument("--method", choices=METHODS, default=d.method)
    run.add_argument("--batch_size", type=int, default=d.batch_size)
    run.add_argument("--n_epochs", type=int, default=d.n_epochs, help="Adam steps")
    run.add_argument("--lr", default=str(d.lr), help="learning rate(s)")
    run.add_argument("--n_test", type=int, default=d.n_test)
    run.add_argument("--weight_decay", default=str(d.weight_decay), help="weight decay value(s)")
    run.add_argument("--init_mode", choices=INIT_MODES, default=d.init_mode)
    run.add_argument("--pretrained", type=int, choices=[0, 1], default=d.pretrained)
    run.add_argument("--pretrained_epochs", type=int, default=d.pretrained_epochs)
    run.add_argument("--pretrained_lr", type=float, default=d.pretrained_lr)
    run.add_argument("--pretrained_level", type=float, default=d.pretrained_level)
    run.add_argument("--tune_bias", type=int, choices=[0, 1], default=d.tune_bias)
    run.add_argument("--last_layers", type=int, default=d.last_layers)
    run.add_argument("--seed", default=str(d.seed), help="seed(s)")
    run.add_argument("--rank_step", type=int, default=d.rank_step)
    run.add_argument("--task", choices=TASKS, default=d.task)
    run.add_argument("--n_train", type=_n_train, default=None, help="finite training set size, or 'inf'")
    run.add_argument("--best_epoch", type=int, choices=[0, 1], default=d.best_epoch,
                     help="report the best-validation state (1) or the final state (0)")
    run.add_argument("--n_head", type=int, default=d.n_head)
    run.add_argument("--seq_length", type=int, default=d.seq_length)
    run.add_argument("--better_optim", type=int, choices=[0, 1], default=d.better_optim)
    run.add_argument("--dropout", type=float, default=d.dropout)
    run.add_argument("--wandb", type=int, choices=[0, 1], default=0, help="accepted for compatibility; must be 0")
    run.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol)
    run.add_argument("--device", choices=DEVICES, default="auto")
    run.add_argument("--json", action="store_true", help="print one JSON object per result row on stdout")
    run.add_argument("--all_checkpoints", action="store_true",
                     help="with --json, print both the 'last' and the 'best' rows of gradient runs")
    run.add_argument("--output", help="also write every result row to this Parquet file")
    run.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads: torch's, and the native engine's split of a cell's configs "
                          "(default 1; one process per core is as fast or faster)")
    from .runs import pipeline

    pipeline.add_subparsers(sub)
    from .runs.plan import add_plan_parser

    add_plan_parser(sub)
    for name, what in (("figures", "every figure (with --comparison_out, the protocol comparison too)"),
                       ("claims", "claims.md/.csv and the protocol comparison")):
        report = sub.add_parser(name, help=f"write {what} from the Parquet results (lorabench.{name})")
        report.add_argument("--runs", help="runs.parquet")
        report.add_argument("--selected", help="selected.parquet (default: selected from --runs)")
        report.add_argument("--out", required=True, help="output folder")
        report.add_argument("--checkpoint", choices=("last", "best"), default="last", help="gradient runs' state")
    sub.choices["figures"].add_argument("--protocol", choices=PROTOCOLS, help="default: paper where it has rows")
    sub.choices["figures"].add_argument("--comparison_out", help="also write protocol_comparison.* here")
    sub.choices["claims"].add_argument("--no_comparison", action="store_true", help="skip protocol_comparison.*")
    return parser


def configs_from_args(args: argparse.Namespace) -> list[RunConfig]:
    if args.wandb:
        raise UsageError("--wandb 1 is not supported: lorabench writes results with --json or --output")
    fixed = {
        name: getattr(args, name)
        for name in RunConfig.__dataclass_fields__
        if hasattr(args, name) and name not in SWEPT
    }
    swept = {
        "rank": parse_values(args.rank, int, "rank"),
        "lr": parse_values(args.lr, float, "lr"),
        "weight_decay": parse_values(args.weight_decay, float, "weight_decay"),
        "seed": parse_values(args.seed, int, "seed"),
    }
    cfgs = []
    for seed, rank, lr, wd in itertools.product(swept["seed"], swept["rank"], swept["lr"], swept["weight_decay"]):
        cfgs.append(RunConfig(**fixed, seed=seed, rank=rank, lr=lr, weight_decay=wd).validated())
    return cfgs


class ProgressBar:
    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.last = None

    def __call__(self, label: str, done: int, total: int) -> None:
        percent = int(100 * done / max(total, 1))
        if (label, percent) == self.last and done != total:
            return
        self.last = (label, percent)
        bar = "#" * (percent // 4)
        self.stream.write(f"\r{label:>12} [{bar:<25}] {done}/{total}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def run_command(args: argparse.Namespace) -> int:
    from .runs.runner import run_configs

    cfgs = configs_from_args(args)
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    if args.output:
        from .runs.results import check_writable

        check_writable(args.output)
    progress = None if args.no_progress else ProgressBar()
    rows = []
    for row in run_configs(cfgs, device=args.device, progress=progress):
        rows.append(row)
        if args.json and (args.all_checkpoints or _reported(row)):
            print(json.dumps({k: _jsonable(v) for k, v in row.items()}), flush=True)
        elif not args.json and _reported(row):
            print(_summary(row), flush=True)
    if args.output:
        from .runs.results import write_rows

        write_rows(rows, args.output)
    return 0


def _reported(row: dict) -> bool:
    """The row run_exp.py would print: the construction, or the checkpoint --best_epoch names."""
    wanted = {"construction", "best" if row["best_epoch"] else "last"}
    return row["checkpoint"] in wanted


def _summary(row: dict) -> str:
    parts = [f"rank={row['rank']}", f"lr={row['lr']:g}", f"wd={row['weight_decay']:g}", f"seed={row['seed']}"]
    metrics = [f"{k}={row[k]:.6g}" for k in ("test_loss", "test_shift_loss", "val_loss", "test_accuracy", "test_shift_accuracy") if row.get(k) is not None]
    flag = " DIVERGED" if row.get("diverged") else ""
    return f"{row['method']} " + " ".join(parts + metrics) + flag


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run_command(args)
        if args.command in ("figures", "claims"):
            from .report import claims, figures

            return figures.figures_command(args) if args.command == "figures" else claims.claims_command(args)
        if args.command == "plan":
            from .runs.plan import plan_command

            return plan_command(args)
        from .runs import pipeline

        if args.command in pipeline.COMMANDS:
            return pipeline.main(args)
    except (ConfigError, UsageError, ResultsError) as error:
        parser.exit(2, f"lorabench: error: {error}\n")
    except RuntimeError as error:
        if "device" in str(error):
            parser.exit(2, f"lorabench: error: {error}\n")
        raise
    except Exception as error:
        from .runs.dispatch import DispatchError

        if isinstance(error, DispatchError):
            parser.exit(1, f"lorabench: error: {error}\n")
        raise
    return 0
