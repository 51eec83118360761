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

from . import native
from ..core import data
from ..core.adapters import LoRA, apply_lora
from ..core.config import RunConfig
from ..core.generation import dropout_with
from ..core.models import FNN, TFN, fnn_forward, shared_input_layer, tfn_forward

Model = Union[FNN, TFN]
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, used by the authors


def forward(model: Model, x: Tensor, dropout=None) -> Tensor:
    return fnn_forward(model, x) if isinstance(model, FNN) else tfn_forward(model, x, dropout)


# ------------------------------------------------------------ flat parameters
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


# ------------------------------------------------------------------ batched Adam
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

    def native_step(self, kernel: native.NativeStep, param: Tensor, batch: tuple[Tensor, Tensor],
                    val_batch: tuple[Tensor, Tensor], active: Tensor, threads: int) -> tuple[Tensor, Tensor]:
        """Loss, gradient, this Adam update (in place on ``param``) and validation loss in
        one native call; returns (training loss before, validation loss after), (C,)."""
        step_size, bias_correction2_sqrt = self._prepare(param)
        (x, y), (vx, vy) = batch, val_batch
        return kernel(param, self.exp_avg, self.exp_avg_sq, self._mask, step_size.flatten().contiguous(),
                      self._wd.flatten().contiguous(), (BETA1, BETA2), EPS, bias_correction2_sqrt,
                      x, y, vx, vy, active, threads)


# -------------------------------------------------------------- parameterisations
@dataclass(frozen=True)
class Trainable:
    """What a cell trains: initial values (C, P) laid out by ``layout``, the mask of
    trainable entries, how the named views make the adapted model, and optionally a
    hand-written ``value_and_grad(flat, x, y) -> (loss (C,), grad (C, P))``, and the native
    step that replaces loss, gradient, Adam and validation where it applies."""

    layout: Layout
    init: Tensor
    mask: Tensor
    build: Callable[[dict[str, Tensor]], Model]
    value_and_grad: Optional[Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = None
    native_step: Optional[native.NativeStep] = None

    @property
    def engine(self) -> str:
        return "native" if self.native_step is not None else "torch"

    def model(self, flat: Tensor) -> Model:
        return self.build(self.layout.views(flat))


def _trainable(init: dict[str, Tensor], masks: dict[str, Tensor], build, value_and_grad=None) -> Trainable:
    layout = Layout({k: tuple(v.shape[1:]) for k, v in init.items()})
    mask = layout.flatten({k: masks[k].expand_as(init[k]) for k in init})
    return Trainable(layout, layout.flatten(init), mask, build, value_and_grad)


def stack_models(models: list[Model]) -> Model:
    first = models[0]
    if isinstance(first, FNN):
        biases = None if first.biases is None else torch.stack([m.biases for m in models])
        return replace(first, weights=torch.stack([m.weights for m in models]), biases=biases)
    return replace(first, **{k: torch.stack([getattr(m, k) for m in models]) for k in first.tensors()})


def stack_lora(adapters: list[LoRA]) -> LoRA:
    stack = lambda field: {k: torch.stack([getattr(a, field)[k] for a in adapters]) for k in getattr(adapters[0], field)}
    return LoRA(stack("a"), stack("b"), stack("mask"))


def fnn_value_and_grad(model: FNN, x: Tensor, y: Tensor, task: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Loss (C,) and its gradients w.r.t. the stacked weights (C, L, D, D) and biases
    (C, L, D), by hand: the same products autograd would do, without its bookkeeping
    (this is the hot loop of the whole benchmark).
    """
    weights, biases, relu = model.weights, model.biases, model.activation == "relu"
    C, L = weights.shape[0], weights.shape[1]
    outputs = []
    h = x
    for layer in range(L):
        bias = None if biases is None else biases[:, layer]
        if h.dim() == 2:  # a batch shared by the cell
            h = shared_input_layer(h, weights[:, layer], bias)
        elif bias is not None:
            h = torch.baddbmm(bias.unsqueeze(1), h, weights[:, layer].transpose(1, 2))
        else:
            h = torch.bmm(h, weights[:, layer].transpose(1, 2))
        if relu:
            h = h.clamp_min_(0)
        outputs.append(h)
    if task == "regression":  # d mean((h - y)^2) / dh, without autograd
        residual = h - y
        loss = (residual * residual).flatten(1).mean(dim=1)
        grad = residual.mul_(2.0 / residual[0].numel())
    else:
        with torch.enable_grad():
            out = h.detach().requires_grad_(True)
            loss = data.task_loss(out, y, task)
            (grad,) = torch.autograd.grad(loss.sum(), [out])
    d_weights, d_biases = [], []
    for layer in reversed(range(L)):
        if relu:
            grad = torch.ops.aten.threshold_backward(grad, outputs[layer], 0)
        previous = outputs[layer - 1] if layer > 0 else x
        if previous.dim() == 2:  # dW_c = g_c^T x for all c as one (D, B) x (B, C*D) product
            stacked = grad.transpose(0, 1).reshape(previous.shape[0], C * grad.shape[-1])
            d_weights.append((previous.t() @ stacked).view(-1, C, grad.shape[-1]).permute(1, 2, 0))
        else:
            d_weights.append(torch.bmm(grad.transpose(1, 2), previous))
        if biases is not None:
            d_biases.append(grad.sum(dim=1))
        if layer > 0:
            grad = torch.bmm(grad, weights[:, layer])
    d_weights = torch.stack(d_weights[::-1], dim=1)
    d_biases = torch.stack(d_biases[::-1], dim=1) if biases is not None else None
    return loss.detach(), d_weights, d_biases


def fnn_trainable(cfgs: list[RunConfig], frozen: FNN, lora: LoRA) -> Trainable:
    """LoRA on every layer (method 'sgd') or full final layers (method 'flt').

    frozen: stacked (C, L, D, D); lora: stacked initial adapters.
    """
    C = len(cfgs)
    like = frozen.weights
    has_bias = frozen.biases is not None
    task = cfgs[0].task
    if cfgs[0].method == "flt":
        L = frozen.depth
        layer_on = torch.tensor(
            [[1.0 if layer >= L - c.last_layers else 0.0 for layer in range(L)] for c in cfgs],
            dtype=like.dtype,
            device=like.device,
        )
        init = {"weights": frozen.weights.clone(), "biases": frozen.biases.clone()}
        masks = {"weights": layer_on.view(C, L, 1, 1), "biases": layer_on.view(C, L, 1)}
        build = lambda p: replace(frozen, weights=p["weights"], biases=p["biases"])

        def value_and_grad(layout: Layout, flat: Tensor, x: Tensor, y: Tensor):
            loss, d_weights, d_biases = fnn_value_and_grad(build(layout.views(flat)), x, y, task)
            return loss, layout.flatten({"weights": d_weights, "biases": d_biases})

        return _with_native(_trainable(init, masks, build, value_and_grad), cfgs[0], _fnn_step(cfgs[0], frozen, None))

    init = {"a": lora.a["weights"].clone(), "b": lora.b["weights"].clone()}
    column = lora.mask["weights"].unsqueeze(-2)  # (C, L, 1, D)
    masks = {"a": column, "b": column}
    if has_bias:
        init["biases"] = frozen.biases.clone()
        masks["biases"] = torch.tensor([float(c.tune_bias) for c in cfgs], dtype=like.dtype, device=like.device).view(C, 1, 1)

    def build(p: dict[str, Tensor]) -> FNN:
        weights = frozen.weights + p["a"] @ p["b"].transpose(-1, -2)
        return replace(frozen, weights=weights, biases=p.get("biases", frozen.biases))

    def value_and_grad(layout: Layout, flat: Tensor, x: Tensor, y: Tensor):
        p = layout.views(flat)
        loss, d_weights, d_biases = fnn_value_and_grad(build(p), x, y, task)
        # W = W0 + A B^T: dA = dW B, dB = dW^T A.
        grads = {"a": d_weights @ p["b"], "b": d_weights.transpose(-1, -2) @ p["a"]}
        if has_bias:
            grads["biases"] = d_biases
        return loss, layout.flatten(grads)

    return _with_native(_trainable(init, masks, build, value_and_grad), cfgs[0], _fnn_step(cfgs[0], frozen, frozen.weights))


def _with_native(trainable: Trainable, cfg: RunConfig, make_step: Callable[[Layout], native.NativeStep]) -> Trainable:
    """Attaches the native step, ``make_step(layout)``, when the engine setting and the
    cell allow it."""
    if trainable.init.dtype != torch.float32 or not native.use_native(cfg, trainable.init.device):
        return trainable
    return replace(trainable, native_step=make_step(trainable.layout))


def _fnn_step(cfg: RunConfig, frozen: FNN, frozen_weights: Optional[Tensor]):
    """The native FNN step's maker; ``frozen_weights`` None: final-layer tuning."""
    return lambda layout: native.FNNStep(
        frozen_weights=frozen_weights,
        offsets=layout.offsets,
        n_param=layout.size,
        depth=frozen.depth,
        width=frozen.weights.shape[-1],
        has_bias=frozen.biases is not None,
        relu=frozen.activation == "relu",
        task=cfg.task,
        full=frozen_weights is None,
    )


def tfn_trainable(cfgs: list[RunConfig], frozen: TFN, lora: LoRA) -> Trainable:
    """LoRA on W_Q, W_K, W_V, W_O of every head and block, the last W_2 and the output
    layer; with tune_bias also the feed-forward biases (the authors' published code)."""
    C = len(cfgs)
    init, masks = {}, {}
    for name in lora.a:
        init[f"a_{name}"] = lora.a[name].clone()
        init[f"b_{name}"] = lora.b[name].clone()
        masks[f"a_{name}"] = masks[f"b_{name}"] = lora.mask[name].unsqueeze(-2)
    tune = torch.tensor([float(c.tune_bias) for c in cfgs], dtype=frozen.b1.dtype, device=frozen.b1.device).view(C, 1, 1)
    for name in ("b1", "b2"):
        init[name] = getattr(frozen, name).clone()
        masks[name] = tune

    def build(p: dict[str, Tensor]) -> TFN:
        adapters = LoRA({k: p[f"a_{k}"] for k in lora.a}, {k: p[f"b_{k}"] for k in lora.a}, lora.mask)
        return apply_lora(replace(frozen, b1=p["b1"], b2=p["b2"]), adapters)

    def make_step(layout: Layout) -> native.TFNStep:
        return native.TFNStep(frozen=frozen.tensors(), offsets=layout.offsets, n_param=layout.size,
                              depth=frozen.depth, heads=frozen.n_head, width=frozen.width)

    return _with_native(_trainable(init, masks, build), cfgs[0], make_step)


def autograd_value_and_grad(trainable: Trainable, flat: Tensor, x: Tensor, y: Tensor, task: str, dropout=None):
    leaf = flat.detach().requires_grad_(True)
    loss = data.task_loss(forward(trainable.model(leaf), x, dropout), y, task)
    # Non-finite losses are masked out so they cannot reach other configs' gradients.
    total = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)).sum()
    (grad,) = torch.autograd.grad(total, [leaf])
    return loss.detach(), grad


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
        from ..core import rng

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

        def drop(x: Tensor, token_major: bool) -> Tensor:
            return torch.stack([d(x[c].cpu(), token_major) for c, d in enumerate(drops)]).to(x.device)

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
    # (native.applies keeps cells with dropout, the TFN residual variant, on torch.)
    use_native = trainable.native_step is not None
    threads = torch.get_num_threads()
    if use_native:
        # The native step runs its own threads; torch's OpenMP workers, woken by the small
        # bookkeeping ops between steps, would spin on the same cores.
        torch.set_num_threads(1)
    try:
        return _train_loop(cfgs, trainable, stream, progress, use_native, threads)
    finally:
        torch.set_num_threads(threads)


def _train_loop(cfgs, trainable, stream, progress, use_native: bool, threads: int) -> TrainResult:
    cfg = cfgs[0]
    task = cfg.task
    C = len(cfgs)
    flat = trainable.init.clone()
    device = flat.device
    optimizer = BatchedAdam([c.lr for c in cfgs], [c.weight_decay for c in cfgs], trainable.mask)
    # The reference protocol tracks improvements the authors' way (accuracy for the
    # classification tasks); the paper protocol always selects by validation loss.
    by_accuracy = cfg.protocol == "reference" and task != "regression"
    inf = torch.full((C,), math.inf, dtype=torch.float64, device=device)
    best = flat.clone()
    best_val, best_metric = inf.clone(), inf.clone()
    best_step = torch.zeros(C, dtype=torch.long, device=device)
    diverged_step = torch.full((C,), -1, dtype=torch.long, device=device)
    active = torch.ones(C, dtype=torch.bool, device=device)
    last_val = last_train = inf.clone()
    curve_steps, train_curve, val_curve = [], [], []

    for step in range(1, cfg.n_epochs + 1):
        x, y = stream.train_batch(step)
        dropout = stream.dropout()
        if use_native:
            # Loss, gradient, Adam and validation loss in one call; the update skips
            # configs that are inactive or whose loss is not finite, as below.
            vx, vy = stream.val_batch()
            loss, val = optimizer.native_step(trainable.native_step, flat, (x, y), (vx, vy), active, threads)
        elif trainable.value_and_grad is not None and dropout is None:
            loss, grad = trainable.value_and_grad(trainable.layout, flat, x, y)
        else:
            loss, grad = autograd_value_and_grad(trainable, flat, x, y, task, dropout)
        finite = torch.isfinite(loss)
        diverged_step = torch.where(active & ~finite, step, diverged_step)
        active = active & finite
        with torch.no_grad():
            if use_native:
                val = val.to(torch.float64)
                vpred = forward(trainable.model(flat), vx) if by_accuracy else None
            else:
                flat = optimizer.step(flat, grad, active)
                vx, vy = stream.val_batch()
                vpred = forward(trainable.model(flat), vx)
                val = data.task_loss(vpred, vy, task).to(torch.float64)
            metric = -data.accuracy(vpred, vy, task) if by_accuracy else val
            improved = active & (metric < best_metric)
            if step == 1 and cfg.protocol == "reference":
                improved = active.clone()  # the authors' first validation always counts
            best_metric = torch.where(improved, metric, best_metric)
            best_val = torch.where(improved, val, best_val)
            best_step = torch.where(improved, step, best_step)
            if best.is_cuda:  # in place, and no host sync (nonzero would wait for the GPU)
                torch.where(improved.view(-1, 1), flat, best, out=best)
            else:  # only the improved rows: a full (C, P) pass costs ~1/4 of a native step
                rows = improved.nonzero().flatten()
                best.index_copy_(0, rows, flat.index_select(0, rows))
            stream.observe(improved)
            last_val, last_train = val, loss.to(torch.float64)
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
