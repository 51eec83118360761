"""What the per-step validation costs: its share of a training step, per engine and protocol.

Every step, every configuration of a cell is evaluated on the fixed validation set
(n_val = 256 samples; the reference TFN: the authors' per-step batch). This times whole
cells (16 ranks, a quick-sized cell) at two run lengths with ``n_val`` = 256 and
``n_val`` = 1: the difference of the per-config-step costs is the validation's share of
a step. CPU time of one thread; printed side by side:

    python benchmarks/validation_cost.py            # ~2 minutes on one core
    python benchmarks/validation_cost.py --steps 20,80
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lorabench.core.config import RunConfig
from lorabench.core.protocols import generate_models
from lorabench.runs.runner import model_key, run_configs

CASES = (  # (label, family, depth, protocol, engine)
    ("FNN (1, 4), paper", "fnn", 4, "paper", "auto"),
    ("FNN (1, 4), reference, native", "fnn", 4, "reference", "native"),
    ("FNN (1, 4), reference, torch", "fnn", 4, "reference", "torch"),
    ("TFN depth 1, paper", "tfn", 1, "paper", "auto"),
    ("TFN depth 2, paper", "tfn", 2, "paper", "auto"),
    ("TFN depth 2, reference, torch", "tfn", 2, "reference", "torch"),
)


def configs(family: str, depth: int, protocol: str, steps: int, n_val: int) -> list[RunConfig]:
    base = dict(exp=family, width=16, target_depth=1 if family == "fnn" else depth, frozen_depth=depth,
                batch_size=256, n_test=200, n_val=n_val, seed=0, protocol=protocol, method="sgd",
                n_epochs=steps, lr=1e-3, n_head=2, seq_length=10)
    return [RunConfig(**base, rank=r).validated() for r in range(1, 17)]


def cpu_seconds(cfgs: list[RunConfig]) -> float:
    models = {model_key(c): generate_models(model_key(c)) for c in cfgs}
    list(run_configs(cfgs[:1], models=models))  # warm-up: library load, allocator
    start = time.process_time()
    list(run_configs(cfgs, models=models))
    return time.process_time() - start


def per_config_step(family, depth, protocol, steps, n_val) -> float:
    s0, s1 = steps
    t0 = cpu_seconds(configs(family, depth, protocol, s0, n_val))
    t1 = cpu_seconds(configs(family, depth, protocol, s1, n_val))
    return max(t1 - t0, 0.0) / (16 * (s1 - s0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="", help="two run lengths, e.g. 20,80 (default: FNN 50,250; TFN 10,40)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'case':<32} {'step, n_val=256':>16} {'step, n_val=1':>14} {'validation share':>17}")
    for label, family, depth, protocol, engine in CASES:
        steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else ((50, 250) if family == "fnn" else (10, 40))
        os.environ["LORABENCH_ENGINE"] = engine
        full = per_config_step(family, depth, protocol, steps, 256)
        bare = per_config_step(family, depth, protocol, steps, 1)
        share = (full - bare) / full * 256 / 255 if full > 0 else float("nan")
        print(f"{label:<32} {full * 1e6:>13.1f} us {bare * 1e6:>11.1f} us {share:>16.0%}", flush=True)


if __name__ == "__main__":
    main()
