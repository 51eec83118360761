"""Full fine-tuning of the adapted matrices (method ``full``): every entry of every
adapted matrix trains, and with ``tune_bias`` the biases. The reference any adapter is
measured against: no adapter on the same matrices can reach a lower training loss at the
optimum, only at a smaller parameter count.
"""

from __future__ import annotations

from ..core.config import RunConfig
from .base import Method, Start, adapted_matrices, bias_parameter_count, matrix_count, tuned_biases, with_biases, \
    with_matrices


class FullFineTuning(Method):
    name = "full"
    label = "full fine-tuning"
    fields = ("tune_bias",)

    def parameter_count(self, cfg: RunConfig) -> int:
        return matrix_count(cfg) * cfg.width**2 + bias_parameter_count(cfg)

    def start(self, cfg, models) -> Start:
        params, masks = tuned_biases(cfg, models.frozen)
        for name, weight in adapted_matrices(models.frozen).items():
            params[f"w_{name}"] = weight.clone()
            masks[f"w_{name}"] = weight.new_ones(())
        return Start(params, masks)

    def adapt(self, frozen, params, fixed):
        matrices = {name: params[f"w_{name}"] for name in adapted_matrices(frozen)}
        return with_biases(with_matrices(frozen, matrices), params)
