"""The protocol objects: one per name, and what they choose."""

import pytest
import torch
import torch.nn.functional as F

from lorabench.core import data
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


# ------------------------------------------------------------- classification loss
def test_each_protocol_names_its_classification_loss():
    assert protocol_of(RunConfig(**CFG, protocol="paper")).classification_loss == "labels"
    assert protocol_of(RunConfig(**CFG, protocol="reference")).classification_loss == "soft_outputs"


@pytest.mark.parametrize("shared_target", [True, False])
def test_label_loss_is_cross_entropy_against_the_targets_argmax(shared_target):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 50, 8, generator=gen, dtype=torch.float64)
    target = torch.randn(50, 8, generator=gen, dtype=torch.float64) if shared_target else \
        torch.randn(3, 50, 8, generator=gen, dtype=torch.float64)
    per_config = lambda c: target if shared_target else target[c]
    readout = data.binary_readout(8, torch.float64)
    for task, logits in (("classification", lambda y: y), ("binary_classification", lambda y: y @ readout)):
        expected = torch.stack([F.cross_entropy(logits(pred[c]), logits(per_config(c)).argmax(dim=-1))
                                for c in range(3)])
        torch.testing.assert_close(data.task_loss(pred, target, task, "labels"), expected, rtol=1e-12, atol=0)


def test_label_loss_gradient_is_softmax_minus_one_hot():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 30, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(data.task_loss(pred, target, "classification", "labels").sum(), [pred])
    one_hot = F.one_hot(target.argmax(dim=-1), 6).to(torch.float64)
    torch.testing.assert_close(grad, (pred.detach().softmax(dim=-1) - one_hot) / 30, rtol=1e-12, atol=1e-15)


def test_authors_loss_is_unbounded_below_and_the_label_loss_is_not():
    """With a negative target output, the authors' loss falls without bound as the
    predicted class's logit grows (here by (w_1 + w_2) s = -0.5 s); cross entropy
    against a class stays >= 0."""
    target = torch.tensor([[2.0, -1.0, 0.5]])
    for scale in (1.0, 10.0, 100.0):
        pred = torch.tensor([[[scale, 0.0, 0.0]]])
        assert data.task_loss(pred, target, "classification", "labels") >= 0
    soft = [float(data.task_loss(torch.tensor([[[s, 0.0, 0.0]]]), target, "classification", "soft_outputs"))
            for s in (1.0, 10.0, 100.0)]
    assert soft[0] > soft[1] > soft[2] and soft[2] < -40


def test_unknown_classification_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="classification_loss must be one of"):
        data.task_loss(torch.zeros(1, 2, 4), torch.zeros(2, 4), "classification", "hinge")


@pytest.mark.parametrize("n_train", [None, 64])
def test_reference_tfn_stream_shares_positions_and_equals_per_config_streams(n_train, monkeypatch):
    """Configs at the same position of their streams share one draw; the batches are those
    of one generator per config (the authors' order), through rewinds and the eviction of
    kept positions."""
    from lorabench.core import streams

    monkeypatch.setattr(streams.ReferenceTFNStream, "KEPT_BYTES", 4 * 2 * 2 * 16 * 16 * 10 * 4)  # 4 positions
    cfg = RunConfig(exp="tfn", width=16, n_head=2, seq_length=10, target_depth=1, frozen_depth=1, rank=2,
                    method="sgd", batch_size=16, n_test=32, n_train=n_train, protocol="reference").validated()
    models = protocol_of(cfg).generate_models(cfg)
    x_train = protocol_of(cfg).training_set([models] * 5)
    C, gen = 5, torch.Generator().manual_seed(3)
    kept = 4 if n_train is None else 8  # positions of validation batches alone are half the size
    shared = streams.ReferenceTFNStream(cfg, models.target, x_train, C, "cpu")
    apart = streams.ReferenceTFNDropoutStream(cfg, models.target, x_train, C, "cpu")
    for step in range(1, 40):
        for ours, theirs in ((shared.train_batch(step), apart.train_batch(step)), (shared.val_batch(), apart.val_batch())):
            if isinstance(ours, streams.SharedRows):
                assert len(ours.row.unique()) <= C and ours.x.shape[0] <= kept + C  # the kept, and a step's new
            (x, y), (x_ref, y_ref) = streams.stacked(ours), theirs
            assert torch.equal(x, x_ref)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
        improved = torch.rand(C, generator=gen) < (0.8 if step < 20 else 0.1)
        shared.observe(improved)
        apart.observe(improved)
        assert len(shared.slot) <= kept


def test_the_reference_tfn_stream_keeps_the_positions_asked_for_soonest():
    """Configs at steps 0, 3 and 9 since their last improvement, and one still at the
    seed's step 5: a kept position is next asked for by the nearest config at or below
    it; after the test sets also by a config improving now (k + 1 steps); never where no
    config will reach it."""
    from lorabench.core.streams import next_use

    origin = torch.tensor([1, 1, 1, 0])
    since = torch.tensor([0, 3, 9, 5])
    positions = [(1, 0), (1, 2), (1, 3), (1, 8), (1, 20), (0, 4), (0, 7)]
    ahead = next_use(positions, origin, since, restart=1)
    assert ahead.tolist() == [0, 2, 0, 5, 11, float("inf"), 2]
