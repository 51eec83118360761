"""The paper's theory as numbers a program can evaluate.

Symbols: D width, L frozen depth, Lbar target depth, R rank per layer (R_l per-layer
ranks), E = W̄ - W_L ... W_1 the discrepancy, sigma_i its singular values in decreasing
order (sigma_i = 0 for i > D). MSEs are torch's mean over the batch and the D output
coordinates, in expectation over x ~ N(0, I_D).

Not here: the paper's FNN approximation bound below the threshold (expected Euclidean
error of Sec. 4, with norm-dependent constants: not an MSE), so only the Lbar = 1 MSE
bound, which follows from Lemma 1, is provided.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .generation import Model, group_product, partition
from .models import FNN, TFN, fnn_forward, map_tensors, tfn_forward

Ranks = Union[int, list[int]]


# ------------------------------------------------------------------ thresholds
def fnn_threshold_rank(width: int, frozen_depth: int, target_depth: int) -> int:
    """Smallest R exact for a generic FNN pair: ceil(D / floor(L / Lbar))."""
    return math.ceil(width / (frozen_depth // target_depth))


def tfn_threshold_rank(width: int) -> int:
    """Smallest R exact for a generic TFN pair: ceil(D / 2)."""
    return math.ceil(width / 2)


def linear_threshold_rank(discrepancy: Tensor, frozen_depth: int) -> int:
    """Smallest R exact for the linear model: ceil(rank(E) / L); discrepancy E: (D, D).
    The rank is numerical (torch.linalg.matrix_rank's default tolerance)."""
    return math.ceil(int(torch.linalg.matrix_rank(discrepancy)) / frozen_depth)


# ---------------------------------------------------------------- linear model
def discrepancy(frozen_weights: Tensor, target_weight: Tensor) -> Tensor:
    """E = W̄ - W_L ... W_1; frozen_weights: (L, D, D) (index 0 applied first),
    target_weight: (D, D) -> (D, D)."""
    return target_weight - group_product(frozen_weights, range(frozen_weights.shape[0]))


def _total_rank(rank: Ranks, depth: int) -> int:
    return rank * depth if isinstance(rank, int) else sum(rank)


def linear_optimal_mse(frozen_weights: Tensor, target_weight: Tensor, rank: Ranks) -> float:
    """(1/D) sum_{i > r} sigma_i(E)^2, r = R L (or sum_l R_l): the expected MSE on N(0, I)
    inputs of the best rank-r correction, which the construction attains (Lemma 1).
    frozen_weights: (L, D, D); target_weight: (D, D)."""
    depth, width = frozen_weights.shape[0], frozen_weights.shape[-1]
    sigma = torch.linalg.svdvals(discrepancy(frozen_weights, target_weight))
    return float((sigma[_total_rank(rank, depth):] ** 2).sum() / width)


def linear_optimal_spectral_error(frozen_weights: Tensor, target_weight: Tensor, rank: Ranks) -> float:
    """sigma_{r+1}(E), r = R L (or sum_l R_l), 0 when r >= D: Lemma 1's minimal spectral
    error. frozen_weights: (L, D, D); target_weight: (D, D)."""
    depth, width = frozen_weights.shape[0], frozen_weights.shape[-1]
    total = _total_rank(rank, depth)
    if total >= width:
        return 0.0
    return float(torch.linalg.svdvals(discrepancy(frozen_weights, target_weight))[total])


def uniform_singular_value_mse(s: float, width: int, frozen_depth: int, rank: int) -> float:
    """s^2 (D - R L)_+ / D: the linear optimum when every sigma_i(E) equals s (the
    'uniform_singular_values' init), linear in R."""
    return s**2 * max(width - rank * frozen_depth, 0) / width


# ------------------------------------------------------------------------- FNN
def fnn_group_singular_values(frozen: FNN, target: FNN) -> Tensor:
    """sigma(W̄_i - prod_{l in P_i} W_l) for each group P_i of the uniform partition:
    (Lbar, D). The construction's error below the threshold grows with their tails."""
    groups = partition(frozen.depth, target.depth)
    return torch.stack(
        [torch.linalg.svdvals(target.weights[i] - group_product(frozen.weights, g)) for i, g in enumerate(groups)]
    )


def fnn_single_layer_mse_bound(frozen: FNN, target: FNN, rank: Ranks) -> float:
    """(1/D) sum_{i > R L} sigma_i(E)^2 for a one-layer target (Lbar = 1).

    Bounds the construction's expected MSE on N(0, I) inputs whenever the frozen model's
    inner ReLUs stay active: the adapted model is then ReLU((W̄ - E_tail) x + b̄), and the
    ReLU is 1-Lipschitz per coordinate, so the error is at most that of the linear part.
    """
    if target.depth != 1:
        raise ValueError(f"the bound is for a one-layer target, got target depth {target.depth}")
    return linear_optimal_mse(frozen.weights, target.weights[0], rank)


# ------------------------------------------------------------- per result row
def single_layer_optimum(frozen: Model, target: Model, rank: int) -> Optional[float]:
    """(1/D) sum_{i > R L} sigma_i(E)^2 in float64 when the target is a one-layer FNN, else
    None: the linear model's optimum (Lemma 1) and the Lbar = 1 ReLU FNN's bound
    (``fnn_single_layer_mse_bound``) at per-layer rank R. NaN for non-finite weights, whose
    singular values do not exist (such a run is recorded as diverged)."""
    if not isinstance(target, FNN) or not isinstance(frozen, FNN) or target.depth != 1:
        return None
    if not (torch.isfinite(frozen.weights).all() and torch.isfinite(target.weights).all()):
        return math.nan
    return linear_optimal_mse(frozen.weights.double(), target.weights[0].double(), rank)


def tfn_product_tail(frozen: TFN, target: TFN, rank: int) -> Optional[float]:
    """The FNN bound's form (1/D) sum_{i > R L} sigma_i(E)^2, with L = 2 factors, summed
    over the two-matrix products the TFN construction matches: per block and head
    E = W̄_K^T W̄_Q - W_K^T W_Q and W̄_O W̄_V - W_O W_V, and for the last block
    W̄_o W̄_2 - W_o W_2. Each product's two factors carry rank R each, so its best change
    has rank 2R (Lemma 1). The deeper blocks' products are compared untransformed (the
    construction matches them after the previous blocks' changes of basis), so this is a
    shape to set beside the construction's error below R* = D/2, not a bound on it. Float64;
    None for a plain-TFN pair that is not, NaN for non-finite weights."""
    if not isinstance(frozen, TFN) or not isinstance(target, TFN) or frozen.prenorm or frozen.residual:
        return None
    f, t = (map_tensors(m, lambda w: w.double()) for m in (frozen, target))
    if not all(torch.isfinite(w).all() for m in (f, t) for w in m.tensors().values()):
        return math.nan
    products = [t.wk.transpose(-1, -2) @ t.wq - f.wk.transpose(-1, -2) @ f.wq,  # (L, H, D, D)
                t.wo @ t.wv - f.wo @ f.wv,
                (t.w_out @ t.w2[-1] - f.w_out @ f.w2[-1]).unsqueeze(0)]
    tail = sum(float((torch.linalg.svdvals(e)[..., 2 * rank:] ** 2).sum()) for e in products)
    return tail / frozen.width


def mean_squared_output(model: Model, x: Tensor) -> float:
    """Mean squared output of ``model`` on inputs ``x``, in float64: the scale against
    which an MSE counts as exact (an MSE of 1e-12 is exact only relative to it)."""
    double = map_tensors(model, lambda t: t.double())
    forward = fnn_forward if isinstance(model, FNN) else tfn_forward
    with torch.no_grad():
        return float((forward(double, x.double()) ** 2).mean())
