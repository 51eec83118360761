"""Double-word arithmetic (core/double_word.py) against exact rational arithmetic."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import torch

from lorabench.core import double_word as dw
from lorabench.core.models import FNN, DoubleWordFNN, fnn_forward, forward

F64 = torch.float64


def exact(x) -> Fraction:
    return Fraction(float(x))


def test_error_free_sum_and_product():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, generator=gen, dtype=F64) * 10.0 ** torch.randint(-8, 9, (200,), generator=gen)
    b = torch.randn(200, generator=gen, dtype=F64) * 10.0 ** torch.randint(-8, 9, (200,), generator=gen)
    s, e = dw.two_sum(a, b)
    p, f = dw.two_prod(a, b)
    for i in range(200):
        assert exact(s[i]) + exact(e[i]) == exact(a[i]) + exact(b[i])
        assert exact(p[i]) + exact(f[i]) == exact(a[i]) * exact(b[i])


def test_matvec_matches_exact_arithmetic():
    """Plain and double-word matrices, one vector and a batch: as accurate as in twice
    the working precision, a few eps^2 of the terms' size."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=gen, dtype=F64) * 10.0 ** torch.randint(-6, 7, (8, 8), generator=gen)
    m_lo = m * 2.0**-60 * torch.randn(8, 8, generator=gen, dtype=F64)
    hi = torch.randn(3, 8, generator=gen, dtype=F64) * 1e12
    lo = hi * 2.0**-60 * torch.randn(3, 8, generator=gen, dtype=F64)
    for matrix, m_low in ((m, torch.zeros_like(m)), ((m, m_lo), m_lo)):
        batch = dw.matvec(matrix, (hi, lo))
        for n in range(3):
            one = dw.matvec(matrix, (hi[n], lo[n]))
            for u in range(8):
                terms = [(exact(m[u, k]) + exact(m_low[u, k])) * (exact(hi[n, k]) + exact(lo[n, k])) for k in range(8)]
                bound = 8 * 2.0**-104 * sum(abs(t) for t in terms)
                for out in ((batch[0][n, u], batch[1][n, u]), (one[0][u], one[1][u])):
                    assert abs(exact(out[0]) + exact(out[1]) - sum(terms)) <= bound


def test_add_and_relu():
    x = (torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([2.0**-60, 2.0**-60], dtype=F64))
    s = dw.add(x, (torch.tensor([2.0**-70, 1.0], dtype=F64), torch.tensor([0.0, 2.0**-61], dtype=F64)))
    assert exact(s[0][0]) + exact(s[1][0]) == 1 + Fraction(2) ** -60 + Fraction(2) ** -70
    assert exact(s[0][1]) + exact(s[1][1]) == Fraction(3, 2) * Fraction(2) ** -60
    r = dw.relu(x)
    assert r[0].tolist() == [1.0, 0.0] and r[1].tolist() == [2.0**-60, 0.0]


def test_double_word_fnn_forward():
    """With zero low parts: the float64 FNN's outputs to float64 rounding; the low parts
    count: an FNN and the same with its weights split into hi + lo agree."""
    gen = torch.Generator().manual_seed(1)
    model = FNN(torch.randn(3, 5, 5, generator=gen, dtype=F64), torch.randn(3, 5, generator=gen, dtype=F64))
    x = torch.randn(40, 5, generator=gen, dtype=F64)
    zero = DoubleWordFNN(model, FNN(torch.zeros_like(model.weights), torch.zeros_like(model.biases)))
    torch.testing.assert_close(forward(zero, x), fnn_forward(model, x), rtol=1e-13, atol=1e-13)
    split = model.weights.float().double()
    pieces = DoubleWordFNN(replace(model, weights=split), FNN(model.weights - split, torch.zeros_like(model.biases)))
    torch.testing.assert_close(forward(pieces, x), fnn_forward(model, x), rtol=1e-13, atol=1e-13)
    assert forward(pieces.to("cpu"), x).dtype == F64
