"""Batched Adam on flat parameters: a learning rate and a weight decay per configuration.

A cell's trainable tensors (C, ...) lie side by side in one (C, P) tensor (``Layout``),
so the optimiser touches every trainable number of a cell in a handful of operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..core import streams
from . import native

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, used by the authors


class Layout:
    """Named tensors of shape (C, ...) stored side by side in one (C, P) tensor, so the
    optimiser touches every trainable number of a cell in a handful of operations."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = dict(shapes)
        self.offsets, offset = {}, 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            self.offsets[name] = (offset, offset + size)
            offset += size
        self.size = offset

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        C = flat.shape[0]
        return {name: flat[:, a:b].view(C, *self.shapes[name]) for name, (a, b) in self.offsets.items()}

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        return torch.cat([tensors[name].reshape(tensors[name].shape[0], -1) for name in self.shapes], dim=1)


@dataclass
class BatchedAdam:
    """torch.optim.Adam (L2 weight decay added to the gradient, bias correction, eps)
    with a learning rate and a weight decay per configuration, on (C, P) parameters.

    ``mask`` (broadcastable to (C, P)) marks the trainable entries; the others keep
    their value (their moments stay zero, so the Adam update is exactly zero).
    ``active`` (C,) freezes whole configurations (the diverged ones).
    """

    lr: list[float]
    weight_decay: list[float]
    mask: Tensor
    step_count: int = 0

    def __post_init__(self):
        self.exp_avg: Optional[Tensor] = None
        self.exp_avg_sq: Optional[Tensor] = None

    def _prepare(self, param: Tensor) -> tuple[Tensor, float]:
        """Creates the moments on first use; advances the step count; returns the
        per-config step size lr / (1 - beta1^t) (as torch computes it, in float64 then
        cast) and sqrt(1 - beta2^t)."""
        if self.exp_avg is None:
            self.exp_avg, self.exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
            self._lr = torch.tensor(self.lr, dtype=torch.float64).view(-1, 1)
            self._wd = torch.tensor(self.weight_decay, dtype=param.dtype, device=param.device).view(-1, 1)
            self._mask = self.mask.to(param.dtype).to(param.device).expand_as(param).contiguous()
        self.step_count += 1
        t = self.step_count
        step_size = (self._lr / (1 - BETA1**t)).to(param.dtype).to(param.device)
        return step_size, math.sqrt(1 - BETA2**t)

    def step(self, param: Tensor, grad: Tensor, active: Tensor) -> Tensor:
        step_size, bias_correction2_sqrt = self._prepare(param)
        # The same operations, in the same order, as torch.optim.Adam's single-tensor path.
        grad = (grad + self._wd * param) * self._mask
        self.exp_avg.lerp_(grad, 1 - BETA1)
        self.exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(EPS)
        new = param - step_size * self.exp_avg / denom
        return torch.where(active.view(-1, 1), new, param)

    def native_step(self, kernel: native.NativeStep, param: Tensor, batch: streams.Batch,
                    val_batch: streams.Batch, active: Tensor, threads: int) -> tuple[Tensor, Tensor]:
        """Loss, gradient, this Adam update (in place on ``param``) and validation loss in
        one native call; returns (training loss before, validation loss after), (C,)."""
        step_size, bias_correction2_sqrt = self._prepare(param)
        (x, y, x_row), (vx, vy, v_row) = (
            (b.x, b.y, b.row) if isinstance(b, streams.SharedRows) else (*b, None) for b in (batch, val_batch))
        return kernel(param, self.exp_avg, self.exp_avg_sq, self._mask, step_size.flatten().contiguous(),
                      self._wd.flatten().contiguous(), (BETA1, BETA2), EPS, bias_correction2_sqrt,
                      x, y, vx, vy, active, threads, x_row=x_row, v_row=v_row)
