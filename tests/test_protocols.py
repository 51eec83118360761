"""The protocol objects: one per name, and what they choose."""

import pytest
import torch

from lorabench.core.config import PROTOCOLS, ConfigError, RunConfig
from lorabench.core.protocols import REGISTRY, protocol_of

CFG = dict(exp="fnn", width=4, frozen_depth=2, batch_size=8, n_test=20, seed=3)


def test_one_protocol_object_per_name():
    assert tuple(REGISTRY) == PROTOCOLS
    for name in PROTOCOLS:
        assert protocol_of(RunConfig(**CFG, protocol=name)).name == name


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ConfigError, match="protocol must be one of"):
        protocol_of(RunConfig(**CFG, protocol="authors"))


def test_model_key_holds_the_rank_only_for_the_reference_protocol():
    for name, rank_in_key in (("paper", False), ("reference", True)):
        low, high = (RunConfig(**CFG, protocol=name, rank=r, lr=lr) for r, lr in ((1, 1e-2), (3, 1e-4)))
        protocol = protocol_of(low)
        assert (protocol.model_key(low) != protocol.model_key(high)) == rank_in_key
        assert protocol.model_key(low) == protocol.model_key(low.replace(lr=1e-4))


def test_reference_validation_set_is_the_first_test_draws():
    cfg = RunConfig(**CFG, protocol="reference")
    sets = protocol_of(cfg).eval_sets(cfg)
    assert torch.equal(sets.val, sets.test[: cfg.batch_size])
    paper = protocol_of(cfg.replace(protocol="paper")).eval_sets(cfg.replace(protocol="paper"))
    assert paper.val.shape[0] == cfg.n_val and not torch.equal(paper.val[:8], paper.test[:8])
