"""``lorabench plan``: what a workflow config will cost, before it runs.

For each experiment and protocol of a config (a preset of ``config.yaml`` or any other
config file): the jobs, the trained configs and their config-steps (configs x Adam
steps), the configs copied from another experiment's training (``reused``: shared configs
train once), the constructions and model keys, and the projected core-hours on this
machine; then the total and the projected wall time on a given number of cores. A
selection of experiments counts the other experiments' train jobs that it reuses.

The projection is linear in measured rates. Each engine (``ENGINES``: the native and the
torch trainer of FNN and TFN cells, the constructions, the model generation) is
calibrated once by running small real cells through ``runner.run_configs`` at two depths
and two step counts, which separates the cost of a config-step from the per-config cost
(set-up and evaluation) and gives both as a line in the model's depth. Times are CPU
time, so a busy machine slows the calibration's wall clock more than its figures. Rates
are cached in ``cache_dir()/plan-calibration.json``, keyed by lorabench version, CPU
model, torch version and engine; ``--recalibrate`` measures again.

Pieces (``--pieces 2h``): the experiments and protocols grouped into Snakemake runs each
projected to fit the budget on the given cores (first-fit by projected wall time; an
experiment runs with both protocols in one piece when they fit together, else one piece
per protocol; experiments that share configs stay together), each with its command; their outputs combine (``results/runs/<experiment>/
<protocol>.parquet``), and a last run of ``all_figures`` only aggregates and draws.

What the projection leaves out or bounds: pretraining is counted at its full budget
(``pretrained_epochs``; it may stop early), the per-config cost is scaled by the number
of evaluation points, the per-job fixed cost is the measured start-up of a Python
process importing lorabench (Snakemake's own per-job overhead is not included), and a run
that validates every k steps (``val_every``) costs the native step less one calibrated
validation per skipped step (``validation-*``, measured only when a config asks for it).
"""

from __future__ import annotations

import heapq
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

from ..core.config import ConfigError, RunConfig
from .provenance import cpu_model

STREAM = "stream-tfn"  # the reference transformer's batches: see stream_cost
VALIDATION = {"fnn": "validation-fnn", "tfn": "validation-tfn"}  # one native validation: see validation_saving
ENGINES = ("native-fnn", "native-tfn", "torch-fnn", "torch-tfn", "autograd-fnn", "autograd-tfn",
           "construct-fnn", "construct-tfn", "models-fnn", "models-tfn", STREAM, *VALIDATION.values())
STARTUP = "startup"
CACHE_NAME = "plan-calibration.json"
# The calibration's cells: the grid's shape (width 16, batch 256, H=2, N=10) at two
# depths each; ranks 1-16 x weight decays fill a cell.
CAL_DEPTHS = {"fnn": (2, 8), "tfn": (1, 2)}
CAL_STEPS = {"fnn": (20, 200), "tfn": (10, 40)}
CAL_WEIGHT_DECAYS = {"fnn": (0.0, 1e-4, 1e-3, 1e-2), "tfn": (0.0, 1e-3)}  # 64 and 32 configs
CAL_SPARSE_VAL_EVERY = 50  # the validation's calibration: every step against every 50th (and the last)
CAL_N_TEST = 1000
CAL_N_VAL = 256
CAL_PRETRAIN_STEPS = 30
CAL_STREAM_POSITIONS = 24
# Under the reference protocol each transformer config draws its own batches, and the
# target's outputs for them, from a stream that rewinds whenever its validation improves:
# configs share a draw while they stand at the same position, and the stream keeps drawn
# positions for the configs that reach them later. The calibration's short cells never
# see configs drift apart over 5,000 steps, so the plan adds, per config and step, this
# share of a fresh position (at most 1: every config at a position of its own). Measured
# on the paper preset's reference transformer job of seed 0, depth 1, random frozen model
# (three 64-config cells of 5,000 steps; each cell's log gives its count): 21,740
# positions in 960,000 config-steps, 0.023 (0.064, 0.004 and 0.000 per cell).
REFERENCE_TFN_DISTINCT_SHARE = 0.03


# ------------------------------------------------------------------ rates
@dataclass(frozen=True)
class Rate:
    """Core-seconds of one engine, measured at two depths and linear in between (and,
    extrapolated, beyond): per config-step (per pretraining step for model generation)
    and per config (per model key)."""

    depths: tuple[int, int]
    step_s: tuple[float, float]
    config_s: tuple[float, float]
    measured: str = ""  # how and when

    def _at(self, values: tuple[float, float], depth: int) -> float:
        (d0, d1), (v0, v1) = self.depths, values
        value = v0 if d1 == d0 else v0 + (v1 - v0) * (depth - d0) / (d1 - d0)
        return max(value, 0.0)

    def step(self, depth: int) -> float:
        return self._at(self.step_s, depth)

    def config(self, depth: int) -> float:
        return self._at(self.config_s, depth)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Rate":
        return cls(tuple(d["depths"]), tuple(d["step_s"]), tuple(d["config_s"]), d.get("measured", ""))


def rate_from_timings(depths: tuple[int, int], steps: tuple[int, int], n_configs: int,
                      seconds: Mapping[tuple[int, int], float], measured: str = "") -> Rate:
    """The rate from the times of ``n_configs`` configs at each (depth, steps)."""
    step_s, config_s = [], []
    (s0, s1) = steps
    for depth in depths:
        t0, t1 = seconds[(depth, s0)], seconds[(depth, s1)]
        per_step = max(t1 - t0, 0.0) / (n_configs * (s1 - s0))
        step_s.append(per_step)
        config_s.append(max(t0 / n_configs - s0 * per_step, 0.0))
    return Rate(tuple(depths), tuple(step_s), tuple(config_s), measured)


# ------------------------------------------------------------------ counting
def engine_of(cfg: RunConfig, kind: str, native: Callable[[RunConfig], bool]) -> str:
    """The engine that runs ``cfg`` in a job of ``kind``; ``native(cfg)`` is the trainer's
    engine decision for a method with a native step. Off the native step, a method with
    hand-written gradients trains on ``torch``, any other on ``autograd`` (calibrated on
    DoRA cells)."""
    from ..methods import method_of

    if kind == "models":
        return f"models-{cfg.exp}"
    if kind == "construct":
        return f"construct-{cfg.exp}"
    return f"{'native' if trains_natively(cfg, native) else method_of(cfg).engine}-{cfg.exp}"


def trains_natively(cfg: RunConfig, native: Callable[[RunConfig], bool]) -> bool:
    from ..methods import method_of

    return method_of(cfg).native and native(cfg)


def eval_points(cfg: RunConfig) -> int:
    return 2 * cfg.n_test + cfg.n_val  # test, shifted test, validation


def config_cost(cfg: RunConfig, kind: str, rate: Rate) -> float:
    """Core-seconds of one config (models job: one model key)."""
    depth = cfg.frozen_depth
    if kind == "models":
        return rate.config(depth) + (cfg.pretrained_epochs if cfg.pretrained else 0) * rate.step(depth)
    scale = eval_points(cfg) / eval_points(RunConfig(n_test=CAL_N_TEST, n_val=CAL_N_VAL))
    steps = cfg.n_epochs if kind == "train" else 0
    return steps * rate.step(depth) + scale * rate.config(depth)


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
    step holds (REFERENCE_TFN_DISTINCT_SHARE): per step, a share of the configs draws a
    batch of its own and evaluates the target on it (the validation batch, and the
    training batch unless the training set is fixed). ``STREAM``'s rate is per position
    and target evaluation."""
    if not has_stream_cost(cfg, kind):
        return 0.0
    evaluations = 1 if cfg.n_train else 2
    return cfg.n_epochs * REFERENCE_TFN_DISTINCT_SHARE * evaluations * rates[STREAM].step(cfg.frozen_depth)


def validations(cfg: RunConfig) -> int:
    """The validated steps of a run: every val_every-th and the last."""
    return cfg.n_epochs // cfg.val_every + (cfg.n_epochs % cfg.val_every != 0)


def skips_validations(cfg: RunConfig, kind: str, native: Callable[[RunConfig], bool]) -> bool:
    return kind == "train" and cfg.val_every > 1 and trains_natively(cfg, native)


def validation_saving(cfg: RunConfig, kind: str, rates: Mapping[str, Rate], native: Callable[[RunConfig], bool]) -> float:
    """Core-seconds that the validations a run skips (val_every > 1) take off the
    calibrated native step, which validates every step. Torch cells are projected at the
    full step: there the validation's share is within the noise of the measurement."""
    if not skips_validations(cfg, kind, native):
        return 0.0
    return (cfg.n_epochs - validations(cfg)) * rates[VALIDATION[cfg.exp]].step(cfg.frozen_depth)


def engine_cost(cfg: RunConfig, kind: str, rates: Mapping[str, Rate], native: Callable[[RunConfig], bool]) -> float:
    """Core-seconds of one config on its engine (without the reference stream's batches)."""
    full = config_cost(cfg, kind, rates[engine_of(cfg, kind, native)])
    return max(full - validation_saving(cfg, kind, rates, native), 0.0)


def job_costs(jobs: Sequence, rates: Mapping[str, Rate], startup_s: float,
              native: Callable[[RunConfig], bool]) -> list[float]:
    """Core-seconds of each job: start-up plus its configs."""
    return [startup_s + sum(engine_cost(c, j.kind, rates, native) + stream_cost(c, j.kind, rates) for c in j.configs)
            for j in jobs]


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


def count(jobs: Sequence, costs: Sequence[float], startup_s: float,
          native: Callable[[RunConfig], bool], rates: Mapping[str, Rate],
          reused: Optional[Sequence[int]] = None) -> list[Row]:
    """One row per (experiment, protocol), in the jobs' order."""
    rows: dict[tuple[str, str], Row] = {}
    for i, (job, cost) in enumerate(zip(jobs, costs)):
        row = rows.setdefault((job.experiment, job.protocol), Row(job.experiment, job.protocol))
        row.jobs += 1
        row.reused += reused[i] if reused else 0
        row.core_s += cost
        row.engines[STARTUP] = row.engines.get(STARTUP, 0.0) + startup_s
        for c in job.configs:
            engine = engine_of(c, job.kind, native)
            row.engines[engine] = row.engines.get(engine, 0.0) + engine_cost(c, job.kind, rates, native)
            stream = stream_cost(c, job.kind, rates)
            if stream:
                row.engines[STREAM] = row.engines.get(STREAM, 0.0) + stream
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
def cache_key(engine: str, device: str = "cpu") -> str:
    """Version, CPU model, torch version and engine (and the GPU, when training runs on one)."""
    import torch

    from .. import __version__

    parts = [__version__, cpu_model(), torch.__version__, engine]
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


def calibration(engines: Iterable[str], calibrate: Callable[[str], dict], recalibrate: bool = False,
                path: Optional[Path] = None, key: Callable[[str], str] = cache_key) -> tuple[dict, dict]:
    """``({engine: measurement}, {engine: 'cache' | 'measured'})``; ``calibrate(engine)``
    is called only for engines missing from the cache (every engine with ``recalibrate``),
    and its result is cached."""
    from .atomic import atomic_write

    path = path or cache_path()
    cache = _read_cache(path)
    out, source = {}, {}
    for engine in dict.fromkeys(engines):
        k = key(engine)
        if recalibrate or k not in cache:
            cache[k] = calibrate(engine)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(cache, indent=1, sort_keys=True)))
            source[engine] = "measured"
        else:
            source[engine] = "cache"
        out[engine] = cache[k]
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


def _cal_configs(family: str, depth: int, method: str, protocol: str, steps: int = 1,
                 val_every: int = 1) -> list[RunConfig]:
    from ..methods import resolve, validated

    base = dict(exp=family, width=16, target_depth=1 if family == "fnn" else depth, frozen_depth=depth,
                batch_size=256, n_test=CAL_N_TEST, n_val=CAL_N_VAL, std=0.25, seed=0, protocol=protocol,
                method=method, n_epochs=steps, lr=1e-4, curve_every=CAL_SPARSE_VAL_EVERY, val_every=val_every,
                n_head=2, seq_length=10)
    if resolve(method).closed_form:
        return [validated(RunConfig(**base, rank=r)) for r in range(1, 17)]
    return [validated(RunConfig(**base, rank=r, weight_decay=wd))
            for r in range(1, 17) for wd in CAL_WEIGHT_DECAYS[family]]


def _cpu_seconds(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def _timed_run(cfgs: list[RunConfig], device: str) -> float:
    from ..core.protocols import generate_models
    from .runner import model_key, run_configs

    models = {model_key(c): generate_models(model_key(c)) for c in cfgs}  # timed as models-*
    # untimed first: one-off costs (lazy imports, the native library's load, allocator
    # warm-up) belong to the process start-up, not to the configs
    list(run_configs(cfgs[:2], device=device, models=models))
    return _cpu_seconds(lambda: list(run_configs(cfgs, device=device, models=models)))


def calibrate_engine(engine: str, device: str = "cpu") -> dict:
    """Measure one engine on small real cells (see the module's docstring); a JSON-able dict."""
    import torch

    torch.set_num_threads(1)  # the workflow's default: one thread per job
    # the load says how far to trust the figures: CPU time, but shared caches and cores
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + f", load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    if engine == STARTUP:
        return {"seconds": _startup_seconds(), "measured": f"python importing lorabench's job modules (CPU s), {stamp}"}
    kind, family = engine.split("-")
    depths = CAL_DEPTHS[family]
    if engine == STREAM:
        return asdict(_calibrate_stream(depths, stamp))
    if kind == "models":
        return asdict(_calibrate_models(family, depths, stamp))
    if kind == "validation":
        return asdict(_calibrate_validation(family, depths, device, stamp))
    if kind == "construct":
        seconds = {}
        for depth in depths:
            cfgs = _cal_configs(family, depth, "ours", "paper")
            seconds[(depth, 0)] = _timed_run(cfgs, device)
            seconds[(depth, 1)] = seconds[(depth, 0)]  # no steps
        rate = rate_from_timings(depths, (0, 1), len(cfgs), seconds, f"{len(cfgs)} constructions per depth, {stamp}")
        return asdict(rate)
    # torch is timed on the reference protocol, whose stream costs the most with it;
    # autograd (the plug-in methods' engine) on DoRA, whose adapted weight costs the most.
    protocol = "reference" if kind == "torch" else "paper"
    method = "dora" if kind == "autograd" else "sgd"
    steps = CAL_STEPS[family]
    seconds = {}
    with _engine("torch" if kind == "autograd" else kind):
        for depth in depths:
            for n in steps:
                cfgs = _cal_configs(family, depth, method, protocol, n)
                seconds[(depth, n)] = _timed_run(cfgs, device)
    measured = f"{len(cfgs)} {method} configs x {steps} steps, {protocol} protocol, depths {depths}, {stamp}"
    return asdict(rate_from_timings(depths, steps, len(cfgs), seconds, measured))


def _calibrate_validation(family: str, depths: tuple[int, int], device: str, stamp: str) -> Rate:
    """CPU seconds of one native validation of one config: the same cells validating every
    step and every CAL_SPARSE_VAL_EVERY steps, the difference per skipped validation."""
    steps = CAL_STEPS[family][1]
    per_validation = []
    with _engine("native"):
        for depth in depths:
            every, sparse = (_cal_configs(family, depth, "sgd", "paper", steps, k) for k in (1, CAL_SPARSE_VAL_EVERY))
            saved = _timed_run(every, device) - _timed_run(sparse, device)
            per_validation.append(max(saved, 0.0) / (len(every) * (validations(every[0]) - validations(sparse[0]))))
    measured = f"{len(every)} configs x {steps} steps validated every step and every {CAL_SPARSE_VAL_EVERY}, {stamp}"
    return Rate(tuple(depths), tuple(per_validation), (0.0, 0.0), measured)


def _calibrate_models(family: str, depths: tuple[int, int], stamp: str) -> Rate:
    """Per model key: generation without pretraining, and the CPU time per pretraining
    step actually taken (pretraining may stop before its budget)."""
    from ..core.protocols import generate_models

    seeds = range(4)
    step_s, config_s = [], []
    for depth in depths:
        cfg = _cal_configs(family, depth, "sgd", "paper")[0]
        generate_models(cfg.replace(seed=99, pretrained=1, pretrained_epochs=2))  # warm-up, untimed
        plain = sum(_cpu_seconds(lambda s=s: generate_models(cfg.replace(seed=s))) for s in seeds) / len(seeds)
        taken, spent = 0, 0.0
        for s in seeds:
            pre = cfg.replace(seed=s, pretrained=1, pretrained_epochs=CAL_PRETRAIN_STEPS)
            start = time.process_time()
            taken += generate_models(pre).pretrain_steps or 0
            spent += time.process_time() - start - plain
        config_s.append(plain)
        step_s.append(max(spent, 0.0) / max(taken, 1))
    return Rate(tuple(depths), tuple(step_s), tuple(config_s),
                f"{len(seeds)} seeds per depth, pretraining up to {CAL_PRETRAIN_STEPS} steps, {stamp}")


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
        cfg = _cal_configs("tfn", depth, "sgd", "reference")[0]
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
        calibrate = lambda engine: calibrate_engine(engine, device.type)  # noqa: E731
    needed = sorted({engine_of(c, j.kind, native) for j in jobs for c in j.configs}
                    | ({STREAM} if any(has_stream_cost(c, j.kind) for j in jobs for c in j.configs) else set())
                    | {VALIDATION[c.exp] for j in jobs for c in j.configs if skips_validations(c, j.kind, native)})
    key = lambda engine: cache_key(engine, device.type)  # noqa: E731
    measured, source = calibration([STARTUP, *needed], calibrate, recalibrate, path, key)
    startup_s = measured[STARTUP]["seconds"]
    rates = {e: Rate.from_dict(measured[e]) for e in needed}
    shared = shared_configs(list(jobs))
    linked = {(key[0], source[0]) for key, by_source in shared.items() for source in by_source}
    ids = [job.id for job in jobs]  # before own_work: a job's id (and path) names all its configs
    paths = [job.path for job in jobs]
    index = {job_key(job): i for i, job in enumerate(jobs)}
    sources = {index[key]: [index[s] for s in by_source if s in index] for key, by_source in shared.items()
               if key in index}
    jobs, reused = own_work(jobs, shared)
    costs = job_costs(jobs, rates, startup_s, native)
    rows = count(jobs, costs, startup_s, native, rates, reused)
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
        "wall_s": {str(n): wall_time(jobs, costs, n) for n in cores},
        "startup_s": startup_s,
        "calibration": {e: {**measured[e], "source": source[e], "key": key(e)} for e in [STARTUP, *needed]},
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

    def uncached(engine: str) -> dict:
        raise NotCalibrated(engine)

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
    for engine, c in plan["calibration"].items():
        if engine == STARTUP:
            what = f"{c['seconds']:.2f} s per job (measured: process start-up and imports; Snakemake's own overhead not included)"
        else:
            rate = Rate.from_dict(c)
            unit = "pretraining step" if engine.startswith("models") else "config-step"
            per = "model key" if engine.startswith("models") else "config"
            what = "; ".join(f"depth {d}: " + ("" if engine.startswith("construct") else
                                                 f"{_short(rate.step(d))} per {unit}, ")
                             + f"{_short(rate.config(d))} per {per}" for d in rate.depths)
        out.append(f"  {engine:<14} [{c['source']}] {what}")
        out.append(f"  {'':<14} ({c.get('measured', '')})")
    out.append("  CPU time of one thread; pretraining counted at its full budget (an upper bound)")
    return "\n".join(out)


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
