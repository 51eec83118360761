"""The FNN construction's precision: its smallest exact rank per setting, per bias rule.

In float64, for the linearising-bias rule of core/construction.py and for the authors'
scalar rule; with ``--deep``, in float64 against extended precision.

Inside a group of frozen layers, the construction's biases keep every ReLU active, so
that the group is the linear map the adapters build. Two rules (``fnn_construction``'s
``bias_rule``), both with the paper protocol's propagation:

* ``default``: the construction's own choice per group: in groups of three or more
  layers ``per_unit``, each unit the smallest bias that keeps it active down to
  ``margin`` calibration standard deviations below its calibration mean (and on every
  calibration input), the biases carried to the group's last layer summed in double-word
  arithmetic; in groups of two, where it is exact to round-off, the authors' rule;
* ``scalar`` (the authors' rule): one constant per layer, twice the most negative
  pre-activation. Carried through adapted layers with condition numbers up to ~1e11, it
  lets the activations inside a four-layer group reach 1e7 to 1e15 while the output's rms
  is 0.4, and the float64 rounding of their cancellation swamps the exact linear part.

The grid (default): per (D, Lbar, L) and seed, under the paper protocol (its models, its
256 calibration inputs as config.yaml sets them, its test inputs; relative MSE = test MSE
/ mean squared target output, exact <= 1e-6, as `report.analysis` measures it): the
smallest rank from which every rank 1..D is exact, per rule; the worst relative MSE at
R >= R* (the theorem's threshold), on the test and on the shifted test inputs (x5); below
R* the largest change of the relative MSE between the rules (ratio - 1 and difference);
at R = R* and D the deepest test pre-activation inside a group, in calibration standard
deviations below the calibration mean (per_unit keeps units active down to ``--margin``
of them). Then the medians over seeds. ``--deep`` compares, for (Lbar, L) = (1, 8) (one
group of eight layers) and (2, 8) (two of four), the construction in float64 throughout
with the default, which extends the precision of groups of more than four layers
(``fnn_construction``'s ``extended_precision``): the smallest exact rank, the worst
relative MSE at R >= R*, and at how many ranks the two give bit-identical outputs.
``--detail`` separates, for one setting, the linear part from the biases (of the
construction in float64).

    python benchmarks/construction_precision.py                         # D = 8, 16: seconds
    python benchmarks/construction_precision.py --widths 8 16 32 64      # the threshold_law grid: minutes
    python benchmarks/construction_precision.py --widths 8 16 32 64 --n-test 10000
    python benchmarks/construction_precision.py --deep                  # D = 8, 16: a few minutes
    python benchmarks/construction_precision.py --deep --widths 8 16 32 --n-test 1000
    python benchmarks/construction_precision.py --detail --width 32 --target-depth 1 --frozen-depth 4
    python benchmarks/construction_precision.py --detail --exact-adapters --width 16 --frozen-depth 8
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
from dataclasses import replace

import mpmath  # installed with torch (through sympy)
import torch

from lorabench.core.config import RunConfig
from lorabench.core.construction import DEFAULT_MARGIN, fnn_adapted, linear_construction
from lorabench.core.generation import group_product, partition
from lorabench.core.models import DoubleWordFNN, fnn_forward, forward
from lorabench.core.protocols import generate_models, protocol_of
from lorabench.core.theory import fnn_threshold_rank, mean_squared_output

EPS64 = torch.finfo(torch.float64).eps
EXACT = 1e-6
# The threshold_law experiment's FNN depth pairs (config.yaml), and deeper groups.
PAIRS = [(1, 2), (1, 4), (2, 4), (2, 5), (2, 6)]
DEEP = [(1, 8), (2, 8)]
RULES = ("scalar", "default")  # "default": fnn_construction's own choice per group
CALIBRATION = 256  # config.yaml's batch_size: the paper protocol's calibration inputs


def setting(width: int, target_depth: int, frozen_depth: int, seed: int, n_test: int):
    """The paper protocol's float64 models, calibration and test inputs of one setting."""
    cfg = RunConfig(exp="fnn", width=width, target_depth=target_depth, frozen_depth=frozen_depth, rank=1,
                    method="ours", use_bias=1, seed=seed, n_test=n_test, batch_size=CALIBRATION).validated()
    protocol = protocol_of(cfg)
    models = generate_models(cfg)
    as64 = lambda m: replace(m, weights=m.weights.double(), biases=m.biases.double())
    sets = protocol.eval_sets(cfg)
    return (as64(models.frozen), as64(models.target), protocol.calibration_inputs(cfg).double(),
            sets.test.double(), sets.test_shift.double(), mean_squared_output(models.target, sets.test))


def constructed(frozen, target, rank, calibration, rule: str, margin: float, extended_precision: bool = True):
    return fnn_adapted(frozen, target, rank, calibration, bias_rule=None if rule == "default" else rule,
                       margin=margin, extended_precision=extended_precision)


def relative_mse(model, target, x, scale=None) -> float:
    y = fnn_forward(target, x)
    return float((forward(model, x) - y).pow(2).mean()) / (float(y.pow(2).mean()) if scale is None else scale)


def deepest(model, target_depth: int, calibration, test) -> float:
    """The deepest test pre-activation inside the groups, in calibration standard
    deviations below the calibration mean (a ReLU switches off beyond the rule's floor)."""
    last = {group[-1] for group in partition(model.depth, target_depth)}
    deepest_, zc, zt = 0.0, calibration, test
    for layer in range(model.depth):
        pc, pt = zc @ model.weights[layer].mT, zt @ model.weights[layer].mT
        if layer not in last:
            depth = (pc.mean(0) - pt.min(0).values) / pc.std(0, correction=0)
            deepest_ = max(deepest_, float(depth.max()))
        zc, zt = torch.relu(pc + model.biases[layer]), torch.relu(pt + model.biases[layer])
    return deepest_


def smallest_exact_rank(errors: dict[int, float]) -> float:
    """The smallest rank from which every tested rank is exact (report.analysis's rule)."""
    ranks = sorted(errors)
    inexact = [r for r in ranks if not errors[r] <= EXACT]
    if not inexact:
        return float(ranks[0])
    following = [r for r in ranks if r > inexact[-1]]
    return float(following[0]) if following else math.inf


def sweep(width: int, target_depth: int, frozen_depth: int, seed: int, n_test: int, margin: float) -> dict:
    frozen, target, calibration, test, shifted, scale = setting(width, target_depth, frozen_depth, seed, n_test)
    threshold = fnn_threshold_rank(width, frozen_depth, target_depth)
    out = {}
    for rule in RULES:
        errors, shift, depth = {}, {}, 0.0
        for rank in range(1, width + 1):
            model = constructed(frozen, target, rank, calibration, rule, margin)
            errors[rank] = relative_mse(model, target, test, scale)
            if rank >= threshold:
                shift[rank] = relative_mse(model, target, shifted)
            if rank in (threshold, width):
                depth = max(depth, deepest(model, target_depth, calibration, test))
        out[rule] = dict(errors=errors, smallest=smallest_exact_rank(errors), deepest=depth,
                         worst=max(errors[r] for r in errors if r >= threshold), worst_shift=max(shift.values()))
    old, new = out["scalar"]["errors"], out["default"]["errors"]
    out["below_change"] = max((abs(new[r] / old[r] - 1) for r in range(1, threshold)), default=0.0)
    out["below_difference"] = max((abs(new[r] - old[r]) for r in range(1, threshold)), default=0.0)
    out["threshold"] = threshold
    return out


def fmt_rank(r: float) -> str:
    return "never" if math.isinf(r) else f"{r:g}"


def grid(widths: list[int], seeds: int, n_test: int, margin: float) -> None:
    settings = [(w, lb, l) for w in widths for lb, l in PAIRS]
    print(f"paper protocol, float64, {n_test} test samples; per_unit margin {margin:g}; exact: relative MSE <= {EXACT:g}")
    print("   D (Lbar, L) seed R* | smallest exact rank  | worst rel. MSE at R >= R* | shifted x5, R >= R*  | below R*: largest     | deepest")
    print("                       |   scalar   default   |    scalar      default    |  scalar    default   | ratio - 1  difference | (std)")
    summary = []
    for width, lbar, depth in settings:
        per_seed = []
        for seed in range(seeds):
            m = sweep(width, lbar, depth, seed, n_test, margin)
            per_seed.append(m)
            s, p = m["scalar"], m["default"]
            print(f"{width:4d} ({lbar}, {depth})   {seed:4d} {m['threshold']:2d} |   {fmt_rank(s['smallest']):>6}   {fmt_rank(p['smallest']):>6}"
                  f"    |   {s['worst']:8.1e}    {p['worst']:8.1e}    | {s['worst_shift']:8.1e}  {p['worst_shift']:8.1e} |  {m['below_change']:.1e}   "
                  f"{m['below_difference']:.1e}  |  {p['deepest']:.1f}")
        median = lambda rule: statistics.median(m[rule]["smallest"] for m in per_seed)
        summary.append((width, lbar, depth, per_seed[0]["threshold"], median("scalar"), median("default"),
                        max(m["scalar"]["worst"] for m in per_seed), max(m["default"]["worst"] for m in per_seed),
                        max(m["below_change"] for m in per_seed), max(m["below_difference"] for m in per_seed)))
    print(f"\nmedian over seeds 0-{seeds - 1} of the smallest exact rank; worst relative MSE at R >= R* over seeds")
    print("   D (Lbar, L)  R* | scalar  default  |  worst scalar  worst default  | below R*: ratio - 1  difference")
    for width, lbar, depth, threshold, old, new, worst_old, worst_new, change, difference in summary:
        print(f"{width:4d} ({lbar}, {depth})   {threshold:3d} |  {fmt_rank(old):>5}   {fmt_rank(new):>5}   |    {worst_old:8.1e}"
              f"      {worst_new:8.1e}   |            {change:.1e}     {difference:.1e}")


# ------------------------------------------------------------------------- deep
def precision_sweep(width: int, target_depth: int, frozen_depth: int, seed: int, n_test: int, margin: float) -> dict:
    """Per rank 1..D, the float64 construction against the default (extended precision
    where a group has more than four layers)."""
    frozen, target, calibration, test, _, scale = setting(width, target_depth, frozen_depth, seed, n_test)
    threshold = fnn_threshold_rank(width, frozen_depth, target_depth)
    errors, identical, extended = {"float64": {}, "default": {}}, 0, False
    for rank in range(1, width + 1):
        outputs = {}
        for name in errors:
            model = constructed(frozen, target, rank, calibration, "default", margin, name == "default")
            extended |= isinstance(model, DoubleWordFNN)
            outputs[name] = forward(model, test)
            errors[name][rank] = relative_mse(model, target, test, scale)
        identical += torch.equal(outputs["float64"], outputs["default"])
    out = {name: dict(smallest=smallest_exact_rank(e), worst=max(e[r] for r in e if r >= threshold))
           for name, e in errors.items()}
    return dict(out, threshold=threshold, identical=identical, extended=extended)


def deep(widths: list[int], seeds: int, n_test: int, margin: float) -> None:
    print(f"paper protocol, {n_test} test samples; exact: relative MSE <= {EXACT:g}; default: groups of more than "
          "four layers in extended precision")
    print("   D (Lbar, L) seed R* | smallest exact rank | worst rel. MSE at R >= R* | extended | ranks with")
    print("                       |  float64   default  |   float64      default    |          | identical outputs")
    summary = []
    for width in widths:
        for lbar, depth in DEEP:
            per_seed = [precision_sweep(width, lbar, depth, seed, n_test, margin) for seed in range(seeds)]
            for seed, m in enumerate(per_seed):
                f, d = m["float64"], m["default"]
                print(f"{width:4d} ({lbar}, {depth})   {seed:4d} {m['threshold']:2d} |   {fmt_rank(f['smallest']):>5}    "
                      f"{fmt_rank(d['smallest']):>5}    |   {f['worst']:8.1e}    {d['worst']:8.1e}    |   {'yes' if m['extended'] else 'no':>3}"
                      f"    | {m['identical']:3d} of {width}")
            median = lambda name: statistics.median(m[name]["smallest"] for m in per_seed)
            worst = lambda name: max(m[name]["worst"] for m in per_seed)
            summary.append((width, lbar, depth, per_seed[0]["threshold"], median("float64"), median("default"),
                            worst("float64"), worst("default")))
    print(f"\nmedian over seeds 0-{seeds - 1} of the smallest exact rank; worst relative MSE at R >= R* over seeds")
    print("   D (Lbar, L)  R* | float64  default  |  worst float64  worst default")
    for width, lbar, depth, threshold, old, new, worst_old, worst_new in summary:
        print(f"{width:4d} ({lbar}, {depth})   {threshold:3d} |  {fmt_rank(old):>5}    {fmt_rank(new):>5}   |    {worst_old:8.1e}"
              f"       {worst_new:8.1e}")


# ------------------------------------------------------------------------- detail
def linear_error(target: torch.Tensor, frozen: torch.Tensor, rank: int) -> float:
    a, b = linear_construction(target, frozen, [rank] * len(frozen))
    adapted = (frozen + a @ b.mT).double()
    product = group_product(adapted, range(len(adapted)))
    return float(torch.linalg.norm(product - target.double()) / torch.linalg.norm(target.double()))


def exact_adapter_error(target: torch.Tensor, frozen: torch.Tensor, rank: int, digits: int = 60) -> tuple[float, float]:
    """The linear part's relative Frobenius error when the adapters are computed with
    ``digits`` decimal digits (Lemma 1 as linear_construction computes it), the adapted
    weights rounded to float64, or to double words (hi + lo), and multiplied out with
    those digits: the error that no computation of these adapters in that precision avoids."""
    with mpmath.workdps(digits):
        m = lambda t: mpmath.matrix(t.tolist())
        depth, width = frozen.shape[0], frozen.shape[-1]
        weights = [m(w) for w in frozen]
        product = lambda ws: functools.reduce(lambda acc, w: w * acc, ws, mpmath.eye(width))
        error = m(target) - product(weights)
        directions = mpmath.svd_r(error)[2].T  # columns: right singular vectors, by decreasing sigma
        as_float = lambda a: torch.tensor([[float(x) for x in row] for row in a.tolist()], dtype=torch.float64)
        rounded = {"float64": [], "double word": []}
        below, start = mpmath.eye(width), 0
        for layer in range(depth):
            stop = min(start + rank, width)
            delta = mpmath.zeros(width, width)
            if stop > start:
                v = directions[:, start:stop]
                delta = (mpmath.inverse(product(weights[layer + 1:])) * error * v) * (mpmath.inverse(below.T) * v).T
            exact = weights[layer] + delta
            hi = m(as_float(exact))
            rounded["float64"].append(hi)
            rounded["double word"].append(hi + m(as_float(exact - hi)))
            below = exact * below
            start = stop
        relative = lambda adapted: float(mpmath.mnorm(product(adapted) - m(target), "f") / mpmath.mnorm(m(target), "f"))
        return relative(rounded["float64"]), relative(rounded["double word"])


def measure(width: int, target_depth: int, frozen_depth: int, seed: int, rank: int, n_test: int, rule: str,
            margin: float) -> dict:
    frozen, target, calibration, test, _, scale = setting(width, target_depth, frozen_depth, seed, n_test)
    first = partition(frozen_depth, target_depth)[0]
    group = frozen.weights[first.start:first.stop]
    perturb = torch.Generator().manual_seed(seed)
    nudged = group * (1 + 1e-13 * torch.randn(group.shape, generator=perturb, dtype=group.dtype))
    adapted = constructed(frozen, target, rank, calibration, rule, margin, extended_precision=False)
    z, peak = test, 0.0
    for layer in range(frozen_depth):
        z = torch.relu(z @ adapted.weights[layer].mT + adapted.biases[layer])
        peak = max(peak, float(z.abs().max()))
    rms = float(fnn_forward(target, test).pow(2).mean().sqrt())
    return {
        "linear64": linear_error(target.weights[0], group, rank),
        "linear64_nudged": linear_error(target.weights[0], nudged, rank),
        "linear32": linear_error(target.weights[0].float(), group.float(), rank),
        "relative_mse": relative_mse(adapted, target, test, scale),
        "largest_bias": float(adapted.biases.abs().max()),
        "largest_activation": peak,
        "rounding_estimate": (EPS64 * peak / rms) ** 2,
        "extended": relative_mse(constructed(frozen, target, rank, calibration, rule, margin), target, test, scale),
    }


def detail(args) -> None:
    """Per seed and rank: the linear part's relative Frobenius error (float64, again after
    perturbing the frozen weights by 1e-13 relative: a bug would not move with the
    perturbation's scale; float32), then per rule the relative test MSE, the largest bias
    and activation inside the network, and the rounding estimate (eps64 x largest
    activation / output rms)^2 that a float64 cancellation of those activations leaves,
    all of the construction in float64, and last the relative test MSE of the default
    construction (extended precision in groups of more than four layers). With
    ``--exact-adapters``, first the linear part of adapters computed with 60 digits and
    rounded to float64 or to double words (exact_adapter_error)."""
    threshold = fnn_threshold_rank(args.width, args.frozen_depth, args.target_depth)
    ranks = sorted({threshold, threshold + 1, threshold + 3, (threshold + args.width) // 2, args.width})
    print(f"D={args.width}, (Lbar, L)=({args.target_depth}, {args.frozen_depth}), theorem's threshold {threshold}")
    print("seed  R   linear f64  nudged 1e-13  linear f32  | rule      relative MSE  largest bias  largest act.  rounding est."
          "  | extended")
    for seed in range(args.seeds):
        for rank in ranks:
            if args.exact_adapters:
                frozen, target, *_ = setting(args.width, args.target_depth, args.frozen_depth, seed, args.n_test)
                first = partition(args.frozen_depth, args.target_depth)[0]
                to64, to_double_word = exact_adapter_error(target.weights[0], frozen.weights[first.start:first.stop], rank)
                print(f"{seed:4d} {rank:3d}   adapters with 60 digits, linear part rounded to float64 {to64:.1e}, "
                      f"to double words {to_double_word:.1e}")
            for rule in RULES:
                m = measure(args.width, args.target_depth, args.frozen_depth, seed, rank, args.n_test, rule, args.margin)
                print(f"{seed:4d} {rank:3d}   {m['linear64']:.1e}     {m['linear64_nudged']:.1e}      {m['linear32']:.1e}"
                      f"    | {rule:8s}   {m['relative_mse']:.1e}       {m['largest_bias']:.1e}       {m['largest_activation']:.1e}"
                      f"       {m['rounding_estimate']:.1e}    | {m['extended']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16], help="grid widths (threshold_law: 8 16 32 64)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="the per_unit rule's margin")
    parser.add_argument("--deep", action="store_true",
                        help="(1, 8) and (2, 8) at --widths: float64 against extended precision")
    parser.add_argument("--detail", action="store_true", help="the linear part against the biases, one setting")
    parser.add_argument("--exact-adapters", action="store_true",
                        help="with --detail: also the linear part of adapters computed with 60 digits (slow)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--target-depth", type=int, default=1)
    parser.add_argument("--frozen-depth", type=int, default=4)
    args = parser.parse_args()
    if args.detail:
        detail(args)
    elif args.deep:
        deep(args.widths, args.seeds, args.n_test, args.margin)
    else:
        grid(args.widths, args.seeds, args.n_test, args.margin)


if __name__ == "__main__":
    main()
