"""Throughput of the batched trainer against one-config-per-process runs.

Prints, for an FNN cell (D=16, Lbar=2, L=4, 16 ranks x 3 lr x 4 weight decays = 192
configs) and a TFN cell (D=16, H=2, N=10, depth 2, same grid):

* config-steps per second of the batched cell (steady state, from two run lengths):
  in one process on one core, in one process on every core (threads), and in one process
  per core; for the FNN with both engines (``native``: fnn_step.c, ``torch``: stacked
  torch operations; see lorabench/training/native.py);
* the same configs run one per process through ``python -m lorabench run`` (this
  project's single-config path, process start-up included, full 5,000 steps);
* the authors' rate and the ratio: measured in the same run when ``--authors DIR`` names a
  checkout of their repository (UW-Madison-Lee-Lab/Expressive_Power_of_LoRA), else the
  figure stored in benchmarks/authors_baseline.json;
* achieved GFLOP/s (one core) against a plain torch.bmm of the same shapes (the practical
  roofline) and against the core's FMA peak (2 FMA units x lanes x 2 flop x clock);
* peak memory of one cell, and the projected time of the paper's full grids.

    python benchmarks/cell_throughput.py               # CPU, ~20 minutes on 2 cores
    python benchmarks/cell_throughput.py --authors ../Expressive_Power_of_LoRA   # + ~6 min
    python benchmarks/cell_throughput.py --device cuda --quick
    python benchmarks/cell_throughput.py --family tfn --val-every 10   # + the cell validating every 10 steps
    python benchmarks/cell_throughput.py --family tfn --sweep          # + `lorabench run` over 48 configs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
RANKS = list(range(1, 17))
LRS = [1e-2, 1e-3, 1e-4]
WDS = [0.0, 1e-4, 1e-3, 1e-2]
FNN = dict(exp="fnn", width=16, target_depth=2, frozen_depth=4, batch_size=256, n_test=5000, method="sgd")
TFN = dict(exp="tfn", width=16, target_depth=2, frozen_depth=2, n_head=2, seq_length=10, batch_size=256,
           n_test=5000, method="sgd")
# The paper's gradient grids (docs/experiments.md): FNN ~13,320 configs, TFN 3,840, 5,000 steps each.
GRID = {"fnn": 13_320, "tfn": 3_840}
PAPER_STEPS = 5_000


def flops_per_config_step(family: str) -> float:
    """Multiply-adds x 2 of one training step (forward, backward, validation forward)."""
    B, D = 256, 16
    if family == "fnn":
        L = FNN["frozen_depth"]
        forward = 2 * B * D * D * L
        backward = 2 * B * D * D * (2 * L - 1)  # weight gradients, and input gradients but the first
        return forward + backward + forward
    H, N, L = TFN["n_head"], TFN["seq_length"], TFN["target_depth"]
    per_block = H * (2 * 2 * D * D * N + 2 * 2 * N * N * D) + 2 * 2 * D * D * N
    forward = B * (L * per_block + 2 * D * D * N)
    return 4 * forward  # backward ~ 2x forward, plus the validation forward


def worker(family: str, steps: int, seed: int, device: str, threads: int, engine: str, val_every: int = 1) -> dict:
    os.environ["LORABENCH_ENGINE"] = engine
    import torch

    torch.set_num_threads(threads)
    from lorabench.core.config import RunConfig
    from lorabench.runs.runner import run_configs

    base = FNN if family == "fnn" else TFN
    # (the curves' resolution must be a multiple of the validation's)
    sparse = dict(val_every=val_every, curve_every=val_every * max(1, 50 // val_every))
    cfgs = [RunConfig(**base, rank=r, lr=lr, weight_decay=wd, n_epochs=steps, seed=seed, **sparse)
            for r in RANKS for lr in LRS for wd in WDS]
    start = time.perf_counter()
    rows = list(run_configs(cfgs, device=device))
    wall = time.perf_counter() - start
    engines = sorted({r["engine"] for r in rows})
    # Training time alone (model generation and the training loop, not the final test-set
    # evaluation): wall_time_s is each cell's training time shared out over its configs.
    train_wall = sum(r["wall_time_s"] for r in rows if r["checkpoint"] == "last")
    if engines != [engine] and engine != "auto":
        raise SystemExit(f"asked for engine {engine}, rows say {engines}")
    peak_gpu = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {
        "wall_s": wall,
        "configs": len(cfgs),
        "rows": len(rows),
        "engine": engines[0],
        "train_wall_s": train_wall,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": None if peak_gpu is None else peak_gpu / 2**20,
    }


def _worker_cmd(family, steps, seed, device, threads, engine, val_every=1):
    return [sys.executable, __file__, "--worker", family, "--steps", str(steps), "--seed", str(seed),
            "--device", device, "--threads", str(threads), "--engine", engine, "--val-every", str(val_every)]


def run_worker(family, steps, seed, device, threads=1, engine="auto"):
    cmd = _worker_cmd(family, steps, seed, device, threads, engine)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steady_state(family, short, long, device, threads=1, engine="auto"):
    """Per-step cost and fixed cost of a cell from two run lengths."""
    a = run_worker(family, short, 0, device, threads, engine)
    b = run_worker(family, long, 0, device, threads, engine)
    per_step = (b["wall_s"] - a["wall_s"]) / (long - short)
    if per_step <= 0:
        raise SystemExit(f"{family}: the {long}-step run ({b['wall_s']:.1f} s) was not slower than the {short}-step "
                         f"run ({a['wall_s']:.1f} s): the machine is too noisy for this fit; rerun when it is quiet")
    fixed = a["wall_s"] - short * per_step
    return {"per_step_s": per_step, "fixed_s": fixed, "configs": a["configs"], "max_rss_mb": b["max_rss_mb"],
            "peak_gpu_mb": b["peak_gpu_mb"], "engine": b["engine"]}


def parallel_rate(family, steps, device, processes, engine="auto", val_every=1):
    """Aggregate config-steps/s of one cell process per core (different seeds), over the
    slowest process's training time (the final test-set evaluation, a fixed cost per cell,
    is left out as in the two-length figures)."""
    procs = [subprocess.Popen(_worker_cmd(family, steps, seed, device, 1, engine, val_every), stdout=subprocess.PIPE,
                              text=True)
             for seed in range(processes)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return sum(r["configs"] for r in results) * steps / max(r["train_wall_s"] for r in results)


def single_config_rate(family, n_configs):
    """One config per `python -m lorabench run` process, start-up included, each timed over
    the full 5,000 steps."""
    base = FNN if family == "fnn" else TFN
    walls = []
    for rank in RANKS[:: max(1, len(RANKS) // n_configs)][:n_configs]:
        args = [sys.executable, "-m", "lorabench", "run", "--no_progress", "--device", "cpu"]
        for key, value in {**base, "rank": rank, "lr": 1e-3, "n_epochs": PAPER_STEPS, "seed": 0}.items():
            args += [f"--{key}", str(value)]
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
    return {"wall_5000_s": sum(walls) / len(walls)}


SWEEP_STEPS = 1_000


def sweep_rate(family: str, val_every: int = 1) -> dict:
    """A plain ``lorabench run`` over 48 configs (ranks 1-16 x 3 learning rates) for
    SWEEP_STEPS steps, every core (its default), start-up and evaluation included."""
    base = FNN if family == "fnn" else TFN
    args = [sys.executable, "-m", "lorabench", "run", "--no_progress", "--device", "cpu", "--rank", "1-16",
            "--lr", ",".join(map(str, LRS)), "--n_epochs", str(SWEEP_STEPS), "--seed", "0"]
    if val_every > 1:
        args += ["--val_every", str(val_every)]
    for key, value in base.items():
        args += [f"--{key}", str(value)]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "config_steps_per_s": len(RANKS) * len(LRS) * SWEEP_STEPS / wall}


def authors_rate(family: str, repo: Path) -> dict:
    """The authors' run_exp.py, one config per process as they run it (wandb off), timed
    over the full 5,000 steps: their cost per step falls as training goes on (they evaluate
    the test set at every validation improvement, and improvements thin out), so short
    runs extrapolate badly (90 TFN steps projected 4.7x their real 5,000-step time). Their
    code imports wandb: an empty stand-in module is provided."""
    import tempfile

    stub = Path(tempfile.mkdtemp(prefix="wandb-stub-"))
    (stub / "wandb.py").write_text("")
    env = {**os.environ, "PYTHONPATH": f"{stub}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    base = FNN if family == "fnn" else {**TFN, "frozen_depth": TFN["target_depth"]}
    args = [sys.executable, "run_exp.py", "--wandb", "0", "--rank", "4", "--lr", "1e-3", "--seed", "0",
            "--n_epochs", str(PAPER_STEPS)]
    for key, value in base.items():
        args += [f"--{key}", str(value)]
    start = time.perf_counter()
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    # Their TFN path raises after training when wandb is off (the unset attribute
    # test_shift_loss): the training and final test being timed have finished by then.
    # Any other failure (a missing module, a wrong flag) would time nothing.
    trained = result.returncode == 0 or (family == "tfn" and "test_shift_loss" in result.stderr)
    if not trained:
        raise SystemExit(f"the authors' run_exp.py failed (exit status {result.returncode}), so it cannot be timed:\n"
                         + "\n".join(result.stderr.strip().splitlines()[-5:]))
    return {"wall_5000_s": wall, "config_steps_per_s": PAPER_STEPS / wall}


def bmm_gflops(family, device):
    import torch

    torch.set_num_threads(1)
    C = len(RANKS) * len(LRS) * len(WDS)
    tokens = 256 if family == "fnn" else 256 * TFN["seq_length"]
    if family == "tfn":
        C = min(C, 64)
    x = torch.randn(C, tokens, 16, device=device)
    w = torch.randn(C, 16, 16, device=device)
    for _ in range(3):
        torch.bmm(x, w)
    if device == "cuda":
        torch.cuda.synchronize()
    n = 50
    start = time.perf_counter()
    for _ in range(n):
        torch.bmm(x, w)
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * C * tokens * 16 * 16 * n / (time.perf_counter() - start) / 1e9


def fma_peak_gflops() -> Optional[float]:
    """One core's float32 FMA peak: 2 FMA units x vector lanes x 2 flop x the clock
    (/proc/cpuinfo's "cpu MHz"; 16 lanes with AVX-512, 8 with AVX2). None when unknown."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = fields.get("flags", "").split()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else None
    if lanes is None or "cpu MHz" not in fields:
        return None
    return 2 * lanes * 2 * float(fields["cpu MHz"]) / 1e3


class Entry(dict):
    """A dict that prints each figure as soon as it is measured."""

    def __init__(self, first: dict):
        super().__init__()
        for key, value in first.items():
            self[key] = value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"  {key:40s} {value:,.2f}" if isinstance(value, float) else f"  {key:40s} {value}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["fnn", "tfn"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--engine", default="auto", choices=["auto", "native", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="shorter runs, no one-config-per-process baseline")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--authors", type=Path, help="a checkout of the authors' repository, timed side by side")
    parser.add_argument("--family", choices=["fnn", "tfn"], action="append",
                        help="measure only this model family (repeatable; default both)")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also time a plain `lorabench run` of 48 configs x {SWEEP_STEPS:,} steps on every core")
    parser.add_argument("--val-every", type=int, default=1,
                        help="also time the cell (one process per core) validating every K steps (val_every K)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.seed, args.device, args.threads, args.engine,
                                args.val_every)))
        return

    baseline = json.loads((HERE / "authors_baseline.json").read_text()) if (HERE / "authors_baseline.json").exists() else {}
    cores = len(os.sched_getaffinity(0)) if args.device == "cpu" else 1
    if args.device == "cuda":
        lengths = {"fnn": (200, 1000), "tfn": (20, 120)}
    else:
        # The TFN cell's fixed cost (model generation with pretraining, test-set evaluation)
        # is over a minute: the two lengths must differ by enough steps to stand above its noise.
        lengths = {"fnn": (100, 300), "tfn": (10, 60)} if args.quick else {"fnn": (200, 1000), "tfn": (20, 120)}
    report = {"device": args.device, "cpu_count": cores, "families": {}}
    if args.device == "cuda":
        import torch

        report["device_name"] = torch.cuda.get_device_name(0)
    for family in args.family or ("fnn", "tfn"):
        short, long = lengths[family]
        cell = steady_state(family, short, long, args.device)
        rate = cell["configs"] / cell["per_step_s"]
        print(f"\n== {family.upper()} cell: {cell['configs']} configs on {args.device} ==", flush=True)
        entry = Entry({
            "engine": cell["engine"],
            "cell_configs": cell["configs"],
            "cell_config_steps_per_s": rate,
            "cell_fixed_s": cell["fixed_s"],
            "cell_5000_step_wall_s": cell["fixed_s"] + PAPER_STEPS * cell["per_step_s"],
            "peak_rss_mb": cell["max_rss_mb"],
            "peak_gpu_mb": cell["peak_gpu_mb"],
            "achieved_gflops": rate * flops_per_config_step(family) / 1e9,
            "bmm_gflops_same_shapes": bmm_gflops(family, args.device),
        })
        entry["fraction_of_bmm"] = entry["achieved_gflops"] / entry["bmm_gflops_same_shapes"]
        peak = fma_peak_gflops() if args.device == "cpu" else None
        if peak:
            entry["fma_peak_gflops_per_core"] = peak
            entry["fraction_of_fma_peak"] = entry["achieved_gflops"] / peak
        all_cores = rate
        if args.device == "cpu" and cores > 1:
            threaded = steady_state(family, short, long, args.device, threads=cores)
            entry["cell_config_steps_per_s_one_process_all_threads"] = threaded["configs"] / threaded["per_step_s"]
            entry["cell_config_steps_per_s_one_process_per_core"] = parallel_rate(family, long, args.device, cores)
            # The workflow runs one one-thread job per core, and the threaded figure comes
            # from the difference of two short runs (an FNN cell once read 3.3x one core).
            all_cores = entry["cell_config_steps_per_s_one_process_per_core"]
            entry["cell_config_steps_per_s_all_cores"] = all_cores
        if args.device == "cpu" and cell["engine"] == "native":
            other = steady_state(family, short, long, args.device, engine="torch")
            entry["torch_engine_config_steps_per_s"] = other["configs"] / other["per_step_s"]
            entry["native_over_torch_engine"] = rate / entry["torch_engine_config_steps_per_s"]
        if not args.quick and args.device == "cpu":
            single = single_config_rate(family, n_configs=3)
            entry["single_process_5000_step_wall_s"] = single["wall_5000_s"]
            entry["single_process_config_steps_per_s"] = PAPER_STEPS / single["wall_5000_s"]
        authors = baseline.get(family, {}).get("config_steps_per_s")
        entry["authors_source"] = "benchmarks/authors_baseline.json"
        if args.authors:
            measured = authors_rate(family, args.authors)
            authors = measured["config_steps_per_s"]
            entry["authors_source"] = "measured now, in the same run (--authors)"
            entry["authors_5000_step_wall_s"] = measured["wall_5000_s"]
        sparse = None
        if args.val_every > 1 and args.device == "cpu":
            sparse = parallel_rate(family, long, args.device, cores, val_every=args.val_every)
            entry[f"cell_config_steps_per_s_one_process_per_core_val_every_{args.val_every}"] = sparse
        sweeps = {}
        if args.sweep and args.device == "cpu":
            for k in dict.fromkeys((1, args.val_every)):
                suffix = "" if k == 1 else f"_val_every_{k}"
                sweeps[suffix] = sweep_rate(family, k)
                entry[f"sweep_48_configs_{SWEEP_STEPS}_steps_wall_s{suffix}"] = sweeps[suffix]["wall_s"]
                entry[f"sweep_config_steps_per_s{suffix}"] = sweeps[suffix]["config_steps_per_s"]
        if authors:
            entry["authors_config_steps_per_s"] = authors
            entry["speedup_vs_authors"] = all_cores / authors
            if sparse:  # the authors validate every step: this ratio counts work they do and these runs skip
                entry[f"speedup_vs_authors_val_every_{args.val_every}"] = sparse / authors
            for suffix, sweep in sweeps.items():
                entry[f"sweep_speedup_vs_authors{suffix}"] = sweep["config_steps_per_s"] / authors
        entry["projected_paper_grid_hours"] = GRID[family] * PAPER_STEPS / all_cores / 3600
        report["families"][family] = entry

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
