"""The native training steps (training_steps.c) against the torch trainer they replace."""

import ctypes
import math

import pytest
import torch

from lorabench.training import native
from lorabench.core.config import RunConfig
from lorabench.core.data import task_loss
from lorabench.core.protocols import generate_models
from lorabench.runs.runner import run_configs
from lorabench.core.adapters import LoRA
from lorabench.core.models import map_tensors
from lorabench.core.models import forward
from lorabench.core.protocols import protocol_of
from lorabench.training.optimiser import BatchedAdam
from lorabench.methods import method_of
from lorabench.training.trainables import (autograd_value_and_grad, stack_lora, stack_models, target_outputs_for,
                                          tfn_lora_trainable)

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native step cannot be built")

CELL = dict(exp="fnn", width=16, target_depth=1, frozen_depth=3, batch_size=48, n_test=300, n_epochs=12,
            method="sgd", seed=5)


@pytest.fixture
def engine(monkeypatch):
    def use(value: str):
        monkeypatch.setenv("LORABENCH_ENGINE", value)

    return use


def _cell(cfgs, engine_value, monkeypatch):
    monkeypatch.setenv("LORABENCH_ENGINE", engine_value)
    models = [generate_models(c) for c in cfgs]
    trainable = method_of(cfgs[0]).trainable(cfgs, stack_models([m.frozen for m in models]), models)
    return trainable, models[0].target


CASES = [
    dict(method="sgd"),
    dict(method="sgd", width=32),
    dict(method="sgd", use_bias=0, activation="linear"),
    dict(method="flt"),
    dict(method="sgd", task="classification"),
    dict(method="sgd", task="binary_classification"),
    dict(method="sgd", task="classification", protocol="reference"),
    dict(method="sgd", task="binary_classification", protocol="reference"),
    # batches that do not fill the classification loss's last group of 8 samples
    dict(method="sgd", task="classification", batch_size=45),
    dict(method="sgd", task="binary_classification", protocol="reference", batch_size=45),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("shared_batch", [True, False])
def test_native_step_equals_torch_step(case, shared_batch, monkeypatch):
    """Loss, gradient, Adam update and validation loss of one step, for every config of a
    cell (mixed ranks, learning rates, weight decays, bias tuning, tuned layers)."""
    cfgs = [RunConfig(**{**CELL, **case}, rank=r, lr=lr, weight_decay=wd, tune_bias=tb, last_layers=1 + r % 2)
            for r in (1, 6) for lr in (1e-2, 1e-3) for wd in (0.0, 1e-2) for tb in (0, 1)]
    native_cell, target = _cell(cfgs, "native", monkeypatch)
    torch_cell, _ = _cell(cfgs, "torch", monkeypatch)
    assert native_cell.engine == "native" and torch_cell.engine == "torch"
    gen = torch.Generator().manual_seed(2)
    C, D = len(cfgs), cfgs[0].width
    # Away from the initialisation (A = 0), so every gradient term is exercised.
    start = (native_cell.init + 0.05 * torch.randn(native_cell.init.shape, generator=gen)).contiguous()
    B = cfgs[0].batch_size
    x = torch.randn(B, D, generator=gen) if shared_batch else torch.randn(C, B, D, generator=gen)
    y = forward(target, x)
    vx = torch.randn(B - 8, D, generator=gen)
    vy = forward(target, vx)
    active = torch.ones(C, dtype=torch.bool)
    active[3] = False  # an inactive config never moves

    ours, theirs = BatchedAdam([c.lr for c in cfgs], [c.weight_decay for c in cfgs], native_cell.mask), \
        BatchedAdam([c.lr for c in cfgs], [c.weight_decay for c in cfgs], torch_cell.mask)
    flat_native, flat_torch = start.clone(), start.clone()
    for step in range(3):
        loss, val = ours.native_step(native_cell.native_step, flat_native, (x, y), (vx, vy), active, 1)
        loss_ref, grad = torch_cell.value_and_grad(torch_cell.layout, flat_torch, x, y)
        flat_torch = theirs.step(flat_torch, grad, active)
        val_ref = task_loss(forward(torch_cell.model(flat_torch), vx), vy, cfgs[0].task,
                            protocol_of(cfgs[0]).classification_loss)
        torch.testing.assert_close(loss, loss_ref, rtol=2e-5, atol=1e-9)
        torch.testing.assert_close(val, val_ref, rtol=2e-5, atol=1e-9)
        # Adam's step is ~lr * g / |g| for a fresh entry: where a gradient entry is ~0
        # (a ReLU unit at its threshold for one sample, say), float32 rounding alone can
        # change that step by up to 2 lr. Nearly every entry agrees to round-off; none
        # differs by more than Adam's bound.
        close = torch.isclose(flat_native, flat_torch, rtol=1e-5, atol=5e-6)
        assert close.float().mean() > 0.995
        assert (flat_native - flat_torch).abs().max() <= 2 * 1e-2 * (step + 1)
        # (The torch trainer also moves an inactive config's moments; neither moves its weights.)
        close = torch.isclose(ours.exp_avg_sq[active], theirs.exp_avg_sq[active], rtol=1e-4, atol=1e-12)
        assert close.float().mean() > 0.995
    assert torch.equal(flat_native[3], start[3])
    # Entries the masks freeze (padded rank columns, untuned biases or layers) never move.
    frozen_entries = native_cell.mask == 0
    assert torch.equal(flat_native[frozen_entries], start[frozen_entries])


def test_native_exp_is_libms_bit_for_bit():
    """The classification losses' exps (exp_vector), a vector at a time, against math.exp (libm's
    exp): every table entry, the range a shifted logit takes, the edges of the fast path
    and what falls back to libm (magnitudes of 512 and more, subnormal results, inf, NaN)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        -745 * torch.rand(200_000, generator=gen, dtype=torch.float64),
        -40 * torch.rand(200_000, generator=gen, dtype=torch.float64),
        2 * torch.rand(100_000, generator=gen, dtype=torch.float64) - 1,
        -torch.exp(66 * torch.rand(100_000, generator=gen, dtype=torch.float64) - 60),
        torch.exp(66 * torch.rand(50_000, generator=gen, dtype=torch.float64) - 60),
        torch.tensor([0.0, -0.0, 5e-324, -5e-324, 1e-17, -1e-17, 2.0**-54, -(2.0**-54), 511.999, -511.999, 512.0,
                      -512.0, -708.4, -709.9, -744.4, -745.2, -800.0, 709.7, -math.inf, -1e300]),
        torch.arange(-128, 129, dtype=torch.float64) * math.log(2) / 128,  # every table entry, and k ln2 / 128
    ]).contiguous()
    out = torch.empty_like(x)
    lib = native._build(16, 0)
    lib.exp_values.restype = None
    lib.exp_values(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_long(len(x)))
    expected = torch.tensor([math.exp(v) for v in x.tolist()], dtype=torch.float64)
    assert torch.equal(out.view(torch.int64), expected.view(torch.int64))
    nan = torch.tensor([math.nan] * 3, dtype=torch.float64)
    lib.exp_values(ctypes.c_void_p(nan.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_long(3))
    assert out[:3].isnan().all()


def _rows(cfgs, **kwargs):
    return {(r["rank"], r["lr"], r["checkpoint"]): r for r in run_configs(cfgs, device="cpu", **kwargs)}


def test_config_alone_inside_a_cell_and_across_threads_is_bit_identical(engine):
    engine("native")
    base = RunConfig(**CELL)
    cell = [base.replace(rank=r, lr=lr) for r in (1, 4, 16) for lr in (1e-2, 1e-3)]
    alone = _rows([base.replace(rank=4, lr=1e-2)])
    together = _rows(cell)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two_threads = _rows(cell)
    finally:
        torch.set_num_threads(threads)
    for checkpoint in ("last", "best"):
        key = (4, 1e-2, checkpoint)
        for column in ("test_loss", "val_loss", "train_loss", "best_step", "val_curve"):
            assert alone[key][column] == together[key][column] == two_threads[key][column], column
    assert {r["engine"] for r in together.values()} == {"native"}


def test_native_training_tracks_the_torch_trainer(engine):
    """Over many steps the engines differ only by float32 rounding, amplified by training:
    the same order as between two torch runs whose initial values differ by 1e-7."""
    base = RunConfig(**{**CELL, "n_epochs": 60})
    cfgs = [base.replace(rank=r, lr=1e-3, weight_decay=wd) for r in (2, 8) for wd in (0.0, 1e-3)]
    engine("native")
    native_rows = _rows(cfgs)
    engine("torch")
    torch_rows = _rows(cfgs)
    for key, row in torch_rows.items():
        assert native_rows[key]["engine"] == "native" and row["engine"] == "torch"
        for column in ("test_loss", "val_loss", "train_loss"):
            assert math.isclose(native_rows[key][column], row[column], rel_tol=1e-4), (key, column)


@pytest.mark.parametrize("family", ["fnn", "tfn"])
def test_pissa_trains_on_the_native_step(engine, family):
    """PiSSA is LoRA on residual frozen weights from the principal factors: it takes
    LoRA's native step, and its rows match the torch engine's within float32 training noise."""
    base = RunConfig(**CELL) if family == "fnn" else RunConfig(exp="tfn", width=16, target_depth=1, frozen_depth=1,
                                                                n_head=2, seq_length=10, batch_size=32, n_test=200,
                                                                n_epochs=12, seed=5)
    cfgs = [base.replace(method="pissa", rank=r, lr=1e-3) for r in (2, 8)]
    engine("native")
    native_rows = _rows(cfgs)
    engine("torch")
    torch_rows = _rows(cfgs)
    for key, row in torch_rows.items():
        assert native_rows[key]["engine"] == "native" and row["engine"] == "torch"
        for column in ("test_loss", "val_loss", "train_loss"):
            assert math.isclose(native_rows[key][column], row[column], rel_tol=1e-4), (key, column)


def test_diverging_config_under_the_native_step(engine):
    engine("native")
    base = RunConfig(**CELL, rank=2)
    rows = _rows([base.replace(lr=1e-2), base.replace(lr=1e9)])
    good, bad = rows[(2, 1e-2, "last")], rows[(2, 1e9, "last")]
    assert bad["diverged"] and bad["diverged_step"] >= 1 and bad["engine"] == "native"
    assert not good["diverged"] and math.isfinite(good["test_loss"])
    alone = _rows([base.replace(lr=1e-2)])[(2, 1e-2, "last")]
    assert alone["test_loss"] == good["test_loss"]


def test_a_native_step_flushes_subnormals_for_itself_only(engine, monkeypatch):
    """The steps run with subnormals flushed to zero and restore the caller's float mode:
    torch's arithmetic after a native cell still underflows gradually."""
    tiny = torch.tensor([1e-38], dtype=torch.float32)
    assert (tiny / 4).item() != 0.0  # gradual underflow before
    engine("native")
    rows = _rows([RunConfig(**CELL, rank=2)])
    assert {r["engine"] for r in rows.values()} == {"native"}
    assert (tiny / 4).item() != 0.0  # and after
    monkeypatch.setenv("LORABENCH_NATIVE_SUBNORMALS", "keep")
    assert native.engine_name() == "native-keep-subnormals" and "-DKEEP_SUBNORMALS" in native._flags()
    monkeypatch.setenv("LORABENCH_NATIVE_SUBNORMALS", "drop")
    with pytest.raises(native.NativeError, match="LORABENCH_NATIVE_SUBNORMALS must be one of"):
        native.engine_name()


def test_engine_setting_is_checked(engine):
    engine("fast")
    with pytest.raises(native.NativeError, match="LORABENCH_ENGINE must be one of"):
        list(run_configs([RunConfig(**CELL)], device="cpu"))


def test_auto_trains_both_protocols_natively(engine):
    """LORABENCH_ENGINE=auto: FNN and TFN cells of both protocols native (the reference
    TFN through its shared stream positions); the residual TFN variant torch."""
    engine("auto")
    cpu = torch.device("cpu")
    fnn = RunConfig(**CELL)
    tfn = RunConfig(**TFN_CELL, target_depth=1, frozen_depth=1)
    for protocol in ("paper", "reference"):
        for cfg in (fnn, fnn.replace(task="classification"), tfn):
            assert native.use_native(cfg.replace(protocol=protocol), cpu), (protocol, cfg.exp, cfg.task)
        assert not native.use_native(tfn.replace(protocol=protocol, better_optim=1), cpu)
    engine("torch")
    assert not native.use_native(fnn, cpu)


def test_unsupported_cells_train_with_torch(engine):
    engine("native")
    rows = run_configs([RunConfig(**{**CELL, "width": 8}), RunConfig(exp="tfn", width=8, target_depth=1,
                        frozen_depth=1, seq_length=3, batch_size=8, n_test=20, n_epochs=2, method="sgd")],
                       device="cpu")
    assert {r["engine"] for r in rows} == {"torch"}


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build in an empty cache folder, forgotten afterwards."""
    monkeypatch.setenv("LORABENCH_CACHE_DIR", str(tmp_path / "cache"))
    native._library.cache_clear()
    yield tmp_path / "cache"
    native._library.cache_clear()


def test_build_is_cached_and_written_whole(fresh_build, capfd):
    assert native.available()
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].name.startswith("training_steps-") and built[0].name.endswith("-w16-n16.so")
    assert "building the native training step for width 16, up to 16 tokens" in capfd.readouterr().err
    native._library.cache_clear()
    before = built[0].stat().st_mtime_ns
    assert native.available() and built[0].stat().st_mtime_ns == before  # reused, not rebuilt
    assert capfd.readouterr().err == ""
    with pytest.raises(native.NativeError, match="widths .* not 24"):
        native._build(24)
    # The paper's 10 tokens take the small library; more than 16 tokens the full one.
    assert native._build(16, 10) is native._build(16)
    assert native._build(16, 17) is not native._build(16) and len(list(fresh_build.iterdir())) == 2
    with pytest.raises(native.NativeError, match="at most 64 tokens, not 65"):
        native._build(16, 65)


def test_missing_compiler(fresh_build, monkeypatch, engine, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    engine("native")
    with pytest.raises(native.NativeError, match="no C compiler"):
        list(run_configs([RunConfig(**CELL)], device="cpu"))
    engine("auto")
    with pytest.warns(UserWarning, match="training with torch"):
        rows = list(run_configs([RunConfig(**CELL)], device="cpu"))
    assert {r["engine"] for r in rows} == {"torch"}
    assert not fresh_build.exists() or not any(fresh_build.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------ TFN
TFN_CELL = dict(exp="tfn", width=16, n_head=2, seq_length=5, batch_size=8, n_test=40, n_epochs=6, method="sgd", seed=1)


def _tfn_cell(cfgs, engine_value, monkeypatch, dtype=torch.float32):
    monkeypatch.setenv("LORABENCH_ENGINE", engine_value)
    models = [generate_models(c) for c in cfgs]
    frozen = map_tensors(stack_models([m.frozen for m in models]), lambda t: t.to(dtype))
    lora = stack_lora([m.lora_init for m in models])
    lora = LoRA(*({k: v.to(dtype) for k, v in part.items()} for part in (lora.a, lora.b, lora.mask)))
    return tfn_lora_trainable(cfgs, frozen, lora), models[0].target


def _tfn_setup(depth, monkeypatch, width=16, tokens=5, prenorm=0):
    shape = {**TFN_CELL, "width": width, "seq_length": tokens, "prenorm": prenorm}
    cfgs = [RunConfig(**shape, target_depth=depth, frozen_depth=depth, rank=r, lr=lr, tune_bias=tb)
            for r in (1, 3) for lr in (1e-2, 1e-3) for tb in (0, 1)]
    native_cell, target = _tfn_cell(cfgs, "native", monkeypatch)
    torch_cell, _ = _tfn_cell(cfgs, "torch", monkeypatch)
    assert native_cell.engine == "native" and torch_cell.engine == "torch"
    gen = torch.Generator().manual_seed(0)
    start = (native_cell.init + 0.05 * torch.randn(native_cell.init.shape, generator=gen)).contiguous()
    x, vx = torch.randn(8, width, tokens, generator=gen), torch.randn(6, width, tokens, generator=gen)
    return cfgs, native_cell, torch_cell, target, start, (x, forward(target, x)), (vx, forward(target, vx))


def _adam(cfgs, trainable):
    return BatchedAdam([c.lr for c in cfgs], [c.weight_decay for c in cfgs], trainable.mask)


# Token counts that take the kernel's smaller row blocks (5: 4 + 1, 10: 8 + 2); wider
# shapes are checked against float64 below.
@pytest.mark.parametrize("width, tokens", [(16, 5), (16, 10)])
def test_native_tfn_step_equals_torch_step(width, tokens, monkeypatch):
    """One block: loss, gradient (every adapted matrix of every head, the last W_2, the
    output layer, the biases), Adam update and validation loss, step by step."""
    cfgs, native_cell, torch_cell, _, start, batch, val_batch = _tfn_setup(1, monkeypatch, width, tokens)
    ours, theirs = _adam(cfgs, native_cell), _adam(cfgs, torch_cell)
    active = torch.ones(len(cfgs), dtype=torch.bool)
    flat_native, flat_torch = start.clone(), start.clone()
    for step in range(3):
        loss, val = ours.native_step(native_cell.native_step, flat_native, batch, val_batch, active, 2)
        loss_ref, grad = autograd_value_and_grad(torch_cell, flat_torch, *batch, "regression", "labels")
        if step == 0:  # after one step, the first moment is 0.1 x the gradient
            torch.testing.assert_close(ours.exp_avg, 0.1 * grad * torch_cell.mask, rtol=2e-5, atol=3e-6)
        flat_torch = theirs.step(flat_torch, grad, active)
        val_ref = task_loss(forward(torch_cell.model(flat_torch), val_batch[0]), val_batch[1], "regression", "labels")
        torch.testing.assert_close(loss, loss_ref, rtol=2e-5, atol=1e-9)
        torch.testing.assert_close(val, val_ref, rtol=2e-5, atol=1e-9)
        assert torch.isclose(flat_native, flat_torch, rtol=1e-5, atol=5e-6).float().mean() > 0.995


@pytest.mark.parametrize("prenorm", [0, 1])
def test_transformer_passes_do_not_depend_on_their_chunks(prenorm, monkeypatch):
    """The token-row passes take a batch a chunk of samples at a time, each chunk's
    backward pass right after its forward pass. Over 37 samples of 3 tokens (the last
    chunk's rows not a multiple of 4) and 23 validation samples, chunks of 4 and 8 give bit
    for bit what one chunk gives: the step's losses, parameters and Adam moments, the dense
    gradients of whole transformers, and the forward pass."""
    cfgs, _, _, target, start, _, _ = _tfn_setup(2, monkeypatch, 16, 3, prenorm)
    gen = torch.Generator().manual_seed(1)
    x, vx = torch.randn(37, 16, 3, generator=gen), torch.randn(23, 16, 3, generator=gen)
    batch, val_batch = (x, forward(target, x)), (vx, forward(target, vx))
    _, models, frozen = _stacked_tfn_models(2, 16, 3, prenorm=prenorm)

    def everything(chunk):
        monkeypatch.setattr(native, "TFN_CHUNK_SAMPLES", chunk)
        cell, _ = _tfn_cell(cfgs, "native", monkeypatch)
        adam, flat = _adam(cfgs, cell), start.clone()
        active = torch.ones(len(cfgs), dtype=torch.bool)
        losses = [adam.native_step(cell.native_step, flat, batch, val_batch, active, 1) for _ in range(2)]
        loss, dense = native.tfn_gradients(frozen, x, forward(models[0].target, x))
        return [*(t for pair in losses for t in pair), flat, adam.exp_avg, adam.exp_avg_sq, loss, *dense.values(),
                native.tfn_outputs(target, x)]

    whole = everything(64)
    for chunk in (4, 8):
        assert all(torch.equal(a, b) for a, b in zip(everything(chunk), whole)), chunk


# Two blocks amplify float32 round-off (outputs ~1e3); so do a width of two vectors and
# 20 tokens (two vectors of a score row), and pre-norm blocks (both engines about twice the
# plain block's error at depth 1), where a step-by-step tolerance would not hold.
@pytest.mark.parametrize("depth, width, tokens, prenorm",
                         [(2, 16, 5, 0), (1, 32, 20, 0), (1, 16, 5, 1), (2, 16, 5, 1), (2, 32, 10, 1)])
def test_native_tfn_gradient_is_as_accurate_as_torch(depth, width, tokens, prenorm, monkeypatch):
    """Both engines' gradients are compared with a float64 autograd reference, and the
    native one may not be worse than 3x torch's float32 error on any trained tensor."""
    cfgs, native_cell, torch_cell, target, start, batch, val_batch = _tfn_setup(depth, monkeypatch, width, tokens,
                                                                                prenorm)
    ours = _adam(cfgs, native_cell)
    active = torch.ones(len(cfgs), dtype=torch.bool)
    loss, _ = ours.native_step(native_cell.native_step, start.clone(), batch, val_batch, active, 1)
    native_grad = ours.exp_avg.double() / 0.1
    loss32, torch_grad = autograd_value_and_grad(torch_cell, start, *batch, "regression", "labels")
    exact_cell, _ = _tfn_cell(cfgs, "torch", monkeypatch, torch.float64)
    x64 = batch[0].double()
    loss64, exact = autograd_value_and_grad(exact_cell, start.double(), x64,
                                            forward(map_tensors(target, lambda t: t.double()), x64), "regression",
                                            "labels")
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=0)
    mask = torch_cell.mask.double()
    for name, (begin, end) in torch_cell.layout.offsets.items():
        reference = (exact * mask)[:, begin:end]
        native_error = (native_grad[:, begin:end] - reference).abs().max()
        torch_error = ((torch_grad.double() * mask)[:, begin:end] - reference).abs().max()
        assert native_error <= 3 * torch_error + 1e-6 * reference.abs().max(), name


@pytest.mark.parametrize("depth, width, tokens, prenorm",
                         [(1, 16, 10, 0), (2, 16, 5, 0), (1, 32, 20, 0), (2, 16, 10, 1)])
def test_native_target_forward_is_as_accurate_as_torch(depth, width, tokens, prenorm):
    """The native forward pass of a target (the reference transformer stream evaluates
    it on every new batch) against float64: no worse than 3x torch's float32 error, on
    inputs with a leading dimension of several batches."""
    cfg = RunConfig(**{**TFN_CELL, "width": width, "seq_length": tokens, "prenorm": prenorm}, target_depth=depth,
                    frozen_depth=depth)
    target = generate_models(cfg).target
    x = torch.randn(2, 7, width, tokens, generator=torch.Generator().manual_seed(0))
    exact = forward(map_tensors(target, lambda t: t.double()), x.double())
    ours = native.tfn_outputs(target, x)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    native_error = (ours.double() - exact).abs().max()
    torch_error = (forward(target, x).double() - exact).abs().max()
    assert native_error <= 3 * torch_error + 1e-6 * exact.abs().max()


def test_native_target_forward_refuses_what_it_does_not_compute():
    target = generate_models(RunConfig(**TFN_CELL, target_depth=1, frozen_depth=1)).target
    with pytest.raises(native.NativeError, match="width 8"):
        native.tfn_outputs(target, torch.randn(3, 8, 5))
    with pytest.raises(native.NativeError, match="one TFN"):
        native.tfn_outputs(stack_models([target, target]), torch.randn(3, 16, 5))


def test_native_transformer_cells_evaluate_their_targets_natively(monkeypatch):
    cfgs, native_cell, torch_cell, target, *_ = _tfn_setup(1, monkeypatch)
    outputs = target_outputs_for(native_cell, target)
    x = torch.randn(4, 16, 5)
    assert torch.equal(outputs(x), native.tfn_outputs(target, x))
    assert target_outputs_for(torch_cell, target) is None


def test_native_tfn_cell_trains_and_matches_alone(engine):
    engine("native")
    base = RunConfig(**TFN_CELL, target_depth=1, frozen_depth=1, curve_every=2)
    cell = [base.replace(rank=r, lr=lr) for r in (1, 4) for lr in (1e-2, 1e-3)]
    together = _rows(cell)
    alone = _rows([base.replace(rank=4, lr=1e-2)])
    assert {r["engine"] for r in together.values()} == {"native"}
    for column in ("test_loss", "val_loss", "train_loss", "val_curve"):
        assert alone[(4, 1e-2, "last")][column] == together[(4, 1e-2, "last")][column], column
    row = together[(4, 1e-2, "last")]
    assert row["train_curve"][-1] < row["train_curve"][0]
    prenorm = _rows([base.replace(rank=2, lr=1e-2, prenorm=1)])
    assert {r["engine"] for r in prenorm.values()} == {"native"}
    # The authors' post-norm residual/dropout variant stays on torch.
    residual = _rows([base.replace(rank=2, lr=1e-2, better_optim=1)])
    assert {r["engine"] for r in residual.values()} == {"torch"}


def test_layout_mismatch_is_a_clear_error(monkeypatch):
    class Longer(ctypes.Structure):
        _fields_ = native._TfnShape._fields_ + [("extra", ctypes.c_long)]

    lib = native._build()
    native._check_abi(lib)
    monkeypatch.setattr(native, "_TfnShape", Longer)
    with pytest.raises(native.NativeError, match="sizeof\\(TfnShape\\)"):
        native._check_abi(lib)


def test_native_tfn_step_reads_shared_rows_and_per_config_validation(monkeypatch):
    """The reference protocol's TFN data (one training and validation batch per config, as
    rows of a few distinct batches) gives bit for bit the step of the stacked copies, and
    each config is validated on its own batch."""
    from lorabench.core.streams import SharedRows, stacked

    cfgs, native_cell, _, target, start, _, _ = _tfn_setup(1, monkeypatch)
    C, gen = len(cfgs), torch.Generator().manual_seed(11)
    x, vx = torch.randn(3, 8, 16, 5, generator=gen), torch.randn(2, 6, 16, 5, generator=gen)
    train = SharedRows(x, forward(target, x), torch.arange(C) % 3)
    val = SharedRows(vx, forward(target, vx), torch.arange(C) // ((C + 1) // 2))
    active = torch.ones(C, dtype=torch.bool)
    flat_rows, flat_copies = start.clone(), start.clone()
    ours, theirs = _adam(cfgs, native_cell), _adam(cfgs, native_cell)
    for _ in range(2):
        loss, v = ours.native_step(native_cell.native_step, flat_rows, train, val, active, 2)
        loss_c, v_c = theirs.native_step(native_cell.native_step, flat_copies, stacked(train), stacked(val), active, 1)
        assert torch.equal(loss, loss_c) and torch.equal(v, v_c)
    assert torch.equal(flat_rows, flat_copies)
    # each config validated on its own batch (half the cell reads the second one)
    model = native_cell.model(flat_rows)
    own = task_loss(forward(model, stacked(val)[0]), stacked(val)[1], "regression", "labels")
    torch.testing.assert_close(v, own, rtol=2e-5, atol=1e-9)
    bad = SharedRows(x, forward(target, x), torch.full((C,), 3))
    with pytest.raises(native.NativeError, match="row index"):
        ours.native_step(native_cell.native_step, flat_rows, bad, val, active, 1)


@pytest.mark.parametrize("depth, width, tokens, samples", [(1, 16, 5, 8), (2, 16, 10, 37), (2, 32, 20, 16)])
def test_native_tfn_validation_on_lanes_is_the_token_row_loss(depth, width, tokens, samples, monkeypatch):
    """The validation pass holds a sample on each lane, the training pass token rows; on the
    same batch with nothing updated, the two losses are bit for bit the same (a group of
    lanes partly filled included)."""
    shape = {**TFN_CELL, "width": width, "seq_length": tokens}
    cfgs = [RunConfig(**shape, target_depth=depth, frozen_depth=depth, rank=r, lr=1e-2) for r in (1, 4, width)]
    cell, target = _tfn_cell(cfgs, "native", monkeypatch)
    gen = torch.Generator().manual_seed(5)
    flat = (cell.init + 0.05 * torch.randn(cell.init.shape, generator=gen)).contiguous()
    x = torch.randn(samples, width, tokens, generator=gen)
    batch = (x, forward(target, x))
    loss, val = _adam(cfgs, cell).native_step(cell.native_step, flat, batch, batch, torch.zeros(3, dtype=torch.bool), 1)
    assert torch.isfinite(loss).all() and torch.equal(loss, val)


# ------------------------------------------------------- native gradients of whole TFNs
def _stacked_tfn_models(depth: int, width: int, tokens: int, seeds=(1, 2, 3), prenorm=0):
    cfgs = [RunConfig(**{**TFN_CELL, "width": width, "seq_length": tokens, "seed": s}, target_depth=depth,
                      frozen_depth=depth, rank=2, prenorm=prenorm) for s in seeds]
    models = [generate_models(c) for c in cfgs]
    return cfgs, models, stack_models([m.frozen for m in models])


@pytest.mark.parametrize("depth, width, tokens, per_config, prenorm",
                         [(2, 16, 5, False, 0), (1, 32, 20, True, 0), (2, 16, 10, True, 1)])
def test_native_gradients_of_whole_transformers_are_as_accurate_as_torch(depth, width, tokens, per_config, prenorm):
    """The loss and the gradient of every tensor (every block's W1 and W2 too, which LoRA's
    step does not train) against a float64 autograd reference: the native error may not
    exceed 3x torch's float32 error. A shared batch, or one per configuration."""
    from dataclasses import replace

    _, models, frozen = _stacked_tfn_models(depth, width, tokens, prenorm=prenorm)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*((3,) if per_config else ()), 8, width, tokens, generator=gen)
    y = forward(models[0].target, x)
    loss, dense = native.tfn_gradients(frozen, x, y)

    def autograd(dtype):
        leaves = {k: v.to(dtype).requires_grad_(True) for k, v in frozen.tensors().items()}
        value = task_loss(forward(replace(frozen, **leaves), x.to(dtype)), y.to(dtype), "regression", "labels")
        return value.detach(), dict(zip(leaves, torch.autograd.grad(value.sum(), list(leaves.values()))))

    (loss32, torch32), (loss64, exact) = autograd(torch.float32), autograd(torch.float64)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=0)
    assert set(dense) == set(exact) == set(native.TFN_DENSE)
    for name, reference in exact.items():
        native_error = (dense[name].double() - reference).abs().max()
        torch_error = (torch32[name].double() - reference).abs().max()
        assert native_error <= 3 * torch_error + 1e-6 * reference.abs().max(), name
    loss_only, none = native.tfn_gradients(frozen, x, y, threads=2, with_grad=False)
    assert none is None and torch.equal(loss_only, loss)


def test_native_gradients_refuse_what_they_do_not_compute():
    _, models, frozen = _stacked_tfn_models(1, 16, 5)
    x = torch.randn(4, 16, 5)
    with pytest.raises(native.NativeError, match="stacked"):
        native.tfn_gradients(models[0].frozen, x, x)
    with pytest.raises(native.NativeError, match="inputs"):
        native.tfn_gradients(frozen, torch.randn(2, 4, 16, 5), torch.randn(2, 4, 16, 5))
    with pytest.raises(native.NativeError, match="targets shaped"):
        native.tfn_gradients(frozen, x, x[:2])


@pytest.mark.parametrize("method", ["full", "dora", "vera"])
def test_plug_in_methods_on_the_transformer_take_the_native_gradients(method, engine):
    """A generic method's transformer cell: loss and gradients from the native pass, mapped
    onto its parameters by autograd through ``adapt``, equal autograd through the whole
    model to float32 round-off; its rows say so; LORABENCH_ENGINE=torch keeps autograd."""
    from lorabench.methods import validated
    from lorabench.training.trainables import generic_trainable

    cfgs = [validated(RunConfig(**{**TFN_CELL, "method": method}, target_depth=1, frozen_depth=1, rank=r, tune_bias=1))
            for r in (1, 3)]
    models = [generate_models(c) for c in cfgs]
    frozen = stack_models([m.frozen for m in models])
    engine("auto")
    ours = generic_trainable(method_of(cfgs[0]), cfgs, frozen, models)
    engine("torch")
    theirs = generic_trainable(method_of(cfgs[0]), cfgs, frozen, models)
    assert ours.native_gradients and ours.engine_label == "native-gradients"
    assert not theirs.native_gradients and theirs.engine_label == "torch"
    gen = torch.Generator().manual_seed(2)
    start = (ours.init + 0.05 * torch.randn(ours.init.shape, generator=gen) * ours.mask).contiguous()
    for shape in ((8, 16, 5), (2, 8, 16, 5)):  # a shared batch, one per configuration
        x = torch.randn(shape, generator=gen)
        y = forward(models[0].target, x)
        loss, grad = ours.value_and_grad(ours.layout, start, x, y)
        loss_ref, grad_ref = autograd_value_and_grad(theirs, start, x, y, "regression", "labels")
        torch.testing.assert_close(loss, loss_ref, rtol=2e-5, atol=1e-9)
        scale = grad_ref.abs().max()
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5 * float(scale))
        torch.testing.assert_close(ours.loss(ours.layout, start, x, y), loss_ref, rtol=2e-5, atol=1e-9)
    engine("auto")
    rows = list(run_configs([cfgs[1].replace(lr=1e-2, curve_every=2)], device="cpu"))
    assert {r["engine"] for r in rows} == {"native-gradients"}
    assert rows[0]["train_curve"][-1] < rows[0]["train_curve"][0]
