"""Batched gradient training: every configuration of a cell trained at once.

A cell is a set of configurations that share a seed and a frozen/target model family
(they may differ in rank, learning rate, weight decay, bias tuning, rank allocation and
final-layer-tuning depth). Their trainable tensors are stacked along a leading
configuration dimension C; one forward/backward pass on the shared batch gives every
configuration its own gradient (the summed loss separates, as no parameter is shared),
and a batched Adam applies per-configuration learning rates and weight decays.

The loop, in one place: draw the step's batch -> loss per config -> Adam step -> loss on
the fixed validation set -> keep the best-validation state -> record the curves.
A configuration whose training loss becomes non-finite stops updating and is reported as
diverged; the others go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import data
from .adapters import LoRA, apply_lora, column_mask, layer_ranks, reference_layer_ranks
from .config import RunConfig
from .generation import dropout_with
from .models import FNN, TFN, fnn_forward, tfn_forward

Model = Union[FNN, TFN]
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, used by the authors


def forward(model: Model, x: Tensor, dropout=None) -> Tensor:
    return fnn_forward(model, x) if isinstance(model, FNN) else tfn_forward(model, x, dropout)


def _per_config(values: list[float], like: Tensor, ndim: int) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (ndim - 1)))


# ------------------------------------------------------------------ batched Adam
@dataclass
class BatchedAdam:
    """torch.optim.Adam (L2 weight decay added to the gradient, bias correction, eps)
    with a learning rate and a weight decay per configuration (leading dimension C).

    ``masks`` (broadcastable to each parameter) freeze entries: a masked entry keeps its
    value and its moments. ``active`` (C,) freezes whole configurations.
    """

    lr: list[float]
    weight_decay: list[float]
    masks: dict[str, Tensor]
    step_count: int = 0

    def __post_init__(self):
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], active: Tensor) -> dict[str, Tensor]:
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1 - BETA1**t
        bias_correction2_sqrt = math.sqrt(1 - BETA2**t)
        updated = {}
        for name, param in params.items():
            grad = grads[name]
            lr = _per_config(self.lr, param, param.ndim)
            wd = _per_config(self.weight_decay, param, param.ndim)
            grad = grad + wd * param
            m = self.exp_avg.get(name, torch.zeros_like(param))
            v = self.exp_avg_sq.get(name, torch.zeros_like(param))
            m_new = torch.lerp(m, grad, 1 - BETA1)
            v_new = v * BETA2 + (1 - BETA2) * grad * grad
            denom = v_new.sqrt() / bias_correction2_sqrt + EPS
            new = param - (lr / bias_correction1) * m_new / denom
            keep = (self.masks[name] > 0) & active.view(-1, *([1] * (param.ndim - 1)))
            updated[name] = torch.where(keep, new, param)
            self.exp_avg[name] = torch.where(keep, m_new, m)
            self.exp_avg_sq[name] = torch.where(keep, v_new, v)
        return updated


# -------------------------------------------------------------- parameterisations
@dataclass(frozen=True)
class Trainable:
    """What a cell trains: initial tensors (C, ...), their update masks, and how they make
    the adapted model."""

    init: dict[str, Tensor]
    masks: dict[str, Tensor]
    build: Callable[[dict[str, Tensor]], Model]


def stack_models(models: list[Model]) -> Model:
    first = models[0]
    if isinstance(first, FNN):
        biases = None if first.biases is None else torch.stack([m.biases for m in models])
        return replace(first, weights=torch.stack([m.weights for m in models]), biases=biases)
    return replace(first, **{k: torch.stack([getattr(m, k) for m in models]) for k in first.tensors()})


def stack_lora(adapters: list[LoRA]) -> LoRA:
    stack = lambda field: {k: torch.stack([getattr(a, field)[k] for a in adapters]) for k in getattr(adapters[0], field)}
    return LoRA(stack("a"), stack("b"), stack("mask"))


def fnn_trainable(cfgs: list[RunConfig], frozen: FNN, lora: LoRA) -> Trainable:
    """LoRA on every layer (method 'sgd') or full final layers (method 'flt').

    frozen: stacked (C, L, D, D); lora: stacked initial adapters.
    """
    C = len(cfgs)
    like = frozen.weights
    has_bias = frozen.biases is not None
    if cfgs[0].method == "flt":
        L = frozen.depth
        layer_on = torch.tensor(
            [[1.0 if layer >= L - c.last_layers else 0.0 for layer in range(L)] for c in cfgs], dtype=like.dtype
        )
        init = {"weights": frozen.weights.clone(), "biases": frozen.biases.clone()}
        masks = {"weights": layer_on.view(C, L, 1, 1), "biases": layer_on.view(C, L, 1)}
        return Trainable(init, masks, lambda p: replace(frozen, weights=p["weights"], biases=p["biases"]))

    init = {"a": lora.a["weights"].clone(), "b": lora.b["weights"].clone()}
    column = lora.mask["weights"].unsqueeze(-2)  # (C, L, 1, D)
    masks = {"a": column, "b": column}
    if has_bias:
        init["biases"] = frozen.biases.clone()
        masks["biases"] = torch.tensor([float(c.tune_bias) for c in cfgs], dtype=like.dtype).view(C, 1, 1)

    def build(p: dict[str, Tensor]) -> FNN:
        weights = frozen.weights + p["a"] @ p["b"].transpose(-1, -2)
        return replace(frozen, weights=weights, biases=p.get("biases", frozen.biases))

    return Trainable(init, masks, build)


def tfn_trainable(cfgs: list[RunConfig], frozen: TFN, lora: LoRA) -> Trainable:
    """LoRA on W_Q, W_K, W_V, W_O of every head and block, the last W_2 and the output
    layer; with tune_bias also the feed-forward biases (the authors' published code)."""
    C = len(cfgs)
    init, masks = {}, {}
    for name in lora.a:
        init[f"a_{name}"] = lora.a[name].clone()
        init[f"b_{name}"] = lora.b[name].clone()
        masks[f"a_{name}"] = masks[f"b_{name}"] = lora.mask[name].unsqueeze(-2)
    tune = torch.tensor([float(c.tune_bias) for c in cfgs], dtype=frozen.b1.dtype).view(C, 1, 1)
    for name in ("b1", "b2"):
        init[name] = getattr(frozen, name).clone()
        masks[name] = tune

    def build(p: dict[str, Tensor]) -> TFN:
        adapters = LoRA({k: p[f"a_{k}"] for k in lora.a}, {k: p[f"b_{k}"] for k in lora.a}, lora.mask)
        return apply_lora(replace(frozen, b1=p["b1"], b2=p["b2"]), adapters)

    return Trainable(init, masks, build)


# ------------------------------------------------------------------ data streams
class PaperStream:
    """Fresh batches shared by the whole cell (or the fixed finite training set), a fixed
    validation set, dropout masks shared by all configurations of a step."""

    def __init__(self, cfg: RunConfig, target: Model, sets: data.EvalSets, x_train: Optional[Tensor], device):
        self.cfg, self.target, self.device = cfg, target, device
        self.gen = data.training_generator(cfg)
        self.drop_gen = data.dropout_generator(cfg)
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

        def drop(x: Tensor) -> Tensor:
            noise = torch.empty(x.shape[-3:]).bernoulli_(1 - p, generator=gen).div_(1 - p)
            return x * noise.to(x.device)

        return drop

    def val_batch(self) -> tuple[Tensor, Tensor]:
        return self.val_x, self.val_y

    def observe(self, improved: Tensor) -> None:
        pass


class ReferenceFNNStream:
    """The authors' FNN data: after step 0 each config trains on one of two fixed batches,
    chosen by whether its validation improved at the previous step (see
    data.reference_fnn_batches); validation on the first training batch."""

    def __init__(self, cfg: RunConfig, target: Model, sets: data.EvalSets, x_train: Optional[Tensor], C: int, device):
        self.fixed = None
        if x_train is not None:  # per-config finite sets (C, n, D)
            x = x_train.to(device)
            self.fixed = (x, _target_outputs(target, x))
        self.batches = data.reference_fnn_batches(cfg).to(device)
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

    def __init__(self, cfg: RunConfig, target: Model, x_train: Optional[Tensor], C: int, device):
        from . import rng

        self.cfg, self.target, self.device = cfg, target, device
        self.gens = [rng.global_stream(cfg.seed) for _ in range(C)]
        self.after_test = data.reference_tfn_state_after_test(cfg)
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

        def drop(x: Tensor) -> Tensor:
            return torch.stack([d(x[c].cpu()) for c, d in enumerate(drops)]).to(x.device)

        return drop

    def val_batch(self):
        x = torch.stack([data.draw(self.cfg, self.cfg.batch_size, g) for g in self.gens]).to(self.device)
        return x, _target_outputs(self.target, x)

    def observe(self, improved: Tensor) -> None:
        for c in torch.nonzero(improved).flatten().tolist():
            self.gens[c].set_state(self.after_test.clone())


def _target_outputs(target: Model, x: Tensor) -> Tensor:
    with torch.no_grad():
        return forward(target, x)


# ---------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    last: dict[str, Tensor]
    best: dict[str, Tensor]
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
    C = len(cfgs)
    params = {k: v.clone() for k, v in trainable.init.items()}
    device = next(iter(params.values())).device
    optimizer = BatchedAdam([c.lr for c in cfgs], [c.weight_decay for c in cfgs], trainable.masks)
    # The reference protocol tracks improvements the authors' way (accuracy for the
    # classification tasks); the paper protocol always selects by validation loss.
    by_accuracy = cfg.protocol == "reference" and task != "regression"
    inf = torch.full((C,), math.inf, dtype=torch.float64, device=device)
    best = {k: v.clone() for k, v in params.items()}
    best_val, best_metric = inf.clone(), inf.clone()
    best_step = torch.zeros(C, dtype=torch.long, device=device)
    diverged_step = torch.full((C,), -1, dtype=torch.long, device=device)
    active = torch.ones(C, dtype=torch.bool, device=device)
    last_val = last_train = inf.clone()
    curve_steps, train_curve, val_curve = [], [], []

    for step in range(1, cfg.n_epochs + 1):
        x, y = stream.train_batch(step)
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        pred = forward(trainable.build(leaves), x, stream.dropout())
        loss = data.task_loss(pred, y, task)
        finite = torch.isfinite(loss.detach())
        diverged_step = torch.where(active & ~finite, step, diverged_step)
        active = active & finite
        total = torch.where(active, loss, torch.zeros_like(loss)).sum()
        grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
        with torch.no_grad():
            params = optimizer.step(params, grads, active)
            vx, vy = stream.val_batch()
            vpred = forward(trainable.build(params), vx)
            val = data.task_loss(vpred, vy, task).to(torch.float64)
            metric = -data.accuracy(vpred, vy, task) if by_accuracy else val
            improved = active & (metric < best_metric)
            if step == 1 and cfg.protocol == "reference":
                improved = active.clone()  # the authors' first validation always counts
            best_metric = torch.where(improved, metric, best_metric)
            best_val = torch.where(improved, val, best_val)
            best_step = torch.where(improved, step, best_step)
            for k in params:
                keep = improved.view(-1, *([1] * (params[k].ndim - 1)))
                best[k] = torch.where(keep, params[k], best[k])
            stream.observe(improved)
            last_val, last_train = val, loss.detach().to(torch.float64)
            if step % cfg.curve_every == 0 or step == cfg.n_epochs:
                curve_steps.append(step)
                train_curve.append(last_train.cpu())
                val_curve.append(val.cpu())
        if progress is not None:
            progress(step)

    return TrainResult(
        last=params,
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


# ------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: Model, target: Model, x: Tensor, task: str, sample_chunk: int = 1000) -> dict[str, Tensor]:
    """Loss (and accuracy for the classification tasks) of stacked models on one input
    set, in sample chunks; returns (C,) float64 tensors.

    The loss is averaged the way torch's criterion averages the whole set at once (sum of
    chunk means weighted by chunk size).
    """
    total_loss, total_correct, n = 0.0, 0.0, x.shape[0]
    for start in range(0, n, sample_chunk):
        chunk = x[start : start + sample_chunk]
        pred, truth = forward(model, chunk), forward(target, chunk)
        if pred.ndim == truth.ndim:  # an unstacked model: add the configuration dimension
            pred = pred.unsqueeze(0)
        weight = chunk.shape[0] / n
        total_loss = total_loss + weight * data.task_loss(pred, truth, task).to(torch.float64)
        if task != "regression":
            total_correct = total_correct + weight * data.accuracy(pred, truth, task)
    out = {"loss": total_loss}
    if task != "regression":
        out["accuracy"] = total_correct
    return out
