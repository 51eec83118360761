"""One run's configuration: every flag of the authors' ``run_exp.py`` plus lorabench's own.

``RunConfig`` is built once (from the command line or from the workflow's config) and
passed down; nothing deeper in the package reads raw dictionaries. Field names and
defaults are those of the authors' command line, so their command lines work unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the offending setting."""


EXPERIMENTS = ("fnn", "tfn")
ACTIVATIONS = ("relu", "linear")
INIT_MODES = ("default", "uniform_singular_values")
TASKS = ("regression", "classification", "binary_classification")
PROTOCOLS = ("paper", "reference")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunConfig:
    exp: str = "fnn"
    width: int = 4
    target_depth: int = 1
    frozen_depth: int = 2
    rank: int = 2
    use_bias: int = 1
    activation: str = "relu"
    std: float = 0.25
    method: str = "ours"  # a built-in method's name or 'package.module:ClassName' (lorabench.methods)
    method_settings: str = ""  # the method's own settings as a JSON object ('' for none)
    batch_size: int = 5000
    n_epochs: int = 1000
    lr: float = 1e-3
    n_test: int = 10000
    weight_decay: float = 0.0
    init_mode: str = "default"
    pretrained: int = 0
    pretrained_epochs: int = 1000
    pretrained_lr: float = 1e-3
    pretrained_level: float = 3.0
    tune_bias: int = 1
    last_layers: int = 1
    seed: int = 123
    rank_step: int = 0
    task: str = "regression"
    n_train: Optional[int] = None  # None: a fresh batch every step (the authors' 'inf')
    best_epoch: int = 0
    n_head: int = 2
    seq_length: int = 10
    better_optim: int = 0
    dropout: float = 0.1
    prenorm: int = 0  # TFN: pre-norm blocks x + Attn(LN(x)), x + FFN(LN(x)) (lorabench's own; not the authors')
    # lorabench's own settings
    protocol: str = "paper"
    n_val: int = 256  # the paper's validation set; the reference protocol uses batch_size
    curve_every: int = 50  # training-curve resolution in steps
    val_every: int = 1  # validate every k steps (and at the last one); the paper validates every step

    # ------------------------------------------------------------------ derived
    @property
    def depth(self) -> int:
        """Depth of the adapted (frozen) model: L for FNN, the block count for TFN."""
        return self.target_depth if self.exp == "tfn" else self.frozen_depth

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of every field; names a run in results and files.

        Fields added after results were published count only away from their default, so
        the runs made before keep their names (and the workflow's jobs their ids)."""
        fields = {name: value for name, value in self.to_dict().items()
                  if not (name in _HASHED_AWAY_FROM_DEFAULT and value == _HASHED_AWAY_FROM_DEFAULT[name])}
        payload = json.dumps(fields, sort_keys=True, default=repr)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- validation
    def validated(self, method_check: Optional[Callable[["RunConfig"], "RunConfig"]] = None) -> "RunConfig":
        """Return the config with TFN depth normalised, or raise ConfigError.

        ``method_check``: the method's own validation (``lorabench.methods.validated``
        passes it; the methods build on this module), run before the TFN's frozen depth
        is set to its target depth."""
        _check_types(self)
        checks = [
            (self.exp in EXPERIMENTS, f"exp must be one of {EXPERIMENTS}, got {self.exp!r}"),
            (self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}"),
            (self.init_mode in INIT_MODES, f"init_mode must be one of {INIT_MODES}, got {self.init_mode!r}"),
            (self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}"),
            (self.protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}"),
            (self.width >= 1, f"width must be >= 1, got {self.width}"),
            (self.target_depth >= 1, f"target_depth must be >= 1, got {self.target_depth}"),
            (self.frozen_depth >= 1, f"frozen_depth must be >= 1, got {self.frozen_depth}"),
            (self.rank >= 0, f"rank must be >= 0, got {self.rank}"),
            (self.rank <= self.width, f"rank {self.rank} exceeds width {self.width}"),
            (self.std >= 0 and math.isfinite(self.std), f"std must be finite and >= 0, got {self.std}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.n_epochs >= 1, f"n_epochs must be >= 1, got {self.n_epochs}"),
            (self.n_test >= 1, f"n_test must be >= 1, got {self.n_test}"),
            (self.n_val >= 1, f"n_val must be >= 1, got {self.n_val}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be finite and > 0, got {self.lr}"),
            (self.weight_decay >= 0 and math.isfinite(self.weight_decay),
             f"weight_decay must be finite and >= 0, got {self.weight_decay}"),
            (self.pretrained_epochs >= 1, f"pretrained_epochs must be >= 1, got {self.pretrained_epochs}"),
            (self.pretrained_lr > 0, f"pretrained_lr must be > 0, got {self.pretrained_lr}"),
            (self.pretrained_level > 1, f"pretrained_level must be > 1, got {self.pretrained_level}"),
            (self.n_train is None or self.n_train >= 1, f"n_train must be >= 1 or 'inf', got {self.n_train}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.curve_every >= 1, f"curve_every must be >= 1, got {self.curve_every}"),
            (self.val_every >= 1, f"val_every must be >= 1, got {self.val_every}"),
        ]
        for flag in ("use_bias", "pretrained", "tune_bias", "best_epoch", "better_optim", "prenorm"):
            value = getattr(self, flag)
            checks.append((value in (0, 1), f"{flag} must be 0 or 1, got {value}"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.val_every > 1:
            _check_sparse_validation(self)
        method_check = method_check or (lambda cfg: cfg)

        if self.exp == "fnn":
            if self.frozen_depth < self.target_depth:
                raise ConfigError(
                    f"frozen_depth ({self.frozen_depth}) must be >= target_depth ({self.target_depth}): "
                    "each target layer needs at least one frozen layer"
                )
            if self.better_optim:
                raise ConfigError("better_optim (residual + LayerNorm + dropout) exists only for exp 'tfn'")
            if self.prenorm:
                raise ConfigError("prenorm (residual + LayerNorm blocks) exists only for exp 'tfn'")
            return method_check(self)

        if self.init_mode != "default":
            raise ConfigError("init_mode 'uniform_singular_values' exists only for exp 'fnn'")
        if self.task != "regression":
            raise ConfigError(f"task {self.task!r} exists only for exp 'fnn'; TFN supports regression")
        if self.rank_step != 0:
            raise ConfigError("rank_step exists only for exp 'fnn'")
        if self.prenorm and self.better_optim:
            raise ConfigError("prenorm and better_optim are two different residual blocks: choose one")
        if self.n_head < 1:
            raise ConfigError(f"n_head must be >= 1, got {self.n_head}")
        if self.seq_length < 1:
            raise ConfigError(f"seq_length must be >= 1, got {self.seq_length}")
        # The authors ignore frozen_depth for TFN (one depth for both models); say so in the
        # data, after the method has seen the depths it was given.
        return method_check(self).replace(frozen_depth=self.target_depth)


# name -> default (see RunConfig.config_hash)
_HASHED_AWAY_FROM_DEFAULT = {"val_every": 1, "method_settings": "", "prenorm": 0}


def _check_sparse_validation(cfg: RunConfig) -> None:
    """Validating every k > 1 steps skips work that only the best-state checkpoint and the
    reference protocol's stream read; refuse it where a result would change otherwise."""
    if cfg.protocol != "paper":
        raise ConfigError(f"val_every {cfg.val_every} needs protocol 'paper': the {cfg.protocol!r} protocol "
                          "chooses each step's batch by whether the last validation improved (val_every must be 1)")
    if cfg.best_epoch:
        raise ConfigError(f"val_every {cfg.val_every} with best_epoch 1: the best-validation state needs "
                          "a validation every step (val_every must be 1)")
    if cfg.curve_every % cfg.val_every:
        raise ConfigError(f"curve_every ({cfg.curve_every}) must be a multiple of val_every ({cfg.val_every}): "
                          "each point of the validation curve is a validation")


def _kind(hint: Any) -> tuple[type, bool]:
    """``int`` -> (int, False); ``Optional[int]`` -> (int, True)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if typing.get_origin(hint) is typing.Union and len(args) == 1 else (hint, False)


_HINTS = typing.get_type_hints(RunConfig)
# name -> (type, may be None), from the annotations above: the one source of the fields'
# types (the results schema's config columns are derived from it).
FIELD_TYPES: dict[str, tuple[type, bool]] = {f.name: _kind(_HINTS[f.name]) for f in dataclasses.fields(RunConfig)}


def _check_types(cfg: RunConfig) -> None:
    for name, (kind, optional) in FIELD_TYPES.items():
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if name == "n_train" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"n_train must be an integer or 'inf', got {value!r}")
        if kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {value!r}")
        elif isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        elif kind is int and not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        elif kind is float and not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")


def config_from_dict(values: dict[str, Any],
                     method_check: Optional[Callable[[RunConfig], RunConfig]] = None) -> RunConfig:
    """Build and validate a RunConfig; unknown keys are refused by name."""
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values = dict(values)
    for key, value in values.items():
        # YAML and JSON give ints for floats written without a point (lr: 0 ...).
        if FIELD_TYPES[key][0] is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
    return RunConfig(**values).validated(method_check)
