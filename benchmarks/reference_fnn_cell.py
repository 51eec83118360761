"""One reference-protocol FNN cell on both engines, side by side.

Prints config-steps per second (steady state, from two run lengths, one thread) of a
reference FNN cell (D=16, Lbar=2, L=4, 16 ranks x 3 lr x 4 weight decays = 192 configs)
with the torch and the native engine, per task; and, for the native engine, the share of
a step spent in the torch forward pass that computes the validation predictions of the
accuracy-driven tasks (engines.NativeEngine.step with predictions=True).

    python benchmarks/reference_fnn_cell.py [--short 20 --long 120 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import torch

from lorabench.core.config import RunConfig
from lorabench.runs.runner import run_configs
from lorabench.training import engines, optimiser

CELL = dict(exp="fnn", width=16, target_depth=2, frozen_depth=4, batch_size=256, n_test=1000, method="sgd",
            protocol="reference", seed=0)
GRID = [(r, lr, wd) for r in range(1, 17) for lr in (1e-2, 1e-3, 1e-4) for wd in (0.0, 1e-4, 1e-3, 1e-2)]


class Timer:
    """Wall seconds spent inside a wrapped function."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


@contextmanager
def patched(obj, name, wrapper):
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


def run(task: str, engine: str, steps: int) -> dict:
    os.environ["LORABENCH_ENGINE"] = engine
    cfgs = [RunConfig(**CELL, task=task, n_epochs=steps, curve_every=steps, rank=r, lr=lr, weight_decay=wd)
            for r, lr, wd in GRID]
    forward, native_step = Timer(), Timer()
    with patched(engines, "forward", forward.wrap), patched(optimiser.BatchedAdam, "native_step", native_step.wrap):
        start = time.perf_counter()
        rows = list(run_configs(cfgs, device="cpu"))
        total = time.perf_counter() - start
    assert {r["engine"] for r in rows} == {engine}, (task, engine)
    return dict(total=total, forward=forward.seconds, native_step=native_step.seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, extra = len(GRID), args.long - args.short
    print(f"reference FNN cell, {n} configs, D=16, Lbar=2, L=4, one thread; best of {args.repeats}")
    for task in ("regression", "classification", "binary_classification"):
        best = {}
        for _ in range(args.repeats):  # alternate the engines: a loaded machine slows both alike
            for engine in ("torch", "native"):
                short, long = run(task, engine, args.short), run(task, engine, args.long)
                per_step = {k: (long[k] - short[k]) / extra for k in long}
                if engine not in best or per_step["total"] < best[engine]["total"]:
                    best[engine] = per_step
        rate = {e: n / best[e]["total"] for e in best}
        native = best["native"]
        print(f"{task:22s} torch {rate['torch']:9,.0f}  native {rate['native']:9,.0f} config-steps/s "
              f"({rate['native'] / rate['torch']:.1f}x); native step: C step {native['native_step'] * 1e3:.2f} ms, "
              f"prediction forward {native['forward'] * 1e3:.2f} ms "
              f"({native['forward'] / native['total']:.0%} of the step, "
              f"{native['forward'] / max(native['native_step'], 1e-12):.0%} of the C step)")


if __name__ == "__main__":
    main()
