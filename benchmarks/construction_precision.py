"""Where the FNN construction stops being exact in float64: the linear part or the biases.

The `threshold_law` claim fails for (Lbar, L) = (1, 4) at some widths: above the theorem's
threshold some ranks are far from exact. This separates the two parts of the
construction (core/construction.py) for one (D, Lbar, L), per seed and rank:

* the linear part: the relative Frobenius error of the adapted group product against the
  target weight, in float64, again after perturbing the frozen weights by 1e-13 (relative;
  a bug would show as an error that does not move with the perturbation's scale), and in
  float32;
* the whole ReLU network: the relative test MSE, the largest bias and the largest
  activation inside the group (the ReLU-activating biases are carried through adapted
  layers with condition numbers up to ~1e11), and the rounding estimate
  (eps64 x largest activation / output rms)^2 that a float64 cancellation of those
  activations down to the output would leave.

    python benchmarks/construction_precision.py                      # D = 32, (1, 4), seeds 0-2
    python benchmarks/construction_precision.py --width 16 --target-depth 2 --frozen-depth 4
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from lorabench.core.adapters import apply_lora
from lorabench.core.config import RunConfig
from lorabench.core.construction import fnn_construction, linear_construction
from lorabench.core.generation import group_product, partition
from lorabench.core.protocols import generate_models, protocol_of

EPS64 = torch.finfo(torch.float64).eps


def linear_error(target: torch.Tensor, frozen: torch.Tensor, rank: int) -> float:
    a, b = linear_construction(target, frozen, [rank] * len(frozen))
    adapted = (frozen + a @ b.mT).double()
    product = group_product(adapted, range(len(adapted)))
    return float(torch.linalg.norm(product - target.double()) / torch.linalg.norm(target.double()))


def measure(width: int, target_depth: int, frozen_depth: int, seed: int, rank: int, n_test: int) -> dict:
    cfg = RunConfig(exp="fnn", width=width, target_depth=target_depth, frozen_depth=frozen_depth, rank=rank,
                    method="ours", use_bias=1, seed=seed, n_test=n_test)
    protocol = protocol_of(cfg)
    models = generate_models(cfg)
    as64 = lambda m: replace(m, weights=m.weights.double(), biases=m.biases.double())
    frozen, target = as64(models.frozen), as64(models.target)
    first = partition(frozen_depth, target_depth)[0]
    group = frozen.weights[first.start:first.stop]
    perturb = torch.Generator().manual_seed(seed)
    nudged = group * (1 + 1e-13 * torch.randn(group.shape, generator=perturb, dtype=group.dtype))
    lora, biases = fnn_construction(frozen, target, rank, protocol.calibration_inputs(cfg).double())
    adapted = apply_lora(replace(frozen, biases=biases), lora)
    x = protocol.eval_sets(cfg).test.double()
    z, peak = x, 0.0
    for layer in range(frozen_depth):
        z = torch.relu(z @ adapted.weights[layer].mT + adapted.biases[layer])
        peak = max(peak, float(z.abs().max()))
    y = x
    for layer in range(target_depth):
        y = torch.relu(y @ target.weights[layer].mT + target.biases[layer])
    rms = float(y.pow(2).mean().sqrt())
    return {
        "linear64": linear_error(target.weights[0], group, rank),
        "linear64_nudged": linear_error(target.weights[0], nudged, rank),
        "linear32": linear_error(target.weights[0].float(), group.float(), rank),
        "relative_mse": float((z - y).pow(2).mean()) / rms**2,
        "largest_bias": float(biases.abs().max()),
        "largest_activation": peak,
        "rounding_estimate": (EPS64 * peak / rms) ** 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--target-depth", type=int, default=1)
    parser.add_argument("--frozen-depth", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-test", type=int, default=2000)
    args = parser.parse_args()
    groups = partition(args.frozen_depth, args.target_depth)
    threshold = -(-args.width // len(groups[0]))
    ranks = sorted({threshold, threshold + 1, threshold + 3, (threshold + args.width) // 2, args.width})
    print(f"D={args.width}, (Lbar, L)=({args.target_depth}, {args.frozen_depth}), theorem's threshold {threshold}")
    print("seed  R   linear f64  nudged 1e-13  linear f32  | relative MSE  largest bias  largest act.  rounding est.")
    for seed in range(args.seeds):
        for rank in ranks:
            m = measure(args.width, args.target_depth, args.frozen_depth, seed, rank, args.n_test)
            print(f"{seed:4d} {rank:3d}   {m['linear64']:.1e}     {m['linear64_nudged']:.1e}      {m['linear32']:.1e}"
                  f"    |   {m['relative_mse']:.1e}       {m['largest_bias']:.1e}       {m['largest_activation']:.1e}"
                  f"       {m['rounding_estimate']:.1e}")


if __name__ == "__main__":
    main()
