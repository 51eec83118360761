"""Theory values: thresholds of the paper's settings and closed forms against constructions."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lorabench.core.config import RunConfig
from lorabench.core.construction import fnn_construction
from lorabench.core.generation import group_product, uniform_singular_values
from lorabench.core.protocols import generate_models
from lorabench.core.theory import (
    discrepancy,
    fnn_group_singular_values,
    fnn_single_layer_mse_bound,
    fnn_threshold_rank,
    linear_optimal_mse,
    linear_optimal_spectral_error,
    linear_threshold_rank,
    tfn_threshold_rank,
    uniform_singular_value_mse,
)

F64 = torch.float64
D = 16


def fnn_models(target_depth, frozen_depth, seed, **settings):
    cfg = RunConfig(width=D, target_depth=target_depth, frozen_depth=frozen_depth, seed=seed, **settings).validated()
    models = generate_models(cfg)
    cast = lambda m: replace(m, weights=m.weights.to(F64), biases=None if m.biases is None else m.biases.to(F64))
    return cast(models.frozen), cast(models.target)


@pytest.mark.parametrize("target_depth,frozen_depth,expected", [(1, 2, 8), (2, 4, 8), (1, 8, 2)])
def test_fnn_thresholds_of_the_paper(target_depth, frozen_depth, expected):
    assert fnn_threshold_rank(D, frozen_depth, target_depth) == expected


def test_fnn_threshold_depth_sweep():
    assert [fnn_threshold_rank(D, L, 1) for L in range(2, 15, 2)] == [8, 4, 3, 2, 2, 2, 2]
    assert fnn_threshold_rank(D, 5, 2) == 8  # groups of 2 and 3 layers: the smaller decides
    assert fnn_threshold_rank(8, 2, 1) == 4


def test_tfn_threshold():
    assert tfn_threshold_rank(16) == 8
    assert tfn_threshold_rank(7) == 4


def test_linear_threshold_uses_rank_of_discrepancy():
    gen = torch.Generator().manual_seed(0)
    frozen = torch.randn(2, D, D, generator=gen, dtype=F64)
    low_rank = torch.randn(D, 4, generator=gen, dtype=F64) @ torch.randn(4, D, generator=gen, dtype=F64)
    target = group_product(frozen, range(2)) + low_rank
    assert linear_threshold_rank(discrepancy(frozen, target), 2) == 2
    assert linear_threshold_rank(torch.randn(D, D, generator=gen, dtype=F64), 2) == 8
    assert linear_optimal_mse(frozen, target, 2) == pytest.approx(0.0, abs=1e-20)
    assert linear_optimal_spectral_error(frozen, target, 1) > 0


def test_linear_optimal_values_from_singular_values():
    gen = torch.Generator().manual_seed(1)
    frozen = torch.randn(2, D, D, generator=gen, dtype=F64)
    target = torch.randn(D, D, generator=gen, dtype=F64)
    sigma = torch.linalg.svdvals(target - frozen[1] @ frozen[0])
    assert linear_optimal_mse(frozen, target, 3) == pytest.approx(float((sigma[6:] ** 2).sum() / D), rel=1e-12)
    assert linear_optimal_mse(frozen, target, [1, 5]) == pytest.approx(linear_optimal_mse(frozen, target, 3), rel=1e-12)
    assert linear_optimal_spectral_error(frozen, target, 3) == pytest.approx(float(sigma[6]), rel=1e-12)
    assert linear_optimal_spectral_error(frozen, target, 8) == 0.0
    assert linear_optimal_mse(frozen, target, 9) == 0.0


def test_uniform_singular_values_formula_against_construction():
    frozen, target = fnn_models(1, 2, seed=0, activation="linear", use_bias=0)
    target = uniform_singular_values(frozen, target)
    sigma = fnn_group_singular_values(frozen, target)
    assert sigma.shape == (1, D)
    s = float(sigma.mean())
    assert torch.allclose(sigma, torch.full_like(sigma, s), rtol=1e-12)
    for rank in range(0, D + 1):
        lora, _ = fnn_construction(frozen, target, rank, None)
        product = group_product(frozen.weights + lora.delta("weights"), range(2))
        mse = float(((product - target.weights[0]) ** 2).sum() / D)  # N(0, I) inputs
        assert mse == pytest.approx(uniform_singular_value_mse(s, D, 2, rank), rel=1e-9, abs=1e-20)
        assert uniform_singular_value_mse(s, D, 2, rank) == pytest.approx(linear_optimal_mse(frozen.weights, target.weights[0], rank), rel=1e-9, abs=1e-20)


def test_fnn_group_singular_values_per_group():
    frozen, target = fnn_models(2, 5, seed=1)
    sigma = fnn_group_singular_values(frozen, target)
    assert sigma.shape == (2, D)
    w = frozen.weights
    assert torch.allclose(sigma[1], torch.linalg.svdvals(target.weights[1] - w[4] @ w[3] @ w[2]))
    assert torch.all(sigma[:, :-1] >= sigma[:, 1:])


def test_single_layer_bound():
    frozen, target = fnn_models(1, 2, seed=2)
    assert fnn_single_layer_mse_bound(frozen, target, 3) == linear_optimal_mse(frozen.weights, target.weights[0], 3)
    assert fnn_single_layer_mse_bound(frozen, target, 8) == 0.0
    deeper_target = fnn_models(2, 4, seed=2)
    with pytest.raises(ValueError):
        fnn_single_layer_mse_bound(*deeper_target, 3)


def test_per_row_theory_values():
    """What the runner stores per row: the single-layer optimum (None for a deeper or TFN
    target, NaN for non-finite weights) and the mean squared target output in float64."""
    from math import isnan

    from lorabench.core import theory
    from lorabench.core.models import fnn_forward

    cfg = RunConfig(width=8, seed=3, n_test=50)
    models = generate_models(cfg)
    expected = theory.linear_optimal_mse(models.frozen.weights.double(), models.target.weights[0].double(), 2)
    assert theory.single_layer_optimum(models.frozen, models.target, 2) == pytest.approx(expected, rel=1e-12)
    deep = generate_models(cfg.replace(target_depth=2, frozen_depth=4))
    assert theory.single_layer_optimum(deep.frozen, deep.target, 2) is None
    tfn = generate_models(cfg.replace(exp="tfn", seq_length=3))
    assert theory.single_layer_optimum(tfn.frozen, tfn.target, 2) is None
    broken = replace(models.frozen, weights=models.frozen.weights.clone().fill_(float("nan")))
    assert isnan(theory.single_layer_optimum(broken, models.target, 2))
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    y = fnn_forward(replace(models.target, weights=models.target.weights.double(), biases=models.target.biases.double()), x.double())
    assert theory.mean_squared_output(models.target, x) == pytest.approx(float((y**2).mean()), rel=1e-12)
    assert theory.mean_squared_output(tfn.target, torch.randn(4, 8, 3, generator=torch.Generator().manual_seed(1))) > 0


def test_the_attention_product_tail_is_the_svd_tail_of_each_product():
    """(1/D) sum over the products the TFN construction matches of sum_{i>2R} sigma_i(E)^2,
    by hand for one block; zero from R = D/2 on; None for FNNs and residual blocks."""
    from lorabench.core.models import map_tensors
    from lorabench.core.theory import tfn_product_tail

    cfg = RunConfig(exp="tfn", width=8, n_head=2, seq_length=4, target_depth=1, frozen_depth=1, batch_size=8,
                    method="sgd", seed=2)
    m = generate_models(cfg)
    f, t = (map_tensors(x, lambda w: w.double()) for x in (m.frozen, m.target))
    pairs = [(t.wk[0, h].T @ t.wq[0, h], f.wk[0, h].T @ f.wq[0, h]) for h in range(2)]
    pairs += [(t.wo[0, h] @ t.wv[0, h], f.wo[0, h] @ f.wv[0, h]) for h in range(2)]
    pairs += [(t.w_out @ t.w2[-1], f.w_out @ f.w2[-1])]
    for rank in (1, 2, 3):
        by_hand = sum(float((torch.linalg.svdvals(a - b)[2 * rank:] ** 2).sum()) for a, b in pairs) / 8
        assert tfn_product_tail(m.frozen, m.target, rank) == pytest.approx(by_hand, rel=1e-9)
    assert tfn_product_tail(m.frozen, m.target, 4) == 0.0
    assert tfn_product_tail(generate_models(RunConfig(method="sgd")).frozen, t, 1) is None
