"""The model families' forward passes against the definitions written out by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorabench.core.config import RunConfig
from lorabench.core.protocols import generate_models
from lorabench.methods import validated
from lorabench.training.native import applies

TFN = dict(exp="tfn", width=8, n_head=2, seq_length=5, batch_size=16, n_test=40, n_val=16, seed=4, method="sgd")


def prenorm_by_hand(model, x):
    """x: (B, D, N), tokens as columns; per block X + sum_h W_O W_V LN(X) softmax((W_K LN(X))^T W_Q LN(X)),
    then Y + W_2 relu(W_1 LN(Y) + b_1) + b_2; output W_o X_L. LN over D per token, no affine."""
    norm = lambda t: F.layer_norm(t.transpose(-1, -2), (t.shape[-2],), eps=1e-5).transpose(-1, -2)  # noqa: E731
    h = x.double()
    m = {k: v.double() for k, v in model.tensors().items()}
    for layer in range(model.depth):
        seen = norm(h)
        attended = torch.zeros_like(h)
        for head in range(model.n_head):
            q, k, v = (m[w][layer, head] @ seen for w in ("wq", "wk", "wv"))
            scores = torch.softmax(k.transpose(-1, -2) @ q, dim=-2)  # (B, keys, queries)
            attended = attended + m["wo"][layer, head] @ v @ scores
        y = h + attended
        hidden = torch.relu(m["w1"][layer] @ norm(y) + m["b1"][layer][:, None])
        h = y + m["w2"][layer] @ hidden + m["b2"][layer][:, None]
    return m["w_out"] @ h


def test_the_prenorm_transformer_is_the_pre_norm_residual_block():
    from lorabench.core.models import tfn_forward

    for depth in (1, 2):
        cfg = validated(RunConfig(**TFN, target_depth=depth, frozen_depth=depth, prenorm=1))
        models = generate_models(cfg)
        assert models.frozen.prenorm and models.target.prenorm  # frozen and target alike
        x = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(tfn_forward(models.frozen, x).double(), prenorm_by_hand(models.frozen, x),
                                   rtol=1e-5, atol=1e-5)


def test_prenorm_trains_natively_and_the_construction_does_not_apply():
    import pytest

    from lorabench.core.config import ConfigError

    plain = {**TFN, "width": 16, "target_depth": 1, "frozen_depth": 1}
    cfg = validated(RunConfig(**plain, prenorm=1))
    assert applies(cfg, torch.device("cpu")) and applies(cfg.replace(prenorm=0), torch.device("cpu"))
    assert not applies(cfg.replace(prenorm=0, better_optim=1), torch.device("cpu"))  # the authors' post-norm variant
    for method in ("ours", "lora_from_construction"):
        with pytest.raises(ConfigError, match="defined for the plain TFN.*prenorm 0"):
            validated(cfg.replace(method=method))
    with pytest.raises(ConfigError, match="prenorm .* exists only for exp 'tfn'"):
        validated(RunConfig(prenorm=1))
    with pytest.raises(ConfigError, match="choose one"):
        validated(cfg.replace(better_optim=1))
    assert cfg.replace(prenorm=0).config_hash() == validated(RunConfig(**plain)).config_hash()
