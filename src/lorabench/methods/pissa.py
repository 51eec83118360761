"""PiSSA, principal singular values and singular vectors adaptation (method ``pissa``).

Meng, Wang and Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models", NeurIPS 2024. LoRA's form ``W_res + A B^T`` with the factors
started from the frozen weight's R principal singular triplets, W = U S V^T:

    A = U_R S_R^(1/2),   B = V_R S_R^(1/2),   W_res = W - A B^T (frozen),

so training starts at the frozen model and moves its principal subspace first, where
LoRA (A = 0, B random) starts from a random one. Same parameter count as LoRA. The SVD
is computed in float64 and is deterministic: no random numbers.

Being LoRA on another frozen model from another start, it trains on LoRA's trainable
(hand-written gradients, and the native step where it applies) with W_res as the frozen
weights; ``adapt`` states the same model for the generic autograd path.
"""

from __future__ import annotations

import torch

from ..core.adapters import LoRA, lora_parameter_count
from ..core.config import RunConfig
from ..core.models import device_of
from .base import Method, Start, adapted_matrices, bias_parameter_count, rank_mask, tuned_biases, with_biases, \
    with_matrices


def principal_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B (..., D, D), their columns >= R zero, with A B^T the best rank-R
    approximation of ``weight`` (..., D, D)."""
    u, s, vh = torch.linalg.svd(weight.to(torch.float64))
    root = s.sqrt() * rank_mask(rank, weight.shape[-1]).to(torch.float64)
    a = u * root.unsqueeze(-2)
    b = vh.transpose(-1, -2) * root.unsqueeze(-2)
    return a.to(weight.dtype), b.to(weight.dtype)


class PiSSA(Method):
    name = "pissa"
    label = "PiSSA"
    fields = ("rank", "tune_bias")
    hand_written = True
    native = True

    def parameter_count(self, cfg: RunConfig) -> int:
        return lora_parameter_count(cfg) + bias_parameter_count(cfg)

    def start(self, cfg, models) -> Start:
        params, masks = tuned_biases(cfg, models.frozen)
        fixed = {}
        column = rank_mask(cfg.rank, cfg.width)
        for name, weight in adapted_matrices(models.frozen).items():
            a, b = principal_factors(weight, cfg.rank)
            params[f"a_{name}"], params[f"b_{name}"] = a, b
            masks[f"a_{name}"] = masks[f"b_{name}"] = column
            fixed[f"residual_{name}"] = weight - a @ b.transpose(-1, -2)
        return Start(params, masks, fixed)

    def trainable(self, cfgs, frozen, models):
        """LoRA's trainable on the residual frozen models (stacked like ``frozen``),
        started from the principal factors."""
        from ..training.trainables import fnn_lora_trainable, tfn_lora_trainable

        starts = [self.start(c, m) for c, m in zip(cfgs, models)]
        device = device_of(frozen)
        params = lambda key: torch.stack([s.params[key] for s in starts]).to(device)
        names = list(adapted_matrices(frozen))
        residual = with_matrices(frozen, {name: torch.stack([s.fixed[f"residual_{name}"] for s in starts]).to(device)
                                          for name in names})
        a, b = {name: params(f"a_{name}") for name in names}, {name: params(f"b_{name}") for name in names}
        columns = torch.stack([rank_mask(c.rank, c.width) for c in cfgs]).to(device)  # (C, D)
        masks = {name: columns.view(len(cfgs), *[1] * (a[name].dim() - 3), -1).expand(*a[name].shape[:-2], -1)
                 for name in names}
        make = fnn_lora_trainable if cfgs[0].exp == "fnn" else tfn_lora_trainable
        return make(cfgs, residual, LoRA(a, b, masks))

    def adapt(self, frozen, params, fixed):
        matrices = {name: fixed[f"residual_{name}"] + params[f"a_{name}"] @ params[f"b_{name}"].transpose(-1, -2)
                    for name in adapted_matrices(frozen)}
        return with_biases(with_matrices(frozen, matrices), params)
