"""Final-layer tuning (method ``flt``): the weights and biases of the last
``last_layers`` FNN layers train in full, the others stay frozen.

The paper's comparison of LoRA with tuning the final layers (Section 4 and its figure of
final-layer tuning against LoRA at equal parameter counts). FNN only.
"""

from __future__ import annotations

from ..core.config import ConfigError, RunConfig
from .base import Method


class FinalLayers(Method):
    name = "flt"
    label = "final layers"
    families = ("fnn",)
    fields = ("last_layers",)
    hand_written = True
    native = True

    def check(self, cfg: RunConfig) -> None:
        if not 1 <= cfg.last_layers <= cfg.frozen_depth:
            raise ConfigError(f"last_layers must be in [1, frozen_depth={cfg.frozen_depth}], got {cfg.last_layers}")
        if not cfg.use_bias:
            raise ConfigError("method 'flt' tunes weights and biases of the last layers: it needs use_bias=1")

    def parameter_count(self, cfg: RunConfig) -> int:
        return cfg.last_layers * (cfg.width**2 + cfg.width)

    def cost_shape(self, cell) -> str:
        # a cell backpropagates down to the deepest layer any of its configs tunes
        return f"last layers up to {max(c.last_layers for c in cell)}"

    def trainable(self, cfgs, frozen, models):
        from ..training.trainables import fnn_final_layers_trainable

        return fnn_final_layers_trainable(cfgs, frozen)
