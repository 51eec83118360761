"""Methods as plug-ins (lorabench.methods): each built-in method against a hand-computed
case, the interface's guarantees on both families, and a user's method found by its
module path, with a clear error for every way it can be wrong."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lorabench.core.config import ConfigError, RunConfig
from lorabench.core.models import forward
from lorabench.core.protocols import generate_models, protocol_of
from lorabench.methods import BUILT_IN, method_of, resolve, validated
from lorabench.methods.base import adapted_matrices, with_matrices
from lorabench.methods.dora import dora_weight
from lorabench.methods.pissa import principal_factors
from lorabench.methods.vera import shared_factors, vera_weight
from lorabench.runs.experiments import configs_hash
from lorabench.runs.runner import ModelCache, run_configs
from lorabench.training.trainables import stack_models

ROOT = Path(__file__).resolve().parents[1]
GRADIENT = sorted(name for name, m in BUILT_IN.items() if not m.closed_form)
FNN_SMALL = dict(width=8, target_depth=1, frozen_depth=2, batch_size=32, n_test=100, n_val=32, n_epochs=20, seed=3,
                 curve_every=5)
TFN_SMALL = dict(exp="tfn", width=8, target_depth=1, frozen_depth=1, n_head=2, seq_length=4, batch_size=16,
                 n_test=40, n_val=16, n_epochs=10, seed=3, curve_every=5)


# ------------------------------------------------------------------ hand-computed cases
def test_dora_weight_is_the_magnitude_times_the_unit_columns_of_w_plus_ab():
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # A B^T = [[0, 1], [0, 0]]: V = [[3, 1], [4, 1]]
    root2 = math.sqrt(2.0)
    torch.testing.assert_close(dora_weight(w, a, b, torch.tensor([10.0, 2.0])),
                               torch.tensor([[6.0, root2], [8.0, root2]]))
    # at the start (A = 0, m = ||W||_c) the weight is W itself
    torch.testing.assert_close(dora_weight(w, torch.zeros(2, 2), b, torch.tensor([5.0, 1.0])), w)


def test_vera_weight_is_w_plus_diag_b_times_b_diag_d_a():
    w = torch.eye(2)
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])  # rank 1: rows >= 1 of A are zero
    b = torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # and columns >= 1 of B
    # B diag(d) A = [[1.5, 3], [2, 4]]; diag(b) flips the second row
    torch.testing.assert_close(vera_weight(w, a, b, torch.tensor([0.5, 7.0]), torch.tensor([1.0, -1.0])),
                               torch.tensor([[2.5, 3.0], [-2.0, -3.0]]))


def test_vera_factors_are_shared_nested_in_the_rank_and_seeded():
    a2, b2 = shared_factors(seed=5, width=6, rank=2)
    a4, b4 = shared_factors(seed=5, width=6, rank=4)
    assert torch.equal(a4[:2], a2[:2]) and torch.equal(b4[:, :2], b2[:, :2])
    assert not a2[2:].any() and not b2[:, 2:].any()
    assert not torch.equal(shared_factors(seed=6, width=6, rank=2)[0], a2)


def test_pissa_factors_are_the_principal_singular_triplets():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    a, b = principal_factors(w, 1)
    torch.testing.assert_close(a @ b.T, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(a.norm(dim=0), torch.tensor([math.sqrt(3.0), 0.0]))
    torch.testing.assert_close(b.norm(dim=0), torch.tensor([math.sqrt(3.0), 0.0]))
    a, b = principal_factors(w, 2)
    torch.testing.assert_close(a @ b.T, w)


@pytest.mark.parametrize("method, fnn, tfn", [
    # FNN (1, 2) at D = 16, rank 4, biases tuned: 2 layers, 32 biases. TFN depth 1, H = 2:
    # 4 * 2 + 2 = 10 matrices, 32 feed-forward biases.
    ("sgd", 2 * 2 * 4 * 16 + 32, 10 * 2 * 4 * 16 + 32),
    ("ours", 2 * 2 * 4 * 16 + 32, 10 * 2 * 4 * 16 + 32),
    ("full", 2 * 16 * 16 + 32, 10 * 16 * 16 + 32),
    ("dora", 2 * (2 * 4 * 16 + 16) + 32, 10 * (2 * 4 * 16 + 16) + 32),
    ("vera", 2 * (4 + 16) + 32, 10 * (4 + 16) + 32),
    ("pissa", 2 * 2 * 4 * 16 + 32, 10 * 2 * 4 * 16 + 32),
])
def test_parameter_counts_by_hand(method, fnn, tfn):
    assert method_of(RunConfig(method=method, width=16, rank=4)).parameter_count(
        validated(RunConfig(method=method, width=16, rank=4, frozen_depth=2))) == fnn
    cfg = validated(RunConfig(method=method, exp="tfn", width=16, rank=4, target_depth=1, frozen_depth=1))
    assert method_of(cfg).parameter_count(cfg) == tfn


def test_final_layers_counts_its_layers():
    cfg = validated(RunConfig(method="flt", width=16, frozen_depth=8, last_layers=3))
    assert method_of(cfg).parameter_count(cfg) == 3 * (16 * 16 + 16)


# --------------------------------------------------------------- the interface's promises
def _start_cell(method: str, base: dict, ranks=(1, 3)):
    cfgs = [validated(RunConfig(**base, method=method, rank=r)) for r in ranks]
    cache = ModelCache()
    models = [cache.get(c) for c in cfgs]
    frozen = stack_models([m.frozen for m in models])
    return cfgs, models, frozen, method_of(cfgs[0]).trainable(cfgs, frozen, models)


# every gradient method on each family it exists for, but LoRA from the construction,
# which starts at the construction (test_lora_from_the_construction_starts_at_the_construction)
STARTS_AT_FROZEN = [(m, base) for m in GRADIENT if m != "lora_from_construction"
                    for base in (FNN_SMALL, TFN_SMALL) if base.get("exp", "fnn") in BUILT_IN[m].families]


@pytest.mark.parametrize("method, base", STARTS_AT_FROZEN,
                         ids=[f"{m}-{b.get('exp', 'fnn')}" for m, b in STARTS_AT_FROZEN])
def test_every_gradient_method_starts_at_the_frozen_model(method, base):
    cfgs, models, frozen, trainable = _start_cell(method, base)
    x = torch.randn(5, base["width"], *(() if "exp" not in base else (base["seq_length"],)),
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(forward(trainable.model(trainable.init), x), forward(frozen, x),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "dora", "vera", "pissa"])
def test_a_plug_in_config_gives_the_same_rows_alone_and_in_a_cell(method):
    """The cell batches configurations: a config's numbers do not depend on its cellmates."""
    cfgs = [validated(RunConfig(**FNN_SMALL, method=method, rank=r, lr=lr)) for r in (1, 4) for lr in (1e-2, 1e-3)]
    together = {r["config_hash"]: r for r in run_configs(cfgs, device="cpu") if r["checkpoint"] == "last"}
    alone = next(r for r in run_configs(cfgs[3:], device="cpu") if r["checkpoint"] == "last")
    assert alone["test_loss"] == pytest.approx(together[alone["config_hash"]]["test_loss"], rel=1e-5)
    assert alone["train_curve"] == pytest.approx(together[alone["config_hash"]]["train_curve"], rel=1e-5)


@pytest.mark.parametrize("base", [FNN_SMALL, TFN_SMALL], ids=["fnn", "tfn"])
@pytest.mark.parametrize("method", ["full", "dora", "vera", "pissa"])
def test_plug_ins_train_and_their_rows_say_what_ran(method, base):
    cfg = validated(RunConfig(**base, method=method, rank=2, lr=1e-2))
    rows = list(run_configs([cfg], device="cpu"))
    assert [r["checkpoint"] for r in rows] == ["last", "best"]
    last = rows[0]
    assert last["method"] == method and last["method_digest"] is None
    assert last["method_settings"] == cfg.method_settings
    assert last["n_trainable_params"] == method_of(cfg).parameter_count(cfg)
    assert last["train_curve"][-1] < last["train_curve"][0]


@pytest.mark.parametrize("base", [FNN_SMALL, TFN_SMALL], ids=["fnn", "tfn"])
def test_pissa_on_loras_trainable_is_the_model_of_its_start_and_adapt(base):
    """PiSSA trains on LoRA's trainable (residual frozen weights, principal factors): the
    same loss and gradients as the generic autograd trainable of its start and adapt."""
    from lorabench.training.trainables import autograd_value_and_grad, generic_trainable

    cfgs, models, frozen, lora_form = _start_cell("pissa", {**base, "tune_bias": 1}, ranks=(1, 3))
    generic = generic_trainable(method_of(cfgs[0]), cfgs, frozen, models)
    gen = torch.Generator().manual_seed(1)
    shape = (12, base["width"]) if "exp" not in base else (12, base["width"], base["seq_length"])
    x = torch.randn(shape, generator=gen)
    y = forward(models[0].target, x)
    task, loss_kind = cfgs[0].task, protocol_of(cfgs[0]).classification_loss
    if lora_form.value_and_grad is not None:
        loss, grad = lora_form.value_and_grad(lora_form.layout, lora_form.init, x, y)
    else:
        loss, grad = autograd_value_and_grad(lora_form, lora_form.init, x, y, task, loss_kind)
    generic_loss, generic_grad = autograd_value_and_grad(generic, generic.init, x, y, task, loss_kind)
    torch.testing.assert_close(loss, generic_loss, rtol=1e-5, atol=1e-7)
    ours, theirs = lora_form.layout.views(grad), generic.layout.views(generic_grad)
    renamed = {"a": "a_weights", "b": "b_weights"}
    assert {renamed.get(k, k) for k in ours} == set(theirs)
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[renamed.get(name, name)], rtol=1e-4, atol=1e-6)
    mask, generic_mask = lora_form.layout.views(lora_form.mask), generic.layout.views(generic.mask)
    for name, value in mask.items():
        torch.testing.assert_close(value, generic_mask[renamed.get(name, name)])


def test_dora_keeps_the_masked_columns_of_its_factors_at_zero():
    cfgs, _, _, trainable = _start_cell("dora", FNN_SMALL, ranks=(2,))
    padding = 1 - trainable.mask[0]
    a_range = trainable.layout.offsets["a_weights"]
    assert padding[a_range[0]:a_range[1]].sum() == 2 * 8 * 6  # two layers, 8 rows, 6 padded columns


def test_adapted_matrices_round_trip_on_the_transformer():
    models = generate_models(validated(RunConfig(**{**TFN_SMALL, "target_depth": 2, "frozen_depth": 2}, method="sgd")))
    matrices = adapted_matrices(models.frozen)
    assert set(matrices) == {"wq", "wk", "wv", "wo", "w2", "w_out"}
    torch.testing.assert_close(matrices["w2"], models.frozen.w2[-1])
    doubled = with_matrices(models.frozen, {k: 2 * v for k, v in matrices.items()})
    torch.testing.assert_close(doubled.w2[0], models.frozen.w2[0])  # only the last block's W_2
    torch.testing.assert_close(doubled.w2[1], 2 * models.frozen.w2[1])


# --------------------------------------------------------------------- settings and errors
def test_vera_settings_are_validated_and_hashed():
    default = validated(RunConfig(method="vera", rank=2))
    assert default.method_settings == '{"d_init":0.1}'
    other = validated(RunConfig(method="vera", rank=2, method_settings='{"d_init": 1}'))
    assert other.method_settings == '{"d_init":1.0}' and other.config_hash() != default.config_hash()
    with pytest.raises(ConfigError, match="method 'vera' setting 'd_init' must be of type float, got 'big'"):
        validated(RunConfig(method="vera", method_settings='{"d_init": "big"}'))
    with pytest.raises(ConfigError, match=r"method 'vera': unknown setting\(s\) alpha \(its settings: d_init\)"):
        validated(RunConfig(method="vera", method_settings='{"alpha": 2}'))
    with pytest.raises(ConfigError, match="method 'sgd': unknown setting"):
        validated(RunConfig(method="sgd", method_settings='{"alpha": 2}'))
    with pytest.raises(ConfigError, match="is not JSON"):
        validated(RunConfig(method="vera", method_settings="d_init=1"))


def test_the_built_in_methods_keep_their_config_hashes():
    """Settings-free methods hash as before method_settings existed (published job ids)."""
    assert validated(RunConfig(method="sgd", rank=2)).config_hash() == "2d64f4f331fbe4ba"
    assert validated(RunConfig(method="ours", rank=2)).config_hash() == "7b5d8ec60305b570"
    assert validated(RunConfig(method="flt", rank=2)).config_hash() == "0844bbe4eda93c88"


def test_each_method_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="method 'flt' exists only for exp 'fnn'"):
        validated(RunConfig(method="flt", exp="tfn", target_depth=1, frozen_depth=1))
    with pytest.raises(ConfigError, match="rank must be >= 1 for method 'dora'"):
        validated(RunConfig(method="dora", rank=0))
    validated(RunConfig(method="ours", rank=0))  # the construction's rank 0: its biases alone
    with pytest.raises(ConfigError, match="unknown method 'lora2'"):
        validated(RunConfig(method="lora2"))


NOT_A_METHOD = {
    "nosuchmodule_xyz:Thing": r"module 'nosuchmodule_xyz' does not import \(ModuleNotFoundError",
    "broken_method:Broken": r"module 'broken_method' does not import \(ZeroDivisionError",
    "incomplete_method:Missing": "has no 'Missing'",
    "incomplete_method:NotAMethod": "is not a subclass of lorabench.methods.Method",
    "incomplete_method:NoAdapt": "a gradient method must define adapt",
    "incomplete_method:NoConstruct": "a closed-form method must define construct",
    "incomplete_method": "unknown method 'incomplete_method'",
}


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    (tmp_path / "broken_method.py").write_text("1 / 0\n")
    (tmp_path / "incomplete_method.py").write_text(textwrap.dedent("""
        from lorabench.methods import Method

        class NotAMethod:
            pass

        class NoAdapt(Method):
            def parameter_count(self, cfg):
                return 0

            def start(self, cfg, models):
                raise AssertionError

        class NoConstruct(Method):
            closed_form = True

            def parameter_count(self, cfg):
                return 0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", sorted(NOT_A_METHOD))
def test_a_bad_method_is_refused_by_name(name, user_modules):
    with pytest.raises(ConfigError, match=NOT_A_METHOD[name]):
        resolve(name)


# ------------------------------------------------------------------- a user's own method
def user_method_source() -> str:
    """The example of docs/methods.md: the one a user would copy."""
    text = (ROOT / "docs" / "methods.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_documented_method_is_about_forty_lines():
    assert 25 <= len(user_method_source().strip().splitlines()) <= 50


def test_a_users_method_runs_through_lorabench_run(tmp_path):
    (tmp_path / "my_methods.py").write_text(user_method_source())
    command = [sys.executable, "-m", "lorabench", "run", "--method", "my_methods:LoRAFA", "--width", "8",
               "--rank", "1,4", "--n_epochs", "20", "--batch_size", "32", "--n_test", "100", "--json",
               "--no_progress", "--output", "rows.parquet"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    from lorabench.runs.results import read_rows

    rows = read_rows(tmp_path / "rows.parquet")
    assert set(rows["method"]) == {"my_methods:LoRAFA"}
    assert rows["method_digest"].notna().all()
    assert sorted(rows.loc[rows.checkpoint == "last", "n_trainable_params"]) == [2 * 1 * 8, 2 * 4 * 8]  # L R D


def test_editing_a_users_method_renames_its_jobs(tmp_path, monkeypatch):
    package = tmp_path / "edited_method_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lorafa.py").write_text(user_method_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = validated(RunConfig(method="edited_method_pkg.lorafa:LoRAFA", rank=2))
    before = configs_hash([cfg])
    builtin = configs_hash([validated(RunConfig(method="sgd", rank=2))])
    (package / "lorafa.py").write_text(user_method_source() + "\n# edited\n")
    import importlib

    from lorabench import methods

    methods._load.cache_clear()
    importlib.invalidate_caches()
    sys.modules.pop("edited_method_pkg.lorafa", None)
    assert configs_hash([cfg]) != before
    assert configs_hash([validated(RunConfig(method="sgd", rank=2))]) == builtin


def test_no_code_outside_the_methods_branches_on_a_method_name():
    source = ROOT / "src" / "lorabench"
    pattern = re.compile(r"method (==|!=|in) ")
    hits = [f"{path.relative_to(source)}:{i}" for path in source.rglob("*.py") if "methods" not in path.parts
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits


def test_protocols_do_not_change_a_plug_in_start_but_its_lora_init():
    """DoRA starts from the protocol's LoRA initialisation (the reference protocol's from
    the authors' stream), PiSSA from the frozen weight alone."""
    for protocol in ("paper", "reference"):
        cfg = validated(RunConfig(**FNN_SMALL, method="dora", rank=2, protocol=protocol))
        models = ModelCache().get(cfg)
        start = method_of(cfg).start(cfg, models)
        assert torch.equal(start.params["b_weights"], models.lora_init.b["weights"])
        assert protocol_of(cfg).name == protocol


@pytest.mark.parametrize("base", [FNN_SMALL, TFN_SMALL], ids=["fnn", "tfn"])
def test_lora_from_the_construction_starts_at_the_construction(base):
    """Its starting model is the construction's adapted model (float64, cast to float32)."""
    cfgs = [validated(RunConfig(**base, method="lora_from_construction", rank=r)) for r in (1, 3)]
    cache = ModelCache()
    models = [cache.get(c) for c in cfgs]
    trainable = method_of(cfgs[0]).trainable(cfgs, stack_models([m.frozen for m in models]), models)
    x = torch.randn(6, base["width"], *(() if "exp" not in base else (base["seq_length"],)),
                    generator=torch.Generator().manual_seed(1))
    protocol = protocol_of(cfgs[0])
    for c, (cfg, m) in enumerate(zip(cfgs, models)):
        built = BUILT_IN["ours"].construct(cfg.replace(method="ours"), m, torch.float64,
                                           protocol.calibration_inputs(cfg), protocol.authors_bias_propagation)
        with torch.no_grad():
            start = forward(trainable.model(trainable.init), x)[c].double()
        expected = forward(built, x.double())
        torch.testing.assert_close(start, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
