"""The two ways of taking one training step of a cell, behind one interface.

``step`` takes the step's training batch and dropout, the stream's ``val_batch`` and the
active configurations; it returns the training loss (before the update), the updated
parameters and the validation loss (after it), and, where asked or computed anyway, the
validation predictions. Either engine calls ``val_batch`` once per step, after the
training batch and the dropout, so a stream sees the same order whichever trains; with
``validate`` False it computes no validation (the loss is NaN, no predictions).

* ``TorchEngine``: the trainable's hand-written (or native, trainables.py) gradient where
  it has one and there is no dropout, else autograd; then ``BatchedAdam.step``; then the
  validation loss (the trainable's own where it has one and no predictions are asked for).
* ``NativeEngine``: loss, gradient, Adam and validation loss in one call of the C step
  (native.py); it skips configs that are inactive or whose loss is not finite, as the
  torch engine does.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..core import data, streams
from ..core.models import forward
from .optimiser import BatchedAdam
from .trainables import Trainable, autograd_value_and_grad

Batch = streams.Batch


@dataclass
class StepResult:
    loss: Tensor  # (C,) training loss before the update
    param: Tensor  # (C, P) parameters after the update
    val: Tensor  # (C,) float64 validation loss after the update
    val_target: Tensor  # the validation targets
    val_pred: Optional[Tensor]  # validation predictions (None where not asked for)


class Engine:
    name: str

    def __init__(self, trainable: Trainable, optimiser: BatchedAdam, task: str, classification_loss: str):
        self.trainable, self.optimiser, self.task = trainable, optimiser, task
        self.classification_loss = classification_loss

    @contextmanager
    def running(self):
        """The context the steps run in."""
        yield

    def step(self, param: Tensor, batch: Batch, dropout, val_batch: Callable[[], Batch], active: Tensor,
             predictions: bool, validate: bool = True) -> StepResult:
        raise NotImplementedError


class TorchEngine(Engine):
    name = "torch"

    def step(self, param, batch, dropout, val_batch, active, predictions, validate=True) -> StepResult:
        trainable, (x, y) = self.trainable, streams.stacked(batch)
        if trainable.value_and_grad is not None and dropout is None:
            loss, grad = trainable.value_and_grad(trainable.layout, param, x, y)
        else:
            loss, grad = autograd_value_and_grad(trainable, param, x, y, self.task, self.classification_loss,
                                                 dropout)
        with torch.no_grad():
            param = self.optimiser.step(param, grad, active & torch.isfinite(loss))
            vx, vy = streams.stacked(val_batch())
            if not validate:
                return StepResult(loss, param, _not_validated(param), vy, None)
            if trainable.loss is not None and not predictions and self.task == "regression":
                val = trainable.loss(trainable.layout, param, vx, vy).to(torch.float64)
                return StepResult(loss, param, val, vy, None)
            vpred = forward(trainable.model(param), vx)
            val = data.task_loss(vpred, vy, self.task, self.classification_loss).to(torch.float64)
        return StepResult(loss, param, val, vy, vpred)


class NativeEngine(Engine):
    name = "native"

    def __init__(self, trainable: Trainable, optimiser: BatchedAdam, task: str, classification_loss: str):
        super().__init__(trainable, optimiser, task, classification_loss)
        self.threads = torch.get_num_threads()

    @contextmanager
    def running(self):
        # The native step runs its own threads; torch's OpenMP workers, woken by the small
        # bookkeeping ops between steps, would spin on the same cores.
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(self.threads)

    def step(self, param, batch, dropout, val_batch, active, predictions, validate=True) -> StepResult:
        # (native.applies keeps cells with dropout, the TFN residual variant, on torch.)
        validation = val_batch()
        if not validate:  # the kernel validates on zero samples: no work, a NaN loss
            predictions = False
            validation = tuple(t[:0] for t in validation)
        loss, val = self.optimiser.native_step(self.trainable.native_step, param, batch, validation, active,
                                               self.threads)
        vx, vy = streams.stacked(validation) if predictions else (None, None)
        with torch.no_grad():
            vpred = forward(self.trainable.model(param), vx) if predictions else None
        return StepResult(loss, param, val.to(torch.float64), vy, vpred)


def _not_validated(param: Tensor) -> Tensor:
    return torch.full((param.shape[0],), float("nan"), dtype=torch.float64, device=param.device)


ENGINES = {engine.name: engine for engine in (TorchEngine, NativeEngine)}


def engine_for(trainable: Trainable, optimiser: BatchedAdam, task: str, classification_loss: str) -> Engine:
    """The engine the trainable was built for (native where it carries a native step, see
    trainables._with_native)."""
    return ENGINES[trainable.engine](trainable, optimiser, task, classification_loss)
