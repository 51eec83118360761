"""The paper's constructed adapters (method ``ours``), computed in closed form.

FNN: the construction of the FNN theorem (Section 3; core/construction.py's
``fnn_construction``); TFN: that of the TFN theorem (Section 4; ``tfn_construction``), for
the plain transformer with equal frozen and target depth. Rank 0 is allowed: the frozen
model with the construction's biases.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..core.adapters import LoRA, apply_lora, lora_parameter_count
from ..core.config import ConfigError, RunConfig
from ..core.construction import fnn_adapted, fnn_construction, tfn_construction
from ..core.models import FNN, map_tensors
from .base import Method, bias_parameter_count


class Construction(Method):
    name = "ours"
    label = "construction"
    closed_form = True
    fields = ("rank", "rank_step")
    min_rank = 0

    def check(self, cfg: RunConfig) -> None:
        if cfg.rank_step != 0:
            raise ConfigError("rank_step != 0 is not supported by method 'ours' (the construction uses one rank)")
        if cfg.exp != "tfn":
            return
        if cfg.target_depth != cfg.frozen_depth:
            raise ConfigError(
                f"TFN construction needs target_depth == frozen_depth, got {cfg.target_depth} and {cfg.frozen_depth}")

    def not_applicable(self, cfg: RunConfig) -> Optional[str]:
        return residual_blocks(cfg) or super().not_applicable(cfg)

    def parameter_count(self, cfg: RunConfig) -> int:
        return lora_parameter_count(cfg) + bias_parameter_count(cfg)

    def construct(self, cfg, models, dtype, calibration, authors_bias_propagation):
        frozen, target = (map_tensors(m, lambda t: t.to(dtype)) for m in (models.frozen, models.target))
        if isinstance(frozen, FNN):
            # Groups of many frozen layers come back with double-word weights (fnn_adapted).
            return fnn_adapted(frozen, target, cfg.rank, _calibration(frozen, calibration, dtype),
                               authors_bias_propagation=authors_bias_propagation)
        lora, biases = constructed_adapters(cfg, models, dtype, calibration, authors_bias_propagation)
        return apply_lora(replace(frozen, **biases), lora)


def residual_blocks(cfg: RunConfig) -> Optional[str]:
    """Why the paper's construction does not cover ``cfg``'s transformer (None: it does)."""
    if cfg.exp == "tfn" and (cfg.better_optim or cfg.prenorm):
        return ("the TFN construction is defined for the plain TFN, without residual connections or LayerNorm: "
                "it needs better_optim 0 and prenorm 0")
    return None


def constructed_adapters(cfg: RunConfig, models, dtype: torch.dtype, calibration: Optional[torch.Tensor],
                         authors_bias_propagation: bool) -> tuple[LoRA, dict[str, torch.Tensor]]:
    """The construction's adapters and the biases it sets on the frozen model ({"biases"}
    for the FNN, {"b1", "b2"} for the TFN), computed in ``dtype``."""
    frozen, target = (map_tensors(m, lambda t: t.to(dtype)) for m in (models.frozen, models.target))
    if isinstance(frozen, FNN):
        lora, biases = fnn_construction(frozen, target, cfg.rank, _calibration(frozen, calibration, dtype),
                                        authors_bias_propagation=authors_bias_propagation)
        return lora, ({} if biases is None else {"biases": biases})
    lora, b1, b2 = tfn_construction(frozen, target, cfg.rank)
    return lora, {"b1": b1, "b2": b2}


def _calibration(frozen: FNN, calibration: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The calibration inputs the FNN construction needs: only for a model with biases."""
    return calibration.to(dtype) if frozen.biases is not None else None
