"""DoRA, weight-decomposed low-rank adaptation (method ``dora``).

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024. Each adapted
matrix is split into a magnitude and a direction:

    W' = m * V / ||V||_c,   V = W + A B^T,

where ``||V||_c`` is the vector of the Euclidean norms of V's columns (one per input
coordinate) and m (D,) is trained, initialised to ``||W||_c`` so that training starts at
the frozen model. A and B are LoRA's factors with LoRA's initialisation (A = 0, B
Gaussian; the protocol's ``lora_init``). Parameters: LoRA's 2 R D per matrix plus D for
the magnitude (and the biases with ``tune_bias``). The norm is differentiated through
(the paper's cheaper variant detaches it; at these sizes the exact gradient costs
nothing).
"""

from __future__ import annotations

from ..core.adapters import lora_parameter_count
from ..core.config import RunConfig
from .base import Method, Start, adapted_matrices, bias_parameter_count, matrix_count, tuned_biases, with_biases, \
    with_matrices


def column_norms(weight):
    """(..., D_out, D_in) -> (..., 1, D_in): the norm of each column."""
    return weight.norm(dim=-2, keepdim=True)


def dora_weight(weight, a, b, magnitude):
    """m * (W + A B^T) / ||W + A B^T||_c; magnitude (..., D_in)."""
    direction = weight + a @ b.transpose(-1, -2)
    return magnitude.unsqueeze(-2) * direction / column_norms(direction)


class DoRA(Method):
    name = "dora"
    label = "DoRA"
    fields = ("rank", "rank_step", "tune_bias")

    def parameter_count(self, cfg: RunConfig) -> int:
        return lora_parameter_count(cfg) + matrix_count(cfg) * cfg.width + bias_parameter_count(cfg)

    def start(self, cfg, models) -> Start:
        params, masks = tuned_biases(cfg, models.frozen)
        lora = models.lora_init
        for name, weight in adapted_matrices(models.frozen).items():
            column = lora.mask[name].unsqueeze(-2)
            params[f"a_{name}"], masks[f"a_{name}"] = lora.a[name].clone(), column
            params[f"b_{name}"], masks[f"b_{name}"] = lora.b[name].clone(), column
            params[f"m_{name}"] = column_norms(weight).squeeze(-2)
            masks[f"m_{name}"] = weight.new_ones(())
        return Start(params, masks)

    def adapt(self, frozen, params, fixed):
        matrices = {name: dora_weight(w, params[f"a_{name}"], params[f"b_{name}"], params[f"m_{name}"])
                    for name, w in adapted_matrices(frozen).items()}
        return with_biases(with_matrices(frozen, matrices), params)
