"""Figures on small synthetic results: schema-valid rows (results.rows_to_table), selected
by validation as the workflow does, drawn without training.

The helpers at the top (``synthetic_runs`` and friends) are shared with test_claims.py.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Iterable, Optional

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from lorabench.report import analysis, figures, style
from lorabench.core import theory
from lorabench.core.protocols import protocol_of
from lorabench.core.config import RunConfig
from lorabench.core.protocols import generate_models
from lorabench.runs.results import RUNS_SCHEMA, SELECTED_SCHEMA, atomic_write_table, read_rows, write_rows
from lorabench.methods import method_of, validated
from lorabench.runs.runner import model_key, theory_columns, threshold_rank
from lorabench.runs.selection import select_by_validation

# Small models: the rows' theory columns are computed from them, as the runner does.
BASE = dict(width=4, n_test=64, batch_size=32, n_val=32, pretrained_epochs=5, n_epochs=10, seq_length=3, curve_every=5)
SEEDS = (0, 1, 2)
RANKS = (1, 2, 3, 4)
LRS = (1e-2, 1e-3)


def _construction_mse(cfg: RunConfig) -> float:
    thr = threshold_rank(cfg)
    return 0.2 * max(thr - cfg.rank, 0) / thr * (1 + 0.1 * cfg.seed) * (0.5 if cfg.pretrained else 1.0) + 1e-14


def default_metrics(experiment: str, cfg: RunConfig) -> dict:
    """Synthetic numbers shaped like the paper's: the construction exact from the threshold
    on, gradient update better below it and never exact, LoRA below FLT, and so on."""
    thr = threshold_rank(cfg)
    lr_penalty = 1.0 if cfg.lr == LRS[0] else 1.3
    if cfg.method == "ours":
        test = _construction_mse(cfg)
    elif cfg.method == "flt":
        test = (0.3 / cfg.last_layers + 0.05) * (1 + 0.1 * cfg.seed) * lr_penalty
    elif cfg.method == "full":
        test = 1e-4 * lr_penalty
    else:
        test = (0.15 * max(thr - cfg.rank, 0) / thr * (1 + 0.1 * cfg.seed) + 1e-3) * lr_penalty
        if cfg.tune_bias == 0:
            test *= 1.5
        if cfg.method in ("dora", "pissa"):
            test *= 0.9
    out = dict(test_loss=test, test_shift_loss=25 * test, val_loss=test * 1.01, train_loss=test * 0.99)
    if cfg.n_train is not None and cfg.method == "sgd":
        out["train_loss"] = test / (100 if cfg.target_depth == 1 else 1.2)
    if cfg.task != "regression":
        acc = 0.5 + 0.5 * min(cfg.rank / thr, 1.0) if cfg.method == "ours" else 0.85
        out.update(test_accuracy=acc, test_shift_accuracy=acc - 0.1, val_accuracy=acc)
    return out


@functools.lru_cache(maxsize=None)
def _models_and_scale(key: RunConfig):
    models = generate_models(key)
    return models, theory.mean_squared_output(models.target, protocol_of(key).eval_sets(key).test)


def stored_theory(cfg: RunConfig) -> dict:
    """The theory columns the runner stores for ``cfg``: from its own models."""
    models, scale = _models_and_scale(model_key(cfg.validated()))
    return theory_columns(cfg, models, scale)


def make_row(experiment: str, cfg: RunConfig, checkpoint: str, metrics: dict) -> dict:
    cfg = validated(cfg)
    row = cfg.to_dict()
    steps = list(range(0, cfg.n_epochs + 1, cfg.curve_every)) if cfg.method != "ours" else []
    final = metrics.get("train_loss") or 0.0
    row.update(
        experiment=experiment, config_hash=cfg.config_hash(), checkpoint=checkpoint,
        test_loss=None, test_shift_loss=None, val_loss=None, train_loss=None,
        test_accuracy=None, test_shift_accuracy=None, val_accuracy=None,
        best_step=cfg.n_epochs if cfg.method != "ours" else None, diverged=False, diverged_step=None,
        n_trainable_params=method_of(cfg).parameter_count(cfg), threshold_rank=threshold_rank(cfg),
        pretrain_steps=3 if cfg.pretrained else None, **stored_theory(cfg),
        curve_steps=steps, train_curve=[final * (10 ** (1 - i / max(len(steps) - 1, 1))) for i in range(len(steps))],
        val_curve=[final] * len(steps),
        lorabench_version="0.1.0", torch_version="test", device="cpu", device_name="cpu", torch_threads=1, engine="torch",
        wall_time_s=0.0, cell_size=1,
    )
    if cfg.method == "ours":
        metrics = {k: v for k, v in metrics.items() if k != "train_loss"}
    row.update(metrics)
    if metrics.get("diverged"):
        row.update({k: math.nan for k in ("test_loss", "test_shift_loss", "val_loss", "train_loss")}, diverged_step=1)
    return row


def experiment_configs(experiment: str, base: Optional[dict] = None) -> list[RunConfig]:
    """The contract's experiment grid, shrunk (D = 4, ranks 1..4, 3 seeds)."""
    b = RunConfig(**(base or BASE))
    out = []
    both = (0, 1)
    fnn_pairs = ((1, 2), (2, 4))
    for seed in SEEDS:
        s = b.replace(seed=seed)
        if experiment == "linear":
            for pre in both:
                for rank in RANKS:
                    out.append(s.replace(activation="linear", use_bias=0, pretrained=pre, rank=rank, method="ours"))
                    out.append(s.replace(activation="linear", use_bias=0, pretrained=pre, rank=rank, method="sgd"))
        elif experiment == "fnn":
            for (lbar, depth) in fnn_pairs:
                for pre in both:
                    for rank in RANKS:
                        c = s.replace(target_depth=lbar, frozen_depth=depth, pretrained=pre, rank=rank)
                        out += [c.replace(method="ours"), c.replace(method="sgd")]
        elif experiment == "tfn":
            for depth in (1, 2):
                for pre in both:
                    for rank in RANKS:
                        c = s.replace(exp="tfn", target_depth=depth, frozen_depth=depth, pretrained=pre, rank=rank)
                        out += [c.replace(method="ours"), c.replace(method="sgd")]
        elif experiment == "flt":
            for pre in both:
                c = s.replace(target_depth=1, frozen_depth=8, pretrained=pre)
                out += [c.replace(method="flt", last_layers=k, rank=1) for k in range(1, 8)]
                out += [c.replace(method="sgd", rank=r) for r in RANKS]
        elif experiment == "bias":
            for pre in both:
                for rank in RANKS:
                    out += [s.replace(method="sgd", pretrained=pre, rank=rank, tune_bias=t) for t in (0, 1)]
        elif experiment == "rank_step":
            for pre in both:
                out += [s.replace(method="sgd", target_depth=2, frozen_depth=4, pretrained=pre, rank=1, rank_step=k)
                        for k in (-1, 0, 1)]
        elif experiment == "classification":
            for task in ("classification", "binary_classification"):
                for (lbar, depth) in fnn_pairs:
                    c = s.replace(task=task, target_depth=lbar, frozen_depth=depth)
                    out += [c.replace(method="ours", rank=r) for r in (0,) + RANKS]
                    out += [c.replace(method="sgd", rank=r) for r in RANKS]
        elif experiment == "depth":
            for depth in (2, 4):
                out += [s.replace(method="sgd", frozen_depth=depth, rank=r) for r in RANKS]
        elif experiment == "generalization":
            for (lbar, depth) in fnn_pairs:
                c = s.replace(target_depth=lbar, frozen_depth=depth, n_train=40 * lbar)
                out += [c.replace(method=m, rank=r) for r in RANKS for m in ("ours", "sgd")]
        elif experiment == "training_curves":
            for (lbar, depth) in fnn_pairs:
                out += [s.replace(method="sgd", target_depth=lbar, frozen_depth=depth, rank=r) for r in (1, 2, 4)]
        elif experiment == "uniform_sv":
            out += [s.replace(init_mode="uniform_singular_values", method=m, rank=r) for r in RANKS for m in ("ours", "sgd")]
        elif experiment == "methods":  # every built-in method on the methods experiment's three settings
            for variant in (dict(target_depth=1, frozen_depth=2), dict(target_depth=2, frozen_depth=4),
                            dict(exp="tfn", target_depth=1, frozen_depth=1)):
                for pre in both:
                    c = s.replace(pretrained=pre, **variant)
                    out += [c.replace(method=m, rank=r) for r in RANKS for m in ("ours", "sgd", "dora", "vera", "pissa")]
                    out.append(c.replace(method="full"))
                    if c.exp == "fnn":
                        out += [c.replace(method="flt", last_layers=k) for k in range(1, c.frozen_depth + 1)]
        elif experiment == "tfn_low_rank":  # D = 8: R* = 4, so ranks 1-3 lie below it
            for depth in (1, 2):
                c = s.replace(exp="tfn", width=8, target_depth=depth, frozen_depth=depth)
                out += [c.replace(method=m, rank=r) for r in RANKS for m in ("ours", "sgd", "lora_from_construction")]
        elif experiment == "tfn_prenorm":
            for depth in (1, 2):
                c = s.replace(exp="tfn", target_depth=depth, frozen_depth=depth)
                out += [c.replace(method="ours", rank=r) for r in RANKS]
                out += [c.replace(method="sgd", rank=r, prenorm=p) for r in RANKS for p in (0, 1)]
        elif experiment == "threshold_law":  # a pair Lbar divides, one it does not, and a TFN
            for lbar, depth, exp in ((1, 2, "fnn"), (2, 5, "fnn"), (1, 1, "tfn")):
                out += [s.replace(exp=exp, target_depth=lbar, frozen_depth=depth, rank=r, method="ours") for r in RANKS]
        else:
            raise ValueError(experiment)
    return out


EXPERIMENTS = ("linear", "fnn", "tfn", "flt", "bias", "rank_step", "classification", "depth", "generalization",
               "training_curves", "uniform_sv", "threshold_law", "methods", "tfn_low_rank", "tfn_prenorm")


def synthetic_runs(
    experiments: Iterable[str] = EXPERIMENTS,
    protocols: Iterable[str] = ("paper", "reference"),
    metrics: Callable[[str, RunConfig], dict] = default_metrics,
    lrs: Iterable[float] = LRS,
    base: Optional[dict] = None,
) -> list[dict]:
    """Result rows for the experiments: one 'construction' row per construction, 'last'
    and 'best' rows for each learning rate of every gradient run."""
    rows = []
    for experiment in experiments:
        for protocol in protocols:
            for cfg in experiment_configs(experiment, base):
                cfg = cfg.replace(protocol=protocol)
                if cfg.method == "ours":
                    rows.append(make_row(experiment, cfg, "construction", metrics(experiment, cfg)))
                    continue
                for lr in lrs:
                    c = cfg.replace(lr=lr)
                    m = metrics(experiment, c)
                    rows += [make_row(experiment, c, "last", m), make_row(experiment, c, "best", m)]
    return rows


def to_frames(rows: list[dict], tmp_path: Path, select: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Through Parquet, as the workflow does: runs.parquet, then selected.parquet. With
    ``select=False`` every row is its own selection group (fast; one grid point per run)."""
    write_rows(rows, tmp_path / "runs.parquet")
    runs = read_rows(tmp_path / "runs.parquet")
    if select:
        selected = select_by_validation(runs)
    else:
        selected = runs.assign(n_candidates=1, n_excluded=0)
    atomic_write_table(pa.Table.from_pandas(selected, schema=SELECTED_SCHEMA, preserve_index=False), tmp_path / "selected.parquet")
    return runs, read_rows(tmp_path / "selected.parquet", SELECTED_SCHEMA)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return to_frames(synthetic_runs(lrs=LRS[:1]), tmp_path_factory.mktemp("synthetic"), select=False)


@pytest.fixture(scope="module")
def written(frames, tmp_path_factory):
    runs, selected = frames
    out = tmp_path_factory.mktemp("figures")
    return out, figures.write_all_figures(runs, selected, out, protocols=["paper"])


@pytest.fixture
def png_only(monkeypatch):
    """Only PNG files: halves the drawing time of tests that check robustness, not format."""
    monkeypatch.setattr(style, "FORMATS", ("png",))


def _check_outputs(paths: list[Path], name: str) -> None:
    assert sorted(p.name for p in paths) == sorted(f"{name}.{fmt}" for fmt in style.FORMATS)
    for path in paths:
        assert path.stat().st_size > 1000
        if path.suffix == ".pdf":
            assert path.read_bytes()[:5] == b"%PDF-"
        else:
            image = mpimg.imread(path)
            assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# ------------------------------------------------------------------ tests
def test_synthetic_rows_follow_the_schema(frames):
    runs, selected = frames
    assert set(RUNS_SCHEMA.names) <= set(runs.columns)
    assert set(SELECTED_SCHEMA.names) <= set(selected.columns)
    assert set(selected["experiment"]) == set(EXPERIMENTS)


@pytest.mark.parametrize("name", figures.FIGURE_NAMES)
def test_each_figure_writes_png_and_pdf(written, name):
    out, paths = written
    _check_outputs([p for p in paths if p.stem == name], name)
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporaries


def test_write_all_figures_writes_every_name(written):
    out, paths = written
    assert sorted(paths) == sorted(out / "paper" / f"{n}.{e}" for n in figures.FIGURE_NAMES for e in ("png", "pdf"))


def test_each_figure_is_drawn_under_each_protocol_with_rows(tmp_path, png_only):
    """By default a figure is drawn under every protocol its experiment has rows for, one
    folder per protocol; a figure without rows under either, under the paper protocol."""
    rows = synthetic_runs(["bias"], lrs=LRS[:1]) + synthetic_runs(["flt"], protocols=("paper",), lrs=LRS[:1])
    _, selected = to_frames(rows, tmp_path)
    out = tmp_path / "figures"
    paths = figures.write_all_figures(None, selected, out, names=["bias", "flt", "linear"])
    assert sorted(p.relative_to(out).as_posix() for p in paths) == [
        "paper/bias.png", "paper/flt.png", "paper/linear.png", "reference/bias.png"]
    assert figures.write_all_figures(None, selected, out, protocols=["reference"], names=["flt"]) == [
        out / "reference" / "flt.png"]  # asked for: drawn, its panels saying "no data"


@pytest.mark.parametrize("name", figures.FIGURE_NAMES)
def test_each_figure_survives_missing_experiment(tmp_path, png_only, name):
    """No rows at all (an empty selection with the schema's columns): every panel says 'no data'."""
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in SELECTED_SCHEMA.names})
    _check_outputs(figures.FIGURES[name](empty, tmp_path), name)


def test_reference_only_results_fall_back_to_reference(tmp_path, png_only):
    """Only the reference protocol present: figures draw it; runs alone suffice."""
    runs, _ = to_frames(synthetic_runs(["fnn"], protocols=("reference",), lrs=LRS[:1]), tmp_path, select=False)
    paths = figures.write_all_figures(runs, None, tmp_path / "figures", names=["fnn"])
    _check_outputs(paths, "fnn")
    assert {p.parent.name for p in paths} == {"reference"}
    assert analysis.choose_protocol(select_by_validation(runs), "fnn") == "reference"
    assert analysis.choose_protocol(select_by_validation(runs), "fnn", "paper") == "paper"


def test_all_diverged_groups_are_excluded_and_counted(tmp_path, png_only):
    """Every gradient run of seed 0 diverged: its selected rows are NaN, the curves use the
    remaining seeds and say how many were left out."""

    def metrics(experiment, cfg):
        out = default_metrics(experiment, cfg)
        if cfg.method != "ours" and cfg.seed == 0:
            out["diverged"] = True
        return out

    _, selected = to_frames(synthetic_runs(["fnn", "training_curves"], protocols=("paper",), metrics=metrics), tmp_path)
    gd = analysis.rows(selected, "fnn", "paper", "sgd", target_depth=1, frozen_depth=2, pretrained=0)
    assert gd.loc[gd["seed"] == 0, "diverged"].all() and gd.loc[gd["seed"] == 0, "test_loss"].isna().all()
    c = analysis.curve(gd, "rank", "test_loss")
    assert c.n_dropped == len(RANKS) and c.n_grid_excluded == len(RANKS) * len(LRS)
    assert np.all(np.isfinite(c.median)) and set(c.n) == {len(SEEDS) - 1}
    for name in ("fnn_log", "training_curves"):
        _check_outputs(figures.FIGURES[name](selected, tmp_path / "out"), name)


def test_every_run_diverged_still_draws(tmp_path, png_only):
    def metrics(experiment, cfg):
        return {**default_metrics(experiment, cfg), "diverged": cfg.method != "ours"}

    _, selected = to_frames(synthetic_runs(["bias", "flt"], protocols=("paper",), metrics=metrics), tmp_path)
    for name in ("bias", "flt"):
        _check_outputs(figures.FIGURES[name](selected, tmp_path), name)


def test_curve_median_and_band():
    df = pd.DataFrame({"rank": [1, 1, 1, 2, 2, 2], "seed": [0, 1, 2] * 2, "test_loss": [1.0, 3.0, 2.0, 5.0, np.nan, 4.0],
                       "diverged": [False] * 6, "val_loss": [0.0] * 6})
    c = analysis.curve(df, "rank", "test_loss")
    assert c.x.tolist() == [1, 2] and c.median.tolist() == [2.0, 4.5]
    assert c.low.tolist() == [1.0, 4.0] and c.high.tolist() == [3.0, 5.0] and c.n_dropped == 1


def config_of(row) -> RunConfig:
    """The RunConfig of a result row (every config column), to regenerate its models."""
    values = {}
    for name, spec in RunConfig.__dataclass_fields__.items():
        value = row[name]
        if name == "n_train":
            values[name] = None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
        else:
            values[name] = type(spec.default)(value)
    return RunConfig(**values)


def test_linear_theory_overlay_is_the_median_svd_tail(frames):
    _, selected = frames
    ours = analysis.rows(selected, "linear", "paper", "ours", pretrained=0)
    c = analysis.curve(analysis.theory_rows(ours), "rank", "value")
    expected = []
    for seed in SEEDS:
        cfg = config_of(ours[ours["seed"] == seed].iloc[0])
        models = generate_models(cfg)
        expected.append(theory.linear_optimal_mse(models.frozen.weights.double(), models.target.weights[0].double(), 1))
    assert c.at(1) == pytest.approx(float(np.median(expected)), rel=1e-9)
    assert c.at(2) == pytest.approx(0.0, abs=1e-12)  # R L = 4 = D: exact


def test_only_one_layer_fnn_targets_carry_the_svd_optimum(frames):
    _, selected = frames
    one_layer = (selected["exp"] == "fnn") & (selected["target_depth"] == 1)
    assert selected.loc[one_layer, "svd_optimum_mse"].notna().all()
    assert selected.loc[~one_layer, "svd_optimum_mse"].isna().all()
    assert (selected["target_mse_scale"] > 0).all()


def test_relative_mse_uses_the_target_scale(frames):
    _, selected = frames
    ours = analysis.rows(selected, "tfn", "paper", "ours", target_depth=2, pretrained=1)
    rel = analysis.relative_mse(ours)
    assert np.all(rel[ours["rank"] >= 2] < 1e-12)
    assert np.all(rel[ours["rank"] == 1] > 0)


def _law_rows(exact_from: dict[int, int], ranks=(1, 2, 3, 4), threshold=3) -> pd.DataFrame:
    """One setting's construction rows: seed -> first exact rank (0: exact nowhere)."""
    out = []
    for seed, first in exact_from.items():
        for rank in ranks:
            exact = bool(first) and rank >= first
            out.append(dict(exp="fnn", width=4, target_depth=1, frozen_depth=2, seed=seed, rank=rank, threshold_rank=threshold,
                            test_loss=1e-9 if exact else 1e-2, target_mse_scale=0.5, diverged=False))
    return pd.DataFrame(out)


def test_smallest_exact_rank_is_where_every_larger_rank_is_exact():
    rows = _law_rows({0: 3})
    assert analysis.smallest_exact_rank(rows) == 3
    # an exact rank followed by an inexact one does not count: exactness must hold from there on
    flaky = rows.assign(test_loss=[1e-9, 1e-2, 1e-9, 1e-9])
    assert analysis.smallest_exact_rank(flaky) == 3
    assert analysis.smallest_exact_rank(_law_rows({0: 0})) == math.inf
    # the relative MSE decides: 1e-9 / 1e-4 = 1e-5 is above the 1e-6 tolerance
    assert analysis.smallest_exact_rank(rows.assign(target_mse_scale=1e-4)) == math.inf
    diverged = rows.assign(diverged=[False, False, False, True])
    assert analysis.smallest_exact_rank(diverged) == math.inf


def test_measured_threshold_is_the_median_over_seeds():
    table = analysis.measured_thresholds(_law_rows({0: 2, 1: 3, 2: 0}))
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["predicted"], row["measured"], row["low"], row["high"]) == (3, 3.0, 2.0, math.inf)
    assert (row["n_seeds"], row["n_never"], row["budget"]) == (3, 1, 2)
    assert analysis.measured_thresholds(_law_rows({0: 0, 1: 0, 2: 4})).iloc[0]["measured"] == math.inf


def test_threshold_law_figure_reads_the_measured_thresholds(frames):
    _, selected = frames
    table = analysis.measured_thresholds(analysis.rows(selected, "threshold_law", "paper", "ours"))
    # the synthetic constructions are exact from the threshold on: every point on the diagonal
    assert len(table) == 3 and (table["measured"] == table["predicted"]).all()
    assert set(table["predicted"]) == {2}  # D = 4: (1,2) and (2,5) floor(5/2) = 2, TFN 4/2
    assert table.loc[table["frozen_depth"] == 5, "budget"].item() == 2  # ceil(4 * 2 / 5)
