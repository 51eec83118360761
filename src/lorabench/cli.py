"""``lorabench``: the command line of the whole package.

``lorabench run`` is the authors' ``run_exp.py`` command line, plus sweeps and JSON
output. Every flag of ``run_exp.py`` keeps its name, default and meaning; ``--rank``,
``--lr``, ``--weight_decay`` and ``--seed`` also take lists (``1e-2,1e-3``) and integer
ranges (``1-16``), and a sweep runs the whole product, batched cell by cell. Multi-word
flags are accepted with ``_`` or ``-`` (``--n_epochs``, ``--n-epochs``).

The workflow's steps (``models``, ``construct``, ``train``, ``aggregate``, ``select``) and
the report (``figures``, ``claims``) are subcommands too; the Snakemake rules call only
these. This module is only argument parsing: the logic is in ``runs.pipeline``,
``runs.runner`` and ``report``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import __version__
from .core.config import (
    ACTIVATIONS,
    DEVICES,
    EXPERIMENTS,
    INIT_MODES,
    PROTOCOLS,
    TASKS,
    ConfigError,
    RunConfig,
)
from .methods import BUILT_IN, validated
from .runs.dispatch import DISPATCHES, DispatchError, SlurmSettings
from .runs.results import ResultsError

SWEPT = ("rank", "lr", "weight_decay", "seed")
DESCRIPTION = ("The synthetic experiments of 'The Expressive Power of Low-Rank Adaptation' (Zeng & Lee, ICLR 2024). "
               "'lorabench COMMAND --help' lists a command's flags; multi-word flags take '_' or '-'.")


class UsageError(Exception):
    """A command-line value that cannot be used; the message names the flag."""


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under Slurm or taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


# ------------------------------------------------------------------ parser
class OneLineParser(argparse.ArgumentParser):
    """Bad input gets one line naming the problem (no usage dump) and exit code 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-3" for an option (its own pattern knows no exponents), so
        # "--lr -1e-3" would fail with "expected one argument"; no flag here starts with
        # "-<digit>", so anything that does is a value.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        self.exit(2, f"lorabench: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help; both spellings of a flag before one metavar."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return ", ".join(action.option_strings) + " " + self._format_args(action, self._get_default_metavar_for_optional(action))


def spellings(name: str) -> list[str]:
    """'n_epochs' -> ['--n_epochs', '--n-epochs']; 'log-dir' -> ['--log-dir', '--log_dir']."""
    other = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    return [f"--{name}"] + ([f"--{other}"] if other != name else [])


def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    parser.add_argument(*spellings(name), **kwargs)


def _add_run(sub) -> None:
    run = sub.add_parser("run", help="run configurations (the authors' run_exp.py flags)",
                         description="Run configurations: the authors' run_exp.py flags, plus sweeps and JSON output.",
                         formatter_class=HelpFormatter)
    d = RunConfig()
    flag = functools.partial(_option, run)
    flag("exp", choices=EXPERIMENTS, default=d.exp, help="model family: feed-forward (fnn) or transformer (tfn)")
    flag("width", type=int, default=d.width, help="model width D")
    flag("target_depth", type=int, default=d.target_depth, help="depth of the target model (TFN: of both models)")
    flag("frozen_depth", type=int, default=d.frozen_depth, help="depth of the frozen model (FNN)")
    flag("rank", default=str(d.rank), help="LoRA rank R: one, a list (1,4,8) or a range (1-16)")
    flag("use_bias", type=int, choices=[0, 1], default=d.use_bias, help="models with biases (1) or without (0)")
    flag("activation", choices=ACTIVATIONS, default=d.activation, help="activation of the FNNs")
    flag("std", type=float, default=d.std, help="std of the LoRA B initialisation")
    flag("method", default=d.method,
         help=f"one of {', '.join(BUILT_IN)} (docs/methods.md), or a method of your own as package.module:ClassName")
    flag("method_settings", default=d.method_settings,
         help="the method's own settings as a JSON object, e.g. '{\"d_init\": 0.1}' for vera")
    flag("batch_size", type=int, default=d.batch_size, help="training batch size")
    flag("n_epochs", type=int, default=d.n_epochs, help="Adam steps")
    flag("lr", default=str(d.lr), help="learning rate(s): one or a list")
    flag("n_test", type=int, default=d.n_test, help="test set size")
    flag("weight_decay", default=str(d.weight_decay), help="weight decay value(s): one or a list")
    flag("init_mode", choices=INIT_MODES, default=d.init_mode, help="initialisation of the frozen and target models")
    flag("pretrained", type=int, choices=[0, 1], default=d.pretrained, help="pretrain the frozen model (1) or not (0)")
    flag("pretrained_epochs", type=int, default=d.pretrained_epochs, help="Adam step budget of pretraining")
    flag("pretrained_lr", type=float, default=d.pretrained_lr, help="learning rate of pretraining")
    flag("pretrained_level", type=float, default=d.pretrained_level,
         help="pretraining stops once the loss is below its initial value / this")
    flag("tune_bias", type=int, choices=[0, 1], default=d.tune_bias, help="train the biases too (1) or not (0)")
    flag("last_layers", type=int, default=d.last_layers, help="layers tuned by method flt")
    flag("seed", default=str(d.seed), help="seed(s): one, a list or a range")
    flag("rank_step", type=int, default=d.rank_step, help="rank added per layer (FNN, gradient methods)")
    flag("task", choices=TASKS, default=d.task, help="what the target model's output is used for")
    flag("n_train", type=_n_train, default=None, help="finite training set size, or 'inf' (None: a fresh batch every step)")
    flag("best_epoch", type=int, choices=[0, 1], default=d.best_epoch,
         help="report the best-validation state (1) or the final state (0)")
    flag("n_head", type=int, default=d.n_head, help="attention heads (TFN)")
    flag("seq_length", type=int, default=d.seq_length, help="tokens per sequence (TFN)")
    flag("better_optim", type=int, choices=[0, 1], default=d.better_optim,
         help="TFN with residual connections, LayerNorm and dropout (1)")
    flag("dropout", type=float, default=d.dropout, help="dropout rate with --better_optim 1")
    flag("prenorm", type=int, choices=[0, 1], default=d.prenorm,
         help="TFN with pre-norm residual blocks, X + Attn(LN(X)), Y + FFN(LN(Y)) (1); trains on torch")
    flag("val_every", type=int, default=d.val_every,
         help="validate every k steps and at the last (k > 1: paper protocol, final state; skips the other validations)")
    flag("wandb", type=int, choices=[0, 1], default=0, help="accepted for compatibility; must be 0")
    flag("protocol", choices=PROTOCOLS, default=d.protocol, help="the paper's protocol or the authors' code's")
    flag("device", choices=DEVICES, default="auto", help="auto: cuda when torch sees one, else cpu")
    flag("json", action="store_true", help="print one JSON object per result row on stdout")
    flag("all_checkpoints", action="store_true", help="with --json, print both the 'last' and the 'best' rows of gradient runs")
    flag("output", help="also write every result row to this Parquet file")
    flag("no_progress", action="store_true", help="no progress on stderr")
    flag("threads", type=int, default=available_cores(),
         help="CPU threads: torch's, and the native engine's split of a cell's configs "
              "(default: every available core, here %(default)s)")


def _add_job(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(*spellings("job"), help="the workflow's job reference (JSON)")
    which.add_argument(*spellings("spec"), help="a job spec file (JSON)")


def _add_workflow(sub) -> None:
    p = sub.add_parser("models", help="workflow: generate the frozen and target models of a job", formatter_class=HelpFormatter)
    _add_job(p)
    _option(p, "out", required=True, help="models file to write (.pt)")
    _option(p, "threads", type=int, default=1, help="torch CPU threads")

    for name, text in (("construct", "run the constructions (method ours) of a job"),
                       ("train", "train the gradient runs of a job")):
        p = sub.add_parser(name, help=f"workflow: {text}", formatter_class=HelpFormatter)
        _add_job(p)
        _option(p, "models", required=True, help="the job's models file (lorabench models)")
        _option(p, "out", required=True, help="Parquet file of result rows")
        _option(p, "device", choices=DEVICES, default="auto", help="auto: cuda when torch sees one, else cpu")
        _option(p, "threads", type=int, default=1, help="torch CPU threads")
        if name == "train":
            defaults = SlurmSettings()
            p.add_argument(*spellings("reuse"), nargs="*", default=[], metavar="FILE",
                           help="other experiments' train job outputs: configs found there are copied, not trained")
            _option(p, "dispatch", choices=DISPATCHES, default="local", help="where training runs")
            _option(p, "log-dir", default="logs/submitit", help="submitit's job logs")
            _option(p, "slurm-partition", default=defaults.partition, help="Slurm partition ('' : the cluster's default)")
            _option(p, "slurm-gpus", type=int, default=defaults.gpus, help="GPUs per job")
            _option(p, "slurm-cpus", type=int, default=defaults.cpus, help="CPUs per job")
            _option(p, "slurm-mem-gb", type=int, default=defaults.mem_gb, help="memory per job (GB)")
            _option(p, "slurm-time-min", type=int, default=defaults.time_min, help="time limit per job (minutes)")
            _option(p, "slurm-account", default=defaults.account, help="Slurm account")
            _option(p, "slurm-qos", default=defaults.qos, help="Slurm QOS")

    p = sub.add_parser("aggregate", help="workflow: concatenate result files into one Parquet file", formatter_class=HelpFormatter)
    _option(p, "out", required=True, help="Parquet file to write")
    _option(p, "selected", help="also write the selection by validation loss here")
    p.add_argument("inputs", nargs="*", help="result files (Parquet)")

    p = sub.add_parser("select", help="workflow: select per group the lr x weight decay point with the lowest validation loss",
                       formatter_class=HelpFormatter)
    _option(p, "runs", required=True, help="runs.parquet")
    _option(p, "out", required=True, help="selected.parquet to write")

    p = sub.add_parser("costs", help="workflow: sum the jobs' benchmark records per experiment, rule and protocol",
                       formatter_class=HelpFormatter)
    _option(p, "out", required=True, help="CSV file to write")
    p.add_argument("inputs", nargs="*", help="Snakemake benchmark files (<rule>/<experiment>/<protocol>/<name>.tsv)")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="projected configs, config-steps, core-hours and wall time of a workflow config",
                       formatter_class=HelpFormatter)
    _option(p, "configfile", default="config.yaml", help="workflow config")
    _option(p, "preset", help="override the config's preset (paper | full_length | quick | smoke)")
    _option(p, "experiments", help="only these experiments (comma-separated)")
    _option(p, "cores", default="1", help="core counts to project the wall time for, e.g. 2,8")
    _option(p, "json", action="store_true", help="print the plan as JSON")
    _option(p, "recalibrate", action="store_true", help="measure every engine again (ignore the cache)")
    _option(p, "pieces", help="group the run into pieces of at most this long on the first --cores value "
            "(e.g. 2h, 90min) and print each piece's snakemake command")
    _option(p, "measured", help="compare the projection with the CPU time of the jobs that ran "
            "(Snakemake's benchmark records, e.g. logs/benchmarks)")


SELECTED_HELP = ("selected.parquet (default: selected from --runs); several files: the pieces of one run, "
                 "each with its own experiments or protocols")


def _add_report(sub) -> None:
    for name, what, out in (("figures", "every figure, or those named by --name", "output folder, with a folder per protocol"),
                            ("claims", "claims.md/.csv and the protocol comparison", "output folder")):
        p = sub.add_parser(name, help=f"write {what} from the Parquet results", formatter_class=HelpFormatter)
        _option(p, "runs", help="runs.parquet")
        _option(p, "selected", nargs="+", help=SELECTED_HELP)
        _option(p, "out", required=True, help=out)
        _option(p, "checkpoint", choices=("last", "best"), default="last", help="gradient runs' state")
        if name == "claims":
            _option(p, "note", default="", help="Markdown appended to claims.md (the workflow names the experiments "
                    "a run left out)")
            _option(p, "baseline", nargs="+", help="another run's selected.parquet (several: its pieces): also write "
                    "claims_vs_<label>.md/.csv, every claim next to that run's")
            _option(p, "baseline_label", default="baseline", help="the baseline's name in those files (letters, digits, "
                    "'_', '-')")
    p = sub.add_parser("paper-tables", help="write per figure of the paper a table: what the paper shows, what was measured",
                       formatter_class=HelpFormatter)
    _option(p, "runs", help="runs.parquet")
    _option(p, "selected", nargs="+", help=SELECTED_HELP)
    _option(p, "out", required=True, help="Markdown file to write")
    _option(p, "checkpoint", choices=("last", "best"), default="last", help="gradient runs' state")
    _option(sub.choices["figures"], "protocol", choices=PROTOCOLS, action="append",
            help="draw under this protocol (repeatable; default: each protocol with rows for the figure's experiments)")
    _option(sub.choices["figures"], "name", action="append", help="only this figure (repeatable; default: every figure)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lorabench", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lorabench {__version__}")
    parser.add_argument("--cpu-record", "--cpu_record", dest="cpu_record", metavar="PATH",
                        help="on success, write this process's CPU time (JSON) to PATH (the workflow's jobs do)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    _add_run(sub)
    _add_workflow(sub)
    _add_plan(sub)
    _add_report(sub)
    return parser


# ------------------------------------------------------------------ lorabench run
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
        cfgs.append(validated(RunConfig(**fixed, seed=seed, rank=rank, lr=lr, weight_decay=wd)))
    return cfgs


class ProgressBar:
    """A bar redrawn in place on a terminal; elsewhere (a log file, a pipe) one plain line
    per quarter, so logs are not flooded with carriage returns."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last = None

    def __call__(self, label: str, done: int, total: int) -> None:
        percent = int(100 * done / max(total, 1))
        step = percent if self.tty else percent // 25 * 25
        if (label, step) == self.last and done != total:
            return
        self.last = (label, step)
        if self.tty:
            bar = "#" * (percent // 4)
            self.stream.write(f"\r{label:>12} [{bar:<25}] {done}/{total}")
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{label:>12} {done}/{total}\n")
        self.stream.flush()


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _check_threads(args: argparse.Namespace) -> None:
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")


def run_command(args: argparse.Namespace) -> int:
    from .runs.runner import run_configs

    cfgs = configs_from_args(args)
    _check_threads(args)
    if args.output:
        from .runs.results import check_writable

        check_writable(args.output)
    import torch

    # main() may be called in-process (tests, notebooks): leave torch's setting as found.
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        progress = None if args.no_progress else ProgressBar()
        rows = []
        for row in run_configs(cfgs, device=args.device, progress=progress):
            rows.append(row)
            if args.json and (args.all_checkpoints or _reported(row)):
                print(json.dumps({k: _jsonable(v) for k, v in row.items()}), flush=True)
            elif not args.json and _reported(row):
                print(_summary(row), flush=True)
    finally:
        torch.set_num_threads(before)
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


# ------------------------------------------------------------------ workflow steps
def _job_spec(args: argparse.Namespace):
    """The job's spec: expanded again from its workflow reference, or the spec file's path."""
    from .runs import pipeline

    return pipeline.job_spec(args.job) if args.job is not None else args.spec


def models_command(args: argparse.Namespace) -> int:
    from .runs import pipeline

    _check_threads(args)
    pipeline.generate(_job_spec(args), args.out, threads=args.threads)
    return 0


def construct_command(args: argparse.Namespace) -> int:
    from .runs import pipeline

    _check_threads(args)
    pipeline.construct(_job_spec(args), args.models, args.out, device=args.device, threads=args.threads)
    return 0


def train_command(args: argparse.Namespace) -> int:
    from .runs import pipeline

    _check_threads(args)
    slurm = SlurmSettings(
        partition=args.slurm_partition, gpus=args.slurm_gpus, cpus=args.slurm_cpus, mem_gb=args.slurm_mem_gb,
        time_min=args.slurm_time_min, account=args.slurm_account, qos=args.slurm_qos,
    )
    pipeline.train(_job_spec(args), args.models, args.out, device=args.device, threads=args.threads,
                   reuse=args.reuse, dispatch=args.dispatch, log_dir=args.log_dir, slurm=slurm)
    return 0


def aggregate_command(args: argparse.Namespace) -> int:
    from .runs import pipeline

    pipeline.aggregate(args.inputs, args.out, args.selected)
    return 0


def select_command(args: argparse.Namespace) -> int:
    from .runs import pipeline

    pipeline.select(args.runs, args.out)
    return 0


# ------------------------------------------------------------------ report
def _report_inputs(args: argparse.Namespace):
    """runs.parquet (optional) and the selected rows (read, or selected from the runs)."""
    from .runs.results import read_pieces, read_rows
    from .runs.selection import select_by_validation

    if not args.runs and not args.selected:
        raise UsageError("give --runs, --selected or both")
    runs = read_rows(args.runs) if args.runs else None
    selected = read_pieces(args.selected) if args.selected else select_by_validation(runs)
    return runs, selected


def _print_paths(paths: Sequence[Path]) -> int:
    for path in paths:
        print(path)
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from .runs import plan

    cores = plan.parse_cores(args.cores)
    chosen = [e.strip() for e in args.experiments.split(",") if e.strip()] if args.experiments else None
    pieces_s = plan.parse_duration(args.pieces) if args.pieces else None
    wf, jobs = plan.load_workflow(args.configfile, args.preset, chosen)
    if args.measured and not Path(args.measured).is_dir():
        raise ConfigError(f"--measured: {args.measured} is not a folder of benchmark records")
    projected = plan.make_plan(wf, jobs, cores, recalibrate=args.recalibrate, pieces_s=pieces_s,
                               configfile=args.configfile, records=Path(args.measured) if args.measured else None,
                               done=lambda path: Path(path).exists())
    print(json.dumps(projected, indent=1) if args.json else plan.format_plan(projected))
    return 0


def costs_command(args: argparse.Namespace) -> int:
    from .runs.costs import write_costs

    write_costs(args.inputs, args.out)
    return 0


def figures_command(args: argparse.Namespace) -> int:
    from .report.figures import write_all_figures

    runs, selected = _report_inputs(args)
    return _print_paths(write_all_figures(runs, selected, args.out, protocols=args.protocol, checkpoint=args.checkpoint,
                                          names=args.name))


def claims_command(args: argparse.Namespace) -> int:
    from .report.commands import write_claims_and_comparison
    from .runs.results import read_pieces

    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.baseline_label):
        raise UsageError(f"--baseline_label {args.baseline_label!r}: use letters, digits, '_' and '-' only")
    runs, selected = _report_inputs(args)
    baseline = read_pieces(args.baseline) if args.baseline else None
    return _print_paths(write_claims_and_comparison(runs, selected, args.out, checkpoint=args.checkpoint,
                                                    note=args.note, baseline=baseline,
                                                    baseline_label=args.baseline_label))


def paper_tables_command(args: argparse.Namespace) -> int:
    from .report.paper_tables import write_paper_tables

    _, selected = _report_inputs(args)
    return _print_paths([write_paper_tables(selected, args.out, checkpoint=args.checkpoint)])


COMMANDS = {
    "run": run_command,
    "models": models_command,
    "construct": construct_command,
    "train": train_command,
    "aggregate": aggregate_command,
    "select": select_command,
    "costs": costs_command,
    "plan": plan_command,
    "figures": figures_command,
    "claims": claims_command,
    "paper-tables": paper_tables_command,
}


def exit_code(error: BaseException) -> Optional[int]:
    """2 for errors in what the user asked for; 1 for a failed dispatched job or a native
    engine that cannot be built (not the command line's fault); None: a bug, let it raise.
    Each class is imported here: a module that raised it is already loaded, and ``--help``
    need not load torch."""
    from .runs.runner import DeviceError
    from .training.native import NativeError

    if isinstance(error, (UsageError, ConfigError, ResultsError, DeviceError)):
        return 2
    if isinstance(error, (DispatchError, NativeError)):
        return 1
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = COMMANDS[args.command](args)
        if args.cpu_record and code == 0:
            from .runs.costs import write_cpu_record

            write_cpu_record(args.cpu_record)
        return code
    except Exception as error:
        code = exit_code(error)
        if code is None:
            raise
        parser.exit(code, f"lorabench: error: {error}\n")
