"""What a method is: the one interface through which lorabench constructs or trains an
adapter, counts its parameters and validates its settings.

A method is a subclass of ``Method`` in one module. The runner, the workflow, the plan
and the reports ask it; none of them knows a method by its name. Two kinds:

* gradient methods (``closed_form = False``) say what they train on the frozen model
  (``start``: initial values and the 0/1 mask of trainable entries, per configuration,
  from the config's seeded generators) and how the adapted model is built from it
  (``adapt``, on stacked configurations). The trainer runs them on the torch engine with
  autograd, batched across a cell's configurations with the same loop, optimiser,
  selection and result rows as LoRA. A method may instead hand over a whole
  ``Trainable`` (``trainable``) with hand-written gradients or a native step, as LoRA
  and final-layer tuning do.
* closed-form methods (``closed_form = True``) compute the adapted model
  (``construct``), as the paper's construction does.

The adapted matrices are the same for every method: every FNN layer; in the TFN the
query, key, value and output matrices of every head and block, the last block's second
feed-forward matrix and the output layer (``adapted_matrices``), so that methods are
compared on the same footing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..core.config import ConfigError, RunConfig
from ..core.generation import Models
from ..core.models import FNN, TFN

Model = Union[FNN, TFN]

# RunConfig fields that belong to one method or another: a method reads those it lists
# in ``fields``; the workflow leaves the others at their defaults for its runs.
METHOD_FIELDS = ("rank", "rank_step", "tune_bias", "last_layers")
# Fields only training reads: a closed-form method leaves them at their defaults.
TRAINING_FIELDS = ("lr", "weight_decay", "n_epochs", "best_epoch", "curve_every", "val_every")
FAMILY_MATRICES = {"fnn": ("weights",), "tfn": ("wq", "wk", "wv", "wo", "w2", "w_out")}


@dataclass
class Start:
    """A gradient method's starting point for one configuration (no leading C).

    params: the trainable tensors' initial values; masks: 1.0 where an entry trains, 0.0
    where it keeps its initial value (broadcastable to its tensor: e.g. the padding
    beyond a rank); fixed: tensors ``adapt`` reads that never train (e.g. a frozen
    random projection, or a residual weight)."""

    params: dict[str, Tensor]
    masks: dict[str, Tensor]
    fixed: dict[str, Tensor] = field(default_factory=dict)


class Method:
    """The interface; see the module's docstring. Subclasses set the class attributes
    and override what their kind needs."""

    name: ClassVar[str]  # the config's ``method`` value
    label: ClassVar[str] = ""  # a short name for figures and tables (default: ``name``)
    closed_form: ClassVar[bool] = False
    families: ClassVar[tuple[str, ...]] = ("fnn", "tfn")
    fields: ClassVar[tuple[str, ...]] = ()  # the METHOD_FIELDS it reads
    min_rank: ClassVar[int] = 1  # with "rank" in fields
    # Its own settings (not RunConfig fields) and their defaults; a value's type is its
    # default's. They reach the method as ``settings_of(cfg)``.
    settings: ClassVar[Mapping[str, Any]] = {}
    # The trainable's engine: "autograd" (the generic path), "torch" (hand-written
    # gradients on torch), "native" where the C step applies (see training/native.py).
    hand_written: ClassVar[bool] = False
    native: ClassVar[bool] = False
    # Where the method comes from: None for lorabench's own; for a user's method the
    # SHA-256 of its module's source, so that editing it renames (and reruns) its jobs.
    digest: ClassVar[Optional[str]] = None

    # ---------------------------------------------------------------- validation
    def validate(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with its method settings in canonical form, or ConfigError."""
        reason = self.not_applicable(cfg)
        if reason:
            raise ConfigError(reason)
        if "rank" in self.fields and cfg.rank < self.min_rank:
            raise ConfigError(f"rank must be >= {self.min_rank} for method {self.name!r}, got {cfg.rank}")
        canonical = canonical_settings(self.parse_settings(cfg.method_settings))
        if canonical != cfg.method_settings:
            cfg = cfg.replace(method_settings=canonical)
        self.check(cfg)
        return cfg

    def check(self, cfg: RunConfig) -> None:
        """Further checks of the method's own; raise ConfigError naming the setting."""

    def not_applicable(self, cfg: RunConfig) -> Optional[str]:
        """Why the method does not exist for ``cfg``'s model (None: it does). An
        experiment leaves such runs out, and its figures say "not applicable"; a run of
        one (``lorabench run``) is refused with the reason."""
        if cfg.exp not in self.families:
            return f"method {self.name!r} exists only for exp {' and '.join(map(repr, self.families))}"
        return None

    def parse_settings(self, text: str) -> dict[str, Any]:
        """The method's settings: its defaults updated with ``text`` (JSON object)."""
        try:
            given = json.loads(text) if text else {}
        except ValueError as error:
            raise ConfigError(f"method_settings of method {self.name!r} is not JSON: {error}") from None
        if not isinstance(given, dict):
            raise ConfigError(f"method_settings of method {self.name!r} must be a JSON object, got {text!r}")
        unknown = sorted(set(given) - set(self.settings))
        if unknown:
            known = ", ".join(self.settings) or "none"
            raise ConfigError(f"method {self.name!r}: unknown setting(s) {', '.join(unknown)} (its settings: {known})")
        out = dict(self.settings)
        for key, value in given.items():
            out[key] = _typed(self.name, key, value, self.settings[key])
        return out

    def settings_of(self, cfg: RunConfig) -> dict[str, Any]:
        return self.parse_settings(cfg.method_settings)

    # ------------------------------------------------------------------- counting
    def parameter_count(self, cfg: RunConfig) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------ gradient methods
    def start(self, cfg: RunConfig, models: Models) -> Start:
        raise NotImplementedError

    def adapt(self, frozen: Model, params: Mapping[str, Tensor], fixed: Mapping[str, Tensor]) -> Model:
        """The adapted models of C stacked configurations: ``frozen`` (C, ...), ``params``
        and ``fixed`` as ``start`` made them with a leading C. Differentiable in params."""
        raise NotImplementedError

    def trainable(self, cfgs: list[RunConfig], frozen: Model, models: list[Models]):
        """What a cell of this method trains (training/trainables.py); by default the
        generic autograd trainable of ``start`` and ``adapt``."""
        from ..training.trainables import generic_trainable

        return generic_trainable(self, cfgs, frozen, models)

    # --------------------------------------------------------- closed-form methods
    def construct(self, cfg: RunConfig, models: Models, dtype: torch.dtype, calibration: Optional[Tensor],
                  authors_bias_propagation: bool) -> Model:
        """The adapted model of one configuration, in ``dtype``. ``calibration``: inputs
        that may choose data-dependent quantities (the FNN construction's linearising biases);
        raise torch.linalg.LinAlgError where no adapted model exists."""
        raise NotImplementedError

    @property
    def engine(self) -> str:
        """The engine a cell trains on when the native step does not apply."""
        return "torch" if self.hand_written else "autograd"

    def cost_shape(self, cell: Sequence[RunConfig]) -> str:
        """What, beyond its engine and the model's shape, sets a cell's cost per config
        (words for ``lorabench plan``'s calibration units; '' when nothing does). A method
        whose cost depends on its cell's own settings says so here, and its cells are then
        calibrated at their own depth."""
        return ""

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def canonical_settings(settings: Mapping[str, Any]) -> str:
    """The settings as the config stores and hashes them: '' for none, else sorted JSON."""
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":")) if settings else ""


def _typed(method: str, key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"method {method!r} setting {key!r} must be of type {kind.__name__}, got {value!r}")
    return value


# ------------------------------------------------------------ shared building blocks
def adapted_matrices(model: Model) -> dict[str, Tensor]:
    """The matrices every method adapts, by name (FAMILY_MATRICES): FNN ``weights``
    (..., L, D, D); TFN ``wq``, ``wk``, ``wv``, ``wo`` (..., L, H, D, D), ``w2`` (the last
    block's, (..., D, D)) and ``w_out`` (..., D, D)."""
    if isinstance(model, FNN):
        return {"weights": model.weights}
    out = {name: getattr(model, name) for name in ("wq", "wk", "wv", "wo")}
    out["w2"] = model.w2[..., -1, :, :]
    out["w_out"] = model.w_out
    return out


def with_matrices(model: Model, matrices: Mapping[str, Tensor]) -> Model:
    """``model`` with its adapted matrices replaced (inverse of ``adapted_matrices``)."""
    if isinstance(model, FNN):
        return replace(model, weights=matrices["weights"])
    changes = {name: matrices[name] for name in ("wq", "wk", "wv", "wo", "w_out")}
    # only the last block's W_2 is adapted
    w2 = matrices["w2"].unsqueeze(-3)
    changes["w2"] = torch.cat([model.w2[..., :-1, :, :].expand(*w2.shape[:-3], -1, -1, -1), w2], dim=-3)
    return replace(model, **changes)


def tuned_biases(cfg: RunConfig, frozen: Model) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The biases a method with ``tune_bias`` trains, and their masks: the FNN's biases
    (when it has them), the TFN's feed-forward b1 and b2; trainable where tune_bias is 1."""
    names = ("biases",) if isinstance(frozen, FNN) else ("b1", "b2")
    params = {n: getattr(frozen, n).clone() for n in names if getattr(frozen, n) is not None}
    masks = {n: torch.tensor(float(cfg.tune_bias), dtype=t.dtype) for n, t in params.items()}
    return params, masks


def bias_parameter_count(cfg: RunConfig) -> int:
    if not (cfg.tune_bias and (cfg.use_bias or cfg.exp == "tfn")):
        return 0
    return (cfg.frozen_depth if cfg.exp == "fnn" else 2 * cfg.target_depth) * cfg.width


def matrix_count(cfg: RunConfig) -> int:
    """The number of adapted D x D matrices."""
    return cfg.frozen_depth if cfg.exp == "fnn" else 4 * cfg.n_head * cfg.target_depth + 2


def with_biases(model: Model, params: Mapping[str, Tensor]) -> Model:
    """``model`` with the biases found in ``params`` (tuned_biases' names)."""
    return replace(model, **{n: params[n] for n in ("biases", "b1", "b2") if n in params})


def rank_mask(rank: int, width: int) -> Tensor:
    """(D,) 1.0 for the first R entries: a rank-R factor padded to D columns."""
    return (torch.arange(width) < rank).to(torch.float32)
