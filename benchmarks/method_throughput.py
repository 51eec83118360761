"""Throughput of every method's batched cell, side by side, against the authors' code.

``--family fnn`` (default): the FNN (Lbar, L) = (2, 4) cell (D=16, batch 256; 16 ranks x
3 learning rates x 4 weight decays = 192 configs; final-layer tuning: its 4 depths x the
same 12 grid points) trained by each method, one process on one core: LoRA on its native
step and on its hand-written torch gradients, and the plug-in methods (full fine-tuning,
DoRA, VeRA, PiSSA) on the torch engine with autograd. ``--family tfn``: the depth-1
transformer cell (D=16, H=2, N=10, batch 256; 16 ranks x 2 weight decays x 2 learning
rates = 64 configs): LoRA native and on torch, LoRA on the pre-norm transformer (both),
the plug-in methods on the native pass's gradients (``native-gradients``), and DoRA also
on autograd through the whole model, as it trains with ``LORABENCH_ENGINE=torch``. Each rate is config-steps per second of training, from two
run lengths (the difference removes model generation and evaluation). The authors'
run_exp.py (one config per process, as they run it, 5,000 steps) is timed in the same run
when ``--authors DIR`` names a checkout of UW-Madison-Lee-Lab/Expressive_Power_of_LoRA,
else the figure stored in benchmarks/authors_baseline.json is used and named as such.

    python benchmarks/method_throughput.py --authors ../Expressive_Power_of_LoRA --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cell_throughput import FNN, LRS, RANKS, WDS, authors_rate  # noqa: E402

# (label, method, engine): the engine LoRA is forced onto; the plug-ins have one.
RUNS = [
    ("LoRA, native step", "sgd", "native"),
    ("LoRA, torch (hand-written gradients)", "sgd", "torch"),
    ("final-layer tuning, native step", "flt", "native"),
    ("full fine-tuning (autograd)", "full", "auto"),
    ("DoRA (autograd)", "dora", "auto"),
    ("VeRA (autograd)", "vera", "auto"),
    ("PiSSA, native step (LoRA's, on the residual weights)", "pissa", "native"),
]
TFN_RUNS = [
    ("LoRA, native step", "sgd", "native", {}),
    ("LoRA, torch (autograd)", "sgd", "torch", {}),
    ("LoRA on pre-norm blocks, native step", "sgd", "native", {"prenorm": 1}),
    ("LoRA on pre-norm blocks, torch (autograd)", "sgd", "torch", {"prenorm": 1}),
    ("full fine-tuning (native gradients)", "full", "auto", {}),
    ("DoRA (native gradients)", "dora", "auto", {}),
    ("DoRA, torch (autograd)", "dora", "torch", {}),
    ("VeRA (native gradients)", "vera", "auto", {}),
    ("PiSSA, native step (LoRA's)", "pissa", "native", {}),
]
LENGTHS = {"fnn": (100, 500), "tfn": (10, 40)}
TFN = dict(exp="tfn", width=16, target_depth=1, frozen_depth=1, n_head=2, seq_length=10, batch_size=256)


def worker(method: str, steps: int, engine: str, family: str = "fnn", extra: str = "{}") -> dict:
    os.environ["LORABENCH_ENGINE"] = engine
    import torch

    torch.set_num_threads(1)
    from lorabench.core.config import RunConfig
    from lorabench.runs.runner import run_configs

    budgets = [dict(last_layers=k) for k in range(1, FNN["frozen_depth"] + 1)] if method == "flt" else \
        [dict(rank=r) for r in RANKS]
    # the test sets are not timed: fewer samples
    base = {**(FNN if family == "fnn" else TFN), "method": method, "n_test": 1000, **json.loads(extra)}
    lrs, wds = (LRS, WDS) if family == "fnn" else (LRS[:2], WDS[:2])
    cfgs = [RunConfig(**base, **budget, lr=lr, weight_decay=wd, n_epochs=steps, seed=0)
            for budget in budgets for lr in lrs for wd in wds]
    rows = list(run_configs(cfgs, device="cpu"))
    # wall_time_s: each cell's training time (models, training loop) shared out over its configs
    train = sum(r["wall_time_s"] for r in rows if r["checkpoint"] == "last")
    return {"configs": len(cfgs), "train_s": train, "engines": sorted({r["engine"] for r in rows})}


def run_worker(method: str, steps: int, engine: str, family: str = "fnn", extra: dict = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--steps", str(steps), "--engine", engine,
           "--family", family, "--extra", json.dumps(extra or {})]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell_rate(method: str, engine: str, family: str = "fnn", extra: dict = None) -> dict:
    lengths = LENGTHS[family]
    short, long = (run_worker(method, n, engine, family, extra) for n in lengths)
    per_step = (long["train_s"] - short["train_s"]) / (lengths[1] - lengths[0])
    if per_step <= 0:
        raise SystemExit(f"{method}: the longer run was not slower: the machine is too noisy; rerun when it is quiet")
    return {"configs": long["configs"], "engines": long["engines"], "config_steps_per_s": long["configs"] / per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--family", default="fnn", choices=["fnn", "tfn"], help="the cell: FNN (2, 4) or TFN depth 1")
    parser.add_argument("--authors", type=Path, help="a checkout of the authors' repository, timed in the same run")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--only", default="", help="time only the runs whose label contains this text")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.engine, args.family, args.extra)))
        return
    if args.family == "tfn":
        report = {"cell": "TFN depth 1, D=16, H=2, N=10, batch 256, one core", "methods": {},
                  "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(f"{'method':<44} {'configs':>7} {'engine':>16} {'config-steps/s':>15}")
        for label, method, engine, extra in (r for r in TFN_RUNS if args.only in r[0]):
            cell = cell_rate(method, engine, "tfn", extra)
            report["methods"][label] = {**cell, "method": method, **extra}
            print(f"{label:<44} {cell['configs']:>7} {'/'.join(cell['engines']):>16} {cell['config_steps_per_s']:>15,.0f}",
                  flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return

    if args.authors:
        authors = authors_rate("fnn", args.authors)["config_steps_per_s"]
        source = "measured now, in the same run"
    else:
        authors = json.loads((HERE / "authors_baseline.json").read_text())["fnn"]["config_steps_per_s"]
        source = "benchmarks/authors_baseline.json (not this machine's measurement)"
    report = {"cell": "FNN (2, 4), D=16, batch 256, one core", "authors_config_steps_per_s": authors,
              "authors_source": source, "methods": {}, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"authors' run_exp.py: {authors:,.0f} config-steps/s ({source})")
    print(f"{'method':<40} {'configs':>7} {'engine':>8} {'config-steps/s':>15} {'x authors':>10}")
    for label, method, engine in (r for r in RUNS if args.only in r[0]):
        cell = cell_rate(method, engine)
        ratio = cell["config_steps_per_s"] / authors
        report["methods"][label] = {**cell, "method": method, "speedup_vs_authors": ratio}
        print(f"{label:<40} {cell['configs']:>7} {'/'.join(cell['engines']):>8} "
              f"{cell['config_steps_per_s']:>15,.0f} {ratio:>9.1f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
