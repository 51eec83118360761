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
  LayerNorm over D and dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "linear")

# A dropout callback receives the tensor to drop and returns it masked and rescaled.
Dropout = Optional[Callable[[Tensor], Tensor]]


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
        return replace(
            self,
            weights=self.weights.to(device),
            biases=None if self.biases is None else self.biases.to(device),
        )


def activate(x: Tensor, activation: str) -> Tensor:
    return torch.relu(x) if activation == "relu" else x


def fnn_forward(model: FNN, x: Tensor) -> Tensor:
    """Output of the FNN; x: (..., B, D) -> (..., B, D).

    Leading dimensions of the weights and of x broadcast (per-configuration weights with a
    shared input batch give one output per configuration).
    """
    for layer in range(model.depth):
        weight = model.weights[..., layer, :, :]
        x = x @ weight.transpose(-1, -2)
        if model.biases is not None:
            x = x + model.biases[..., layer, None, :]
        x = activate(x, model.activation)
    return x


@dataclass(frozen=True)
class TFN:
    """Transformer network (H heads, L blocks, width D).

    wq, wk, wv, wo: (..., L, H, D, D); w1, w2: (..., L, D, D); b1, b2: (..., L, D);
    w_out: (..., D, D). ``residual`` and ``dropout`` select the authors' optional
    residual + LayerNorm + dropout variant.
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
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})


def _layer_norm_over_width(x: Tensor) -> Tensor:
    # The authors' LayerNorm keeps its initial affine parameters (1, 0): they are never
    # trained, so a parameter-free normalisation over D is the same function.
    return torch.nn.functional.layer_norm(x.transpose(-1, -2), (x.shape[-2],)).transpose(-1, -2)


def attention(wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor, x: Tensor) -> Tensor:
    """Multi-head attention of one block, summed over heads.

    wq..wo: (..., H, D, D); x: (..., B, D, N) -> (..., B, D, N).
    """
    x = x.unsqueeze(-4)  # (..., 1, B, D, N): broadcast over heads
    heads = lambda w: w.unsqueeze(-3)  # (..., H, 1, D, D): broadcast over the batch
    query = heads(wq) @ x
    key = heads(wk) @ x
    scores = key.transpose(-1, -2) @ query  # (..., H, B, N_key, N_query)
    weights = torch.softmax(scores, dim=-2)
    out = heads(wo) @ ((heads(wv) @ x) @ weights)
    return out.sum(dim=-4)


def tfn_forward(model: TFN, x: Tensor, dropout: Dropout = None) -> Tensor:
    """Output of the TFN; x: (..., B, D, N) -> (..., B, D, N).

    ``dropout`` is only used by the residual variant in training mode; pass None to
    evaluate.
    """
    drop = dropout if (model.residual and dropout is not None) else (lambda t: t)
    per_block = lambda w, layer: w[..., layer, :, :]
    for layer in range(model.depth):
        attended = attention(
            model.wq[..., layer, :, :, :],
            model.wk[..., layer, :, :, :],
            model.wv[..., layer, :, :, :],
            model.wo[..., layer, :, :, :],
            x,
        )
        if model.residual:
            attended = _layer_norm_over_width(x + drop(attended))
        hidden = torch.relu(
            per_block(model.w1, layer).unsqueeze(-3) @ attended
            + model.b1[..., layer, None, :, None]
        )
        out = per_block(model.w2, layer).unsqueeze(-3) @ hidden + model.b2[..., layer, None, :, None]
        if model.residual:
            out = _layer_norm_over_width(attended + drop(out))
        x = out
    return model.w_out.unsqueeze(-3) @ x
