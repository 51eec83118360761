"""LoRA trained by gradient descent from the paper's construction (method
``lora_from_construction``).

The construction (methods/construction.py) computes adapters in closed form; below the
threshold rank it is not exact, and gradient descent may improve on it. This method starts
LoRA at the construction's adapters A, B and its biases (the FNN's recalibrated biases,
the TFN's b_1 and b_2), computed in the protocol's construction precision and cast to the
training dtype, then trains them as LoRA does (``tune_bias`` 1: the biases too), with
LoRA's hand-written gradients and native step. Whether training from there ends below
both the construction and LoRA's default start is what the ``tfn_low_rank`` experiment
measures.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..core.adapters import LoRA, lora_parameter_count
from ..core.config import RunConfig
from ..core.models import device_of
from ..core.protocols import protocol_of
from .base import Method, adapted_matrices, bias_parameter_count
from .construction import Construction, constructed_adapters, residual_blocks


def constructed_start(cfg: RunConfig, models) -> tuple[LoRA, dict]:
    """The construction's adapters and biases of one configuration, in the protocol's
    construction precision, cast to the frozen model's dtype: (LoRA, {bias name: tensor})."""
    protocol = protocol_of(cfg)
    lora, biases = constructed_adapters(cfg, models, protocol.construction_dtype, protocol.calibration_inputs(cfg),
                                        protocol.authors_bias_propagation)
    dtype = next(iter(adapted_matrices(models.frozen).values())).dtype
    cast = lambda d: {k: v.to(dtype) for k, v in d.items()}  # noqa: E731
    return LoRA(cast(lora.a), cast(lora.b), cast(lora.mask)), cast(biases)


class LoRAFromConstruction(Method):
    name = "lora_from_construction"
    label = "LoRA from the construction"
    fields = ("rank", "tune_bias")
    hand_written = True
    native = True

    def check(self, cfg: RunConfig) -> None:
        Construction().check(cfg)

    def not_applicable(self, cfg: RunConfig) -> Optional[str]:
        return residual_blocks(cfg) or super().not_applicable(cfg)

    def parameter_count(self, cfg: RunConfig) -> int:
        return lora_parameter_count(cfg) + bias_parameter_count(cfg)

    def trainable(self, cfgs, frozen, models):
        from ..training.trainables import fnn_lora_trainable, stack_lora, tfn_lora_trainable

        starts = [constructed_start(c, m) for c, m in zip(cfgs, models)]
        device = device_of(frozen)
        lora = stack_lora([s[0] for s in starts]).to(device)
        biases = {name: torch.stack([s[1][name] for s in starts]).to(device) for name in starts[0][1]}
        start = replace(frozen, **biases)
        make = fnn_lora_trainable if cfgs[0].exp == "fnn" else tfn_lora_trainable
        return make(cfgs, start, lora)
