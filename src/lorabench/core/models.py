"""The paper's two model families as plain tensors and pure forward functions.

Weights are kept as tensors rather than ``nn.Module``s so that one forward pass can
evaluate many configurations at once: every weight may carry leading batch dimensions
(one entry per configuration, shape ``(C, ...)``) which broadcast against the inputs.

Conventions (the paper's, and the authors' code's):

* FNN of width D and depth L: ``x_l = act(W_l x_{l-1} + b_l)`` for l = 1..L, the
  activation applied after the last layer too. Inputs are rows: ``x`` has shape (B, D).
* TFN with H heads, L blocks, sequence length N. Inputs are (B, D, N) with tokens as
  columns. Block l: ``A = sum_h W_O^h W_V^h X softmax_col((W_K^h X)^T W_Q^h X)``
  (no 1/sqrt(D) scaling; softmax over the key index so every query column sums to one),
  ``Z = W_2 ReLU(W_1 A + b_1) + b_2``; output ``W_o Z_L``. The optional ``residual``
  variant (the authors' ``better_optim``) adds residual connections, a parameter-free
  LayerNorm over D and dropout after each sublayer (post-norm). The optional ``prenorm``
  variant is the usual pre-norm block, without dropout: ``X + Attn(LN(X))``, then
  ``Y + FFN(LN(Y))``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from . import double_word

ACTIVATIONS = ("relu", "linear")

# A dropout callback receives the tensor to drop, laid out (..., B, D, N), and whether the
# authors' tensor at that point is stored token-major (B, N, D) in memory, which fixes the
# order its mask is drawn in; it returns the tensor masked and rescaled.
Dropout = Optional[Callable[[Tensor, bool], Tensor]]


@dataclass(frozen=True)
class FNN:
    """Fully connected network.

    weights: (..., L, D, D); biases: (..., L, D) or None; activation: 'relu' | 'linear'.
    """

    weights: Tensor
    biases: Optional[Tensor]
    activation: str = "relu"

    @property
    def depth(self) -> int:
        return self.weights.shape[-3]

    @property
    def width(self) -> int:
        return self.weights.shape[-1]

    def to(self, device) -> "FNN":
        return map_tensors(self, lambda t: t.to(device))


@dataclass(frozen=True)
class DoubleWordFNN:
    """An FNN of one configuration whose weights and biases are double words hi + lo
    (core/double_word.py), evaluated with about twice the precision of their dtype: the
    construction's groups of many layers (core/construction.py) need it."""

    hi: FNN
    lo: FNN

    @property
    def depth(self) -> int:
        return self.hi.depth

    @property
    def width(self) -> int:
        return self.hi.width

    def to(self, device) -> "DoubleWordFNN":
        return map_tensors(self, lambda t: t.to(device))


def double_word_forward(model: DoubleWordFNN, x: Tensor) -> Tensor:
    """Output of the FNN, rounded to x's dtype; x: (B, D) -> (B, D)."""
    z = double_word.from_float(x)
    for layer in range(model.depth):
        z = double_word.matvec((model.hi.weights[layer], model.lo.weights[layer]), z)
        if model.hi.biases is not None:
            z = double_word.add(z, (model.hi.biases[layer], model.lo.biases[layer]))
        z = double_word.relu(z) if model.hi.activation == "relu" else z
    return z[0]


def device_of(model) -> torch.device:
    """Where a model's weights live (either family, stacked or not)."""
    return (model.weights if isinstance(model, FNN) else model.wq).device


def map_tensors(model, fn: Callable[[Tensor], Tensor]):
    """The model with ``fn`` applied to every weight and bias (cast, move, slice)."""
    if isinstance(model, DoubleWordFNN):
        return replace(model, hi=map_tensors(model.hi, fn), lo=map_tensors(model.lo, fn))
    if isinstance(model, FNN):
        return replace(model, weights=fn(model.weights), biases=None if model.biases is None else fn(model.biases))
    return replace(model, **{k: fn(v) for k, v in model.tensors().items()})


def activate(x: Tensor, activation: str) -> Tensor:
    return torch.relu(x) if activation == "relu" else x


def fnn_forward(model: FNN, x: Tensor) -> Tensor:
    """Output of the FNN; x: (..., B, D) -> (..., B, D).

    Leading dimensions of the weights and of x broadcast (per-configuration weights with a
    shared input batch give one output per configuration).
    """
    stacked = model.weights.dim() == 4 and x.dim() in (2, 3)
    for layer in range(model.depth):
        weight = model.weights[..., layer, :, :]
        bias = None if model.biases is None else model.biases[..., layer, :]
        if stacked and x.dim() == 2:
            x = shared_input_layer(x, weight, bias)
        elif stacked and bias is not None:
            x = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(-1, -2))
        else:
            x = x @ weight.transpose(-1, -2)
            if bias is not None:
                x = x + bias.unsqueeze(-2)
        # In place: neither product needs its output for the backward pass.
        x = torch.relu_(x) if model.activation == "relu" else x
    return x


def shared_input_layer(x: Tensor, weights: Tensor, biases: Optional[Tensor]) -> Tensor:
    """``x W_c^T + b_c`` for every configuration c of a batch x shared by all of them.

    x: (B, D); weights: (C, D, D); biases: (C, D) -> (C, B, D) (a strided view of one
    (B, C*D) product: a single large matrix product instead of C small ones).
    """
    C, D_out, D_in = weights.shape
    stacked_t = weights.permute(2, 0, 1).reshape(D_in, C * D_out)
    out = (x @ stacked_t).view(x.shape[0], C, D_out).transpose(0, 1)
    return out if biases is None else out + biases.unsqueeze(1)


@dataclass(frozen=True)
class TFN:
    """Transformer network (H heads, L blocks, width D).

    wq, wk, wv, wo: (..., L, H, D, D); w1, w2: (..., L, D, D); b1, b2: (..., L, D);
    w_out: (..., D, D). ``residual`` and ``dropout`` select the authors' optional
    residual + LayerNorm + dropout variant; ``prenorm`` the pre-norm residual block.
    """

    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    w_out: Tensor
    residual: bool = False
    dropout: float = 0.0
    prenorm: bool = False

    @property
    def depth(self) -> int:
        return self.wq.shape[-4]

    @property
    def n_head(self) -> int:
        return self.wq.shape[-3]

    @property
    def width(self) -> int:
        return self.wq.shape[-1]

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def to(self, device) -> "TFN":
        return map_tensors(self, lambda t: t.to(device))


def _layer_norm_over_width(h: Tensor) -> Tensor:
    """LayerNorm over D for hidden states laid out (..., D, B, N).

    The authors' LayerNorm keeps its initial affine parameters (1, 0): they are never
    trained, so a parameter-free normalisation is the same function.
    """
    mean = h.mean(dim=-3, keepdim=True)
    centred = h - mean
    variance = (centred * centred).mean(dim=-3, keepdim=True)
    return centred / torch.sqrt(variance + 1e-5)


def tfn_forward(model: TFN, x: Tensor, dropout: Dropout = None) -> Tensor:
    """Output of the TFN; x: (..., B, D, N) -> (..., B, D, N).

    Weights may be stacked per configuration (a leading C) with x shared (B, D, N) or
    per configuration (C, B, D, N). Internally hidden states are laid out (C, D, B, N) so
    that every weight multiplies all B*N tokens in one matrix product, and each head's
    score matrix uses the merged products W_K^T W_Q and W_O W_V (the same function as
    the paper's per-factor form). ``dropout(t, token_major)`` is only used by the
    residual variant in training; pass None to evaluate.
    """
    stacked = model.wq.dim() == 5
    if not stacked and x.dim() > 3:  # one model, several input sets: fold them into B
        out = tfn_forward(model, x.reshape(-1, *x.shape[-2:]), dropout)
        return out.reshape(*x.shape[:-2], *out.shape[-2:])
    c = "c" if stacked else ""
    h = x.movedim(-2, -3)  # (..., D, B, N)

    def drop(t: Tensor, token_major: bool) -> Tensor:
        if not (model.residual and dropout is not None):
            return t
        return dropout(t.movedim(-3, -2), token_major).movedim(-2, -3)

    for layer in range(model.depth):
        hc = "c" if h.dim() == 4 else ""
        pick = lambda w: w[..., layer, :, :, :]
        scores_w = pick(model.wk).transpose(-1, -2) @ pick(model.wq)  # (..., H, D, D)
        values_w = pick(model.wo) @ pick(model.wv)
        seen = _layer_norm_over_width(h) if model.prenorm else h
        queries = torch.einsum(f"{c}hed,{hc}dbn->{c}hebn", scores_w, seen)
        scores = torch.einsum(f"{hc}dbk,{c}hdbq->{c}hbkq", seen, queries)
        weights = torch.softmax(scores, dim=-2)  # over the keys: each query column sums to 1
        values = torch.einsum(f"{c}hed,{hc}dbn->{c}hebn", values_w, seen)
        attended = torch.einsum(f"{c}hdbk,{c}hbkq->{c}dbq", values, weights)
        if model.residual:
            attended = _layer_norm_over_width(h + drop(attended, False))
        elif model.prenorm:
            attended = h + attended
        w1, w2 = model.w1[..., layer, :, :], model.w2[..., layer, :, :]
        b1, b2 = model.b1[..., layer, :, None, None], model.b2[..., layer, :, None, None]
        fed = _layer_norm_over_width(attended) if model.prenorm else attended
        hidden = torch.relu(torch.einsum(f"{c}ed,{c}dbn->{c}ebn", w1, fed) + b1)
        out = torch.einsum(f"{c}ed,{c}dbn->{c}ebn", w2, hidden) + b2
        if model.residual:
            out = _layer_norm_over_width(attended + drop(out, True))
        elif model.prenorm:
            out = attended + out
        h = out
    hc = "c" if h.dim() == 4 else ""
    return torch.einsum(f"{c}ed,{hc}dbn->{c}ebn", model.w_out, h).movedim(-3, -2)


def forward(model, x: Tensor, dropout: Dropout = None) -> Tensor:
    """Either family's forward pass (``dropout`` reaches only the TFN)."""
    if isinstance(model, DoubleWordFNN):
        return double_word_forward(model, x)
    return fnn_forward(model, x) if isinstance(model, FNN) else tfn_forward(model, x, dropout)
