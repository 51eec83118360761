"""Throughput of the batched trainer against one-config-per-process runs.

Prints, for an FNN cell (D=16, Lbar=2, L=4, 16 ranks x 3 lr x 4 weight decays = 192
configs) and a TFN cell (D=16, H=2, N=10, depth 2, same grid):

* config-steps per second of the batched cell (steady state, from two run lengths),
  in one process and in one process per core;
* the same configs run one per process through ``python -m lorabench run`` (this
  project's single-config path, process start-up included);
* the authors' measured rate (benchmarks/authors_baseline.json) and the ratio;
* achieved GFLOP/s against a plain torch.bmm of the same shapes (the practical roofline);
* peak memory of one cell, and the projected time of the paper's full grids.

    python benchmarks/cell_throughput.py               # CPU, takes ~10 minutes
    python benchmarks/cell_throughput.py --device cuda --quick
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

HERE = Path(__file__).resolve().parent
RANKS = list(range(1, 17))
LRS = [1e-2, 1e-3, 1e-4]
WDS = [0.0, 1e-4, 1e-3, 1e-2]
FNN = dict(exp="fnn", width=16, target_depth=2, frozen_depth=4, batch_size=256, n_test=5000, method="sgd")
TFN = dict(exp="tfn", width=16, target_depth=2, frozen_depth=2, n_head=2, seq_length=10, batch_size=256,
           n_test=5000, method="sgd")
# The paper's gradient grids (EXPERIMENTS.md): FNN ~13,320 configs, TFN 3,840, 5,000 steps each.
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


def worker(family: str, steps: int, seed: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from lorabench.config import RunConfig
    from lorabench.runner import run_configs

    base = FNN if family == "fnn" else TFN
    cfgs = [RunConfig(**base, rank=r, lr=lr, weight_decay=wd, n_epochs=steps, seed=seed)
            for r in RANKS for lr in LRS for wd in WDS]
    start = time.perf_counter()
    rows = list(run_configs(cfgs, device=device))
    wall = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {
        "wall_s": wall,
        "configs": len(cfgs),
        "rows": len(rows),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": None if peak_gpu is None else peak_gpu / 2**20,
    }


def run_worker(family, steps, seed, device, threads=1):
    cmd = [sys.executable, __file__, "--worker", family, "--steps", str(steps), "--seed", str(seed),
           "--device", device, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steady_state(family, short, long, device):
    """Per-step cost and fixed cost of a cell from two run lengths."""
    a, b = run_worker(family, short, 0, device), run_worker(family, long, 0, device)
    per_step = (b["wall_s"] - a["wall_s"]) / (long - short)
    fixed = a["wall_s"] - short * per_step
    return {"per_step_s": per_step, "fixed_s": fixed, "configs": a["configs"], "max_rss_mb": b["max_rss_mb"],
            "peak_gpu_mb": b["peak_gpu_mb"]}


def parallel_rate(family, steps, device, processes):
    """Aggregate config-steps/s of one cell process per core (different seeds)."""
    cmd = lambda seed: [sys.executable, __file__, "--worker", family, "--steps", str(steps), "--seed", str(seed),
                        "--device", device, "--threads", "1"]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd(seed), stdout=subprocess.PIPE, text=True) for seed in range(processes)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - start
    return sum(r["configs"] for r in results) * steps / wall


def single_config_rate(family, short, long, n_configs):
    """One config per `python -m lorabench run` process, start-up included."""
    base = FNN if family == "fnn" else TFN

    def run(steps, rank):
        args = [sys.executable, "-m", "lorabench", "run", "--no_progress", "--device", "cpu"]
        for key, value in {**base, "rank": rank, "lr": 1e-3, "n_epochs": steps, "seed": 0}.items():
            args += [f"--{key}", str(value)]
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        return time.perf_counter() - start

    ranks = RANKS[:: max(1, len(RANKS) // n_configs)][:n_configs]
    short_t = [run(short, r) for r in ranks]
    long_t = [run(long, r) for r in ranks]
    per_step = (sum(long_t) - sum(short_t)) / len(ranks) / (long - short)
    fixed = sum(short_t) / len(ranks) - short * per_step
    return {"per_step_s": per_step, "fixed_s": fixed, "wall_5000_s": fixed + PAPER_STEPS * per_step}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["fnn", "tfn"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="shorter runs, no one-config-per-process baseline")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.seed, args.device, args.threads)))
        return

    baseline = json.loads((HERE / "authors_baseline.json").read_text()) if (HERE / "authors_baseline.json").exists() else {}
    cores = os.cpu_count() if args.device == "cpu" else 1
    if args.device == "cuda":
        lengths = {"fnn": (200, 1000), "tfn": (20, 120)}
    else:
        lengths = {"fnn": (100, 300), "tfn": (5, 15)} if args.quick else {"fnn": (200, 1000), "tfn": (10, 40)}
    report = {"device": args.device, "cpu_count": os.cpu_count(), "families": {}}
    if args.device == "cuda":
        import torch

        report["device_name"] = torch.cuda.get_device_name(0)
    for family in ("fnn", "tfn"):
        short, long = lengths[family]
        cell = steady_state(family, short, long, args.device)
        rate = cell["configs"] / cell["per_step_s"]
        entry = {
            "cell_configs": cell["configs"],
            "cell_config_steps_per_s": rate,
            "cell_fixed_s": cell["fixed_s"],
            "cell_5000_step_wall_s": cell["fixed_s"] + PAPER_STEPS * cell["per_step_s"],
            "peak_rss_mb": cell["max_rss_mb"],
            "peak_gpu_mb": cell["peak_gpu_mb"],
            "achieved_gflops": rate * flops_per_config_step(family) / 1e9,
            "bmm_gflops_same_shapes": bmm_gflops(family, args.device),
        }
        if args.device == "cpu" and cores > 1:
            entry["cell_config_steps_per_s_all_cores"] = parallel_rate(family, long, args.device, cores)
        if not args.quick and args.device == "cpu":
            single = single_config_rate(family, *((20, 220) if family == "fnn" else (3, 13)), n_configs=3)
            entry["single_process_5000_step_wall_s"] = single["wall_5000_s"]
            entry["single_process_config_steps_per_s"] = PAPER_STEPS / single["wall_5000_s"]
        authors = baseline.get(family, {}).get("config_steps_per_s")
        if authors:
            entry["authors_config_steps_per_s"] = authors
            best = entry.get("cell_config_steps_per_s_all_cores", rate)
            entry["speedup_vs_authors"] = best / authors
        all_cores = entry.get("cell_config_steps_per_s_all_cores", rate)
        entry["projected_paper_grid_hours"] = GRID[family] * PAPER_STEPS / all_cores / 3600
        report["families"][family] = entry

    for family, e in report["families"].items():
        print(f"\n== {family.upper()} cell: {e['cell_configs']} configs on {args.device} ==")
        for key, value in e.items():
            print(f"  {key:40s} {value:,.2f}" if isinstance(value, float) else f"  {key:40s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
