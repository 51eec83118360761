"""What the per-step validation costs: its share of a training step, per engine and protocol.

Every step, every configuration of a cell is evaluated on the fixed validation set
(n_val = 256 samples; the reference TFN: the authors' per-step batch). This times whole
cells' engine steps (16 ranks: a quick-sized cell) validating on all 256 samples and
on one, interleaved, the least of several blocks each: the difference is the
validation's share of a step. CPU time of one thread; printed side by side:

    python benchmarks/validation_cost.py                # ~5 minutes on one core
    python benchmarks/validation_cost.py --cases 0,3,4  # the native paper cells only
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lorabench.core.config import RunConfig
from lorabench.core.protocols import generate_models
from lorabench.runs.runner import model_key

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


def step_seconds(cfgs: list[RunConfig], val_samples: int, blocks: int, block: int) -> float:
    """CPU seconds of one engine step of the cell, validating on the first
    ``val_samples`` validation samples: the least over ``blocks`` blocks of ``block``
    steps (the cell's cost, not the machine's load)."""
    from lorabench.core.protocols import protocol_of
    from lorabench.runs.runner import ModelCache
    from lorabench.training.engines import engine_for
    from lorabench.training.optimiser import BatchedAdam
    from lorabench.methods import method_of
    from lorabench.training.trainables import stack_models

    cfg, cpu = cfgs[0], torch.device("cpu")
    cache = ModelCache({model_key(c): generate_models(model_key(c)) for c in cfgs})
    models = [cache.get(c) for c in cfgs]
    trainable = method_of(cfg).trainable(cfgs, stack_models([m.frozen for m in models]), models)
    protocol = protocol_of(cfg)
    sets = protocol.eval_sets(cfg)
    stream = protocol.stream(cfg, models[0].target, sets, protocol.training_set(models), len(cfgs), cpu)
    vx, vy = stream.val_batch()
    val = lambda: (vx[:val_samples], vy[:val_samples])  # noqa: E731
    optimiser = BatchedAdam([c.lr for c in cfgs], [c.weight_decay for c in cfgs], trainable.mask)
    engine = engine_for(trainable, optimiser, cfg.task, protocol.classification_loss)
    flat, active = trainable.init.clone(), torch.ones(len(cfgs), dtype=torch.bool)
    batch = stream.train_batch(1)  # one batch: the step's cost, not the stream's
    best = float("inf")
    with engine.running():
        for _ in range(blocks):
            start = time.process_time()
            for _ in range(block):
                flat = engine.step(flat, batch, None, val, active, predictions=False).param
            best = min(best, (time.process_time() - start) / block)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the least counts (default 3)")
    parser.add_argument("--cases", default="", help="comma-separated case numbers (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'case':<32} {'step, n_val=256':>16} {'step, n_val=1':>14} {'validation share':>17}")
    chosen = [int(i) for i in args.cases.split(",")] if args.cases else range(len(CASES))
    for label, family, depth, protocol, engine in (CASES[i] for i in chosen):
        os.environ["LORABENCH_ENGINE"] = engine
        cfgs = configs(family, depth, protocol, 1, 256)
        block = 20 if family == "fnn" else 4
        full = bare = float("inf")
        for _ in range(args.repeats):  # interleaved: both see the same load
            full = min(full, step_seconds(cfgs, 256, 5, block) / len(cfgs))
            bare = min(bare, step_seconds(cfgs, 1, 5, block) / len(cfgs))
        share = (full - bare) / full * 256 / 255 if full > 0 else float("nan")
        print(f"{label:<32} {full * 1e6:>13.1f} us {bare * 1e6:>11.1f} us {share:>16.0%}", flush=True)


if __name__ == "__main__":
    main()
