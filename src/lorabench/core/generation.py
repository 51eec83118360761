"""Frozen and target model generation: random, pretrained, or with uniform singular values.

Both protocols draw the same kinds of weights (PyTorch's ``nn.Linear`` initialisation,
N(0, 1) attention matrices); they differ in where the random numbers come from:

* ``paper``: one generator per purpose (target, frozen, pretraining data, ...), so the
  models of a seed do not depend on the rank or on anything else in the run.
* ``reference``: the single stream of the authors' code, in its order: target layers,
  frozen layers interleaved with the frozen model's LoRA factors, pretraining batches,
  then the finite training set. Through that order the authors' TFN frozen model and
  finite training sets depend on the rank; the reference protocol keeps that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import Tensor

from . import rng
from .adapters import LoRA, layer_ranks, reference_layer_ranks
from .config import RunConfig
from .models import FNN, TFN, forward

Model = Union[FNN, TFN]


@dataclass(frozen=True)
class Models:
    frozen: Model
    target: Model
    lora_init: LoRA  # the adapters every gradient run starts from (A = 0)
    x_train: Optional[Tensor] = None  # the finite training set, when n_train is set
    pretrain_steps: Optional[int] = None  # Adam steps the pretraining took


# ----------------------------------------------------------------- primitives
def _linear_init(width: int, bias: bool, gen: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
    """``nn.Linear(width, width)``'s initialisation, drawn from ``gen`` in its order."""
    weight = torch.empty(width, width)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
    if not bias:
        return weight, None
    bound = 1 / math.sqrt(width)
    return weight, torch.empty(width).uniform_(-bound, bound, generator=gen)


def _reference_lora_factor(width: int, rank: int, std: float, gen: torch.Generator) -> Tensor:
    """The authors' LoRA initialisation consumes randn (A, then zeroed), randn, normal_ (B)."""
    torch.randn(width, rank, generator=gen)
    torch.randn(width, rank, generator=gen)
    return torch.empty(width, rank).normal_(0.0, std, generator=gen)


def _pad_columns(factor: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(factor, (0, width - factor.shape[-1]))


# ------------------------------------------------------------------------ FNN
def _random_fnn(depth: int, cfg: RunConfig, gen: torch.Generator, lora_ranks: Optional[list[int]] = None):
    """Layers in order; with ``lora_ranks`` also the authors' LoRA factors after them."""
    layers = [_linear_init(cfg.width, bool(cfg.use_bias), gen) for _ in range(depth)]
    weights = torch.stack([w for w, _ in layers])
    biases = torch.stack([b for _, b in layers]) if cfg.use_bias else None
    model = FNN(weights, biases, cfg.activation)
    if lora_ranks is None:
        return model, None
    b_factors = [_pad_columns(_reference_lora_factor(cfg.width, r, cfg.std, gen), cfg.width) for r in lora_ranks]
    return model, torch.stack(b_factors)


def uniform_singular_values(frozen: FNN, target: FNN) -> FNN:
    """Replace each target layer by (frozen group product) + s*I, s the mean singular value
    of the group's discrepancy: every discrepancy then has equal singular values."""
    groups = partition(frozen.depth, target.depth)
    weights = target.weights.clone()
    for i, group in enumerate(groups):
        product = group_product(frozen.weights, group)
        discrepancy = target.weights[i] - product
        mean_singular_value = torch.linalg.svdvals(discrepancy).mean()
        weights[i] = product + torch.eye(frozen.width, dtype=product.dtype, device=product.device) * mean_singular_value
    return replace(target, weights=weights)


def partition(frozen_depth: int, target_depth: int) -> list[range]:
    """The paper's uniform partition: floor(L/Lbar) frozen layers per target layer, the
    remainder going to the last group."""
    size = frozen_depth // target_depth
    return [
        range(i * size, (i + 1) * size if i < target_depth - 1 else frozen_depth)
        for i in range(target_depth)
    ]


def group_product(weights: Tensor, group: range) -> Tensor:
    """W_{last} ... W_{first} over the layers of one group; weights: (L, D, D)."""
    product = torch.eye(weights.shape[-1], dtype=weights.dtype, device=weights.device)
    for layer in group:
        product = weights[layer] @ product
    return product


# ------------------------------------------------------------------------ TFN
def _random_tfn(cfg: RunConfig, gen: torch.Generator, lora_rank: Optional[int] = None):
    """Blocks in the authors' order; with ``lora_rank`` the frozen model's LoRA factors
    are drawn where the authors' modules draw them (after each block's attention
    matrices, after the last block's feed-forward, after the output layer)."""
    D, H, L = cfg.width, cfg.n_head, cfg.target_depth
    attn = {name: [] for name in ("wq", "wk", "wv", "wo")}
    ff = {name: [] for name in ("w1", "b1", "w2", "b2")}
    lora_b = {"wq": [], "wk": [], "wv": [], "wo": []}
    w2_lora = w_out_lora = None
    for block in range(L):
        for name in ("wq", "wk", "wv", "wo"):
            attn[name].append(torch.stack([torch.randn(D, D, generator=gen) for _ in range(H)]))
        if lora_rank is not None:
            per_head = [
                [_pad_columns(_reference_lora_factor(D, lora_rank, cfg.std, gen), D) for _ in range(4)]
                for _ in range(H)
            ]
            for j, name in enumerate(("wq", "wk", "wv", "wo")):
                lora_b[name].append(torch.stack([per_head[h][j] for h in range(H)]))
        w1, b1 = _linear_init(D, True, gen)
        w2, b2 = _linear_init(D, True, gen)
        for name, value in zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2)):
            ff[name].append(value)
        if lora_rank is not None and block == L - 1:
            w2_lora = _pad_columns(_reference_lora_factor(D, lora_rank, cfg.std, gen), D)
    w_out, _ = _linear_init(D, False, gen)
    if lora_rank is not None:
        w_out_lora = _pad_columns(_reference_lora_factor(D, lora_rank, cfg.std, gen), D)
    model = TFN(
        **{k: torch.stack(v) for k, v in attn.items()},
        **{k: torch.stack(v) for k, v in ff.items()},
        w_out=w_out,
        residual=bool(cfg.better_optim),
        dropout=cfg.dropout if cfg.better_optim else 0.0,
        prenorm=bool(cfg.prenorm),
    )
    if lora_rank is None:
        return model, None
    b = {k: torch.stack(v) for k, v in lora_b.items()}
    b["w2"], b["w_out"] = w2_lora, w_out_lora
    return model, b


# ---------------------------------------------------------------- pretraining
def dropout_with(gen: torch.Generator, p: float):
    """Dropout drawing its mask from ``gen`` the way torch's CPU dropout draws it: in the
    memory order of the tensor it drops (token-major for the authors' second site)."""

    def drop(x: Tensor, token_major: bool = False) -> Tensor:
        shape = (*x.shape[:-2], x.shape[-1], x.shape[-2]) if token_major else x.shape
        noise = torch.empty(shape, dtype=x.dtype).bernoulli_(1 - p, generator=gen).div_(1 - p)
        noise = noise.transpose(-1, -2) if token_major else noise
        return x * noise.to(x.device)

    return drop


def pretrain(frozen: Model, target: Model, cfg: RunConfig, gen: torch.Generator) -> tuple[Model, int]:
    """Adam on every frozen weight towards the target until the training MSE falls below
    initial / pretrained_level (checked before each step) or the budget ends.

    Draws one batch per step from ``gen`` (and, for the residual TFN, dropout masks),
    then one more validation batch at the end, as the authors' code does.
    Returns the pretrained model and the number of Adam steps taken.
    """
    is_fnn = isinstance(frozen, FNN)
    params = _pretrainable(frozen)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.Adam(leaves.values(), lr=cfg.pretrained_lr, weight_decay=0.0)
    drop = dropout_with(gen, frozen.dropout) if (not is_fnn and frozen.residual) else None
    steps = 0
    initial = None
    for step in range(cfg.pretrained_epochs):
        x = _draw_inputs(cfg, cfg.batch_size, gen)
        with torch.no_grad():
            y = forward(target, x)
        model = replace(frozen, **leaves)
        loss = torch.nn.functional.mse_loss(forward(model, x, drop), y)
        if step == 0:
            initial = loss.item()
        elif loss.item() < initial / cfg.pretrained_level:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    _draw_inputs(cfg, cfg.batch_size, gen)  # the authors' final validation batch
    return replace(frozen, **{k: v.detach() for k, v in leaves.items()}), steps


def _pretrainable(model: Model) -> dict[str, Tensor]:
    if isinstance(model, FNN):
        out = {"weights": model.weights}
        if model.biases is not None:
            out["biases"] = model.biases
        return out
    return model.tensors()


def _draw_inputs(cfg: RunConfig, n: int, gen: torch.Generator) -> Tensor:
    if cfg.exp == "fnn":
        return torch.randn(n, cfg.width, generator=gen)
    return torch.randn(n, cfg.width, cfg.seq_length, generator=gen)


# ------------------------------------------------------------------ the two orders
def paper_models(cfg: RunConfig) -> Models:
    """One generator per purpose: the models of a seed do not depend on the rank."""
    seed = cfg.seed
    if cfg.exp == "fnn":
        target, _ = _random_fnn(cfg.target_depth, cfg, rng.generator(seed, "target"))
        frozen, _ = _random_fnn(cfg.frozen_depth, cfg, rng.generator(seed, "frozen"))
        if cfg.init_mode == "uniform_singular_values":
            target = uniform_singular_values(frozen, target)
    else:
        target, _ = _random_tfn(cfg, rng.generator(seed, "target"))
        frozen, _ = _random_tfn(cfg, rng.generator(seed, "frozen"))
        target = replace(target, residual=False, dropout=0.0)
    steps = None
    if cfg.pretrained:
        frozen, steps = pretrain(frozen, target, cfg, rng.generator(seed, "pretrain"))
    lora = LoRA.gaussian_init(cfg, rng.generator(seed, "lora_init"), layer_ranks(cfg))
    x_train = None
    if cfg.n_train is not None:
        x_train = _draw_inputs(cfg, cfg.n_train, rng.generator(seed, "train_set"))
    return Models(frozen, target, lora, x_train, steps)


def reference_models(cfg: RunConfig) -> Models:
    """The authors' single stream, in their order."""
    gen = rng.global_stream(cfg.seed)
    if cfg.exp == "fnn":
        ranks = reference_layer_ranks(cfg)
        target, _ = _random_fnn(cfg.target_depth, cfg, gen)
        frozen, b = _random_fnn(cfg.frozen_depth, cfg, gen, lora_ranks=ranks)
        if cfg.init_mode == "uniform_singular_values":
            target = uniform_singular_values(frozen, target)
        lora = LoRA.from_factors(cfg, {"weights": b}, {"weights": ranks})
    else:
        # The authors' TFN target never has the residual variant.
        target, _ = _random_tfn(cfg.replace(better_optim=0), gen)
        frozen, b = _random_tfn(cfg, gen, lora_rank=cfg.rank)
        lora = LoRA.from_factors(cfg, b, None)
    steps = None
    if cfg.pretrained:
        gen = rng.global_stream(cfg.seed)
        frozen, steps = pretrain(frozen, target, cfg, gen)
    x_train = _draw_inputs(cfg, cfg.n_train, gen) if cfg.n_train is not None else None
    return Models(frozen, target, lora, x_train, steps)
