"""Why the `generalization` experiment's LoRA runs stop fitting their training set.

The FNN applies a ReLU after its last layer too. In many frozen-model draws an output unit
is active on only a few of the 400 * Lbar training inputs at the start; within a few
hundred Adam steps it is inactive on all of them, its bias and its row of the last
layer's adapter get exactly zero gradient, and with weight decay 0 nothing moves them
again. The training MSE then stops at what the dead outputs contribute alone,
(1/D) sum over dead k of mean(y_k^2) on the training set. Weight decay (Adam's L2 term,
rescaled by Adam) pulls the dead unit's parameters towards zero until it revives.

Per protocol, target depth and seed, this trains LoRA at rank 16, weight decay 0 and the
paper's three learning rates (the package's own cell, loop and native step), and prints
the final training MSE, the output units dead on the whole training set, and the loss
those units account for. A run "ends on a dead-output plateau" when its training MSE is
within 5% of that loss.

    python benchmarks/generalization_dead_units.py                    # seeds 0-4, Lbar 1 and 2 (minutes)
    python benchmarks/generalization_dead_units.py --seeds 12 --steps 5000
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from lorabench.core.config import RunConfig
from lorabench.core.models import FNN, forward
from lorabench.methods import validated
from lorabench.runs.runner import ModelCache, train_gradient_cell

LEARNING_RATES = (1e-4, 1e-3, 1e-2)


def config(seed: int, target_depth: int, lr: float, protocol: str, steps: int) -> RunConfig:
    return validated(RunConfig(exp="fnn", width=16, target_depth=target_depth, frozen_depth=2 * target_depth,
                               rank=16, method="sgd", tune_bias=1, batch_size=256, n_epochs=steps, lr=lr,
                               weight_decay=0.0, n_train=400 * target_depth, n_test=1000, n_val=256, seed=seed,
                               protocol=protocol, curve_every=50))


def dead_outputs(model: FNN, x: torch.Tensor) -> list[int]:
    """Output units whose pre-activation is <= 0 on every input of ``x`` (one unstacked model)."""
    h = x
    for layer in range(model.depth):
        z = h @ model.weights[layer].T + model.biases[layer]
        h = torch.relu(z)
    return torch.nonzero((z <= 0).all(dim=0)).flatten().tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--target-depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20000, help="Adam steps (the experiment's 20,000)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    plateaus: dict[tuple[str, int], list[int]] = {}
    for protocol in ("paper", "reference"):
        for depth in args.target_depths:
            for seed in range(args.seeds):
                cell = [config(seed, depth, lr, protocol, args.steps) for lr in LEARNING_RATES]
                # the cell trained as the workflow trains it
                cell_run = train_gradient_cell(cell, ModelCache(), torch.device("cpu"))
                result, models = cell_run.result, cell_run.models[0]
                x = models.x_train
                y = forward(models.target, x)
                trained = cell_run.trainable.model(result.last)
                cells = []
                for c, lr in enumerate(LEARNING_RATES):
                    member = replace(trained, weights=trained.weights[c], biases=trained.biases[c])
                    dead = dead_outputs(member, x)
                    alone = float((y[:, dead] ** 2).mean(0).sum() / y.shape[1]) if dead else 0.0
                    train_mse = float(result.last_train[c])
                    on_plateau = bool(dead) and train_mse <= 1.05 * alone
                    plateaus.setdefault((protocol, depth), []).append(on_plateau)
                    cells.append(f"lr {lr:g}: train {train_mse:.2e}, dead outputs {dead or '-'} "
                                 f"(alone {alone:.2e}){' PLATEAU' if on_plateau else ''}")
                print(f"{protocol:<9} Lbar {depth} seed {seed}: " + "; ".join(cells), flush=True)
    print("\nruns ending on a dead-output plateau (rank 16, weight decay 0):")
    for (protocol, depth), runs in plateaus.items():
        print(f"  {protocol:<9} Lbar {depth}: {sum(runs)} of {len(runs)}")


if __name__ == "__main__":
    main()
