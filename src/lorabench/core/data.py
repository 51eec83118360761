"""Tasks (losses, accuracies), Gaussian inputs and the fixed evaluation sets' container.

Which inputs each protocol draws lives in protocols.py and streams.py.

Every loss is reduced per configuration: predictions carry a leading configuration
dimension C and a loss comes back with shape (C,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import RunConfig

SHIFT_SCALE = 5.0  # the distribution-shift test: inputs scaled by 5 (std 5)


# ----------------------------------------------------------------------- tasks
def binary_readout(width: int, dtype=torch.float32, device=None) -> Tensor:
    """(D, 2): sums of the first D//2 and of the remaining output coordinates."""
    readout = torch.zeros(width, 2, dtype=dtype, device=device)
    readout[: width // 2, 0] = 1.0
    readout[width // 2 :, 1] = 1.0
    return readout


def _logits(y: Tensor, task: str) -> Tensor:
    if task == "binary_classification":
        return y @ binary_readout(y.shape[-1], y.dtype, y.device)
    return y


# The classification losses: cross entropy against the target's argmax class (the
# paper protocol), or against the target's outputs used as soft, unnormalised class
# weights (the authors' code; unbounded below wherever a target output is negative).
CLASSIFICATION_LOSSES = ("labels", "soft_outputs")


def task_loss(pred: Tensor, target: Tensor, task: str, classification_loss: str) -> Tensor:
    """Per-configuration loss; pred (C, B, ...), target broadcastable -> (C,).

    Regression: MSE averaged over samples and coordinates (torch's MSELoss).
    Classification: cross entropy of the outputs, against the target's argmax class
    ("labels") or against the target's outputs as class weights ("soft_outputs"); the
    binary task first sums the outputs over the two halves of the coordinates (for
    both the model and the target, as ``accuracy`` does).
    """
    if task == "regression":
        residual = pred - target
        return (residual * residual).flatten(1).mean(dim=1)
    log_probs = torch.log_softmax(_logits(pred, task), dim=-1)
    if classification_loss == "labels":
        labels = _logits(target, task).argmax(dim=-1, keepdim=True)
        labels = labels.expand(*log_probs.shape[:-1], 1)
        return -log_probs.gather(-1, labels).squeeze(-1).mean(dim=-1)
    if classification_loss == "soft_outputs":
        return -(_logits(target, task) * log_probs).sum(dim=-1).mean(dim=-1)
    raise ValueError(f"classification_loss must be one of {CLASSIFICATION_LOSSES}, got {classification_loss!r}")


def accuracy(pred: Tensor, target: Tensor, task: str) -> Tensor:
    """Fraction of samples whose predicted class (argmax) is the target's; (C,)."""
    agree = _logits(pred, task).argmax(dim=-1) == _logits(target, task).argmax(dim=-1)
    return agree.to(torch.float64).mean(dim=-1)


# --------------------------------------------------------------------- inputs
def input_shape(cfg: RunConfig) -> tuple[int, ...]:
    return (cfg.width,) if cfg.exp == "fnn" else (cfg.width, cfg.seq_length)


def draw(cfg: RunConfig, n: int, gen: torch.Generator) -> Tensor:
    return torch.randn(n, *input_shape(cfg), generator=gen)


@dataclass(frozen=True)
class EvalSets:
    """Fixed inputs of one seed: validation, test and shifted test (CPU tensors)."""

    val: Tensor
    test: Tensor
    test_shift: Tensor
