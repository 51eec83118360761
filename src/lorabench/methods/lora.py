"""LoRA trained by gradient descent (the paper's "gradient update"; method ``sgd``).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. Every
adapted matrix W becomes ``W + A B^T`` with A, B of shape (D, R); A starts at zero and B
Gaussian (core/adapters.py), so training starts at the frozen model. With ``tune_bias``
the biases train too (the paper's Section 5 and the bias experiment). ``rank_step``
gives FNN layer l the rank R + step * l.

The trainable carries hand-written gradients and, where it applies, the native C step
(training/trainables.py): this is the hot loop of the whole benchmark.
"""

from __future__ import annotations

from ..core.adapters import lora_parameter_count
from ..core.config import RunConfig
from ..core.models import device_of
from .base import Method, bias_parameter_count


class LoRAGradient(Method):
    name = "sgd"
    label = "LoRA"
    fields = ("rank", "rank_step", "tune_bias")
    hand_written = True
    native = True

    def parameter_count(self, cfg: RunConfig) -> int:
        return lora_parameter_count(cfg) + bias_parameter_count(cfg)

    def trainable(self, cfgs, frozen, models):
        from ..training.trainables import fnn_lora_trainable, stack_lora, tfn_lora_trainable

        lora = stack_lora([m.lora_init for m in models]).to(device_of(frozen))
        make = fnn_lora_trainable if cfgs[0].exp == "fnn" else tfn_lora_trainable
        return make(cfgs, frozen, lora)
