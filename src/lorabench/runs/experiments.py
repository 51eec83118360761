"""The workflow's config (``config.yaml``) as typed objects: experiments expanded into
RunConfigs, presets applied, and the expansion cut into jobs.

An experiment is a named set of runs::

    settings:  RunConfig fields shared by the experiment's runs; a list sweeps the field
    variants:  alternatives (e.g. (target_depth, frozen_depth) pairs), each merged over settings
    protocols: optional; the protocols it runs under, of the config's (default: all of them)
    methods:   {method: fields of that method's runs, and its own settings; lists sweep}

A method is named as the config's ``method`` field names it: a built-in one (``ours``,
``sgd``, ``flt``, ``full``, ``dora``, ``vera``, ``pissa``) or a user's
``package.module:ClassName`` (lorabench.methods). A run's settings are, in order of
precedence: its method's block, its variant, the experiment's settings, the config's
``defaults``. Fields a method does not read (``methods.ignored_fields``) are left at
RunConfig's defaults unless the method's block sets them, so the construction is not
repeated over the learning-rate grid. Keys of a method's block that are not RunConfig
fields are the method's own settings (its ``settings``), stored as ``method_settings``.

A preset scales every experiment: ``set`` replaces fields (seeds, test size, lr x wd grid),
``cap`` bounds them (steps), ``subset`` keeps the listed values of a swept field (ranks),
``only`` drops the runs whose value of a field is not listed (whole variants, e.g. widths);
its ``experiments`` entries do the same for one experiment, after the rest, except that an
entry's ``subset`` of a field replaces the preset's ``subset`` of that field (so one
experiment can keep ranks the others drop).

Jobs: one per (experiment, protocol, seed) and kind (models, construct, train), or per
(experiment, protocol) and kind with a preset's ``split_seeds: false`` (fewer processes for
small runs); each gradient method trains in jobs of its own; a preset's ``split_by: [field, ...]`` cuts each seed's training further, one
train job per value of those fields (so a single-seed experiment can use several cores);
a job's id is ``s<seed>-<hash of its configs>`` (``all-<hash>``), so changing an experiment
changes its jobs' ids and nothing else's.

Configs shared between experiments are trained once (``shared_configs``): a train job
whose configs an earlier experiment's train job also holds (same config, so same
protocol, seed and models) takes their rows from that job's output instead of training
them again. Its id and output still cover all of its configs. The sharing is decided over
every defined experiment, not the selection, so selecting experiments never changes a
job's inputs: a selected experiment pulls in the train jobs it reuses.

A job travels to its step as a small reference (``WorkflowConfig.job_ref``: the
experiment's definition, the preset and the job's id); the step expands that one
experiment again (``resolve_job``) instead of reading a spec file, so parsing the workflow
writes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Optional

from ..core.config import DEVICES, PROTOCOLS, ConfigError, RunConfig, config_from_dict
from ..methods import canonical_settings, ignored_fields, method_of, resolve, validated
from .dispatch import DISPATCHES, SlurmSettings

PRESETS = ("paper", "full_length", "quick", "smoke")
JOB_KINDS = ("models", "construct", "train")
STAGE_DIR = {"models": "models", "construct": "constructions", "train": "cells"}
STAGE_SUFFIX = {"models": "pt", "construct": "parquet", "train": "parquet"}
SCALING = ("set", "cap", "subset", "only")  # how a preset scales an experiment
# The experiments beyond the paper's own (its figures' and threshold_law): its question
# asked of other methods and of its open cases. `lorabench plan` shows their cost apart.
BEYOND_THE_PAPER = ("methods", "tfn_low_rank", "tfn_prenorm")
_FIELDS = set(RunConfig.__dataclass_fields__)
_SETTING = "\0setting:"  # marks a method's own settings while a block's values are swept


@dataclass(frozen=True)
class Job:
    experiment: str
    protocol: str
    seed: Optional[int]  # None: every seed of the experiment
    kind: str  # models | construct | train
    configs: tuple[RunConfig, ...]  # models jobs: the model keys

    @cached_property  # hashing a paper-grid job's configs takes milliseconds; ids are asked often
    def id(self) -> str:
        prefix = "all" if self.seed is None else f"s{self.seed}"
        return f"{prefix}-{configs_hash(self.configs)}"

    @property
    def path(self) -> str:
        """The job's output in the workflow (results/<stage>/<experiment>/<protocol>/<id>.<suffix>)."""
        return f"results/{STAGE_DIR[self.kind]}/{self.experiment}/{self.protocol}/{self.id}.{STAGE_SUFFIX[self.kind]}"

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
    split_by: tuple[str, ...] = ()  # RunConfig fields cutting a seed's training into jobs
    # every defined experiment, also under a selection: shared configs are decided over all
    defined: Mapping[str, tuple[RunConfig, ...]] = field(default_factory=dict, compare=False, repr=False)
    # per experiment, what expand_experiment read: its block, the defaults and the preset
    definitions: Mapping[str, dict] = field(default_factory=dict, compare=False, repr=False)

    def jobs(self, defined: bool = False) -> list[Job]:
        """Every job of every selected (or, with ``defined``, every defined) experiment and
        protocol, in a stable order."""
        return [job for name in ((self.defined or self.experiments) if defined else self.experiments)
                for job in self._jobs_of(name)]

    @cached_property
    def _expanded(self) -> dict[str, list[Job]]:
        return {}  # experiment -> its jobs: a paper-grid experiment takes up to a second to cut

    def _jobs_of(self, name: str) -> list[Job]:
        if name not in self._expanded:
            cfgs = (self.defined or self.experiments)[name]
            self._expanded[name] = [job for protocol in self.protocols_of(name) for job in experiment_jobs(
                name, protocol, [c.replace(protocol=protocol) for c in cfgs], self.split_seeds, self.split_by)]
        return self._expanded[name]

    def protocols_of(self, name: str) -> tuple[str, ...]:
        """The protocols experiment ``name`` runs under: the config's ``protocols``, less
        those its block leaves out (``protocols: [paper]``)."""
        own = ((self.definitions.get(name) or {}).get("definition") or {}).get("protocols")
        return tuple(p for p in self.protocols if own is None or p in own)

    @cached_property
    def shared(self) -> dict[JobKey, dict[JobKey, tuple[RunConfig, ...]]]:
        """``shared_configs`` over every defined experiment's jobs."""
        return shared_configs(self.jobs(defined=True))

    def run_jobs(self) -> list[Job]:
        """The jobs a run of the selected experiments runs: theirs, and the train jobs of
        other experiments whose rows they reuse, with those jobs' models jobs; in the
        order of ``jobs(defined=True)``."""
        every = self.jobs(defined=True)
        keys = {job_key(j) for j in every if j.experiment in self.experiments}
        wanted = keys | {source for key, by_source in self.shared.items() if key in keys for source in by_source}
        seeds = {(j.experiment, j.protocol, j.seed) for j in every if job_key(j) in wanted - keys}
        return [j for j in every if job_key(j) in wanted
                or (j.kind == "models" and (j.experiment, j.protocol, j.seed) in seeds)]

    def job_ref(self, job: Job) -> str:
        """What a step needs to rebuild ``job`` (``resolve_job``), as compact JSON: a few
        hundred bytes, where the job's spec of a paper-grid training job is ~150 kB."""
        ref = {"experiment": job.experiment, "protocol": job.protocol, "kind": job.kind, "id": job.id,
               "split_seeds": self.split_seeds, "split_by": list(self.split_by), **self.definitions[job.experiment]}
        return json.dumps(ref, sort_keys=True, separators=(",", ":"))

    def select(self, names) -> "WorkflowConfig":
        """Only the named experiments (``--config experiments=[fnn,tfn]``); an unknown name
        is refused with the valid ones."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.experiments]
        if unknown:
            raise ConfigError(f"experiments: unknown experiment(s) {', '.join(map(repr, unknown))}; "
                              f"defined: {', '.join(self.experiments)}")
        if not names:
            raise ConfigError(f"experiments: empty selection; defined: {', '.join(self.experiments)}")
        keep = [n for n in self.experiments if n in names]  # the config's order
        # (definitions stay whole: a selected experiment may reuse another's train jobs)
        return dataclasses.replace(self, experiments={n: self.experiments[n] for n in keep})


def resolve_job(ref: str) -> Job:
    """The job a ``WorkflowConfig.job_ref`` names: its experiment expanded again, and the
    job of that kind and id. A reference that does not expand to its id (edited by hand,
    or from another lorabench version) is refused."""
    try:
        values = json.loads(ref)
        name, protocol, kind, job_id = values["experiment"], values["protocol"], values["kind"], values["id"]
        block, defaults, preset = values["definition"], values["defaults"], values["preset"]
        split_seeds = bool(values["split_seeds"])
        split_by = tuple(values.get("split_by") or ())
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"not a lorabench job reference ({type(error).__name__}: {error})") from None
    cfgs = [c.replace(protocol=protocol) for c in expand_experiment(name, block, defaults, preset)]
    for job in experiment_jobs(name, protocol, cfgs, split_seeds, split_by):
        if job.kind == kind and job.id == job_id:
            return job
    raise ConfigError(f"job {job_id} ({kind}) is not in experiment {name!r} ({protocol}) as referenced")


def configs_hash(cfgs) -> str:
    """16 hex digits naming a set of configs (order-free), and the source of the users'
    methods among them, so that editing a method renames (and reruns) only its jobs."""
    names = sorted(c.config_hash() for c in cfgs)
    digests = sorted({d for d in (method_of(c).digest for c in cfgs) if d})
    payload = json.dumps(names if not digests else [names, digests])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def experiment_jobs(experiment: str, protocol: str, cfgs: list[RunConfig], split_seeds: bool = True,
                    split_by: tuple[str, ...] = ()) -> list[Job]:
    """The jobs of one experiment and protocol: per seed (or for all seeds) a models job,
    a construct job, and a train job per gradient method and value of the ``split_by``
    fields."""
    from .runner import cells, model_key

    jobs = []
    for seed in sorted({c.seed for c in cfgs}) if split_seeds else [None]:
        mine = [c for c in cfgs if seed is None or c.seed == seed]
        keys = tuple(dict.fromkeys(model_key(c) for c in mine))
        jobs.append(Job(experiment, protocol, seed, "models", keys))
        constructed = tuple(c for c in mine if method_of(c).closed_form)
        if constructed:
            jobs.append(Job(experiment, protocol, seed, "construct", constructed))
        parts: dict[tuple, list[RunConfig]] = {}
        for c in mine:
            if not method_of(c).closed_form:  # one job per method: editing a method reruns its jobs alone
                parts.setdefault((c.method,) + tuple(getattr(c, name) for name in split_by), []).append(c)
        for gradient in parts.values():
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


def _kept(cfg: RunConfig, preset: Mapping[str, Any]) -> bool:
    """Whether ``cfg`` passes a preset's ``only`` filters."""
    return all(getattr(cfg, name) in keep for name, keep in (preset.get("only") or {}).items())


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
    own = (preset.get("experiments") or {}).get(name) or {}
    shared = dict(preset)
    if own.get("subset"):
        shared["subset"] = {k: v for k, v in (preset.get("subset") or {}).items() if k not in own["subset"]}
    out: dict[RunConfig, None] = {}
    applicable: set = set()  # the methods that apply to some run (Method.not_applicable)
    not_applicable: dict[str, str] = {}  # method -> why it does not apply to a run left out
    for i, variant in enumerate(variants):
        _check_fields(variant, f"experiment {name!r} variant {i}")
        for method_name, block in methods.items():
            method = resolve(str(method_name))
            where = f"experiment {name!r} method {method_name!r}"
            block = dict(block or {})
            empty = sorted(k for k, v in block.items() if isinstance(v, list) and not v)
            if empty:
                raise ConfigError(f"{where}: {', '.join(empty)}: an empty list sweeps nothing")
            own_settings = {k: v for k, v in block.items() if k not in _FIELDS}
            fields_block = {k: v for k, v in block.items() if k in _FIELDS}
            _check_fields(fields_block, where)
            if own_settings and not method.settings:
                raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(own_settings))}")
            merged = {**defaults, **settings, **variant, **fields_block, "method": method_name}
            merged = apply_preset(merged, shared)
            merged = apply_preset(merged, own)
            for ignored in ignored_fields(method):
                if ignored not in block:
                    merged.pop(ignored, None)
            for values in _sweep({**merged, **{_SETTING + k: v for k, v in own_settings.items()}}):
                extra = {k[len(_SETTING):]: values.pop(k) for k in list(values) if k.startswith(_SETTING)}
                if extra:
                    values["method_settings"] = canonical_settings(extra)
                try:
                    cfg = config_from_dict(values, lambda c: c if method.not_applicable(c) else method.validate(c))
                except ConfigError as error:
                    raise ConfigError(f"{where}: {error}") from None
                reason = method.not_applicable(cfg)
                if reason:  # e.g. final-layer tuning in an experiment's transformer variant
                    not_applicable.setdefault(method_name, reason)
                    continue
                applicable.add(method_name)
                if _kept(cfg, shared) and _kept(cfg, own):
                    out[cfg] = None
    absent = [m for m in methods if m not in applicable]
    if absent:
        raise ConfigError(f"experiment {name!r}: method {absent[0]!r} applies to none of its runs: "
                          f"{not_applicable[absent[0]]}")
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
        for part in SCALING:
            _check_fields(spec.get(part) or {}, f"preset {name!r} {part}")
        _check_fields(dict.fromkeys(spec.get("split_by") or ()), f"preset {name!r} split_by")
        for experiment, override in (spec.get("experiments") or {}).items():
            if experiment not in (config.get("experiments") or {}):
                raise ConfigError(f"preset {name!r}: unknown experiment {experiment!r}")
            for part in SCALING:
                _check_fields((override or {}).get(part) or {}, f"preset {name!r} experiment {experiment!r} {part}")
    blocks = dict(config.get("experiments") or {})
    for name, spec in blocks.items():
        unknown = [p for p in (spec or {}).get("protocols") or () if p not in PROTOCOLS]
        if unknown:
            raise ConfigError(f"experiment {name!r}: protocols: unknown protocol {unknown[0]!r} (one of {PROTOCOLS})")
    experiments = {name: expand_experiment(name, spec, defaults, preset) for name, spec in blocks.items()}
    definitions = {name: {"definition": spec, "defaults": defaults, "preset": _preset_for(preset, name)}
                   for name, spec in blocks.items()}
    if not experiments:
        raise ConfigError("experiments: none defined")
    _check_protocols(experiments, protocols)
    slurm = SlurmSettings(**(config.get("slurm") or {}))
    return WorkflowConfig(
        defined=experiments,
        preset=preset_name,
        protocols=protocols,
        device=device,
        dispatch=dispatch,
        threads=int(config.get("threads", 1)),
        slurm=slurm,
        experiments=experiments,
        split_seeds=bool(preset.get("split_seeds", True)),
        split_by=tuple(preset.get("split_by") or ()),
        definitions=definitions,
    )


def _check_protocols(experiments: Mapping[str, tuple[RunConfig, ...]], protocols: tuple[str, ...]) -> None:
    """Experiments are expanded under the paper protocol; a setting that another protocol
    refuses (val_every > 1) is refused here, before any job runs."""
    for name, cfgs in experiments.items():
        sparse = next((c for c in cfgs if c.val_every > 1), None)
        for protocol in protocols if sparse else ():
            try:
                validated(sparse.replace(protocol=protocol))
            except ConfigError as error:
                raise ConfigError(f"experiment {name!r} under protocol {protocol!r}: {error}; "
                                  "run it with protocols=[paper]") from None


def _preset_for(preset: Mapping[str, Any], name: str) -> dict:
    """The parts of a preset that expand_experiment reads for experiment ``name``."""
    own = (preset.get("experiments") or {}).get(name)
    out = {k: v for k, v in preset.items() if k in SCALING}
    return {**out, "experiments": {name: own}} if own else out


JobKey = tuple[str, str, str, str]  # (experiment, protocol, kind, job id)


def job_key(job: Job) -> JobKey:
    return (job.experiment, job.protocol, job.kind, job.id)


def job_index(jobs: list[Job]) -> dict[JobKey, Job]:
    """(experiment, protocol, kind, job id) -> Job."""
    return {job_key(j): j for j in jobs}


def shared_configs(jobs: list[Job]) -> dict[JobKey, dict[JobKey, tuple[RunConfig, ...]]]:
    """Train job -> {earlier train job: the configs of both}, for the train jobs that hold
    configs an earlier experiment's train job in ``jobs`` holds too. Each shared config
    is taken from the first train job that holds it, which trains it. A config's rows do
    not depend on the cell it trains in, so the copy equals a second training."""
    first: dict[RunConfig, JobKey] = {}
    out: dict[JobKey, dict[JobKey, list[RunConfig]]] = {}
    for job in jobs:
        if job.kind != "train":
            continue
        key = job_key(job)
        for cfg in job.configs:
            source = first.setdefault(cfg, key)
            if source[0] != job.experiment:
                out.setdefault(key, {}).setdefault(source, []).append(cfg)
    return {key: {source: tuple(cfgs) for source, cfgs in by_source.items()} for key, by_source in out.items()}


def jobs_for_outputs(paths: list[str], jobs: list[Job],
                     shared: Mapping[JobKey, Mapping[JobKey, tuple]]) -> Optional[list[Job]]:
    """The jobs a run of these job outputs (a piece of jobs) runs: theirs, the train jobs
    whose rows they copy, and those jobs' models jobs, in the order of ``jobs``; None when
    a path is not a job's output."""
    by_path = {j.path: j for j in jobs}
    if not paths or any(p not in by_path for p in paths):
        return None
    index = job_index(jobs)
    wanted = {job_key(by_path[p]) for p in paths}
    wanted |= {source for key in list(wanted) for source in shared.get(key, {})}
    seeds = {(k[0], k[1], index[k].seed) for k in wanted}
    return [j for j in jobs if job_key(j) in wanted or (j.kind == "models" and (j.experiment, j.protocol, j.seed) in seeds)]


def models_jobs(jobs: list[Job]) -> dict[tuple[str, str, Optional[int]], Job]:
    """(experiment, protocol, seed) -> the models job the other jobs of that seed read."""
    return {(j.experiment, j.protocol, j.seed): j for j in jobs if j.kind == "models"}


# ---------------------------------------------------------------- schema check
def schema_error(config: Mapping[str, Any], schema: Mapping[str, Any]) -> Optional[str]:
    """The most relevant violation of the config schema as one short line (the key, what
    was expected, what was given), or None. jsonschema's own message repeats the whole
    schema; this names only the offending key."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return None
    where = ".".join(str(p) for p in error.absolute_path)
    given = error.instance
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties") or {})
        extra = sorted(set(given) - set(allowed)) if isinstance(given, Mapping) else []
        key = ".".join(filter(None, [where, ", ".join(map(str, extra))]))
        expected = f"one of {', '.join(allowed)}" if allowed else "no other keys"
        return f"{key}: unknown key; expected {expected}"
    if error.validator == "enum":
        expected = "one of " + ", ".join(map(str, error.validator_value))
    elif error.validator == "pattern":
        expected = error.schema.get("description") or f"a string matching {error.validator_value}"
    elif error.validator == "type":
        expected = f"type {error.validator_value}"
    elif error.validator in ("minimum", "maximum", "minItems", "minProperties", "uniqueItems", "required"):
        return f"{where or 'config'}: {error.message}"
    else:
        expected = error.message if len(error.message) <= 160 else error.message[:157] + "..."
        return f"{where or 'config'}: {expected}"
    return f"{where or 'config'}: expected {expected}; given {given!r}"


def split_selection(config: Mapping[str, Any], sources: list) -> tuple[dict, Optional[list]]:
    """``(definitions, selection)`` of a merged Snakemake config. ``--config
    experiments=[fnn,tfn]`` (a list, or one name) selects experiments; Snakemake merges it
    over the config files' definitions, replacing them, so these are merged again from
    ``sources`` (the config files' contents, in Snakemake's order). Without a selection:
    ``(config["experiments"], None)``."""
    value = config.get("experiments")
    if not isinstance(value, (list, str)):
        return value, None
    selection = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(name, str) for name in selection):
        raise ConfigError(f"experiments: a selection is a list of experiment names, got {value!r}")
    definitions: dict = {}
    for source in sources:
        block = (source or {}).get("experiments")
        if isinstance(block, Mapping):
            for name, spec in block.items():
                definitions[name] = _merged(definitions.get(name), spec)
    return definitions, selection


def _merged(old, new):
    """Snakemake's merge of config files: mappings key by key, anything else replaced."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = dict(old)
        for key, value in new.items():
            out[key] = _merged(out.get(key), value)
        return out
    return new
