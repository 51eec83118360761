"""The workflow's config (``config.yaml``) as typed objects: experiments expanded into
RunConfigs, presets applied, and the expansion cut into jobs.

An experiment is a named set of runs::

    settings:  RunConfig fields shared by the experiment's runs; a list sweeps the field
    variants:  alternatives (e.g. (target_depth, frozen_depth) pairs), each merged over settings
    methods:   {ours|sgd|flt: fields of that method's runs; lists sweep}

A run's settings are, in order of precedence: its method's block, its variant, the
experiment's settings, the config's ``defaults``. Fields a method does not read
(``IGNORED``) are left at RunConfig's defaults unless the method's block sets them, so
the construction is not repeated over the learning-rate grid.

A preset scales every experiment: ``set`` replaces fields (seeds, test size, lr x wd grid),
``cap`` bounds them (steps), ``subset`` keeps the listed values of a swept field (ranks);
its ``experiments`` entries do the same for one experiment, after the rest.

Jobs: one per (experiment, protocol, seed) and kind (models, construct, train), or per
(experiment, protocol) and kind with a preset's ``split_seeds: false`` (fewer processes for
small runs); a job's id is ``s<seed>-<hash of its configs>`` (``all-<hash>``), so changing
an experiment changes its jobs' ids and nothing else's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..core.config import DEVICES, PROTOCOLS, ConfigError, RunConfig, config_from_dict
from .dispatch import DISPATCHES, SlurmSettings

PRESETS = ("paper", "quick", "smoke")
JOB_KINDS = ("models", "construct", "train")
# Fields a method does not read: left at RunConfig's defaults unless its block sets them.
IGNORED = {
    "ours": ("lr", "weight_decay", "n_epochs", "tune_bias", "last_layers", "best_epoch", "curve_every"),
    "sgd": ("last_layers",),
    "flt": ("rank", "rank_step", "tune_bias"),
}
_FIELDS = set(RunConfig.__dataclass_fields__)


@dataclass(frozen=True)
class Job:
    experiment: str
    protocol: str
    seed: Optional[int]  # None: every seed of the experiment
    kind: str  # models | construct | train
    configs: tuple[RunConfig, ...]  # models jobs: the model keys

    @property
    def id(self) -> str:
        prefix = "all" if self.seed is None else f"s{self.seed}"
        return f"{prefix}-{configs_hash(self.configs)}"

    def spec(self) -> dict:
        return {
            "experiment": self.experiment,
            "protocol": self.protocol,
            "seed": self.seed,
            "kind": self.kind,
            "configs": [c.to_dict() for c in self.configs],
        }


@dataclass(frozen=True)
class WorkflowConfig:
    preset: str
    protocols: tuple[str, ...]
    device: str
    dispatch: str
    threads: int
    slurm: SlurmSettings
    experiments: Mapping[str, tuple[RunConfig, ...]]  # protocol-free: protocol set per job
    split_seeds: bool = True

    def configs(self, experiment: str, protocol: str) -> list[RunConfig]:
        return [c.replace(protocol=protocol) for c in self.experiments[experiment]]

    def jobs(self) -> list[Job]:
        """Every job of every experiment and protocol, in a stable order."""
        out = []
        for name in self.experiments:
            for protocol in self.protocols:
                out.extend(experiment_jobs(name, protocol, self.configs(name, protocol), self.split_seeds))
        return out


def configs_hash(cfgs) -> str:
    """16 hex digits naming a set of configs (order-free)."""
    payload = json.dumps(sorted(c.config_hash() for c in cfgs))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def experiment_jobs(experiment: str, protocol: str, cfgs: list[RunConfig], split_seeds: bool = True) -> list[Job]:
    from .runner import cells, model_key

    jobs = []
    for seed in sorted({c.seed for c in cfgs}) if split_seeds else [None]:
        mine = [c for c in cfgs if seed is None or c.seed == seed]
        keys = tuple(dict.fromkeys(model_key(c) for c in mine))
        jobs.append(Job(experiment, protocol, seed, "models", keys))
        ours = tuple(c for c in mine if c.method == "ours")
        if ours:
            jobs.append(Job(experiment, protocol, seed, "construct", ours))
        gradient = [c for c in mine if c.method != "ours"]
        if gradient:
            # the runner's cells, in its order: the job runs them one after the other
            ordered = tuple(c for cell in cells(gradient) for c in cell)
            jobs.append(Job(experiment, protocol, seed, "train", ordered))
    return jobs


# ---------------------------------------------------------------- expansion
def _sweep(values: Mapping[str, Any]) -> list[dict]:
    """The product of a dict's list values (scalars stay fixed)."""
    names = list(values)
    choices = [v if isinstance(v, list) else [v] for v in values.values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def _check_fields(values: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    if "protocol" in values:
        raise ConfigError(f"{where}: 'protocol' is set by the top-level 'protocols' list")


def apply_preset(values: dict, preset: Mapping[str, Any]) -> dict:
    """``set`` replaces, ``cap`` bounds, ``subset`` filters swept lists."""
    values = dict(values)
    if not preset:
        return values
    values.update(preset.get("set") or {})
    for name, bound in (preset.get("cap") or {}).items():
        if name in values:
            v = values[name]
            values[name] = [min(x, bound) for x in v] if isinstance(v, list) else min(v, bound)
    for name, keep in (preset.get("subset") or {}).items():
        v = values.get(name)
        if isinstance(v, list):
            kept = [x for x in v if x in keep]
            values[name] = kept or v[:1]  # never empty: keep the first value
    return values


def expand_experiment(
    name: str, spec: Mapping[str, Any], defaults: Mapping[str, Any], preset: Mapping[str, Any]
) -> tuple[RunConfig, ...]:
    """Every RunConfig of one experiment (protocol left at its default)."""
    settings = dict(spec.get("settings") or {})
    variants = list(spec.get("variants") or [{}])
    methods = dict(spec.get("methods") or {})
    if not methods:
        raise ConfigError(f"experiment {name!r}: no methods")
    _check_fields(settings, f"experiment {name!r} settings")
    out: dict[RunConfig, None] = {}
    for i, variant in enumerate(variants):
        _check_fields(variant, f"experiment {name!r} variant {i}")
        for method, block in methods.items():
            if method not in IGNORED:
                raise ConfigError(f"experiment {name!r}: unknown method {method!r} (one of {sorted(IGNORED)})")
            block = dict(block or {})
            _check_fields(block, f"experiment {name!r} method {method!r}")
            merged = {**defaults, **settings, **variant, **block, "method": method}
            merged = apply_preset(merged, preset)
            merged = apply_preset(merged, (preset.get("experiments") or {}).get(name) or {})
            for ignored in IGNORED[method]:
                if ignored not in block:
                    merged.pop(ignored, None)
            for values in _sweep(merged):
                try:
                    cfg = config_from_dict(values)
                except ConfigError as error:
                    raise ConfigError(f"experiment {name!r} method {method!r}: {error}") from None
                out[cfg] = None
    if not out:
        raise ConfigError(f"experiment {name!r} has no runs")
    return tuple(out)


def load(config: Mapping[str, Any]) -> WorkflowConfig:
    """The typed workflow config from the (schema-validated) config dict."""
    preset_name = config.get("preset", "paper")
    presets = config.get("presets") or {}
    if preset_name not in PRESETS:
        raise ConfigError(f"preset must be one of {PRESETS}, got {preset_name!r}")
    preset = presets.get(preset_name) or {}
    protocols = tuple(config.get("protocols", PROTOCOLS))
    for p in protocols:
        if p not in PROTOCOLS:
            raise ConfigError(f"protocols: unknown protocol {p!r} (one of {PROTOCOLS})")
    device = config.get("device", "auto")
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
    dispatch = config.get("dispatch", "local")
    if dispatch not in DISPATCHES:
        raise ConfigError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    defaults = dict(config.get("defaults") or {})
    _check_fields(defaults, "defaults")
    for name, spec in presets.items():
        if name not in PRESETS:
            raise ConfigError(f"presets: unknown preset {name!r} (one of {PRESETS})")
        spec = spec or {}
        for part in ("set", "cap", "subset"):
            _check_fields(spec.get(part) or {}, f"preset {name!r} {part}")
        for experiment, override in (spec.get("experiments") or {}).items():
            if experiment not in (config.get("experiments") or {}):
                raise ConfigError(f"preset {name!r}: unknown experiment {experiment!r}")
            for part in ("set", "cap", "subset"):
                _check_fields((override or {}).get(part) or {}, f"preset {name!r} experiment {experiment!r} {part}")
    experiments = {
        name: expand_experiment(name, spec, defaults, preset) for name, spec in (config.get("experiments") or {}).items()
    }
    if not experiments:
        raise ConfigError("experiments: none defined")
    slurm = SlurmSettings(**(config.get("slurm") or {}))
    return WorkflowConfig(
        preset=preset_name,
        protocols=protocols,
        device=device,
        dispatch=dispatch,
        threads=int(config.get("threads", 1)),
        slurm=slurm,
        experiments=experiments,
        split_seeds=bool(preset.get("split_seeds", True)),
    )


def job_index(jobs: list[Job]) -> dict[tuple[str, str, str, str], Job]:
    """(experiment, protocol, kind, job id) -> Job."""
    return {(j.experiment, j.protocol, j.kind, j.id): j for j in jobs}


def models_jobs(jobs: list[Job]) -> dict[tuple[str, str, Optional[int]], Job]:
    """(experiment, protocol, seed) -> the models job the other jobs of that seed read."""
    return {(j.experiment, j.protocol, j.seed): j for j in jobs if j.kind == "models"}
