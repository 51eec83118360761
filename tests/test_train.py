import math

import pytest
import torch

from lorabench.core.config import RunConfig
from lorabench.runs.runner import run_configs
from lorabench.core.protocols import generate_models
from lorabench.core.models import forward
from lorabench.core.protocols import protocol_of
from lorabench.training.optimiser import BatchedAdam
from lorabench.methods import method_of
from lorabench.training.trainables import autograd_value_and_grad, stack_models

FNN_CELL = dict(width=8, target_depth=1, frozen_depth=2, batch_size=64, n_test=500, n_epochs=40, method="sgd", seed=3)


def test_batched_adam_matches_torch_adam_step_for_step():
    gen = torch.Generator().manual_seed(0)
    lrs, wds = [1e-2, 1e-3, 3e-2], [0.0, 1e-2, 1e-4]
    start = torch.randn(3, 20, generator=gen)
    targets = torch.randn(3, 20, generator=gen)
    ours = BatchedAdam(lrs, wds, torch.ones(1, 20))
    flat = start.clone()
    references = [start[c].clone().requires_grad_(True) for c in range(3)]
    optimizers = [torch.optim.Adam([references[c]], lr=lrs[c], weight_decay=wds[c]) for c in range(3)]
    for _ in range(25):
        leaf = flat.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(((leaf - targets) ** 3).abs().sum(), [leaf])
        flat = ours.step(flat, grad, torch.ones(3, dtype=torch.bool))
        for c in range(3):
            optimizers[c].zero_grad()
            ((references[c] - targets[c]) ** 3).abs().sum().backward()
            optimizers[c].step()
            torch.testing.assert_close(flat[c], references[c].detach(), rtol=1e-6, atol=1e-7)


def test_masked_entries_and_inactive_configs_never_move():
    ours = BatchedAdam([1e-1, 1e-1], [1e-2, 1e-2], torch.tensor([[1.0, 0.0]]))
    flat = torch.ones(2, 2)
    for _ in range(3):
        flat = ours.step(flat, torch.ones(2, 2), torch.tensor([True, False]))
    assert flat[0, 0] != 1.0
    assert flat[0, 1] == 1.0 and torch.equal(flat[1], torch.ones(2))


@pytest.mark.parametrize("method, task, protocol", [
    ("sgd", "regression", "paper"), ("flt", "regression", "paper"), ("sgd", "classification", "paper"),
    ("sgd", "binary_classification", "paper"), ("sgd", "classification", "reference"),
    ("sgd", "binary_classification", "reference")])
def test_hand_written_fnn_gradients_equal_autograd(method, task, protocol):
    cfgs = [RunConfig(**{**FNN_CELL, "frozen_depth": 3, "method": method}, rank=r, task=task, last_layers=2,
                      tune_bias=tb, protocol=protocol)
            for r in (1, 5) for tb in (0, 1)]
    models = [generate_models(c) for c in cfgs]
    trainable = method_of(cfgs[0]).trainable(cfgs, stack_models([m.frozen for m in models]), models)
    gen = torch.Generator().manual_seed(1)
    flat = trainable.init + 0.1 * torch.randn(trainable.init.shape, generator=gen)
    x = torch.randn(64, 8, generator=gen)
    y = forward(models[0].target, x)
    loss, grad = trainable.value_and_grad(trainable.layout, flat, x, y)
    loss_ref, grad_ref = autograd_value_and_grad(trainable, flat, x, y, task,
                                                 protocol_of(cfgs[0]).classification_loss)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


def _rows(cfgs, checkpoint="last"):
    return {(r["rank"], r["lr"], r["weight_decay"], r["tune_bias"]): r for r in run_configs(cfgs, device="cpu") if r["checkpoint"] == checkpoint}


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_config_alone_equals_config_inside_a_cell(protocol):
    base = RunConfig(**FNN_CELL, protocol=protocol)
    alone = base.replace(rank=3, lr=1e-2, weight_decay=1e-3)
    cell = [base.replace(rank=r, lr=lr, weight_decay=wd, tune_bias=tb)
            for r in (1, 3, 8) for lr in (1e-2, 1e-3) for wd in (0.0, 1e-3) for tb in (0, 1)]
    single = _rows([alone])[(3, 1e-2, 1e-3, 1)]
    batched = _rows(cell)[(3, 1e-2, 1e-3, 1)]
    for key in ("test_loss", "test_shift_loss", "val_loss", "train_loss"):
        assert math.isclose(single[key], batched[key], rel_tol=1e-6), key
    assert batched["cell_size"] == len(cell) and single["cell_size"] == 1


def test_tfn_config_alone_equals_config_inside_a_cell():
    base = RunConfig(exp="tfn", width=8, target_depth=1, frozen_depth=1, n_head=2, seq_length=4, batch_size=32,
                     n_test=200, n_epochs=15, method="sgd", seed=1)
    alone = base.replace(rank=2, lr=1e-2)
    cell = [base.replace(rank=r, lr=lr) for r in (1, 2, 4) for lr in (1e-2, 1e-3)]
    single = _rows([alone])[(2, 1e-2, 0.0, 1)]
    batched = _rows(cell)[(2, 1e-2, 0.0, 1)]
    for key in ("test_loss", "val_loss", "train_loss"):
        assert math.isclose(single[key], batched[key], rel_tol=1e-6), key


@pytest.mark.parametrize("engine", ["native", "torch"])
def test_native_transformer_cells_hold_the_papers_whole_grid(monkeypatch, engine):
    """On the native step a transformer grid of 192 configs trains as one cell (its batch
    and target outputs computed once per step); on torch, and for a plug-in method without
    a native step, cells stay at 64 configs, whose memory grows with the cell."""
    from lorabench.runs.runner import MAX_CELL, MAX_NATIVE_CELL, cells, native_engine_for

    monkeypatch.setenv("LORABENCH_ENGINE", engine)
    base = RunConfig(exp="tfn", width=16, target_depth=1, frozen_depth=1, n_head=2, seq_length=10, batch_size=256)
    grid = [base.replace(rank=r, lr=lr, weight_decay=wd, method=m) for m in ("sgd", "dora")
            for r in range(1, 17) for lr in (1e-2, 1e-3, 1e-4) for wd in (0.0, 1e-4, 1e-3, 1e-2)]
    sizes = {(cell[0].method, len(cell)) for cell in cells(grid, native_engine_for(torch.device("cpu")))}
    sgd = MAX_NATIVE_CELL["tfn"] if engine == "native" else MAX_CELL["tfn"]
    assert sizes == {("sgd", sgd), ("dora", MAX_CELL["tfn"])}
    assert (MAX_NATIVE_CELL["tfn"], MAX_CELL["tfn"]) == (192, 64)
    # the cpu is asked without the native library being built
    assert not native_engine_for(torch.device("cuda"))(base)


def test_diverging_config_is_recorded_and_the_others_go_on():
    base = RunConfig(**FNN_CELL, rank=2)
    rows = _rows([base.replace(lr=1e-2), base.replace(lr=1e9)])
    good, bad = rows[(2, 1e-2, 0.0, 1)], rows[(2, 1e9, 0.0, 1)]
    assert bad["diverged"] and bad["diverged_step"] >= 1
    assert not good["diverged"] and math.isfinite(good["test_loss"])
    alone = _rows([base.replace(lr=1e-2)])[(2, 1e-2, 0.0, 1)]
    assert math.isclose(alone["test_loss"], good["test_loss"], rel_tol=1e-6)


def test_training_reduces_loss_and_best_checkpoint_has_lowest_validation():
    cfg = RunConfig(**FNN_CELL, rank=4, lr=1e-2).replace(curve_every=5)
    rows = list(run_configs([cfg], device="cpu"))
    last = next(r for r in rows if r["checkpoint"] == "last")
    best = next(r for r in rows if r["checkpoint"] == "best")
    assert last["train_curve"][-1] < last["train_curve"][0]
    assert best["val_loss"] <= min(last["val_curve"]) + 1e-12
    assert 1 <= best["best_step"] <= cfg.n_epochs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("exp", ["fnn", "tfn"])
def test_cuda_gives_the_cpu_numbers(exp):
    if exp == "fnn":
        base = RunConfig(**FNN_CELL, rank=3, lr=1e-2)
    else:
        base = RunConfig(exp="tfn", width=8, target_depth=1, frozen_depth=1, seq_length=4, batch_size=32, n_test=200,
                         n_epochs=10, method="sgd", rank=2, lr=1e-3, seed=1)
    cfgs = [base, base.replace(method="ours")]
    cpu = {(r["method"], r["checkpoint"]): r for r in run_configs(cfgs, device="cpu")}
    cuda = {(r["method"], r["checkpoint"]): r for r in run_configs(cfgs, device="cuda")}
    assert {r["device"] for r in cuda.values()} == {"cuda"}
    for key, row in cpu.items():
        for column in ("test_loss", "test_shift_loss", "val_loss"):
            assert math.isclose(row[column], cuda[key][column], rel_tol=1e-3, abs_tol=1e-9), (key, column)


SPARSE_CELLS = {
    "fnn": dict(FNN_CELL, n_epochs=23, curve_every=5),
    "tfn": dict(exp="tfn", target_depth=1, frozen_depth=1, n_head=2, seq_length=4, batch_size=32, n_test=200,
                n_epochs=23, curve_every=5, method="sgd", seed=1),
}


@pytest.mark.parametrize("exp, width, engine", [("fnn", 8, "torch"), ("fnn", 16, "native"), ("tfn", 8, "torch"),
                                                ("tfn", 16, "native")])
def test_validating_every_k_steps_changes_only_the_best_state(monkeypatch, exp, width, engine):
    """val_every 5: the final state, its losses and the curves are bit for bit those of
    val_every 1; the best state is the best of the validated steps (5, 10, 15, 20 and the
    last, 23), i.e. the lowest point of the every-step run's validation curve, where the
    every-step run finds some best states between them."""
    monkeypatch.setenv("LORABENCH_ENGINE", engine)
    base = RunConfig(**{**SPARSE_CELLS[exp], "width": width})
    # learning rates high enough that the validation loss does not fall every step
    cell = [base.replace(rank=r, lr=lr) for r in (1, 2, 3) for lr in (3e-1, 1e-1)]
    every = {(r["rank"], r["lr"], r["checkpoint"]): r for r in run_configs(cell, device="cpu")}
    sparse = {(r["rank"], r["lr"], r["checkpoint"]): r
              for r in run_configs([c.replace(val_every=5) for c in cell], device="cpu")}
    assert {r["engine"] for r in sparse.values()} == {engine}
    for (rank, lr, checkpoint), row in sparse.items():
        reference = every[(rank, lr, checkpoint)]
        assert row["val_every"] == 5 and row["config_hash"] != reference["config_hash"]
        if checkpoint == "last":
            for column in ("test_loss", "test_shift_loss", "val_loss", "train_loss", "train_curve", "val_curve",
                           "curve_steps"):
                assert row[column] == reference[column], column
            continue
        curve = reference["val_curve"]
        lowest = min(range(len(curve)), key=curve.__getitem__)
        assert row["curve_steps"] == [5, 10, 15, 20, 23]
        assert row["best_step"] == row["curve_steps"][lowest] and row["val_loss"] == curve[lowest]
    validated = {5, 10, 15, 20, 23}
    assert any(row["best_step"] not in validated for key, row in every.items() if key[2] == "best")


def test_val_every_is_refused_where_a_result_would_change():
    from lorabench.core.config import ConfigError

    base = RunConfig(**FNN_CELL, val_every=5)
    assert base.validated().val_every == 5
    with pytest.raises(ConfigError, match="val_every 5 needs protocol 'paper'"):
        base.replace(protocol="reference").validated()
    with pytest.raises(ConfigError, match="best_epoch 1"):
        base.replace(best_epoch=1).validated()
    with pytest.raises(ConfigError, match=r"curve_every \(50\) must be a multiple of val_every \(7\)"):
        base.replace(val_every=7).validated()
    with pytest.raises(ConfigError, match="val_every must be >= 1"):
        base.replace(val_every=0).validated()


def test_val_every_at_its_default_leaves_the_config_hash_unchanged():
    """Runs made before val_every (and method_settings, prenorm) existed keep their hashes
    (and the workflow its job ids)."""
    import hashlib
    import json

    cfg = RunConfig(**FNN_CELL)
    without = {k: v for k, v in cfg.to_dict().items() if k not in ("val_every", "method_settings", "prenorm")}
    before = hashlib.sha256(json.dumps(without, sort_keys=True, default=repr).encode()).hexdigest()[:16]
    assert cfg.config_hash() == before
    assert cfg.replace(val_every=2).config_hash() != before
