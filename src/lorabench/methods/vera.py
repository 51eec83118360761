"""VeRA, vector-based random matrix adaptation (method ``vera``).

Kopiczko, Blankevoort and Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR
2024. One pair of frozen random factors A (R, D) and B (D, R) is shared by every adapted
matrix; each matrix trains two scaling vectors, d (R,) and b (D,):

    W' = W + diag(b) B diag(d) A.

b starts at zero (training starts at the frozen model) and d at ``d_init`` (the paper's
0.1). A and B are Kaiming-uniform, drawn once per seed from the generator
``(seed, "vera")`` as D x D blocks of which the first R rows of A and columns of B are
kept, so a higher rank only adds directions. Parameters: R + D per adapted matrix (plus
the biases with ``tune_bias``): the count grows by one per matrix with the rank, where
LoRA's grows by 2 D, so VeRA is compared with LoRA at equal parameter counts.
"""

from __future__ import annotations

import math

import torch

from ..core import rng
from ..core.config import ConfigError, RunConfig
from .base import Method, Start, adapted_matrices, bias_parameter_count, matrix_count, rank_mask, tuned_biases, \
    with_biases, with_matrices


def shared_factors(seed: int, width: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (D, D) with rows >= R zero, B (D, D) with columns >= R zero."""
    gen = rng.generator(seed, "vera")
    bound = math.sqrt(6.0 / width)  # Kaiming uniform for a fan-in of D
    a = torch.empty(width, width).uniform_(-bound, bound, generator=gen)
    b = torch.empty(width, width).uniform_(-bound, bound, generator=gen)
    keep = rank_mask(rank, width)
    return a * keep.unsqueeze(-1), b * keep


def vera_weight(weight, a, b, scale_d, scale_b):
    """W + diag(scale_b) B diag(scale_d) A; scale_d, scale_b (..., D)."""
    return weight + scale_b.unsqueeze(-1) * ((b * scale_d.unsqueeze(-2)) @ a)


class VeRA(Method):
    name = "vera"
    label = "VeRA"
    fields = ("rank", "tune_bias")
    settings = {"d_init": 0.1}

    def check(self, cfg: RunConfig) -> None:
        d_init = self.settings_of(cfg)["d_init"]
        if not math.isfinite(d_init):
            raise ConfigError(f"method 'vera' setting 'd_init' must be finite, got {d_init}")

    def parameter_count(self, cfg: RunConfig) -> int:
        return matrix_count(cfg) * (cfg.rank + cfg.width) + bias_parameter_count(cfg)

    def start(self, cfg, models) -> Start:
        params, masks = tuned_biases(cfg, models.frozen)
        a, b = shared_factors(cfg.seed, cfg.width, cfg.rank)
        d_init = self.settings_of(cfg)["d_init"]
        keep = rank_mask(cfg.rank, cfg.width)
        for name, weight in adapted_matrices(models.frozen).items():
            lead = weight.shape[:-2]
            params[f"d_{name}"], masks[f"d_{name}"] = (d_init * keep).expand(*lead, -1).clone(), keep
            params[f"b_{name}"] = torch.zeros(*lead, cfg.width)
            masks[f"b_{name}"] = torch.ones(())
        return Start(params, masks, fixed={"a": a, "b": b})

    def adapt(self, frozen, params, fixed):
        a, b = fixed["a"], fixed["b"]
        matrices = {}
        for name, w in adapted_matrices(frozen).items():
            extra = w.dim() - a.dim()  # the shared factors broadcast over layers and heads
            shape = a.shape[:1] + (1,) * extra + a.shape[1:]
            matrices[name] = vera_weight(w, a.view(shape), b.view(shape), params[f"d_{name}"], params[f"b_{name}"])
        return with_biases(with_matrices(frozen, matrices), params)
