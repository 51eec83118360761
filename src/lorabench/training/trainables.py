"""What a cell trains: its parameters laid out flat, the adapted model they make, and
their loss and gradient.

A cell is a set of configurations that share a seed and a frozen/target model family
(they may differ in rank, learning rate, weight decay, bias tuning, rank allocation and
final-layer-tuning depth). Their trainable tensors are stacked along a leading
configuration dimension C; one forward/backward pass on the shared batch gives every
configuration its own gradient (the summed loss separates, as no parameter is shared).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import native
from ..core import data
from ..core.adapters import LoRA, apply_lora
from ..core.config import RunConfig
from ..core.models import FNN, TFN, device_of, forward, shared_input_layer
from ..core.protocols import protocol_of
from .optimiser import Layout

Model = Union[FNN, TFN]


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
    value_and_grad: Optional[Callable[[Layout, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = None
    native_step: Optional[native.NativeStep] = None
    # The loss alone, (layout, flat, x, y) -> (C,), where it has a faster way than torch's
    # forward pass; and whether value_and_grad and loss are native (native_gradients).
    loss: Optional[Callable[[Layout, Tensor, Tensor, Tensor], Tensor]] = None
    native_gradients: bool = False

    @property
    def engine(self) -> str:
        return "native" if self.native_step is not None else "torch"

    @property
    def engine_label(self) -> str:
        """What trained it, as result rows say: the native step, torch with the native
        gradients of the adapted transformer (native_gradients), or torch."""
        if self.native_step is not None:
            return native.engine_name()
        return f"{native.engine_name()}-gradients" if self.native_gradients else "torch"

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


def fnn_value_and_grad(model: FNN, x: Tensor, y: Tensor, task: str,
                       classification_loss: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
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
            loss = data.task_loss(out, y, task, classification_loss)
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


def fnn_final_layers_trainable(cfgs: list[RunConfig], frozen: FNN) -> Trainable:
    """The last ``last_layers`` layers' weights and biases in full (method 'flt');
    frozen: stacked (C, L, D, D)."""
    C, L = len(cfgs), frozen.depth
    task, classification_loss = cfgs[0].task, protocol_of(cfgs[0]).classification_loss
    layer_on = torch.tensor([[1.0 if layer >= L - c.last_layers else 0.0 for layer in range(L)] for c in cfgs],
                            dtype=frozen.weights.dtype, device=frozen.weights.device)
    init = {"weights": frozen.weights.clone(), "biases": frozen.biases.clone()}
    masks = {"weights": layer_on.view(C, L, 1, 1), "biases": layer_on.view(C, L, 1)}
    build = lambda p: replace(frozen, weights=p["weights"], biases=p["biases"])

    def value_and_grad(layout: Layout, flat: Tensor, x: Tensor, y: Tensor):
        loss, d_weights, d_biases = fnn_value_and_grad(build(layout.views(flat)), x, y, task, classification_loss)
        return loss, layout.flatten({"weights": d_weights, "biases": d_biases})

    return _with_native(_trainable(init, masks, build, value_and_grad), cfgs[0], _fnn_step(cfgs[0], frozen, None))


def fnn_lora_trainable(cfgs: list[RunConfig], frozen: FNN, lora: LoRA) -> Trainable:
    """LoRA on every layer, and the biases with tune_bias (method 'sgd').

    frozen: stacked (C, L, D, D); lora: stacked initial adapters.
    """
    C = len(cfgs)
    like = frozen.weights
    has_bias = frozen.biases is not None
    task, classification_loss = cfgs[0].task, protocol_of(cfgs[0]).classification_loss
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
        loss, d_weights, d_biases = fnn_value_and_grad(build(p), x, y, task, classification_loss)
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
        classification_loss=protocol_of(cfg).classification_loss,
        full=frozen_weights is None,
    )


def tfn_lora_trainable(cfgs: list[RunConfig], frozen: TFN, lora: LoRA) -> Trainable:
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
                              depth=frozen.depth, heads=frozen.n_head, width=frozen.width,
                              tokens=cfgs[0].seq_length, prenorm=frozen.prenorm)

    return _with_native(_trainable(init, masks, build), cfgs[0], make_step)


def generic_trainable(method, cfgs: list[RunConfig], frozen: Model, models: list) -> Trainable:
    """A gradient method's cell from its ``start`` and ``adapt`` (methods/base.py): the
    configurations' starting points stacked along C, trained with autograd on torch."""
    device = device_of(frozen)
    starts = [method.start(c, m) for c, m in zip(cfgs, models)]

    def stacked(part: str) -> dict[str, Tensor]:
        return {name: torch.stack([getattr(s, part)[name] for s in starts]).to(device) for name in getattr(starts[0], part)}

    init, fixed = stacked("params"), stacked("fixed")
    masks = {name: torch.stack([s.masks[name].expand_as(s.params[name]) for s in starts]).to(device) for name in init}
    trainable = _trainable(init, masks, lambda p: method.adapt(frozen, p, fixed))
    if isinstance(frozen, TFN) and trainable.init.dtype == torch.float32 and native.use_native(cfgs[0], device):
        return with_native_tfn_gradients(trainable)
    return trainable


def with_native_tfn_gradients(trainable: Trainable) -> Trainable:
    """A transformer trainable whose loss and gradient come from the native pass over the
    adapted model's whole weights (native.tfn_gradients); autograd maps those onto the
    trainable's parameters through ``build`` alone, a few small matrix products, instead
    of through the transformer's forward pass."""

    def value_and_grad(layout: Layout, flat: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        leaf = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            model = trainable.build(layout.views(leaf))
        loss, dense = native.tfn_gradients(model, x, y, threads=torch.get_num_threads())
        adapted = [(t, dense[name].to(t.dtype)) for name, t in model.tensors().items() if t.requires_grad]
        if not adapted:
            return loss, torch.zeros_like(flat)
        (grad,) = torch.autograd.grad([t for t, _ in adapted], [leaf], grad_outputs=[g for _, g in adapted],
                                      allow_unused=True)
        return loss, torch.zeros_like(flat) if grad is None else grad

    def loss(layout: Layout, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        model = trainable.build(layout.views(flat))
        return native.tfn_gradients(model, x, y, threads=torch.get_num_threads(), with_grad=False)[0]

    return replace(trainable, value_and_grad=value_and_grad, loss=loss, native_gradients=True)


def target_outputs_for(trainable: Trainable, target: Model) -> Optional[Callable[[Tensor], Tensor]]:
    """How a cell's stream evaluates its target: a native transformer cell with the native
    forward pass (the reference stream evaluates new batches for many configurations every
    step); None: torch's forward."""
    if not isinstance(target, TFN) or not isinstance(trainable.native_step, native.TFNStep):
        return None
    return partial(native.tfn_outputs, target)


def autograd_value_and_grad(trainable: Trainable, flat: Tensor, x: Tensor, y: Tensor, task: str,
                            classification_loss: str, dropout=None):
    leaf = flat.detach().requires_grad_(True)
    loss = data.task_loss(forward(trainable.model(leaf), x, dropout), y, task, classification_loss)
    # Non-finite losses are masked out so they cannot reach other configs' gradients.
    total = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)).sum()
    (grad,) = torch.autograd.grad(total, [leaf])
    return loss.detach(), grad
