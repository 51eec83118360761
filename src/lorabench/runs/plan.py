"""``lorabench plan``: what a workflow config will cost, before it runs.

For each experiment and protocol of a config (a preset of ``config.yaml`` or any other
config file): the jobs, the trained configs and their config-steps (configs x Adam
steps), the configs copied from another experiment's training (``reused``: shared configs
train once), the constructions and model keys, and the projected core-hours on this
machine; then the total and the projected wall time on a given number of cores. A
selection of experiments counts the other experiments' train jobs that it reuses.

The projection is linear in measured rates. Each calibration unit (an engine, the native
and the torch trainer of FNN and TFN cells, the constructions, the model generation, at
the settings that change its cost: the method, task, activation, width, training batch
or finite training set, validation set, protocol and, for transformers, heads, tokens and
blocks' variant; ``unit_of``) is calibrated once by running small real cells of that shape
through ``runner.run_configs``: at two depths, two step counts and two cell sizes, which
separates the cost of a config-step from the per-config cost (set-up and evaluation),
and both from what a cell pays once per step and once in all for its configs together
(the batch and the target's outputs, the loop); each is a line in the model's depth.
A step's cost comes from the cells' training steps timed alone (``Timing``), so the noise
of a run's set-up and test-set evaluations stays in the once-parts. Times are CPU time,
so a busy machine slows the calibration's wall clock more than its figures. Rates are
cached in ``cache_dir()/plan-calibration.json``, keyed by lorabench version, CPU model,
torch version and unit; ``--recalibrate`` measures again.

Pieces (``--pieces 2h``): the experiments and protocols grouped into Snakemake runs each
projected to fit the budget on the given cores (first-fit by projected wall time; an
experiment runs with both protocols in one piece when they fit together, else one piece
per protocol; experiments that share configs stay together), each with its command; their outputs combine (``results/runs/<experiment>/
<protocol>.parquet``), and a last run of ``all_figures`` only aggregates and draws.

What the projection estimates or leaves out: pretraining stops when its training loss
falls below initial / ``pretrained_level`` or at its budget (``pretrained_epochs``), so it
is counted at the mean length measured on a few seeds (``models-*`` units); the
per-config cost is scaled by the number of evaluation points; the per-job fixed cost is
the measured start-up of a Python process importing lorabench (Snakemake's own per-job
overhead is not included); and a run
that validates every k steps (``val_every``) costs the native step less one calibrated
validation per skipped step (``validation-*``, measured only when a config asks for it).
"""

from __future__ import annotations

import heapq
import io
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, redirect_stderr
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

from ..core.config import ConfigError, RunConfig
from .experiments import BEYOND_THE_PAPER
from .provenance import cpu_model

STREAM = "stream-tfn"  # the reference transformer's batches: see stream_cost
VALIDATION = {"fnn": "validation-fnn", "tfn": "validation-tfn"}  # one native validation: see validation_saving
STARTUP = "startup"
CACHE_NAME = "plan-calibration.json"
# The calibration's cells: configs like a real cell of the unit, at two depths, two step
# counts and two cell sizes; a real cell holds up to runner.MAX_CELL configs, on the native
# step runner.MAX_NATIVE_CELL (the paper's FNN and native transformer cells: 192). The
# grid's own cell (``grid_cell``): ranks 1-16 x these weight decays.
CAL_DEPTHS = {"fnn": (2, 8), "tfn": (1, 2)}
CAL_CELLS = {  # (sizes, steps) per engine
    "native-fnn": ((32, 192), (50, 500)),
    # The transformer's per-config step is the difference of the two sizes' slopes: with
    # 10 and 40 steps two calibrations on one quiet machine differed by up to 10%. Its
    # real cells hold 192 configs (runner.MAX_NATIVE_CELL): calibrated at that size.
    "native-tfn": ((64, 192), (10, 80)),
    "torch-fnn": ((4, 16), (20, 200)),
    "autograd-fnn": ((4, 16), (20, 200)),
    "torch-tfn": ((4, 16), (5, 20)),
    "autograd-tfn": ((4, 16), (5, 20)),
    "gradients-tfn": ((16, 64), (10, 80)),
}
CAL_WEIGHT_DECAYS = {"fnn": (0.0, 1e-4, 1e-3, 1e-2), "tfn": (0.0, 1e-3)}
CAL_CONSTRUCTIONS = 16
CAL_VALIDATION_STEPS = {"fnn": 200, "tfn": 40}
CAL_SPARSE_VAL_EVERY = 50  # the validation's calibration: every step against every 50th (and the last)
CAL_N_TEST = 1000
CAL_N_VAL = 256
CAL_PRETRAIN_SEEDS = 8  # pretrained models per depth, run to their stop: the mean length
CAL_STREAM_POSITIONS = 24
# Under the reference protocol each transformer config draws its own batches, and the
# target's outputs for them, from a stream that rewinds whenever its validation improves:
# configs share a draw while they stand at the same position, and the stream keeps drawn
# positions for the configs that reach them later. The calibration's short cells never
# see configs drift apart over 5,000 steps, so the plan adds, per config and step, this
# share of a fresh position (at most 1: every config at a position of its own), by the
# transformer's depth. Measured on the paper preset's reference transformer jobs of seed 0,
# random frozen model (their cells' logs give the count): 22,434 positions in 960,000
# config-steps at depth 1, 0.023 (21,740 when it ran as three 64-config cells); 74,249 at
# depth 2, 0.077. Deeper transformers take the depth-2 share.
REFERENCE_TFN_DISTINCT_SHARE = {1: 0.03, 2: 0.08}


def distinct_share(depth: int) -> float:
    """REFERENCE_TFN_DISTINCT_SHARE at a transformer's depth."""
    return REFERENCE_TFN_DISTINCT_SHARE[min(max(depth, 1), max(REFERENCE_TFN_DISTINCT_SHARE))]


# ------------------------------------------------------------------ rates
@dataclass(frozen=True)
class Rate:
    """Core-seconds of one calibration unit, measured at two depths and linear in between
    (and, extrapolated, beyond): per config-step (per pretraining step for model
    generation) and per config (per model key); and what a cell pays for all its configs
    together, per step (``cell_step_s``) and once (``cell_s``)."""

    depths: tuple[int, int]
    step_s: tuple[float, float]
    config_s: tuple[float, float]
    measured: str = ""  # how and when
    cell_step_s: tuple[float, float] = (0.0, 0.0)
    cell_s: tuple[float, float] = (0.0, 0.0)
    # model generation of pretrained keys: the mean number of Adam steps a pretraining took
    pretrain_steps: tuple[float, float] = (0.0, 0.0)

    def _at(self, values: tuple[float, float], depth: int) -> float:
        (d0, d1), (v0, v1) = self.depths, values
        value = v0 if d1 == d0 else v0 + (v1 - v0) * (depth - d0) / (d1 - d0)
        return max(value, 0.0)

    def step(self, depth: int) -> float:
        return self._at(self.step_s, depth)

    def config(self, depth: int) -> float:
        return self._at(self.config_s, depth)

    def cell_step(self, depth: int) -> float:
        return self._at(self.cell_step_s, depth)

    def cell(self, depth: int) -> float:
        return self._at(self.cell_s, depth)

    def pretraining(self, depth: int) -> float:
        return self._at(self.pretrain_steps, depth)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Rate":
        return cls(tuple(d["depths"]), tuple(d["step_s"]), tuple(d["config_s"]), d.get("measured", ""),
                   tuple(d.get("cell_step_s", (0.0, 0.0))), tuple(d.get("cell_s", (0.0, 0.0))),
                   tuple(d.get("pretrain_steps", (0.0, 0.0))))


def _line(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float]:
    """Slope and intercept through two points (slope 0 through one)."""
    slope = 0.0 if x1 == x0 else (y1 - y0) / (x1 - x0)
    return slope, y0 - slope * x0


def _split(small: float, large: float, n0: int, n1: int) -> tuple[float, float]:
    """Per config and per cell parts of what cells of ``n0`` and ``n1`` configs pay (a line
    in the size). Where noise makes a part negative, the larger cell's whole cost goes to
    the other part, so a cell of that size is still priced at what it was measured to cost."""
    if n0 == n1:
        return small / n0, 0.0
    per_config, per_cell = _line(n0, small, n1, large)
    if per_cell < 0:
        return large / n1, 0.0
    if per_config < 0:
        return 0.0, large
    return per_config, per_cell


@dataclass(frozen=True)
class Timing:
    """CPU seconds of one calibration run: in all, and of its training steps alone (each
    cell's steps after its first, ``step_count`` of them), which give a step's cost
    without the noise of the run's set-up and evaluations."""

    total: float
    steps: float = 0.0
    step_count: int = 0


def rate_from_timings(depths: tuple[int, int], steps: tuple[int, int], sizes: tuple[int, int],
                      timings: Mapping[tuple[int, int, int], Timing], measured: str = "") -> Rate:
    """The rate from one cell's ``Timing`` at each (depth, size, steps): per size, what one
    step of the cell cost (its training steps timed alone, over both runs) and what the
    runs cost beyond their steps (on average), each split into per-config and per-cell
    parts (``_split``)."""
    per = {"step_s": [], "config_s": [], "cell_step_s": [], "cell_s": []}
    n0, n1 = sizes
    for depth in depths:
        slopes, onces = [], []
        for n in sizes:
            runs = [timings[(depth, n, k)] for k in steps]
            slope = sum(t.steps for t in runs) / max(sum(t.step_count for t in runs), 1)
            slopes.append(slope)
            onces.append(sum(t.total - k * slope for k, t in zip(steps, runs)) / len(runs))
        step, cell_step = _split(max(slopes[0], 0.0), max(slopes[1], 0.0), n0, n1)
        fixed, cell = _split(max(onces[0], 0.0), max(onces[1], 0.0), n0, n1)
        for name, value in (("step_s", step), ("config_s", fixed), ("cell_step_s", cell_step), ("cell_s", cell)):
            per[name].append(value)
    return Rate(tuple(depths), tuple(per["step_s"]), tuple(per["config_s"]), measured,
                tuple(per["cell_step_s"]), tuple(per["cell_s"]))


# ------------------------------------------------------------------ counting
def engine_of(cfg: RunConfig, kind: str, native: Callable[[RunConfig], bool]) -> str:
    """The engine that runs ``cfg`` in a job of ``kind``; ``native(cfg)`` is the trainer's
    engine decision for a method with a native step. Off the native step, a method with
    hand-written gradients trains on ``torch``, any other on ``autograd``, but on the
    transformer where the native step would apply: there autograd maps the native pass's
    gradients onto the method's parameters (``gradients``, trainables.py)."""
    from ..methods import method_of
    from .runner import trains_natively

    if kind == "models":
        return f"models-{cfg.exp}"
    if kind == "construct":
        return f"construct-{cfg.exp}"
    if trains_natively(cfg, native):
        return f"native-{cfg.exp}"
    engine = method_of(cfg).engine
    if engine == "autograd" and cfg.exp == "tfn" and native(cfg):
        return "gradients-tfn"
    return f"{engine}-{cfg.exp}"


def at_own_depth(cell: Sequence[RunConfig], kind: str) -> bool:
    """Whether a cell's unit is calibrated at its own depths rather than as a line in the
    depth: a construction (its cost follows its groups of layers), and a cell whose method
    prices its cell's own settings (``Method.cost_shape``: final-layer tuning costs what
    the deepest layer that its cell tunes costs)."""
    from ..methods import method_of

    return kind == "construct" or (kind == "train" and bool(method_of(cell[0]).cost_shape(cell)))


def shape_of(cell: Sequence[RunConfig], kind: str) -> str:
    """The settings beyond depth, cell size and step count that change what a cell's
    configs cost on their engine (for model generation: what a pretraining's steps cost
    and how many it takes)."""
    from ..methods import method_of

    cfg = cell[0]
    if kind == "models":
        words = [cfg.protocol, cfg.activation, f"width {cfg.width}"]
        if cfg.exp == "tfn":
            words += [f"heads {cfg.n_head}", f"tokens {cfg.seq_length}"] + (["prenorm"] if cfg.prenorm else [])
        if cfg.pretrained:
            words += [f"pretrained up to {cfg.pretrained_epochs} steps of batch {cfg.batch_size}, "
                      f"lr {cfg.pretrained_lr:g}, level {cfg.pretrained_level:g}"]
        return " ".join(words)
    words = [cfg.method, cfg.task, cfg.activation, f"width {cfg.width}"]
    if at_own_depth(cell, kind):
        words.append(f"depths {cfg.target_depth}/{cfg.frozen_depth}")
    if kind == "train":
        words += [f"batch {cfg.batch_size}" if cfg.n_train is None else f"set {cfg.n_train}", f"val {cfg.n_val}"]
        words += [w for w in [method_of(cfg).cost_shape(cell)] if w]
    words.append(cfg.protocol)
    if cfg.exp == "tfn":
        words += [f"heads {cfg.n_head}", f"tokens {cfg.seq_length}"]
        words += [flag for flag in ("prenorm", "better_optim") if getattr(cfg, flag)]
    return " ".join(words)


def unit_of(cell: Sequence[RunConfig], kind: str, native: Callable[[RunConfig], bool]) -> str:
    """The calibration unit that prices a cell's configs (a job's ``job_cells``): its
    engine, at its shape."""
    engine, shape = engine_of(cell[0], kind, native), shape_of(cell, kind)
    return f"{engine} [{shape}]" if shape else engine


def engine_name(unit: str) -> str:
    return unit.split(" [", 1)[0]


def eval_points(cfg: RunConfig) -> int:
    return 2 * cfg.n_test + cfg.n_val  # test, shifted test, validation


def config_cost(cfg: RunConfig, kind: str, rate: Rate) -> float:
    """Core-seconds of one config (models job: one model key), without its cell's share."""
    depth = cfg.frozen_depth
    if kind == "models":
        steps = min(rate.pretraining(depth), cfg.pretrained_epochs) if cfg.pretrained else 0.0
        return rate.config(depth) + steps * rate.step(depth)
    scale = eval_points(cfg) / eval_points(RunConfig(n_test=CAL_N_TEST, n_val=CAL_N_VAL))
    steps = cfg.n_epochs if kind == "train" else 0
    return steps * rate.step(depth) + scale * rate.config(depth)


def cell_cost(cfg: RunConfig, kind: str, rate: Rate) -> float:
    """Core-seconds a training cell pays once for all its configs (``cfg``: any of them)."""
    if kind != "train":
        return 0.0
    return cfg.n_epochs * rate.cell_step(cfg.frozen_depth) + rate.cell(cfg.frozen_depth)


def job_cells(job, native: Callable[[RunConfig], bool]) -> list[list[RunConfig]]:
    """A job's configs as they run and are priced: training cells for a train job (sized
    by the engine decision ``native``); for the others, its configs grouped by shape
    (each config runs on its own)."""
    from .runner import cells

    if job.kind == "train":
        return cells(job.configs, native)
    groups: dict[str, list[RunConfig]] = {}
    for c in job.configs:
        groups.setdefault(shape_of([c], job.kind), []).append(c)
    return list(groups.values())


@dataclass
class Row:
    experiment: str
    protocol: str
    jobs: int = 0
    configs: int = 0  # trained (sgd, flt) by this experiment's jobs
    reused: int = 0  # configs whose rows are copied from another experiment's train job
    config_steps: int = 0
    constructions: int = 0
    models: int = 0  # model keys generated
    core_s: float = 0.0
    engines: dict = field(default_factory=dict)  # engine -> core-seconds


def has_stream_cost(cfg: RunConfig, kind: str) -> bool:
    return kind == "train" and cfg.exp == "tfn" and cfg.protocol == "reference"


def stream_cost(cfg: RunConfig, kind: str, rates: Mapping[str, Rate]) -> float:
    """Core-seconds of the reference transformer's batches beyond what the calibrated
    step holds (``distinct_share``): per step, a share of the configs draws a
    batch of its own and evaluates the target on it (the validation batch, and the
    training batch unless the training set is fixed). ``STREAM``'s rate is per position
    and target evaluation."""
    if not has_stream_cost(cfg, kind):
        return 0.0
    evaluations = 1 if cfg.n_train else 2
    return cfg.n_epochs * distinct_share(cfg.frozen_depth) * evaluations * rates[STREAM].step(cfg.frozen_depth)


def validations(cfg: RunConfig) -> int:
    """The validated steps of a run: every val_every-th and the last."""
    return cfg.n_epochs // cfg.val_every + (cfg.n_epochs % cfg.val_every != 0)


def skips_validations(cfg: RunConfig, kind: str, native: Callable[[RunConfig], bool]) -> bool:
    from .runner import trains_natively

    return kind == "train" and cfg.val_every > 1 and trains_natively(cfg, native)


def validation_saving(cfg: RunConfig, kind: str, rates: Mapping[str, Rate], native: Callable[[RunConfig], bool]) -> float:
    """Core-seconds that the validations a run skips (val_every > 1) take off the
    calibrated native step, which validates every step. Torch cells are projected at the
    full step: there the validation's share is within the noise of the measurement."""
    if not skips_validations(cfg, kind, native):
        return 0.0
    return (cfg.n_epochs - validations(cfg)) * rates[VALIDATION[cfg.exp]].step(cfg.frozen_depth)


def engine_cost(cfg: RunConfig, kind: str, rate: Rate, rates: Mapping[str, Rate],
                native: Callable[[RunConfig], bool]) -> float:
    """Core-seconds of one config at its unit's ``rate`` (without its cell's share and
    the reference stream's batches)."""
    return max(config_cost(cfg, kind, rate) - validation_saving(cfg, kind, rates, native), 0.0)


def cell_costs(job, rates: Mapping[str, Rate], native: Callable[[RunConfig], bool]) -> dict[str, float]:
    """Core-seconds of a job's configs by engine (the reference stream's batches under
    ``STREAM``), start-up not included."""
    out: dict[str, float] = defaultdict(float)
    for cell in job_cells(job, native):
        unit = unit_of(cell, job.kind, native)
        rate = rates[unit]
        out[engine_name(unit)] += cell_cost(cell[0], job.kind, rate) + sum(
            engine_cost(c, job.kind, rate, rates, native) for c in cell)
        stream = sum(stream_cost(c, job.kind, rates) for c in cell)
        if stream:
            out[STREAM] += stream
    return dict(out)


def job_costs(jobs: Sequence, rates: Mapping[str, Rate], startup_s: float,
              native: Callable[[RunConfig], bool]) -> list[float]:
    """Core-seconds of each job: start-up plus its cells."""
    return costs_of([cell_costs(j, rates, native) for j in jobs], startup_s)


def costs_of(by_engine: Sequence[Mapping[str, float]], startup_s: float) -> list[float]:
    """Each job's core-seconds from its ``cell_costs``."""
    return [startup_s + sum(engines.values()) for engines in by_engine]


def own_work(jobs: Sequence, shared: Mapping) -> tuple[list, list[int]]:
    """The jobs with each train job cut to the configs it trains itself (it copies the
    rows of the configs it shares with an earlier experiment's train job: ``shared``, from
    ``experiments.shared_configs``), and how many configs each job copies."""
    from .experiments import job_key

    out, reused = [], []
    for job in jobs:
        copied = {c for cfgs in shared.get(job_key(job), {}).values() for c in cfgs}
        out.append(replace(job, configs=tuple(c for c in job.configs if c not in copied)) if copied else job)
        reused.append(len(copied))
    return out, reused


def count(jobs: Sequence, costs: Sequence[float], startup_s: float, by_engine: Sequence[Mapping[str, float]],
          reused: Optional[Sequence[int]] = None) -> list[Row]:
    """One row per (experiment, protocol), in the jobs' order."""
    rows: dict[tuple[str, str], Row] = {}
    for i, (job, cost) in enumerate(zip(jobs, costs)):
        row = rows.setdefault((job.experiment, job.protocol), Row(job.experiment, job.protocol))
        row.jobs += 1
        row.reused += reused[i] if reused else 0
        row.core_s += cost
        row.engines[STARTUP] = row.engines.get(STARTUP, 0.0) + startup_s
        for engine, seconds in by_engine[i].items():
            row.engines[engine] = row.engines.get(engine, 0.0) + seconds
        if job.kind == "train":
            row.configs += len(job.configs)
            row.config_steps += sum(c.n_epochs for c in job.configs)
        elif job.kind == "construct":
            row.constructions += len(job.configs)
        else:
            row.models += len(job.configs)
    return list(rows.values())


def makespan(durations: Iterable[float], cores: int) -> float:
    """Longest-first list scheduling of independent jobs on ``cores`` workers."""
    if cores < 1:
        raise ConfigError(f"cores must be >= 1, got {cores}")
    loads = [0.0] * cores
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


def wall_time(jobs: Sequence, costs: Sequence[float], cores: int) -> float:
    """Projected wall seconds on ``cores`` one-thread workers: the models jobs first
    (longest first), then every other job, longest first, on the first free worker once
    its seed's models job is done (so never less than that chain)."""
    if cores < 1:
        raise ConfigError(f"cores must be >= 1, got {cores}")
    loads = [0.0] * cores
    ready: dict = {}
    models = sorted(((c, j) for j, c in zip(jobs, costs) if j.kind == "models"), key=lambda x: -x[0])
    for cost, job in models:
        start = heapq.heappop(loads)
        ready[(job.experiment, job.protocol, job.seed)] = start + cost
        heapq.heappush(loads, start + cost)
    end = max(loads)
    others = sorted(((c, j) for j, c in zip(jobs, costs) if j.kind != "models"), key=lambda x: -x[0])
    for cost, job in others:
        start = max(heapq.heappop(loads), ready.get((job.experiment, job.protocol, job.seed), 0.0))
        heapq.heappush(loads, start + cost)
        end = max(end, start + cost)
    return end


def parse_cores(text: str) -> list[int]:
    try:
        cores = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--cores: expected comma-separated integers, got {text!r}") from None
    if not cores or min(cores) < 1:
        raise ConfigError(f"--cores: expected integers >= 1, got {text!r}")
    return cores


# ------------------------------------------------------------------ cache
def cache_key(unit: str, device: str = "cpu") -> str:
    """Version, CPU model, torch version and calibration unit (and the GPU, when training
    runs on one)."""
    import torch

    from .. import __version__

    parts = [__version__, cpu_model(), torch.__version__, unit]
    if device != "cpu":
        parts.append(torch.cuda.get_device_name(torch.device(device)))
    return "|".join(parts)


def cache_path() -> Path:
    from ..training.native import cache_dir

    return cache_dir() / CACHE_NAME


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again


def calibration(units: Mapping[str, Optional[Sequence[RunConfig]]],
                calibrate: Callable[[str, Optional[Sequence[RunConfig]]], dict],
                recalibrate: bool = False, path: Optional[Path] = None,
                key: Callable[[str], str] = cache_key) -> tuple[dict, dict]:
    """``({unit: measurement}, {unit: 'cache' | 'measured'})``; ``units``: each unit with a
    config of its shape (None for the units calibrated on the grid's own shape);
    ``calibrate(unit, example)`` is called only for units missing from the cache (every
    unit with ``recalibrate``), and its result is cached."""
    from .atomic import atomic_write

    path = path or cache_path()
    cache = _read_cache(path)
    out, source = {}, {}
    for unit, example in units.items():
        k = key(unit)
        if recalibrate or k not in cache:
            cache[k] = calibrate(unit, example)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(cache, indent=1, sort_keys=True)))
            source[unit] = "measured"
        else:
            source[unit] = "cache"
        out[unit] = cache[k]
    return out, source


# ------------------------------------------------------------------ calibration
@contextmanager
def _engine(setting: str):
    old = os.environ.get("LORABENCH_ENGINE")
    os.environ["LORABENCH_ENGINE"] = setting
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LORABENCH_ENGINE", None)
        else:
            os.environ["LORABENCH_ENGINE"] = old


def grid_cell(family: str, method: str = "sgd", protocol: str = "paper") -> list[RunConfig]:
    """A cell of the grid's shape (width 16, batch 256; transformers: 2 heads, 10 tokens):
    ranks 1-16 x the calibration's weight decays, for the units calibrated on it."""
    from ..methods import validated

    depth = CAL_DEPTHS[family][0]
    base = RunConfig(exp=family, width=16, target_depth=1 if family == "fnn" else depth, frozen_depth=depth,
                     batch_size=256, n_test=CAL_N_TEST, n_val=CAL_N_VAL, std=0.25, seed=0, protocol=protocol,
                     method=method, lr=1e-4, n_head=2, seq_length=10)
    return [validated(base.replace(rank=r, weight_decay=wd)) for wd in CAL_WEIGHT_DECAYS[family] for r in range(1, 17)]


def _cal_cell(example: Sequence[RunConfig], depth: int, size: int, steps: int = 1,
              val_every: int = 1) -> list[RunConfig]:
    """``size`` configs like the cell ``example`` (spread evenly over it from its first to
    its last config, repeated when it is smaller) at ``depth``: one cell (constructions:
    one config each)."""
    from ..methods import validated

    fixed = dict(frozen_depth=depth, n_epochs=steps, n_test=CAL_N_TEST, seed=0, pretrained=0, best_epoch=0,
                 curve_every=CAL_SPARSE_VAL_EVERY, val_every=val_every)
    out = []
    for i in range(size):
        base = example[(i * (len(example) - 1)) // (size - 1)] if 1 < size <= len(example) else example[i % len(example)]
        target_depth = depth if base.exp == "tfn" else min(base.target_depth, depth)
        out.append(validated(base.replace(**fixed, target_depth=target_depth,
                                          last_layers=min(base.last_layers, depth),
                                          lr=base.lr * (1 + 1e-3 * i))))  # distinct configs
    return out


def _cpu_seconds(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def _timed_run(cfgs: list[RunConfig], device: str) -> Timing:
    from ..core.protocols import generate_models
    from .runner import model_key, run_configs

    models = {model_key(c): generate_models(model_key(c)) for c in cfgs}  # timed as models-*
    cell_steps = cfgs[0].n_epochs  # every cell of a calibration run trains as long
    step_ends = []  # (steps done, CPU time), at the end of each training step

    def progress(label: str, done: int, total: int) -> None:
        if label == "training":
            step_ends.append((done, time.process_time()))

    # untimed first: one-off costs (lazy imports, the native library's load, allocator
    # warm-up) belong to the process start-up, not to the configs
    with redirect_stderr(io.StringIO()):  # the cells' own log lines are not the plan's
        list(run_configs(cfgs[:2], device=device, models=models))
        total = _cpu_seconds(lambda: list(run_configs(cfgs, device=device, models=models, progress=progress)))
    # a step's own time: from the end of the step before it in the same cell
    spans = [end - before for (_, before), (done, end) in zip(step_ends, step_ends[1:])
             if (done - 1) % cell_steps != 0]
    return Timing(total, sum(spans), len(spans))


def calibrate_unit(unit: str, example: Optional[Sequence[RunConfig]] = None, device: str = "cpu") -> dict:
    """Measure one calibration unit on small real cells like ``example`` (a cell of the
    unit; see the module's docstring; without one, the grid's shape); a JSON-able dict."""
    import torch

    torch.set_num_threads(1)  # the workflow's default: one thread per job
    # the load says how far to trust the figures: CPU time, but shared caches and cores
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + f", load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    if unit == STARTUP:
        return {"seconds": _startup_seconds(), "measured": f"python importing lorabench's job modules (CPU s), {stamp}"}
    engine = engine_name(unit)
    kind, family = engine.split("-")
    depths = CAL_DEPTHS[family]
    if engine == STREAM:
        return asdict(_calibrate_stream(depths, stamp))
    if kind == "models":
        return asdict(_calibrate_models(example or grid_cell(family), depths, stamp))
    if kind == "validation":
        return asdict(_calibrate_validation(family, depths, device, stamp))
    if kind == "construct":
        example = example or grid_cell(family, "ours")
        depth = example[0].frozen_depth
        cfgs = _cal_cell(example, depth, CAL_CONSTRUCTIONS)
        per_config = _timed_run(cfgs, device).total / len(cfgs)
        return asdict(Rate((depth, depth), (0.0, 0.0), (per_config, per_config),
                           f"{len(cfgs)} constructions, {stamp}"))
    if example is None:  # the grid's shape; autograd and gradients (the plug-in methods' engines) on DoRA
        example = grid_cell(family, "dora" if kind in ("autograd", "gradients") else "sgd")
    if at_own_depth(example, "train"):
        depths = (example[0].frozen_depth,) * 2
    sizes, steps = CAL_CELLS[engine]
    timings = {}
    with _engine({"autograd": "torch", "gradients": "native"}.get(kind, kind)):
        for depth in dict.fromkeys(depths):
            for size in sizes:
                for n in steps:
                    timings[(depth, size, n)] = _timed_run(_cal_cell(example, depth, size, n), device)
    measured = (f"cells of {sizes[0]} and {sizes[1]} configs x {steps[0]} and {steps[1]} steps, depths {depths}, "
                f"steps timed alone, {stamp}")
    return asdict(rate_from_timings(depths, steps, sizes, timings, measured))


def _calibrate_validation(family: str, depths: tuple[int, int], device: str, stamp: str) -> Rate:
    """CPU seconds of one native validation of one config: the same cells validating every
    step and every CAL_SPARSE_VAL_EVERY steps, the difference per skipped validation."""
    steps = CAL_VALIDATION_STEPS[family]
    example, size = grid_cell(family), CAL_CELLS[f"native-{family}"][0][1]
    per_validation = []
    with _engine("native"):
        for depth in depths:
            every, sparse = (_cal_cell(example, depth, size, steps, k) for k in (1, CAL_SPARSE_VAL_EVERY))
            saved = _timed_run(every, device).total - _timed_run(sparse, device).total
            per_validation.append(max(saved, 0.0) / (len(every) * (validations(every[0]) - validations(sparse[0]))))
    measured = f"{size} configs x {steps} steps validated every step and every {CAL_SPARSE_VAL_EVERY}, {stamp}"
    return Rate(tuple(depths), tuple(per_validation), (0.0, 0.0), measured)


def _calibrate_models(example: Sequence[RunConfig], depths: tuple[int, int], stamp: str) -> Rate:
    """Per model key like ``example``'s first: generation without pretraining and, for a
    pretrained key, the CPU time per pretraining step and the mean number of steps a
    pretraining takes (it stops below initial / pretrained_level or at its budget), over
    CAL_PRETRAIN_SEEDS seeds run to their stop."""
    from ..core.protocols import generate_models

    seeds = range(CAL_PRETRAIN_SEEDS)
    pretrained = bool(example[0].pretrained)
    step_s, config_s, mean_steps = [], [], []
    for depth in depths:
        cfg = _cal_cell(example, depth, 1)[0].replace(pretrained=0)
        generate_models(cfg.replace(seed=99, pretrained=1, pretrained_epochs=2))  # warm-up, untimed
        plain = sum(_cpu_seconds(lambda s=s: generate_models(cfg.replace(seed=s))) for s in seeds) / len(seeds)
        taken, spent = [], 0.0
        for s in seeds if pretrained else ():
            start = time.process_time()
            taken.append(generate_models(cfg.replace(seed=s, pretrained=1)).pretrain_steps or 0)
            spent += time.process_time() - start - plain
        config_s.append(plain)
        step_s.append(max(spent, 0.0) / max(sum(taken), 1))
        mean_steps.append(sum(taken) / len(seeds) if pretrained else 0.0)
    what = (f"{len(seeds)} seeds per depth, pretrained to their stop (mean steps {', '.join(f'{m:.0f}' for m in mean_steps)})"
            if pretrained else f"{len(seeds)} seeds per depth, no pretraining")
    return Rate(tuple(depths), tuple(step_s), tuple(config_s), f"{what}, {stamp}", pretrain_steps=tuple(mean_steps))


def _calibrate_stream(depths: tuple[int, int], stamp: str) -> Rate:
    """CPU seconds per target evaluation of the reference transformer's stream: fresh
    positions drawn one after another, each a training and a validation batch with the
    target's outputs (two evaluations)."""
    import torch

    from ..core.protocols import generate_models
    from ..core.streams import ReferenceTFNStream
    from ..training.native import tfn_outputs, use_native

    step_s = []
    for depth in depths:
        cfg = _cal_cell(grid_cell("tfn", protocol="reference"), depth, 1)[0]
        target = generate_models(cfg).target
        # As a run evaluates them: natively where the native step trains the cell.
        outputs = partial(tfn_outputs, target) if use_native(cfg, torch.device("cpu")) else None
        stream = ReferenceTFNStream(cfg, target, None, 1, "cpu", outputs)

        def step(count: int) -> None:
            for _ in range(count):  # no improvement observed: every step is a fresh position
                stream.train_batch(0)
                stream.val_batch()  # drawn with the training batch; moves the stream on

        step(1)  # warm-up, untimed
        step_s.append(_cpu_seconds(lambda: step(CAL_STREAM_POSITIONS)) / (2 * CAL_STREAM_POSITIONS))
    return Rate(tuple(depths), tuple(step_s), (0.0, 0.0),
                f"{CAL_STREAM_POSITIONS} positions per depth, {stamp}")


def _startup_seconds(repeats: int = 3) -> float:
    """CPU seconds of a Python process that imports lorabench's job modules (the least of
    a few tries: start-up, not the machine's load)."""
    best = float("inf")
    code = "import lorabench.cli, lorabench.runs.pipeline, lorabench.runs.runner"  # what `python -m lorabench train` loads
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return best


# ------------------------------------------------------------------ against a run
BENCHMARK_RULE = {"models": "generate_models", "construct": "construct", "train": "train"}


def measured_against(jobs: Sequence, costs: Sequence[float], ids: Sequence[str], records: Path) -> list[dict]:
    """Per (experiment, protocol): the projected and the measured CPU seconds of the jobs
    that have a benchmark record under ``records`` (Snakemake's ``logs/benchmarks``, one
    file per job that ran, ``<rule>/<experiment>/<protocol>/<job id>.tsv``); rows without
    any record are left out. ``ids``: the jobs' ids (those of their whole config sets, before
    ``own_work`` cut them)."""
    from .costs import read_record

    out: dict[tuple[str, str], dict] = {}
    for job, cost, job_id in zip(jobs, costs, ids):
        record = records / BENCHMARK_RULE[job.kind] / job.experiment / job.protocol / f"{job_id}.tsv"
        if not record.exists():
            continue
        row = out.setdefault((job.experiment, job.protocol), {
            "experiment": job.experiment, "protocol": job.protocol, "jobs": 0, "projected_cpu_s": 0.0,
            "measured_cpu_s": 0.0})
        row["jobs"] += 1
        row["projected_cpu_s"] += cost
        row["measured_cpu_s"] += read_record(record)["cpu_s"]
    for row in out.values():
        row["ratio"] = row["measured_cpu_s"] / row["projected_cpu_s"] if row["projected_cpu_s"] else float("nan")
    return list(out.values())


# ------------------------------------------------------------------ pieces
DURATION_UNITS = {"h": 3600.0, "min": 60.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``2h``, ``90min`` or ``5400s``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(h|min|m|s)\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--pieces: expected a duration such as 2h, 90min or 5400s, got {text!r}")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


@dataclass
class Piece:
    """One Snakemake run of the plan: these experiments under these protocols, or, for an
    experiment too long for one piece, these jobs (``targets``: their output files)."""

    experiments: list
    protocols: list
    wall_s: float = 0.0
    core_s: float = 0.0
    over_budget: bool = False  # a single job projected above the budget
    targets: list = field(default_factory=list)  # job outputs; empty: whole experiments


def make_pieces(jobs: Sequence, costs: Sequence[float], cores: int, budget_s: float,
                protocols: Sequence[str], linked: Iterable[tuple[str, str]] = (),
                sources: Optional[Mapping[int, Sequence[int]]] = None,
                paths: Optional[Sequence[str]] = None) -> list[Piece]:
    """The jobs cut into pieces each projected to take at most ``budget_s`` on ``cores``
    (``wall_time``). An experiment keeps both protocols in one piece when they fit
    together; otherwise each protocol is its own unit. Experiments ``linked`` (one reuses
    the other's training of shared configs) stay in one unit, so a piece's projection is
    what its run trains. Units of the same protocols are packed first-fit, longest first;
    such a piece is a product of experiments and protocols, so one ``--config
    experiments=[...] protocols=[...]`` names it.

    A unit above the budget is cut into its jobs instead (``paths``: their outputs), each
    job with its seed's models job; ``sources``: job index -> the indices of the train
    jobs whose rows it copies, which go to the same or an earlier piece. Those pieces
    come after the others, in the order they must run."""
    order = list(dict.fromkeys(job.experiment for job in jobs))
    lead = {name: name for name in order}  # each experiment's unit, named by its first experiment
    for a, b in linked:
        if a not in lead or b not in lead:
            continue  # one of them has no job left to run
        a, b = sorted((lead[a], lead[b]), key=order.index)
        lead = {name: a if unit == b else unit for name, unit in lead.items()}
    members = {unit: [name for name in order if lead[name] == unit] for unit in dict.fromkeys(lead.values())}
    by_unit: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        by_unit[(lead[job.experiment], job.protocol)].append(i)
    protocols = [p for p in protocols if any(p == key[1] for key in by_unit)]

    def wall(indices: list[int]) -> float:
        return wall_time([jobs[i] for i in indices], [costs[i] for i in indices], cores)

    units: list[tuple[tuple[str, ...], str, list[int]]] = []  # (protocols, experiment, job indices)
    too_long: list[int] = []  # jobs of units above the budget, cut job by job
    for name in members:
        together = [i for p in protocols for i in by_unit.get((name, p), [])]
        if len(protocols) == 1 or wall(together) <= budget_s:
            units.append((tuple(protocols), name, together))
        else:
            units.extend(((p,), name, by_unit[(name, p)]) for p in protocols if by_unit.get((name, p)))
    if paths is not None:
        too_long = [i for u in units if wall(u[2]) > budget_s for i in u[2]]
        units = [u for u in units if wall(u[2]) <= budget_s]
    groups = list(dict.fromkeys(u[0] for u in units))
    pieces: list[tuple[tuple[str, ...], list[str], list[int]]] = []
    for group in sorted(groups, key=len, reverse=True):  # both protocols first, then each
        mine: list[tuple[list[str], list[int]]] = []
        for _, name, indices in sorted((u for u in units if u[0] == group), key=lambda u: -wall(u[2])):
            for names, held in mine:
                if wall(held + indices) <= budget_s:
                    names.extend(members[name])
                    held.extend(indices)
                    break
            else:
                mine.append((list(members[name]), list(indices)))
        mine.sort(key=lambda piece: min(order.index(name) for name in piece[0]))  # the config's order
        pieces.extend((group, names, held) for names, held in mine)
    out = []
    for group, names, held in pieces:
        seconds = wall(held)
        out.append(Piece(sorted(names, key=order.index), list(group), seconds, sum(costs[i] for i in held),
                         seconds > budget_s))
    if too_long:
        out.extend(_job_pieces(jobs, costs, too_long, wall, budget_s, sources or {}, paths, order))
    return out


def _job_pieces(jobs, costs, indices, wall, budget_s, sources, paths, order) -> list[Piece]:
    """Pieces of single jobs (see make_pieces), packed first-fit, longest first, a job
    copying rows never before the piece of a job it copies them from."""
    models = {(jobs[i].experiment, jobs[i].protocol, jobs[i].seed): i for i in indices if jobs[i].kind == "models"}
    level: dict[int, int] = {}
    for i in indices:  # a source precedes the jobs that copy from it in ``jobs``
        level[i] = 1 + max((level.get(s, 0) for s in sources.get(i, ())), default=-1)
    work = sorted((i for i in indices if jobs[i].kind != "models"), key=lambda i: (level[i], -costs[i]))
    placed: dict[int, int] = {}
    held: list[list[int]] = []

    def with_models(members: list[int]) -> list[int]:
        seeds = dict.fromkeys((jobs[i].experiment, jobs[i].protocol, jobs[i].seed) for i in members)
        return [models[k] for k in seeds if k in models] + members

    for i in work:
        first = max((placed[s] for s in sources.get(i, ()) if s in placed), default=0)
        for k in range(first, len(held)):
            if wall(with_models(held[k] + [i])) <= budget_s:
                break
        else:
            k = len(held)
            held.append([])
        held[k].append(i)
        placed[i] = k
    out, built = [], set()
    for members in held:
        # a models job runs in the first piece that needs it; later pieces read its output
        need = [m for m in with_models(members) if m not in built]
        built.update(need)
        seconds = wall(need)
        out.append(Piece(sorted({jobs[i].experiment for i in need}, key=order.index),
                         sorted({jobs[i].protocol for i in need}), seconds, sum(costs[i] for i in need),
                         seconds > budget_s, [paths[i] for i in members]))
    return out


def piece_command(piece: Piece, preset: str, cores: int, configfile: str = "config.yaml") -> str:
    """The Snakemake command of one piece: its training and its per-protocol results, or
    its jobs' outputs alone."""
    config = "" if configfile == "config.yaml" else f"--configfile {configfile} "
    if piece.targets:
        return f"snakemake --cores {cores} {' '.join(piece.targets)} {config}--config preset={preset}"
    return (f"snakemake --cores {cores} all_runs {config}--config preset={preset} "
            f"experiments=[{','.join(piece.experiments)}] protocols=[{','.join(piece.protocols)}]")


def combine_command(preset: str, cores: int, configfile: str = "config.yaml") -> str:
    """The run after every piece: aggregation, figures, claims and tables (no training)."""
    config = "" if configfile == "config.yaml" else f"--configfile {configfile} "
    return f"snakemake --cores {cores} all_figures {config}--config preset={preset}"


# ------------------------------------------------------------------ the plan
def load_workflow(configfile: str, preset: Optional[str] = None, experiments: Optional[Sequence[str]] = None):
    """The expanded workflow config of a config file, with its preset overridden and its
    experiments restricted when asked."""
    import yaml

    from . import experiments as lbx

    try:
        with open(configfile) as f:
            config = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{configfile}: no such config file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{configfile}: not valid YAML ({error})") from None
    if preset is not None:
        config["preset"] = preset
    wf = lbx.load(config)
    if experiments:
        unknown = sorted(set(experiments) - set(wf.experiments))
        if unknown:
            raise ConfigError(f"--experiments: unknown experiment(s) {', '.join(unknown)} "
                              f"(the config has {', '.join(wf.experiments)})")
        wf = wf.select(experiments)
    return wf, wf.run_jobs()


def make_plan(wf, jobs: Sequence, cores: Sequence[int], calibrate: Callable[[str], dict] = None,
              recalibrate: bool = False, native: Optional[Callable[[RunConfig], bool]] = None,
              path: Optional[Path] = None, pieces_s: Optional[float] = None,
              configfile: str = "config.yaml", records: Optional[Path] = None,
              done: Callable[[str], bool] = lambda path: False) -> dict:
    """The plan as a JSON-able dict: rows, total, wall times, calibration; with
    ``pieces_s``, the pieces of at most that many seconds on ``cores[0]`` cores and their
    commands; with ``records`` (a benchmark records folder), the projection against the
    CPU time of the jobs that ran (``measured_against``). Pieces leave out the jobs
    ``done`` says are done (by output path): a run in pieces plans what is left."""
    from .experiments import job_key, shared_configs
    from .runner import resolve_device

    device = resolve_device(wf.device)
    if native is None:
        from ..training.native import use_native

        native = lambda cfg: use_native(cfg, device)  # noqa: E731
    if calibrate is None:
        calibrate = lambda unit, example: calibrate_unit(unit, example, device.type)  # noqa: E731
    units: dict[str, Optional[list[RunConfig]]] = {STARTUP: None}
    for j in jobs:
        for cell in job_cells(j, native):
            units.setdefault(unit_of(cell, j.kind, native), cell)
            for c in cell:
                if has_stream_cost(c, j.kind):
                    units.setdefault(STREAM, None)
                if skips_validations(c, j.kind, native):
                    units.setdefault(VALIDATION[c.exp], None)
    units = {STARTUP: None, **dict(sorted((u, e) for u, e in units.items() if u != STARTUP))}
    key = lambda unit: cache_key(unit, device.type)  # noqa: E731
    measured, source = calibration(units, calibrate, recalibrate, path, key)
    startup_s = measured[STARTUP]["seconds"]
    rates = {u: Rate.from_dict(measured[u]) for u in units if u != STARTUP}
    shared = shared_configs(list(jobs))
    linked = {(key[0], source[0]) for key, by_source in shared.items() for source in by_source}
    ids = [job.id for job in jobs]  # before own_work: a job's id (and path) names all its configs
    paths = [job.path for job in jobs]
    index = {job_key(job): i for i, job in enumerate(jobs)}
    sources = {index[key]: [index[s] for s in by_source if s in index] for key, by_source in shared.items()
               if key in index}
    jobs, reused = own_work(jobs, shared)
    by_engine = [cell_costs(j, rates, native) for j in jobs]  # each job's cells grouped once
    costs = costs_of(by_engine, startup_s)
    rows = count(jobs, costs, startup_s, by_engine, reused)
    total = Row("total", "")
    for row in rows:
        for name in ("jobs", "configs", "reused", "config_steps", "constructions", "models", "core_s"):
            setattr(total, name, getattr(total, name) + getattr(row, name))
        for engine, s in row.engines.items():
            total.engines[engine] = total.engines.get(engine, 0.0) + s
    out = {
        "preset": wf.preset,
        "protocols": list(wf.protocols),
        "device": device.type,
        "rows": [asdict(r) for r in rows],
        "total": asdict(total),
        "beyond_the_paper_s": sum(r.core_s for r in rows if r.experiment in BEYOND_THE_PAPER),
        "wall_s": {str(n): wall_time(jobs, costs, n) for n in cores},
        "startup_s": startup_s,
        "calibration": {u: {**measured[u], "source": source[u], "key": key(u)} for u in units},
        "cache": str(path or cache_path()),
    }
    if records is not None:
        out["measured"] = {"records": str(records), "rows": measured_against(jobs, costs, ids, Path(records))}
    if pieces_s is not None:
        n = cores[0]
        left = [i for i, path in enumerate(paths) if not done(path)]
        renumber = {old: new for new, old in enumerate(left)}
        pieces = make_pieces([jobs[i] for i in left], [costs[i] for i in left], n, pieces_s, wf.protocols, linked,
                             {renumber[i]: [renumber[s] for s in sources[i] if s in renumber]
                              for i in sources if i in renumber}, [paths[i] for i in left])
        out["pieces"] = {
            "budget_s": pieces_s, "cores": n, "done": len(paths) - len(left),
            "runs": [{**asdict(p), "command": piece_command(p, wf.preset, n, configfile)} for p in pieces],
            "combine": combine_command(wf.preset, n, configfile),
        }
    return out


class NotCalibrated(LookupError):
    """An engine without a cached calibration, where measuring one is not allowed."""


def preview(wf, jobs: Sequence, cores: int) -> Optional[str]:
    """The block a workflow run prints before its first job: the preset, the jobs to run,
    their projected core-hours and wall time on ``cores``, from the cached calibration
    alone (it never calibrates, and never builds the native library: the engine decision
    is ``native.applies``). Without a cached calibration it says so, with the command that
    measures one. None when ``jobs`` (the jobs still to run) is empty."""
    from ..training import native
    from .runner import resolve_device

    if not jobs:
        return None
    device = resolve_device(wf.device)

    def uncached(unit: str, example) -> dict:
        raise NotCalibrated(unit)

    head = f"lorabench: preset {wf.preset}, {len(jobs)} jobs to run"
    try:
        plan = make_plan(wf, jobs, [cores], calibrate=uncached, native=lambda cfg: native.applies(cfg, device))
    except NotCalibrated as missing:
        return (f"{head}; no projection: this machine has no cached calibration of '{missing}'. "
                f"`lorabench plan --preset {wf.preset}` measures one (minutes) and caches it.")
    return (f"{head}: projected {_hours(plan['total']['core_s'])} core-hours, about "
            f"{_duration(plan['wall_s'][str(cores)])} on {cores} cores (`lorabench plan --preset {wf.preset}` "
            "for the details).")


def _hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:.3g}" if h < 100 else f"{h:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _short(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e6:.3g} us"


def format_plan(plan: dict) -> str:
    head = ("experiment", "protocol", "jobs", "configs", "reused", "config-steps", "constructions", "models", "core-h")
    lines = []
    for r in [*plan["rows"], plan["total"]]:
        lines.append((r["experiment"], r["protocol"], str(r["jobs"]), str(r["configs"]), str(r["reused"]),
                      f"{r['config_steps']:,}",
                      str(r["constructions"]), str(r["models"]), _hours(r["core_s"])))
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [f"plan: preset {plan['preset']}, protocols {', '.join(plan['protocols'])}, device {plan['device']}",
           fmt(head), "  ".join("-" * w for w in widths)]
    out += [fmt(cells) for cells in lines[:-1]]
    out += ["  ".join("-" * w for w in widths), fmt(lines[-1]), ""]
    beyond, total = plan.get("beyond_the_paper_s", 0.0), plan["total"]["core_s"]
    if 0 < beyond < total:
        out.append(f"core-h of the paper's own experiments {_hours(total - beyond)}, of those beyond it "
                   f"({', '.join(BEYOND_THE_PAPER)}) {_hours(beyond)}")
    engines = plan["total"]["engines"]
    out.append("core-h by engine: " + ", ".join(f"{e} {_hours(s)}" for e, s in sorted(engines.items(), key=lambda x: -x[1])))
    for n, s in plan["wall_s"].items():
        out.append(f"projected wall time on {n} core(s), one job per core: {_duration(s)}")
    if "measured" in plan:
        out += ["", *format_measured(plan["measured"])]
    if "pieces" in plan:
        out += ["", *format_pieces(plan["pieces"])]
    out.append("")
    out.append(f"calibration ({plan['cache']}):")
    for unit, c in plan["calibration"].items():
        if unit == STARTUP:
            what = f"{c['seconds']:.2f} s per job (measured: process start-up and imports; Snakemake's own overhead not included)"
        else:
            what = "; ".join(_rate_words(unit, Rate.from_dict(c), d) for d in dict.fromkeys(Rate.from_dict(c).depths))
        out.append(f"  {unit} [{c['source']}]")
        out.append(f"      {what}")
        out.append(f"      ({c.get('measured', '')})")
    out.append("  CPU time of one thread; pretraining counted at its mean measured length")
    return "\n".join(out)


def _rate_words(unit: str, rate: Rate, depth: int) -> str:
    if unit.startswith("models"):
        words = f"depth {depth}: {_short(rate.config(depth))} per model key"
        if rate.pretraining(depth):
            words += f", {_short(rate.step(depth))} per pretraining step, {rate.pretraining(depth):.0f} steps"
        return words
    if unit.startswith("construct"):
        return f"depth {depth}: {_short(rate.config(depth))} per construction"
    words = f"depth {depth}: {_short(rate.step(depth))} per config-step, {_short(rate.config(depth))} per config"
    if rate.cell_step(depth) or rate.cell(depth):
        words += f", {_short(rate.cell_step(depth))} per cell-step, {_short(rate.cell(depth))} per cell"
    return words


def format_measured(measured: dict) -> list[str]:
    rows = measured["rows"]
    if not rows:
        return [f"no job of this plan has a benchmark record under {measured['records']}"]
    out = [f"projected against measured CPU time (the jobs with a record under {measured['records']}):"]
    for r in rows:
        out.append(f"  {r['experiment']:<16} {r['protocol']:<10} {r['jobs']:>4} jobs  projected {r['projected_cpu_s']:>9,.0f} s"
                   f"  measured {r['measured_cpu_s']:>9,.0f} s  x{r['ratio']:.2f}")
    projected = sum(r["projected_cpu_s"] for r in rows)
    spent = sum(r["measured_cpu_s"] for r in rows)
    out.append(f"  {'total':<16} {'':<10} {sum(r['jobs'] for r in rows):>4} jobs  projected {projected:>9,.0f} s"
               f"  measured {spent:>9,.0f} s  x{spent / projected if projected else float('nan'):.2f}")
    return out


def format_pieces(pieces: dict) -> list[str]:
    runs = pieces["runs"]
    done = f" ({pieces['done']} jobs already done here are left out)" if pieces.get("done") else ""
    out = [f"{len(runs)} piece(s) of at most {_duration(pieces['budget_s'])} on {pieces['cores']} core(s){done}, "
           "in this order (each trains only its experiments and protocols, or its jobs):"]
    for i, run in enumerate(runs, 1):
        over = "  ABOVE THE BUDGET: one job alone" if run["over_budget"] else ""
        what = f"{len(run['targets'])} job(s) of " if run["targets"] else ""
        out.append(f"  {i}. {_duration(run['wall_s'])} ({_hours(run['core_s'])} core-h): "
                   f"{what}{', '.join(run['experiments'])} [{', '.join(run['protocols'])}]{over}")
        out.append(f"     {run['command']}")
    out.append("then, to aggregate and draw (no training):")
    out.append(f"     {pieces['combine']}")
    return out
