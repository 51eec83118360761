"""The paper's constructed adapters ("our construction") as pure functions.

Symbols: D width, L frozen depth, Lbar target depth, R rank per layer, H heads.
Convention of adapters.py: the adapted weight is ``W + A B^T`` with A, B of shape (D, D),
padded: the columns beyond a matrix's rank are zero, and the returned ``LoRA`` masks them.

* ``linear_construction``: Lemma 1. Layers W_1..W_L (layer 0 of the tensor applied first)
  are adapted so that (W_L + A_L B_L^T) ... (W_1 + A_1 B_1^T) = W_L ... W_1 + LR_r(E),
  E = target - W_L ... W_1, r = sum_l R_l: the truncated SVD of the discrepancy, exact
  once r >= rank(E).
* ``fnn_construction``: the FNN theorem. Each target layer is matched by one group of the
  uniform partition (generation.partition); biases keep the ReLUs inside a group active
  on a region that the calibration inputs determine, so the group acts as a linear map
  there (its docstring states the region). ``fnn_adapted``: the adapted model it
  makes, in double words where a group needs extended precision (below).
* ``tfn_construction``: the TFN theorem. W_K^T W_Q, W_O W_V and (last block) W_o W_2 are
  products of two matrices, each matched with the linear construction at L = 2.

Precision: exactness above the threshold holds up to rounding, and the constructions
invert products of frozen matrices, so rounding grows with their condition number.
Compute in float64 (pass float64 models, or ``dtype=torch.float64``; with ``dtype`` the
computation runs in that dtype and the results are cast back to the models' dtype).
Measured above the threshold (relative MSE = MSE / mean target output^2, on test inputs
drawn independently of the calibration inputs; PyTorch's default init; FNN float64: the
threshold_law grid, D = 8..64, seeds 0-2, benchmarks/construction_precision.py; the
rest at D = 16):

* FNN, float64: groups of one or two frozen layers ((Lbar, L) = (1, 2), (2, 4)) 4e-19 or
  less; (2, 5) (groups of two and three) 7e-16; (2, 6) (three and three) 3e-13; four
  layers ((1, 4); (2, 8) at D = 8..32) up to 7e-7. In a four-layer group the adapted weights
  reach norms of ~1e8 while the group's product is the target weight, and what remains is
  the float64 rounding of that cancellation in the forward pass, which the biases enlarge
  in proportion to the activations they keep positive (hence ``fnn_construction``'s
  smallest such biases).
* FNN, groups of more than four layers ((1, 8): one group of eight), in float64: a
  product of 7 frozen layers has condition number up to 6e11 and the adapted weights
  reach ~1e13 while their product is the target weight. Below R = D the adapters are
  beyond float64: computed with 60 digits and rounded to float64 they leave the group's
  product off by a relative 1e-4 to 1e10 (D = 16, seeds 0-2;
  benchmarks/construction_precision.py --detail --exact-adapters), and the construction
  is exact only from R = 4 to 8 at D = 8, 7 to 16 at D = 16, 32 at D = 32 (seeds 0-2).
  Such groups are therefore extended (``fnn_construction``'s ``extended_precision``):
  their adapters are computed with EXTENDED_BITS bits (mpmath) and rounded to double
  words (hi + lo, about 32 digits; core/double_word.py), which leaves the product off by
  5e-9 relative or less (D = 8..32), their biases are computed, and the whole adapted
  model is evaluated (``fnn_adapted``), in double-word arithmetic. (1, 8) is then exact
  from R* on: worst relative MSE at R >= R* 2e-14, 6e-11 and 7e-19 at D = 8, 16 and 32
  (seeds 0-2, benchmarks/construction_precision.py --deep); not with the authors' scalar
  biases, whose activations reach 1e33 in such a group. The rule is the group's
  size because neither a residual nor a condition number separates the groups float64
  serves from those it does not: in float64 the construction misses the target layer on
  the calibration inputs by up to 7e-7 relative MSE in exact rows of four-layer groups
  (the grid above), by as little as 9e-7 in inexact (1, 8) rows; the frozen partial
  products of four-layer groups reach condition number 4e7, those of (1, 8) groups (each
  inexact in float64 at some R >= R*) start at 2e5. The authors never ran the
  construction beyond L = 4.
* FNN, float32: (1, 2) and (2, 4) 2e-7 or less; groups of three or more layers are not
  exact (relative MSE 1e-6 to 1e15).
* TFN, depth 2: float64 ~1e-17; in float32 1e-7 to 4e-2 depending on the seed (the
  adapted weights reach ~1e5, and merely rounding the exact float64 adapted weights to
  float32 costs that much). The authors' float32 numbers: MSE ~1e-2 at R >= D/2
  (median over seeds 0-4 of their code's output). Depth 1: float32 ~1e-8.

The functions take one configuration (no leading batch dimensions) and use no randomness:
the FNN calibration inputs are passed in.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import mpmath
import torch
from torch import Tensor

from . import double_word as dw
from .adapters import LoRA, apply_lora, column_mask
from .generation import group_product, partition
from .models import FNN, TFN, DoubleWordFNN, activate

Ranks = Union[int, list[int]]


def _per_layer(rank: Ranks, depth: int) -> list[int]:
    ranks = [rank] * depth if isinstance(rank, int) else list(rank)
    if len(ranks) != depth or min(ranks) < 0:
        raise ValueError(f"need {depth} non-negative per-layer ranks, got {rank}")
    return ranks


def _discrepancy(target: Tensor, frozen: Tensor) -> tuple[Tensor, Tensor]:
    """E = target - W_L ... W_1 and its right singular vectors (columns, by decreasing sigma)."""
    error = target - group_product(frozen, range(frozen.shape[0]))
    return error, torch.linalg.svd(error).Vh.mT


def linear_construction(target: Tensor, frozen: Tensor, rank: Ranks, *, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Adapters making the product of ``frozen`` closest to ``target`` (Lemma 1).

    target: (D, D); frozen: (L, D, D), the product ordered W_L ... W_1 (index 0 first);
    rank: R for every layer or per-layer ranks [R_1, ..., R_L] (a total above D is exact).
    Returns A, B: (L, D, D), column c of layer l nonzero only for c < R_l.

    With E = U S V^T, layer l gets the next R_l right singular directions V_l and
    ``A_l B_l^T = (W_L ... W_{l+1})^{-1} E V_l V_l^T (W'_{l-1} ... W'_1)^{-1}`` (W' adapted).
    The product then telescopes to ``prod W + E V_{1:r} V_{1:r}^T = prod W + LR_r(E)``.
    Needs the frozen matrices and the partial adapted products to be invertible (almost
    surely true for random weights).
    """
    depth, width = frozen.shape[0], frozen.shape[-1]
    ranks = _per_layer(rank, depth)
    out_dtype = frozen.dtype
    weights = frozen.to(dtype or out_dtype)
    error, directions = _discrepancy(target.to(weights.dtype), weights)
    a = torch.zeros_like(weights)
    b = torch.zeros_like(weights)
    adapted_below = torch.eye(width, dtype=weights.dtype, device=weights.device)  # W'_{l-1} ... W'_1
    start = 0
    for layer in range(depth):
        stop = min(start + ranks[layer], width)
        v = directions[:, start:stop]
        frozen_above = group_product(weights, range(layer + 1, depth))  # W_L ... W_{l+1}
        # Solves rather than explicit inverses: the same maths, less rounding.
        a[layer, :, : stop - start] = torch.linalg.solve(frozen_above, error @ v)
        b[layer, :, : stop - start] = torch.linalg.solve(adapted_below.mT, v)
        adapted_below = (weights[layer] + a[layer] @ b[layer].mT) @ adapted_below
        start = stop
    return a.to(out_dtype), b.to(out_dtype)


BIAS_RULES = ("per_unit", "scalar")
# Standard deviations below the calibration mean that the per_unit rule keeps active.
# Independent test inputs reach 6.6 on the threshold_law grid; each further one costs
# precision in four-layer groups, whose float64 rounding grows with the activations.
DEFAULT_MARGIN = 8.0


def _default_rule(group_size: int, authors_bias_propagation: bool) -> str:
    """The authors' rule where it is exact to float64 round-off: with their propagation,
    and in groups of two layers (one ReLU layer to keep active, its bias carried through
    one adapted layer). Groups of three or more carry their biases through products of
    adapted layers whose norms reach ~1e8: there only the per-unit rule stays exact."""
    return "scalar" if authors_bias_propagation or group_size <= 2 else "per_unit"


def _linearising_bias(pre: Tensor, rule: str, margin: float) -> Tensor:
    """The bias of a non-last layer of a group, from its pre-activations ``pre`` (n, D)
    on the calibration inputs (fnn_construction's ``bias_rule``)."""
    if rule == "scalar":
        return -2 * torch.clamp(pre.min(), max=0) * torch.ones_like(pre[0])
    # A standard deviation is a steadier scale than the range of a few hundred samples;
    # the minimum keeps every calibration input active whatever its distribution.
    floor = torch.minimum(pre.min(0).values, pre.mean(0) - margin * pre.std(0, correction=0))
    return -floor


def fnn_construction(frozen: FNN, target: FNN, rank: Ranks, calibration: Optional[Tensor],
                     **options) -> tuple[LoRA, Optional[Tensor]]:
    """Adapters and new frozen biases making ``frozen`` (depth L) represent ``target`` (Lbar).

    frozen: weights (L, D, D), biases (L, D) or None; target: weights (Lbar, D, D);
    rank: R per layer or per-layer ranks (length L); calibration: inputs (n, D) that choose
    the linearising biases (the authors draw 256 N(0, I) samples), needed only for a ReLU
    model with biases and a group of more than one layer; ``options``, keywords, below:
    authors_bias_propagation (False), bias_rule (None), margin (DEFAULT_MARGIN), dtype
    (None) and extended_precision (True).
    Returns the adapters (key "weights": A, B (L, D, D), mask (L, D)) and the biases
    (L, D) that replace the frozen ones (None when the model has no biases).

    Group i (layers P_i of the uniform partition) gets the linear construction towards the
    target weight W̄_i. Its non-last layers get linearising biases (below); its last layer
    gets b̄_i minus those biases carried through the later adapted layers, so that the
    group equals the target layer ReLU(W̄_i x + b̄_i) (below the threshold: the adapted
    group's linear map, then b̄_i and the ReLU) wherever its ReLUs are active. The
    calibration inputs are carried from group to group through the adapted model;
    ``authors_bias_propagation`` instead carries them as the authors' code does, without
    the last layer's bias and activation of each group (which leaves their residual error
    of 1e-7 to 1e-9 above the threshold for Lbar >= 2), and defaults to their bias rule.

    ``bias_rule``, with a unit's pre-activation meaning its adapted layer's output before
    its bias, on the calibration inputs carried through the adapted model:

    * "per_unit" (the default for groups of three or more layers, unless
      ``authors_bias_propagation``): each unit's bias moves its
      floor, the lower of its calibration minimum and its calibration mean minus
      ``margin`` calibration standard deviations (population standard deviation), to 0:
      the smallest bias that keeps the unit active down to the floor. The float64 rounding
      of a group grows with the activations the biases create, and the biases carried to
      the last layer cancel there, so these are carried in double-word arithmetic.
    * "scalar" (the authors' rule, computed as their code does; the default for groups of
      two layers and with ``authors_bias_propagation``): one constant per layer, twice the
      most negative pre-activation over all its units (0 if none is negative).

    ``bias_rule`` None chooses per group (``_default_rule``); a rule given applies to every
    group.

    Where the result is exact (in exact arithmetic; float64 adds the rounding that the
    module docstring quantifies): on every input that keeps every ReLU of every non-last
    layer of every group active, that is, whose pre-activation at each such unit, carried
    through the returned model, is at least the unit's floor (per_unit), or twice the
    layer's most negative calibration pre-activation (scalar). The calibration inputs
    always qualify. Inputs drawn independently of them qualify with a probability that
    the margin sets:
    on the threshold_law grid (256 Gaussian calibration inputs, 10,000 test inputs per
    seed) the deepest test pre-activation lay 6.6 standard deviations below its
    calibration mean, in a skewed unit of a second group (Gaussian units: 6.0). Inputs
    scaled up, such as the shifted test set (standard deviation 5), leave the region.
    ``margin``: in standard deviations, per_unit rule only.

    Extended precision (``extended_precision``, the default; float64 models only, and
    never with ``authors_bias_propagation``): a group of more than FLOAT64_GROUP_LAYERS
    frozen layers, beyond float64 (module docstring), gets its adapters computed with
    EXTENDED_BITS bits and rounded to double words (hi + lo, about 32 digits), and its
    biases computed in double-word arithmetic. The adapters and biases returned here are
    then those rounded to float64, which a float64 model cannot evaluate exactly:
    ``fnn_adapted`` returns the model in double words. ``extended_precision`` False
    computes every group in float64 (as before extended precision existed).
    """
    lora, biases, _ = _fnn_construction(frozen, target, rank, calibration, **options)
    return lora, biases


def fnn_adapted(frozen: FNN, target: FNN, rank: Ranks, calibration: Optional[Tensor],
                **options) -> Union[FNN, DoubleWordFNN]:
    """The adapted model of ``fnn_construction`` (same arguments): ``frozen`` with its
    adapters applied and its biases replaced, bit for bit, where no group is extended;
    otherwise the model with double-word weights and biases (the groups in float64 with
    zero low parts), which models.forward evaluates in double-word arithmetic."""
    lora, biases, extended = _fnn_construction(frozen, target, rank, calibration, **options)
    if extended is not None:
        return extended
    return apply_lora(frozen if biases is None else replace(frozen, biases=biases), lora)


def _fnn_construction(frozen: FNN, target: FNN, rank: Ranks, calibration: Optional[Tensor], *,
                      authors_bias_propagation: bool = False, bias_rule: Optional[str] = None,
                      margin: float = DEFAULT_MARGIN, dtype: Optional[torch.dtype] = None,
                      extended_precision: bool = True) -> tuple[LoRA, Optional[Tensor], Optional[DoubleWordFNN]]:
    """fnn_construction's adapters and biases, and the double-word adapted model where a
    group is extended (else None)."""
    if bias_rule is not None and bias_rule not in BIAS_RULES:
        raise ValueError(f"bias_rule must be one of {BIAS_RULES}, got {bias_rule!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    groups = partition(frozen.depth, target.depth)
    ranks = _per_layer(rank, frozen.depth)
    out_dtype = frozen.weights.dtype
    work = dtype or out_dtype
    extended = [extended_precision and _extended(len(g), work, out_dtype, authors_bias_propagation) for g in groups]
    weights = frozen.weights.to(work)
    a = torch.zeros_like(weights)
    b = torch.zeros_like(weights)
    double_words = {}  # group index -> its adapted weights as double words
    for i, group in enumerate(groups):
        layers = slice(group.start, group.stop)
        if extended[i]:
            double_words[i], a[layers], b[layers] = _extended_linear_construction(target.weights[i].to(work), weights[layers],
                                                                           ranks[layers])
        else:
            a[layers], b[layers] = linear_construction(target.weights[i].to(work), weights[layers], ranks[layers])
    mask = column_mask(ranks, (frozen.depth,), frozen.width).to(weights.device)
    lora = LoRA({"weights": a.to(out_dtype)}, {"weights": b.to(out_dtype)}, {"weights": mask})
    adapted = weights + a @ b.mT
    adapted_lo = torch.zeros_like(adapted)
    for i, (hi, lo) in double_words.items():
        adapted[groups[i].start:groups[i].stop], adapted_lo[groups[i].start:groups[i].stop] = hi, lo
    if frozen.biases is None:
        double = DoubleWordFNN(FNN(adapted, None, frozen.activation), FNN(adapted_lo, None, frozen.activation))
        return lora, None, double if double_words else None

    relu = frozen.activation == "relu"
    if relu and calibration is None and any(len(g) > 1 for g in groups):
        raise ValueError("a ReLU FNN with biases and groups of several layers needs calibration inputs")
    z = None if calibration is None else calibration.to(work)
    biases = torch.zeros(frozen.depth, frozen.width, dtype=work, device=weights.device)
    biases_lo = torch.zeros_like(biases)
    for i, group in enumerate(groups):
        rule = bias_rule or _default_rule(len(group), authors_bias_propagation)
        if extended[i]:
            layers = slice(group.start, group.stop)
            (biases[layers], biases_lo[layers]), z = _extended_group_biases(
                (adapted[layers], adapted_lo[layers]), target.biases[i], z, rule, margin, frozen.activation)
            continue
        precise = rule == "per_unit"
        # The group's biases so far, pushed through its layers, as an unevaluated sum
        # hi + lo: with adapted norms up to ~1e8 they reach ~1e12 and cancel at the
        # last layer, where float64 alone would double the worst relative MSE of a
        # four-layer group (lo stays zero for the authors' rule, computed as their code does).
        carried = dw.from_float(torch.zeros_like(biases[0]))
        for layer in group[:-1]:
            if relu:
                pre = z @ adapted[layer].mT
                biases[layer] = _linearising_bias(pre, rule, margin)
                z = pre + biases[layer]  # the ReLU is the identity here
            if precise:
                carried = dw.add(dw.matvec(adapted[layer], carried), biases[layer])
            else:
                carried = (adapted[layer] @ carried[0] + biases[layer], carried[1])
        last = group[-1]
        if precise:
            hi, _ = dw.add(dw.neg(dw.matvec(adapted[last], carried)), target.biases[i].to(work))
            biases[last] = hi
        else:
            biases[last] = target.biases[i].to(work) - adapted[last] @ carried[0]
        if z is not None:
            pre = z @ adapted[last].mT
            z = pre if authors_bias_propagation else activate(pre + biases[last], frozen.activation)
    double = DoubleWordFNN(FNN(adapted, biases, frozen.activation), FNN(adapted_lo, biases_lo, frozen.activation))
    return lora, biases.to(out_dtype), double if double_words else None


# Frozen layers per group up to which float64 suffices (module docstring).
FLOAT64_GROUP_LAYERS = 4
# Bits for the adapters of extended groups: enough that their rounding to double words,
# not the computation, sets their error, whatever the conditioning of the group.
EXTENDED_BITS = 256


def _extended(group_size: int, work: torch.dtype, out_dtype: torch.dtype, authors_bias_propagation: bool) -> bool:
    """Whether a group's adapters are computed with EXTENDED_BITS bits and the model is
    evaluated in double words: beyond FLOAT64_GROUP_LAYERS layers, where float64 is not
    exact, in float64 only (a float32 construction replays the authors' precision), and
    never with the authors' bias propagation, which replays their code."""
    float64 = work == out_dtype == torch.float64
    return group_size > FLOAT64_GROUP_LAYERS and float64 and not authors_bias_propagation


def _extended_linear_construction(target: Tensor, frozen: Tensor, ranks: list[int]) -> tuple[dw.DoubleWord, Tensor, Tensor]:
    """linear_construction computed with EXTENDED_BITS bits, float64 in and out: the
    adapted weights W_l + A_l B_l^T rounded to double words, and A, B rounded to float64.

    The singular directions are float64's: at full rank (r = D) the product is
    W_L ... W_1 + E V V^T, and V V^T = I to float64 round-off, a relative error of ~1e-16;
    below it V only chooses which rank-r approximation of E the product adds.
    """
    depth, width = frozen.shape[0], frozen.shape[-1]
    _, directions = _discrepancy(target, frozen)
    a, b = torch.zeros_like(frozen), torch.zeros_like(frozen)
    hi, lo = torch.zeros_like(frozen), torch.zeros_like(frozen)
    with mpmath.workprec(EXTENDED_BITS):
        weights = [_to_mp(w) for w in frozen]
        above = [mpmath.eye(width)]  # W_L ... W_{l+1}, built from l = L down to 1
        for w in reversed(weights[1:]):
            above.insert(0, above[0] * w)
        error = _to_mp(target) - above[0] * weights[0]
        below = mpmath.eye(width)  # W'_{l-1} ... W'_1
        start = 0
        for layer in range(depth):
            stop = min(start + ranks[layer], width)
            adapted = weights[layer]
            if stop > start:
                v = _to_mp(directions[:, start:stop])
                a_l = _inverse(above[layer]) * error * v
                b_l = _inverse(below.T) * v
                adapted = adapted + a_l * b_l.T
                a[layer, :, : stop - start] = _to_tensor(a_l, frozen)
                b[layer, :, : stop - start] = _to_tensor(b_l, frozen)
            hi[layer], lo[layer] = _to_double_word(adapted, frozen)
            below = adapted * below
            start = stop
    return (hi, lo), a, b


def _to_mp(t: Tensor) -> mpmath.matrix:
    return mpmath.matrix(t.tolist())  # exact: every float is an mpf


def _inverse(m: mpmath.matrix) -> mpmath.matrix:
    try:
        return mpmath.inverse(m)
    except ZeroDivisionError as error:
        raise torch.linalg.LinAlgError(f"singular partial product: {error}") from None


def _to_tensor(m: mpmath.matrix, like: Tensor) -> Tensor:
    return torch.tensor([[float(x) for x in row] for row in m.tolist()], dtype=like.dtype, device=like.device)


def _to_double_word(m: mpmath.matrix, like: Tensor) -> dw.DoubleWord:
    hi = _to_tensor(m, like)
    return dw.two_sum(hi, _to_tensor(m - _to_mp(hi), like))


def _extended_group_biases(adapted: dw.DoubleWord, target_bias: Tensor, z: Optional[Tensor], rule: str, margin: float,
                           activation: str) -> tuple[dw.DoubleWord, Optional[Tensor]]:
    """fnn_construction's biases for one group whose adapted weights (layers, D, D) are
    double words, with every sum and product in double words; returns the biases as
    double words (lo zero but in the last layer) and the group's output on the
    calibration inputs z."""
    hi, lo = adapted
    biases, biases_lo = torch.zeros_like(hi[:, 0]), torch.zeros_like(hi[:, 0])
    x = None if z is None else dw.from_float(z)
    carried = dw.from_float(torch.zeros_like(target_bias))
    for layer in range(len(hi) - 1):
        weight = (hi[layer], lo[layer])
        if x is not None:
            pre = dw.matvec(weight, x)
            if activation == "relu":
                biases[layer] = _linearising_bias(pre[0], rule, margin)
            x = dw.add(pre, biases[layer])  # the ReLU is the identity here
        carried = dw.add(dw.matvec(weight, carried), biases[layer])
    weight = (hi[-1], lo[-1])
    biases[-1], biases_lo[-1] = dw.add(dw.neg(dw.matvec(weight, carried)), target_bias)
    if x is None:
        return (biases, biases_lo), None
    out = dw.add(dw.matvec(weight, x), (biases[-1], biases_lo[-1]))
    return (biases, biases_lo), activate(out[0], activation)


def tfn_construction(frozen: TFN, target: TFN, rank: int, *, dtype: Optional[torch.dtype] = None) -> tuple[LoRA, Tensor, Tensor]:
    """Adapters and feed-forward biases making ``frozen`` represent ``target`` (same L, H, D).

    Returns the adapters (keys "wq", "wk", "wv", "wo": A, B (L, H, D, D); "w2" (the last
    block's W_2) and "w_out": (D, D)) and the new b1, b2 (L, D). Only the plain TFN
    (no residual variant) is covered.

    Invariant: the adapted block l sees X_{l-1} where the target sees C_l X_{l-1}, with
    C_1 = I and C_l = W̄_{2,l-1} W_{2,l-1}^{-1} (bars: target). Per head, matching
    ``W_K^T W_Q -> C_l^T W̄_K^T W̄_Q C_l`` gives the same attention scores, and
    ``W_O W_V -> W_1^{-1} W̄_1 W̄_O W̄_V C_l`` the same W_1 A_l; with b_1 := b̄_1 the hidden
    ReLU layer is then the target's. Non-last blocks: b_2 := W_2 W̄_2^{-1} b̄_2 makes
    Z_l = W_2 W̄_2^{-1} Z̄_l, i.e. the next C. Last block: (W_2, W_o) matched to W̄_o W̄_2
    and b_2 := (W_o + ΔW_o)^{-1} W̄_o b̄_2. Each match is a two-layer linear construction,
    exact for R >= D/2.
    """
    out_dtype = frozen.wq.dtype
    work = dtype or out_dtype
    f = {k: v.to(work) for k, v in frozen.tensors().items()}
    t = {k: v.to(work) for k, v in target.tensors().items()}
    depth, n_head, width = frozen.depth, frozen.n_head, frozen.width
    a = {k: torch.zeros_like(f[k]) for k in ("wq", "wk", "wv", "wo")}
    b = {k: torch.zeros_like(f[k]) for k in ("wq", "wk", "wv", "wo")}
    b1, b2 = t["b1"].clone(), torch.zeros_like(t["b2"])
    calibrate = torch.eye(width, dtype=work, device=f["wq"].device)  # C_l
    for l in range(depth):
        to_target_hidden = torch.linalg.solve(f["w1"][l], t["w1"][l])  # W_1^{-1} W̄_1
        for h in range(n_head):
            # W_Q is the first layer and W_K^T the second: the K adapter is the transpose,
            # (W_K^T + A B^T)^T = W_K + B A^T.
            kq = calibrate.mT @ t["wk"][l, h].mT @ t["wq"][l, h] @ calibrate
            ka, kb = linear_construction(kq, torch.stack([f["wq"][l, h], f["wk"][l, h].mT]), rank)
            a["wq"][l, h], b["wq"][l, h] = ka[0], kb[0]
            a["wk"][l, h], b["wk"][l, h] = kb[1], ka[1]
            ov = to_target_hidden @ t["wo"][l, h] @ t["wv"][l, h] @ calibrate
            va, vb = linear_construction(ov, torch.stack([f["wv"][l, h], f["wo"][l, h]]), rank)
            a["wv"][l, h], b["wv"][l, h] = va[0], vb[0]
            a["wo"][l, h], b["wo"][l, h] = va[1], vb[1]
        if l < depth - 1:
            b2[l] = f["w2"][l] @ torch.linalg.solve(t["w2"][l], t["b2"][l])
            calibrate = torch.linalg.solve(f["w2"][l], t["w2"][l], left=False)  # W̄_2 W_2^{-1}
        else:
            oa, ob = linear_construction(t["w_out"] @ t["w2"][l], torch.stack([f["w2"][l], f["w_out"]]), rank)
            a["w2"], b["w2"] = oa[0], ob[0]
            a["w_out"], b["w_out"] = oa[1], ob[1]
            adapted_out = f["w_out"] + oa[1] @ ob[1].mT
            b2[l] = torch.linalg.solve(adapted_out, t["w_out"] @ t["b2"][l])
    device = calibrate.device
    masks = {k: column_mask(rank, (depth, n_head), width).to(device) for k in ("wq", "wk", "wv", "wo")}
    masks["w2"], masks["w_out"] = column_mask(rank, (), width).to(device), column_mask(rank, (), width).to(device)
    cast = lambda d: {k: v.to(out_dtype) for k, v in d.items()}
    return LoRA(cast(a), cast(b), masks), b1.to(out_dtype), b2.to(out_dtype)
