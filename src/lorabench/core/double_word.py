"""Double-word arithmetic: a value is the unevaluated sum hi + lo of two floats of one
dtype, with about twice its precision.

The error-free transformations (Dekker 1971; Knuth, TAOCP vol. 2, Sec. 4.2.2) are exact
in IEEE binary arithmetic with round-to-nearest; the products of a matrix and vectors sum
their terms as Ogita, Rump and Oishi's Sum2 does (SIAM J. Sci. Comput. 26, 2005), as
accurate as in twice the precision. Everything is elementwise on tensors, so one call
handles a batch of vectors.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

DoubleWord = tuple[Tensor, Tensor]  # (hi, lo)


def two_sum(a: Tensor, b: Tensor) -> DoubleWord:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: Tensor) -> DoubleWord:
    digits = 1 - round(math.log2(torch.finfo(a.dtype).eps))  # 53 for float64
    t = (2.0 ** -(-digits // 2) + 1) * a
    hi = t - (t - a)
    return hi, a - hi


def two_prod(a: Tensor, b: Tensor) -> DoubleWord:
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def add(x: DoubleWord, y: Union[Tensor, DoubleWord]) -> DoubleWord:
    """x + y, y a double word or a plain float."""
    if isinstance(y, Tensor):
        s, e = two_sum(x[0], y)
        return two_sum(s, e + x[1])
    s, e = two_sum(x[0], y[0])
    return two_sum(s, e + (x[1] + y[1]))


def neg(x: DoubleWord) -> DoubleWord:
    return -x[0], -x[1]


def relu(x: DoubleWord) -> DoubleWord:
    keep = x[0] > 0
    return torch.where(keep, x[0], 0.0), torch.where(keep, x[1], 0.0)


def matvec(m: Union[Tensor, DoubleWord], x: DoubleWord) -> DoubleWord:
    """m x for a matrix m (D_out, D_in), plain or double word, and double-word vectors
    x (..., D_in); returns (..., D_out)."""
    m_hi, m_lo = (m, None) if isinstance(m, Tensor) else m
    x_hi, x_lo = x[0].unsqueeze(-2), x[1].unsqueeze(-2)
    p, e = two_prod(m_hi, x_hi)
    small = e + m_hi * x_lo
    if m_lo is not None:
        small = small + m_lo * x_hi
    s = torch.zeros_like(p[..., 0])
    compensation = small.sum(-1)
    for k in range(p.shape[-1]):
        s, err = two_sum(s, p[..., k])
        compensation = compensation + err
    return two_sum(s, compensation)


def from_float(x: Tensor) -> DoubleWord:
    return x, torch.zeros_like(x)
