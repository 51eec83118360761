"""The training loop of a cell, and the evaluation of its trained models.

The loop, in one place: draw the step's batch -> one engine step (loss per config, Adam
step, loss on the validation set) -> keep the best-validation state -> record the curves.
With ``val_every`` k > 1 (paper protocol only) the validation runs every k-th step and at
the last: the parameters are those of k = 1, and the best state is the best of the
validated steps.
A configuration whose training loss becomes non-finite stops updating and is reported as
diverged; the others go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..core import data
from ..core.config import RunConfig
from ..core.models import TFN, forward
from ..core.protocols import protocol_of
from .engines import engine_for
from .optimiser import BatchedAdam
from .trainables import Model, Trainable


@dataclass
class TrainResult:
    last: Tensor  # (C, P) final parameters
    best: Tensor  # (C, P) best-validation parameters
    best_val: Tensor  # (C,) validation loss of the best state
    best_step: Tensor  # (C,) step (1-based) of the best state
    last_val: Tensor  # (C,) validation loss of the final state
    last_train: Tensor  # (C,) training loss of the final step
    diverged_step: Tensor  # (C,) first step with a non-finite training loss, -1 if none
    curve_steps: list[int]
    train_curve: Tensor  # (C, K)
    val_curve: Tensor  # (C, K)


def train_cell(
    cfgs: list[RunConfig],
    trainable: Trainable,
    stream,
    progress: Optional[Callable[[int], None]] = None,
) -> TrainResult:
    cfg = cfgs[0]
    task = cfg.task
    protocol = protocol_of(cfg)
    C = len(cfgs)
    flat = trainable.init.clone()
    device = flat.device
    optimiser = BatchedAdam([c.lr for c in cfgs], [c.weight_decay for c in cfgs], trainable.mask)
    engine = engine_for(trainable, optimiser, task, protocol.classification_loss)
    by_accuracy = protocol.selects_by_accuracy(task)
    inf = torch.full((C,), math.inf, dtype=torch.float64, device=device)
    best = flat.clone()
    best_val, best_metric = inf.clone(), inf.clone()
    best_step = torch.zeros(C, dtype=torch.long, device=device)
    diverged_step = torch.full((C,), -1, dtype=torch.long, device=device)
    active = torch.ones(C, dtype=torch.bool, device=device)
    last_val = last_train = inf.clone()
    curve_steps, train_curve, val_curve = [], [], []

    with engine.running():
        for step in range(1, cfg.n_epochs + 1):
            batch = stream.train_batch(step)
            validate = step % cfg.val_every == 0 or step == cfg.n_epochs
            out = engine.step(flat, batch, stream.dropout(), stream.val_batch, active, predictions=by_accuracy,
                              validate=validate)
            flat, loss, val = out.param, out.loss, out.val
            finite = torch.isfinite(loss)
            diverged_step = torch.where(active & ~finite, step, diverged_step)
            active = active & finite
            with torch.no_grad():
                improved = torch.zeros_like(active)
                if validate:
                    metric = -data.accuracy(out.val_pred, out.val_target, task) if by_accuracy else val
                    improved = active & (metric < best_metric)
                    if step == 1 and protocol.first_validation_improves:
                        improved = active.clone()
                    best_metric = torch.where(improved, metric, best_metric)
                    best_val = torch.where(improved, val, best_val)
                    best_step = torch.where(improved, step, best_step)
                    if best.is_cuda:  # in place, and no host sync (nonzero would wait for the GPU)
                        torch.where(improved.view(-1, 1), flat, best, out=best)
                    else:  # only the improved rows: a full (C, P) pass costs ~1/4 of a native step
                        rows = improved.nonzero().flatten()
                        best.index_copy_(0, rows, flat.index_select(0, rows))
                    last_val = val
                stream.observe(improved)
                last_train = loss.to(torch.float64)
                # (curve steps are validated: curve_every is a multiple of val_every)
                if step % cfg.curve_every == 0 or step == cfg.n_epochs:
                    curve_steps.append(step)
                    train_curve.append(last_train.cpu())
                    val_curve.append(val.cpu())
            if progress is not None:
                progress(step)

    return TrainResult(
        last=flat,
        best=best,
        best_val=best_val,
        best_step=best_step,
        last_val=last_val,
        last_train=last_train,
        diverged_step=diverged_step,
        curve_steps=curve_steps,
        train_curve=torch.stack(train_curve, dim=1),
        val_curve=torch.stack(val_curve, dim=1),
    )


SAMPLE_CHUNK = 1000  # samples per forward pass in evaluation


@torch.no_grad()
def outputs_in_chunks(model: Model, x: Tensor, sample_chunk: int = SAMPLE_CHUNK) -> Tensor:
    """The model's outputs on x, computed chunk by chunk as ``evaluate`` computes them."""
    return torch.cat([forward(model, x[start : start + sample_chunk]) for start in range(0, x.shape[0], sample_chunk)],
                     dim=-3 if isinstance(model, TFN) else -2)


@torch.no_grad()
def evaluate(model: Model, target: Model, x: Tensor, task: str, classification_loss: str,
             sample_chunk: int = SAMPLE_CHUNK, target_outputs: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Loss (and accuracy for the classification tasks) of stacked models on one input
    set, in sample chunks; returns (C,) float64 tensors. ``target_outputs``: the target's
    outputs on x (``outputs_in_chunks``), when the caller has them already.

    The loss is averaged the way torch's criterion averages the whole set at once (sum of
    chunk means weighted by chunk size).
    """
    total_loss, total_correct, n = 0.0, 0.0, x.shape[0]
    for start in range(0, n, sample_chunk):
        chunk = x[start : start + sample_chunk]
        pred = forward(model, chunk)
        truth = forward(target, chunk) if target_outputs is None else target_outputs[start : start + sample_chunk]
        if pred.ndim == truth.ndim:  # an unstacked model: add the configuration dimension
            pred = pred.unsqueeze(0)
        weight = chunk.shape[0] / n
        total_loss = total_loss + weight * data.task_loss(pred, truth, task, classification_loss).to(torch.float64)
        if task != "regression":
            total_correct = total_correct + weight * data.accuracy(pred, truth, task)
    out = {"loss": total_loss}
    if task != "regression":
        out["accuracy"] = total_correct
    return out
