"""The two protocols, one object each: everything in which they differ.

* ``paper`` follows the paper's text: one generator per purpose, a fresh Gaussian batch
  every step, a fixed validation set of ``n_val`` samples, independent test and shifted
  test sets, selection by validation loss, constructions in float64.
* ``reference`` replays what the authors' published code computes: their single global
  stream in their order (so the TFN frozen model depends on the rank), their data
  streams (the global seed is reset in their validation and test functions), their
  float32 construction with its bias propagation, accuracy-driven improvements for the
  classification tasks.

The rest of the package asks ``protocol_of(cfg)``; it never tests the protocol's name.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from . import data, generation, rng, streams
from .adapters import LoRA, layer_ranks
from .config import PROTOCOLS, ConfigError, RunConfig
from .generation import Models

# Settings that model generation never reads: cells of one model family differ in them.
_NEUTRAL = dict(lr=1e-3, weight_decay=0.0, tune_bias=1, last_layers=1, method="sgd", best_epoch=0, n_epochs=1,
                val_every=1)


class Protocol:
    name: str
    # The construction's dtype (paper: float64, a statement about exact representation;
    # in float32 the TFN depth-2 adapters, entries near 1e5, alone cost ~1e-3 relative
    # error) and whether it propagates the biases as the authors' code does.
    construction_dtype: torch.dtype
    authors_bias_propagation: bool
    # Whether the first validation always counts as an improvement.
    first_validation_improves: bool
    # The classification tasks' loss (data.CLASSIFICATION_LOSSES), in training, selection
    # and the reported losses alike.
    classification_loss: str

    def selects_by_accuracy(self, task: str) -> bool:
        """Whether an improvement is judged by validation accuracy rather than loss."""
        raise NotImplementedError

    def model_key(self, cfg: RunConfig) -> RunConfig:
        """The config that names ``cfg``'s models (see runs.runner.model_key)."""
        return cfg.replace(**_NEUTRAL)

    def generate_models(self, cfg: RunConfig) -> Models:
        raise NotImplementedError

    def with_adapters(self, cfg: RunConfig, models: Models) -> Models:
        """``models`` (generated for ``model_key(cfg)``) with ``cfg``'s initial adapters."""
        return models

    def eval_sets(self, cfg: RunConfig) -> data.EvalSets:
        raise NotImplementedError

    def calibration_inputs(self, cfg: RunConfig) -> Tensor:
        """Inputs that choose the construction's linearising biases (batch_size Gaussian samples)."""
        raise NotImplementedError

    def training_set(self, models: list[Models]) -> Optional[Tensor]:
        """The cell's finite training set (shared, or stacked per config); None: streamed."""
        raise NotImplementedError

    def stream(self, cfg: RunConfig, target, sets: data.EvalSets, x_train: Optional[Tensor], C: int, device,
               target_outputs: Optional[streams.TargetOutputs] = None):
        """The cell's training data (core/streams.py). ``target_outputs``: how the reference
        transformer stream, which draws new batches for many configurations every step,
        evaluates the target on them (None: torch's forward); the other streams evaluate
        one batch a step or a few fixed ones with torch's forward."""
        raise NotImplementedError


class PaperProtocol(Protocol):
    name = "paper"
    construction_dtype = torch.float64
    authors_bias_propagation = False
    first_validation_improves = False
    # Appendix G: cross entropy against the target's class (its argmax, the label that
    # the accuracy scores); the authors' soft weights, the target's raw outputs, make the
    # loss unbounded below wherever one is negative.
    classification_loss = "labels"

    def selects_by_accuracy(self, task: str) -> bool:
        return False

    def model_key(self, cfg: RunConfig) -> RunConfig:
        # The rank only changes the adapters' initialisation (with_adapters).
        return cfg.replace(**_NEUTRAL, rank=1, rank_step=0)

    def generate_models(self, cfg: RunConfig) -> Models:
        return generation.paper_models(cfg)

    def with_adapters(self, cfg: RunConfig, models: Models) -> Models:
        lora = LoRA.gaussian_init(cfg, rng.generator(cfg.seed, "lora_init"), layer_ranks(cfg))
        return replace(models, lora_init=lora)

    def eval_sets(self, cfg: RunConfig) -> data.EvalSets:
        """Three independent streams."""
        return data.EvalSets(
            data.draw(cfg, cfg.n_val, rng.generator(cfg.seed, "val")),
            data.draw(cfg, cfg.n_test, rng.generator(cfg.seed, "test")),
            data.SHIFT_SCALE * data.draw(cfg, cfg.n_test, rng.generator(cfg.seed, "test_shift")),
        )

    def calibration_inputs(self, cfg: RunConfig) -> Tensor:
        return data.draw(cfg, cfg.batch_size, rng.generator(cfg.seed, "calibration"))

    def training_set(self, models: list[Models]) -> Optional[Tensor]:
        return models[0].x_train  # the same for every rank of the cell

    def stream(self, cfg, target, sets, x_train, C, device, target_outputs=None):
        return streams.PaperStream(cfg, target, sets, x_train, device)


class ReferenceProtocol(Protocol):
    name = "reference"
    construction_dtype = torch.float32
    authors_bias_propagation = True
    first_validation_improves = True
    classification_loss = "soft_outputs"

    def selects_by_accuracy(self, task: str) -> bool:
        return task != "regression"

    def model_key(self, cfg: RunConfig) -> RunConfig:
        # The rank changes the authors' random-number order: it is part of the key.
        return cfg.replace(**_NEUTRAL)

    def generate_models(self, cfg: RunConfig) -> Models:
        return generation.reference_models(cfg)

    def eval_sets(self, cfg: RunConfig) -> data.EvalSets:
        """The authors' reseeded draws: the validation set is the first batch after
        ``set_seed`` and the test set starts with the same numbers."""
        gen = rng.global_stream(cfg.seed)
        val = data.draw(cfg, cfg.batch_size, gen)
        gen = rng.global_stream(cfg.seed)
        test = data.draw(cfg, cfg.n_test, gen)
        return data.EvalSets(val, test, data.SHIFT_SCALE * data.draw(cfg, cfg.n_test, gen))

    def calibration_inputs(self, cfg: RunConfig) -> Tensor:
        # The authors draw them right after ``set_seed``, i.e. the validation batch.
        return data.draw(cfg, cfg.batch_size, rng.global_stream(cfg.seed))

    def training_set(self, models: list[Models]) -> Optional[Tensor]:
        if models[0].x_train is None:
            return None
        return torch.stack([m.x_train for m in models])  # drawn after rank-dependent numbers

    def stream(self, cfg, target, sets, x_train, C, device, target_outputs=None):
        if cfg.exp == "fnn":
            return streams.ReferenceFNNStream(cfg, target, sets, x_train, C, device)
        if cfg.better_optim:
            return streams.ReferenceTFNDropoutStream(cfg, target, x_train, C, device)
        return streams.ReferenceTFNStream(cfg, target, x_train, C, device, target_outputs)


REGISTRY: dict[str, Protocol] = {p.name: p for p in (PaperProtocol(), ReferenceProtocol())}


def protocol_of(cfg: RunConfig) -> Protocol:
    try:
        return REGISTRY[cfg.protocol]
    except KeyError:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {cfg.protocol!r}") from None


def generate_models(cfg: RunConfig) -> Models:
    """Frozen model, target model, initial adapters and finite training set of one config,
    in its protocol's random-number order."""
    return protocol_of(cfg).generate_models(cfg)
