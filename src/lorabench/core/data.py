"""Tasks (losses, accuracies) and the data streams of the two protocols.

Every loss is reduced per configuration: predictions carry a leading configuration
dimension C and a loss comes back with shape (C,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import rng
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


def task_loss(pred: Tensor, target: Tensor, task: str) -> Tensor:
    """Per-configuration loss; pred (C, B, ...), target broadcastable -> (C,).

    Regression: MSE averaged over samples and coordinates (torch's MSELoss).
    Classification: cross entropy of the outputs against the target's outputs used as
    soft, unnormalised class weights (the authors' definition); binary: both first
    summed into two halves.
    """
    if task == "regression":
        residual = pred - target
        return (residual * residual).flatten(1).mean(dim=1)
    log_probs = torch.log_softmax(_logits(pred, task), dim=-1)
    return -(_logits(target, task) * log_probs).sum(dim=-1).mean(dim=-1)


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


def eval_sets(cfg: RunConfig) -> EvalSets:
    """Paper: three independent streams. Reference: the authors' reseeded draws, where
    the validation set is the first batch after ``set_seed`` and the test set starts with
    the same numbers."""
    if cfg.protocol == "paper":
        return EvalSets(
            draw(cfg, cfg.n_val, rng.generator(cfg.seed, "val")),
            draw(cfg, cfg.n_test, rng.generator(cfg.seed, "test")),
            SHIFT_SCALE * draw(cfg, cfg.n_test, rng.generator(cfg.seed, "test_shift")),
        )
    gen = rng.global_stream(cfg.seed)
    val = draw(cfg, cfg.batch_size, gen)
    gen = rng.global_stream(cfg.seed)
    test = draw(cfg, cfg.n_test, gen)
    return EvalSets(val, test, SHIFT_SCALE * draw(cfg, cfg.n_test, gen))


def calibration_inputs(cfg: RunConfig) -> Tensor:
    """Inputs that choose the construction's large biases (batch_size Gaussian samples).

    Reference: the authors draw them right after ``set_seed``, i.e. the validation batch.
    """
    gen = rng.global_stream(cfg.seed) if cfg.protocol == "reference" else rng.generator(cfg.seed, "calibration")
    return draw(cfg, cfg.batch_size, gen)


def reference_fnn_batches(cfg: RunConfig) -> Tensor:
    """The only training batches the authors' FNN loop ever sees, stacked (3, B, D).

    Their validation and test functions reset the global seed, so after step 0 (batch 0,
    the first draws after the seed, which is also the validation set) the next batch is
    either the draws following a test (1: the config's validation loss improved at the
    previous step) or those following a validation (2: it did not).
    """
    gen = rng.global_stream(cfg.seed)
    first = draw(cfg, cfg.batch_size, gen)
    after_validation = draw(cfg, cfg.batch_size, gen)
    gen = rng.global_stream(cfg.seed)
    draw(cfg, cfg.n_test, gen)
    draw(cfg, cfg.n_test, gen)
    after_test = draw(cfg, cfg.batch_size, gen)
    return torch.stack([first, after_test, after_validation])


def reference_tfn_state_after_test(cfg: RunConfig) -> torch.Tensor:
    """Generator state the authors' TFN stream resumes from after each test evaluation."""
    gen = rng.global_stream(cfg.seed)
    draw(cfg, cfg.n_test, gen)
    draw(cfg, cfg.n_test, gen)
    return gen.get_state()


def training_generator(cfg: RunConfig) -> torch.Generator:
    """Paper protocol: the stream of fresh training batches of one seed."""
    return rng.generator(cfg.seed, "train")


def dropout_generator(cfg: RunConfig) -> torch.Generator:
    return rng.generator(cfg.seed, "dropout")
