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
  there (its docstring states the region).
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
  layers ((1, 4); (2, 8) at D = 16) up to 7e-7. In a four-layer group the adapted weights
  reach norms of ~1e8 while the group's product is the target weight, and what remains is
  the float64 rounding of that cancellation in the forward pass, which the biases enlarge
  in proportion to the activations they keep positive (hence ``fnn_construction``'s
  smallest such biases).
* FNN, (1, 8) (one group of eight layers): a product of 7 frozen layers has condition
  number up to 5e11 and the adapted weights reach ~1e12. Below R = D the adapters
  themselves are beyond float64: adapters computed with 60 digits and rounded to float64
  leave the group's product off by a relative 1e-4 to 1e10 at R = 2..9 (D = 16, seeds
  0-2; benchmarks/construction_precision.py --detail --exact-adapters). Exact from R = 7,
  14 and 16 for those seeds; at R = D 2e-9 or less. The authors never ran the
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

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .adapters import LoRA, column_mask
from .generation import group_product, partition
from .models import FNN, TFN, activate

Ranks = Union[int, list[int]]


def _per_layer(rank: Ranks, depth: int) -> list[int]:
    ranks = [rank] * depth if isinstance(rank, int) else list(rank)
    if len(ranks) != depth or min(ranks) < 0:
        raise ValueError(f"need {depth} non-negative per-layer ranks, got {rank}")
    return ranks


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
    error = target.to(weights.dtype) - group_product(weights, range(depth))
    directions = torch.linalg.svd(error).Vh.mT  # columns: right singular vectors, by decreasing sigma
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


# Double-word arithmetic (a value is an unevaluated sum hi + lo of two floats): error-free
# transformations, exact in IEEE binary arithmetic with round-to-nearest.
def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: Tensor) -> tuple[Tensor, Tensor]:
    digits = 1 - round(math.log2(torch.finfo(a.dtype).eps))  # 53 for float64
    t = (2.0 ** -(-digits // 2) + 1) * a
    hi = t - (t - a)
    return hi, a - hi


def _two_prod(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _dd_add(x: tuple[Tensor, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
    s, e = _two_sum(x[0], y)
    return _two_sum(s, e + x[1])


def _dd_neg(x: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return -x[0], -x[1]


def _dd_matvec(m: Tensor, x: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """m (D, D) times the double-word vector x, as accurate as in twice the precision."""
    p, e = _two_prod(m, x[0])
    s = torch.zeros_like(x[0])
    compensation = (e + m * x[1]).sum(-1)
    for k in range(m.shape[-1]):
        s, err = _two_sum(s, p[:, k])
        compensation = compensation + err
    return _two_sum(s, compensation)


def fnn_construction(
    frozen: FNN,
    target: FNN,
    rank: Ranks,
    calibration: Optional[Tensor],
    *,
    authors_bias_propagation: bool = False,
    bias_rule: Optional[str] = None,
    margin: float = DEFAULT_MARGIN,
    dtype: Optional[torch.dtype] = None,
) -> tuple[LoRA, Optional[Tensor]]:
    """Adapters and new frozen biases making ``frozen`` (depth L) represent ``target`` (Lbar).

    frozen: weights (L, D, D), biases (L, D) or None; target: weights (Lbar, D, D);
    rank: R per layer or per-layer ranks (length L); calibration: inputs (n, D) that choose
    the linearising biases (the authors draw 256 N(0, I) samples), needed only for a ReLU
    model with biases and a group of more than one layer.
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
    """
    if bias_rule is not None and bias_rule not in BIAS_RULES:
        raise ValueError(f"bias_rule must be one of {BIAS_RULES}, got {bias_rule!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    groups = partition(frozen.depth, target.depth)
    ranks = _per_layer(rank, frozen.depth)
    out_dtype = frozen.weights.dtype
    work = dtype or out_dtype
    weights = frozen.weights.to(work)
    a = torch.zeros_like(weights)
    b = torch.zeros_like(weights)
    for i, group in enumerate(groups):
        layers = slice(group.start, group.stop)
        a[layers], b[layers] = linear_construction(target.weights[i].to(work), weights[layers], ranks[layers])
    mask = column_mask(ranks, (frozen.depth,), frozen.width).to(weights.device)
    lora = LoRA({"weights": a.to(out_dtype)}, {"weights": b.to(out_dtype)}, {"weights": mask})
    if frozen.biases is None:
        return lora, None

    adapted = weights + a @ b.mT
    relu = frozen.activation == "relu"
    if relu and calibration is None and any(len(g) > 1 for g in groups):
        raise ValueError("a ReLU FNN with biases and groups of several layers needs calibration inputs")
    z = None if calibration is None else calibration.to(work)
    biases = torch.zeros(frozen.depth, frozen.width, dtype=work, device=weights.device)
    for i, group in enumerate(groups):
        rule = bias_rule or _default_rule(len(group), authors_bias_propagation)
        precise = rule == "per_unit"
        # The group's biases so far, pushed through its layers, as an unevaluated sum
        # hi + lo: with adapted norms up to ~1e8 they reach ~1e12 and cancel at the
        # last layer, where float64 alone would double the worst relative MSE of a
        # four-layer group (lo stays zero for the authors' rule, computed as their code does).
        carried = (torch.zeros_like(biases[0]), torch.zeros_like(biases[0]))
        for layer in group[:-1]:
            if relu:
                pre = z @ adapted[layer].mT
                biases[layer] = _linearising_bias(pre, rule, margin)
                z = pre + biases[layer]  # the ReLU is the identity here
            if precise:
                carried = _dd_add(_dd_matvec(adapted[layer], carried), biases[layer])
            else:
                carried = (adapted[layer] @ carried[0] + biases[layer], carried[1])
        last = group[-1]
        if precise:
            hi, _ = _dd_add(_dd_neg(_dd_matvec(adapted[last], carried)), target.biases[i].to(work))
            biases[last] = hi
        else:
            biases[last] = target.biases[i].to(work) - adapted[last] @ carried[0]
        if z is not None:
            pre = z @ adapted[last].mT
            z = pre if authors_bias_propagation else activate(pre + biases[last], frozen.activation)
    return lora, biases.to(out_dtype)


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
