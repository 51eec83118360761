"""LoRA adapters: ``W + A B^T`` with A, B of shape (D, R), one pair per adapted matrix.

Every factor is stored padded to D columns with a 0/1 column mask. The padding is exact
(padded columns are zero and stay zero: their gradients vanish and the trainer masks
their updates), and it makes every configuration compute with the same shapes whatever
its rank, so a configuration gives the same numbers alone or stacked with others.

Adapted matrices:

* FNN: ``weights`` (L, D, D), every layer.
* TFN: ``wq``, ``wk``, ``wv``, ``wo`` (L, H, D, D), every head of every block; ``w2``
  (D, D), the last block's second feed-forward layer; ``w_out`` (D, D), the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import Tensor

from .config import ConfigError, RunConfig
from .models import FNN, TFN

TFN_ADAPTED = ("wq", "wk", "wv", "wo", "w2", "w_out")  # also the native TFN step's order


def layer_ranks(cfg: RunConfig) -> Optional[list[int]]:
    """Per-layer FNN ranks R + step*l (l = 0..L-1), clipped to [0, D]; None for TFN."""
    if cfg.exp != "fnn":
        return None
    return [min(max(cfg.rank + cfg.rank_step * layer, 0), cfg.width) for layer in range(cfg.frozen_depth)]


def reference_layer_ranks(cfg: RunConfig) -> list[int]:
    """The authors' per-layer ranks, sign bug included: a negative step *increases* the
    rank (R - step*l) and is not capped at D."""
    step, rank, width = cfg.rank_step, cfg.rank, cfg.width
    if step >= 0:
        ranks = [min(rank + step * layer, width) for layer in range(cfg.frozen_depth)]
    else:
        ranks = [max(rank - step * layer, 0) for layer in range(cfg.frozen_depth)]
    if max(ranks) > width:
        raise ConfigError(
            f"the authors' rank_step {step} gives layer ranks {ranks}, above width {width} (their code would crash)"
        )
    return ranks


def adapted_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every adapted matrix stack, without the trailing (D, D)."""
    if cfg.exp == "fnn":
        return {"weights": (cfg.frozen_depth,)}
    per_head = (cfg.target_depth, cfg.n_head)
    return {name: per_head if name in ("wq", "wk", "wv", "wo") else () for name in TFN_ADAPTED}


def column_mask(ranks: Union[int, list[int]], lead: tuple[int, ...], width: int) -> Tensor:
    """1.0 for the first R columns of each factor, 0.0 for the padding; shape (*lead, D)."""
    columns = torch.arange(width)
    if isinstance(ranks, int):
        return (columns < ranks).to(torch.float32).expand(*lead, width).clone()
    per_layer = torch.tensor(ranks).unsqueeze(-1)
    return (columns < per_layer).to(torch.float32)


@dataclass(frozen=True)
class LoRA:
    """Adapters of one configuration (or of C stacked ones, with a leading C dimension)."""

    a: dict[str, Tensor]
    b: dict[str, Tensor]
    mask: dict[str, Tensor]

    def delta(self, name: str) -> Tensor:
        return self.a[name] @ self.b[name].transpose(-1, -2)

    def to(self, device) -> "LoRA":
        move = lambda d: {k: v.to(device) for k, v in d.items()}
        return LoRA(move(self.a), move(self.b), move(self.mask))

    # --------------------------------------------------------------- builders
    @staticmethod
    def _masks(cfg: RunConfig, ranks: Optional[list[int]]) -> dict[str, Tensor]:
        masks = {}
        for name, lead in adapted_shapes(cfg).items():
            masks[name] = column_mask(ranks if (ranks is not None and cfg.exp == "fnn") else cfg.rank, lead, cfg.width)
        return masks

    @classmethod
    def gaussian_init(cls, cfg: RunConfig, gen: torch.Generator, ranks: Optional[list[int]]) -> "LoRA":
        """A = 0, B ~ N(0, std^2) on the first R columns (paper protocol).

        Each matrix draws a full D x D block and keeps R columns, so a higher rank only
        adds columns to a lower rank's initialisation.
        """
        masks = cls._masks(cfg, ranks)
        b = {}
        for name, lead in adapted_shapes(cfg).items():
            full = torch.empty(*lead, cfg.width, cfg.width).normal_(0.0, cfg.std, generator=gen)
            b[name] = full * masks[name].unsqueeze(-2)
        a = {k: torch.zeros_like(v) for k, v in b.items()}
        return cls(a, b, masks)

    @classmethod
    def from_factors(cls, cfg: RunConfig, b: dict[str, Tensor], ranks: Optional[dict[str, list[int]]]) -> "LoRA":
        """A = 0 and given (padded) B factors, e.g. drawn in the authors' order."""
        masks = cls._masks(cfg, ranks["weights"] if ranks else None)
        a = {k: torch.zeros_like(v) for k, v in b.items()}
        return cls(a, dict(b), masks)


def apply_lora(model: Union[FNN, TFN], lora: LoRA) -> Union[FNN, TFN]:
    """The adapted model: every adapted matrix W replaced by W + A B^T."""
    if isinstance(model, FNN):
        return replace(model, weights=model.weights + lora.delta("weights"))
    changes = {name: getattr(model, name) + lora.delta(name) for name in ("wq", "wk", "wv", "wo")}
    w2_delta = lora.delta("w2")
    depth = model.depth
    # Only the last block's W_2 is adapted: add the delta to that slice.
    last_only = torch.zeros(depth, 1, 1, dtype=w2_delta.dtype, device=w2_delta.device)
    last_only[-1] = 1.0
    changes["w2"] = model.w2 + last_only * w2_delta.unsqueeze(-3)
    changes["w_out"] = model.w_out + lora.delta("w_out")
    return replace(model, **changes)


def lora_parameter_count(cfg: RunConfig) -> int:
    """Trainable LoRA weights: 2 R D per adapted matrix (the paper's x-axis)."""
    ranks = layer_ranks(cfg)
    if cfg.exp == "fnn":
        return sum(2 * r * cfg.width for r in ranks)
    matrices = 4 * cfg.n_head * cfg.target_depth + 2
    return 2 * cfg.rank * cfg.width * matrices
