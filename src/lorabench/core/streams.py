"""The training data of a cell, step by step: training batch, dropout masks, validation.

A stream answers, every step and in this order, ``train_batch(step)``, ``dropout()`` and
``val_batch()``, and is told which configurations improved (``observe``): the authors'
streams depend on it. Stacked inputs carry a leading configuration dimension C; shared
inputs have none.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import data, rng
from .config import RunConfig
from .generation import dropout_with
from .models import forward


def _target_outputs(target, x: Tensor) -> Tensor:
    with torch.no_grad():
        return forward(target, x)


class PaperStream:
    """Fresh batches shared by the whole cell (or the fixed finite training set), a fixed
    validation set, dropout masks shared by all configurations of a step."""

    def __init__(self, cfg: RunConfig, target, sets: data.EvalSets, x_train: Optional[Tensor], device):
        self.cfg, self.target, self.device = cfg, target, device
        self.gen = rng.generator(cfg.seed, "train")
        self.drop_gen = rng.generator(cfg.seed, "dropout")
        self.fixed = None
        if x_train is not None:
            x = x_train.to(device)
            self.fixed = (x, _target_outputs(target, x))
        self.val_x = sets.val.to(device)
        self.val_y = _target_outputs(target, self.val_x)

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        if self.fixed is not None:
            return self.fixed
        x = data.draw(self.cfg, self.cfg.batch_size, self.gen).to(self.device)
        return x, _target_outputs(self.target, x)

    def dropout(self):
        if not self.cfg.better_optim:
            return None
        gen, p = self.drop_gen, self.cfg.dropout

        def drop(x: Tensor, token_major: bool) -> Tensor:
            # One mask per step shared by every config: a config's numbers then do not
            # depend on which others share its cell.
            noise = torch.empty(x.shape[-3:]).bernoulli_(1 - p, generator=gen).div_(1 - p)
            return x * noise.to(x.device)

        return drop

    def val_batch(self) -> tuple[Tensor, Tensor]:
        return self.val_x, self.val_y

    def observe(self, improved: Tensor) -> None:
        pass


def reference_fnn_batches(cfg: RunConfig) -> Tensor:
    """The only training batches the authors' FNN loop ever sees, stacked (3, B, D).

    Their validation and test functions reset the global seed, so after step 0 (batch 0,
    the first draws after the seed, which is also the validation set) the next batch is
    either the draws following a test (1: the config's validation loss improved at the
    previous step) or those following a validation (2: it did not).
    """
    gen = rng.global_stream(cfg.seed)
    first = data.draw(cfg, cfg.batch_size, gen)
    after_validation = data.draw(cfg, cfg.batch_size, gen)
    gen = rng.global_stream(cfg.seed)
    data.draw(cfg, cfg.n_test, gen)
    data.draw(cfg, cfg.n_test, gen)
    after_test = data.draw(cfg, cfg.batch_size, gen)
    return torch.stack([first, after_test, after_validation])


def reference_tfn_state_after_test(cfg: RunConfig) -> torch.Tensor:
    """Generator state the authors' TFN stream resumes from after each test evaluation."""
    gen = rng.global_stream(cfg.seed)
    data.draw(cfg, cfg.n_test, gen)
    data.draw(cfg, cfg.n_test, gen)
    return gen.get_state()


class ReferenceFNNStream:
    """The authors' FNN data: after step 0 each config trains on one of two fixed batches,
    chosen by whether its validation improved at the previous step (see
    reference_fnn_batches); validation on the first training batch."""

    def __init__(self, cfg: RunConfig, target, sets: data.EvalSets, x_train: Optional[Tensor], C: int, device):
        self.fixed = None
        if x_train is not None:  # per-config finite sets (C, n, D)
            x = x_train.to(device)
            self.fixed = (x, _target_outputs(target, x))
        self.batches = reference_fnn_batches(cfg).to(device)
        self.targets = _target_outputs(target, self.batches)
        self.choice = torch.zeros(C, dtype=torch.long, device=device)
        self.val_x = sets.val.to(device)
        self.val_y = _target_outputs(target, self.val_x)

    def train_batch(self, step: int):
        if self.fixed is not None:
            return self.fixed
        return self.batches[self.choice], self.targets[self.choice]

    def dropout(self):
        return None

    def val_batch(self):
        return self.val_x, self.val_y

    def observe(self, improved: Tensor) -> None:
        self.choice = torch.where(improved, 1, 2)


class ReferenceTFNStream:
    """The authors' TFN data: each config's own global stream; training batch, dropout
    masks and validation batch drawn in turn every step, and the stream rewound to the
    position after the test sets whenever the config's validation improves."""

    def __init__(self, cfg: RunConfig, target, x_train: Optional[Tensor], C: int, device):
        self.cfg, self.target, self.device = cfg, target, device
        self.gens = [rng.global_stream(cfg.seed) for _ in range(C)]
        self.after_test = reference_tfn_state_after_test(cfg)
        self.fixed = None
        if x_train is not None:
            x = x_train.to(device)
            self.fixed = (x, _target_outputs(target, x))

    def train_batch(self, step: int):
        if self.fixed is not None:
            return self.fixed
        x = torch.stack([data.draw(self.cfg, self.cfg.batch_size, g) for g in self.gens]).to(self.device)
        return x, _target_outputs(self.target, x)

    def dropout(self):
        if not self.cfg.better_optim:
            return None
        drops = [dropout_with(g, self.cfg.dropout) for g in self.gens]

        def drop(x: Tensor, token_major: bool) -> Tensor:
            return torch.stack([d(x[c].cpu(), token_major) for c, d in enumerate(drops)]).to(x.device)

        return drop

    def val_batch(self):
        x = torch.stack([data.draw(self.cfg, self.cfg.batch_size, g) for g in self.gens]).to(self.device)
        return x, _target_outputs(self.target, x)

    def observe(self, improved: Tensor) -> None:
        for c in torch.nonzero(improved).flatten().tolist():
            self.gens[c].set_state(self.after_test.clone())
