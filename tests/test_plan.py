import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lorabench.cli import main
from lorabench.core.config import ConfigError, RunConfig
from lorabench.training import native
from lorabench.runs import experiments as lbx, plan
from lorabench.runs.experiments import BEYOND_THE_PAPER

CONFIG = str(Path(__file__).resolve().parents[1] / "config.yaml")
RATE = {"depths": [1, 2], "step_s": [1e-4, 2e-4], "config_s": [0.01, 0.02]}


def fake_calibrate(unit, example=None):
    return {"seconds": 1.0} if unit == plan.STARTUP else dict(RATE)


class EveryUnit(dict):
    """Rates for every calibration unit: ``rate`` unless set."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def __missing__(self, unit):
        return self.rate


def default_native(cfg):
    """The default engine decision: native wherever the native step applies."""
    return native.applies(cfg, torch.device("cpu"))


# The smoke preset by hand, per protocol: seeds 2, one lr and weight decay, 30 steps (TFN
# 10); ranks 1-16 become {1, 2, 8, 16} (4), classification's 0-16 {0, 1, 2, 8, 16} (5).
# experiment: (trained configs, config-steps, constructions)
SMOKE = {
    "linear": (2 * 4 * 2, 2 * 4 * 2 * 30, 2 * 4 * 2),  # pretrained x ranks x seeds
    "fnn": (2 * 2 * 4 * 2, 2 * 2 * 4 * 2 * 30, 2 * 2 * 4 * 2),  # variants x pretrained x ranks x seeds
    "tfn": (2 * 2 * 4 * 2, 2 * 2 * 4 * 2 * 10, 2 * 2 * 4 * 2),
    "flt": (2 * (3 + 4) * 2, 2 * (3 + 4) * 2 * 30, 0),  # pretrained x (last_layers + ranks) x seeds
    "bias": (2 * 4 * 2 * 2, 2 * 4 * 2 * 2 * 30, 0),  # pretrained x ranks x tune_bias x seeds
    "rank_step": (2 * 3 * 2, 2 * 3 * 2 * 30, 0),  # pretrained x rank steps x seeds
    "classification": (2 * 2 * 4 * 2, 2 * 2 * 4 * 2 * 30, 2 * 2 * 5 * 2),  # tasks x variants x ranks x seeds
    "depth": (3 * 4 * 2, 3 * 4 * 2 * 30, 0),  # frozen depths x ranks x seeds
    "generalization": (2 * 4 * 2, 2 * 4 * 2 * 30, 2 * 4 * 2),
    "training_curves": (2 * 3 * 2, 2 * 3 * 2 * 30, 0),  # variants x {1, 8, 16} x seeds
    "uniform_sv": (4 * 2, 4 * 2 * 30, 4 * 2),
    "threshold_law": (0, 0, (4 + 5) * 2 * 2),  # constructions only: ranks {3, 4, 7, 8} at D=8, and 16 at D=16; FNN + TFN; seeds
    # (1, 2), (2, 4), TFN: LoRA, DoRA, VeRA, PiSSA at 4 ranks, full fine-tuning, final layers {1} and {1, 4}; 10 steps
    "methods": (2 * 2 * (3 * (4 * 4 + 1) + 1 + 2), 2 * 2 * (3 * (4 * 4 + 1) + 1 + 2) * 10, 3 * 4 * 2 * 2),
    # D = 8, depths 1 and 2, ranks 1-4: LoRA and LoRA from the construction; 10 steps
    "tfn_low_rank": (2 * 4 * 2 * 2, 2 * 4 * 2 * 2 * 10, 2 * 4 * 2),
    # depth 1, ranks {1, 2, 8, 16}: LoRA on the plain and the pre-norm transformer; the plain one's construction
    "tfn_prenorm": (2 * 4 * 2, 2 * 4 * 2 * 10, 4 * 2),
}
PAPER_ONLY = {"methods", "tfn_low_rank", "tfn_prenorm"}  # beyond the paper: `protocols: [paper]`


# Configs an experiment copies from fnn's (methods: tfn's) train jobs (shared configs train once)
REUSED = {
    "bias": 2 * 4 * 2,  # its tuned-bias runs are fnn's (1, 2) runs: pretrained x ranks x seeds
    "rank_step": 2 * 2,  # rank 8 with step 0 is fnn's (2, 4) run: pretrained x seeds
    "depth": 4 * 2,  # frozen depth 2 is fnn's unpretrained (1, 2): ranks x seeds
    "training_curves": 2 * 3 * 2,  # all of them: fnn's unpretrained runs at ranks 1, 8, 16
    "methods": 4 * 2 * 2,  # its transformer LoRA runs are tfn's depth-1 ones: ranks x pretrained x seeds (10 steps)
    "tfn_prenorm": 4 * 2,  # its plain LoRA runs are tfn's depth-1 random ones: ranks x seeds (10 steps)
}


@pytest.fixture
def smoke():
    return plan.load_workflow(CONFIG, "smoke")


def test_smoke_counts_match_a_count_by_hand(smoke, tmp_path):
    wf, jobs = smoke
    result = plan.make_plan(wf, jobs, [2], calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json")
    got = {(r["experiment"], r["protocol"]): (r["configs"], r["reused"], r["config_steps"], r["constructions"])
           for r in result["rows"]}
    steps_of = {"methods": 10, "tfn_prenorm": 10}  # the reused configs' steps
    own = {name: (configs - REUSED.get(name, 0), REUSED.get(name, 0),
                  steps - steps_of.get(name, 30) * REUSED.get(name, 0), built)
           for name, (configs, steps, built) in SMOKE.items()}
    protocols = lambda name: ("paper",) if name in PAPER_ONLY else ("paper", "reference")  # noqa: E731
    assert got == {(name, protocol): counts for name, counts in own.items() for protocol in protocols(name)}
    assert result["total"]["config_steps"] == sum(len(protocols(n)) * c[2] for n, c in own.items())
    assert result["total"]["reused"] == sum(len(protocols(n)) * r for n, r in REUSED.items())


def test_experiments_filter_and_unknown_experiment(tmp_path):
    wf, jobs = plan.load_workflow(CONFIG, "smoke", ["tfn"])
    assert {j.experiment for j in jobs} == {"tfn"}
    with pytest.raises(ConfigError, match="unknown experiment.*nope"):
        plan.load_workflow(CONFIG, "smoke", ["tfn", "nope"])


def test_a_selection_counts_the_train_jobs_it_reuses(tmp_path):
    """--experiments bias: fnn's train and models jobs that bias copies from run too (and
    are counted, as fnn's), fnn's constructions do not; bias itself trains only its own."""
    wf, jobs = plan.load_workflow(CONFIG, "smoke", ["bias"])
    assert {(j.experiment, j.kind) for j in jobs} == {("bias", "models"), ("bias", "train"), ("fnn", "models"),
                                                      ("fnn", "train")}
    result = plan.make_plan(wf, jobs, [2], calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json")
    rows = {(r["experiment"], r["protocol"]): r for r in result["rows"]}
    assert rows[("bias", "paper")]["configs"] == SMOKE["bias"][0] - REUSED["bias"]
    assert rows[("bias", "paper")]["reused"] == REUSED["bias"]
    assert rows[("fnn", "paper")]["configs"] == SMOKE["fnn"][0] and rows[("fnn", "paper")]["constructions"] == 0


def test_pieces_keep_experiments_that_share_configs_together():
    jobs, costs = [], []
    for name, seconds in (("a", 50), ("b", 50), ("c", 50)):
        jobs += [FakeJob(name, "paper", "models"), FakeJob(name, "paper", "train")]
        costs += [1.0, float(seconds)]
    apart = plan.make_pieces(jobs, costs, 1, 110.0, ["paper"])
    assert [p.experiments for p in apart] == [["a", "b"], ["c"]]
    linked = plan.make_pieces(jobs, costs, 1, 110.0, ["paper"], linked=[("c", "a")])
    assert [p.experiments for p in linked] == [["a", "c"], ["b"]]
    assert [p.over_budget for p in plan.make_pieces(jobs, costs, 1, 60.0, ["paper"], linked=[("c", "a")])] == [True, False]


def test_bad_preset_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["plan", "--configfile", CONFIG, "--preset", "huge"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "preset must be one of" in err and "huge" in err and len(err.strip().splitlines()) == 1


def _timings(config, cell, depths=(2, 4), sizes=(8, 32), steps=(10, 30), noise=None):
    """Calibration runs of a cell whose configs cost config[d] = (once, per step) and whose
    cell costs cell[d] likewise, each run's steps after its first timed alone; ``noise``
    (steps: seconds) adds to a run's total only, as its set-up and evaluations would."""
    out = {}
    for d in depths:
        for n in sizes:
            for s in steps:
                step = n * config[d][1] + cell[d][1]
                total = n * config[d][0] + cell[d][0] + s * step + (noise or {}).get(s, 0.0)
                out[(d, n, s)] = plan.Timing(total, (s - 1) * step, s - 1)
    return out


def test_rate_is_linear_in_depth_and_separates_configs_from_cells():
    # per config 0.5 s + 0.01 s per step at depth 2, 1.5 s + 0.03 s at depth 4; per cell
    # 2 s + 0.1 s per step at depth 2, 4 s + 0.3 s at depth 4
    config = {2: (0.5, 0.01), 4: (1.5, 0.03)}
    cell = {2: (2.0, 0.1), 4: (4.0, 0.3)}
    timings = _timings(config, cell)
    rate = plan.rate_from_timings((2, 4), (10, 30), (8, 32), timings)
    assert rate.step(2) == pytest.approx(0.01) and rate.step(4) == pytest.approx(0.03)
    assert rate.config(2) == pytest.approx(0.5) and rate.config(4) == pytest.approx(1.5)
    assert rate.cell_step(2) == pytest.approx(0.1) and rate.cell_step(4) == pytest.approx(0.3)
    assert rate.cell(2) == pytest.approx(2.0) and rate.cell(4) == pytest.approx(4.0)
    assert rate.step(3) == pytest.approx(0.02) and rate.config(6) == pytest.approx(2.5)
    assert plan.Rate((1, 2), (1.0, 0.0), (0.0, 0.0)).step(5) == 0.0  # never negative
    assert plan.Rate.from_dict(dataclasses.asdict(rate)) == rate
    one_size = plan.rate_from_timings((2, 4), (10, 30), (8, 8), {k: v for k, v in timings.items() if k[1] == 8})
    assert one_size.cell_step(2) == 0 and one_size.step(2) == pytest.approx(0.01 + 0.1 / 8)
    # noise that makes a part negative: the larger cell is still priced at what it cost
    slow = timings[(2, 8, 30)]
    noisy = {**timings, (2, 8, 30): plan.Timing(slow.total + 10.0, slow.steps + 10.0, slow.step_count)}
    rate = plan.rate_from_timings((2, 4), (10, 30), (8, 32), noisy)  # the small cell looks slow per step
    big_step = 32 * config[2][1] + cell[2][1]
    assert 32 * rate.step(2) + rate.cell_step(2) == pytest.approx(big_step) and rate.cell_step(2) >= 0


def test_rate_takes_its_steps_from_the_steps_timed_alone():
    """A run's set-up and evaluation noise (in its total) does not reach the per-step
    parts, which are the steps' own times; the once parts are what the runs cost beyond
    their steps, on average."""
    config = {2: (0.5, 0.01), 4: (1.5, 0.03)}
    cell = {2: (2.0, 0.1), 4: (4.0, 0.3)}
    noise = {10: 0.8, 30: -0.8}  # the longer run's evaluation happened to be faster
    rate = plan.rate_from_timings((2, 4), (10, 30), (8, 32), _timings(config, cell, noise=noise))
    for d in (2, 4):
        assert rate.step(d) == pytest.approx(config[d][1]) and rate.cell_step(d) == pytest.approx(cell[d][1])
        assert rate.config(d) == pytest.approx(config[d][0]) and rate.cell(d) == pytest.approx(cell[d][0])


def test_a_calibration_run_times_its_steps_alone():
    cfgs = [RunConfig(method="sgd", width=16, batch_size=32, n_test=64, n_epochs=6, rank=r) for r in (1, 4, 8)]
    timing = plan._timed_run(cfgs, "cpu")
    assert timing.step_count == 5  # one cell: its steps after the first
    assert 0 < timing.steps < timing.total


def test_a_unit_is_the_engine_at_the_settings_that_change_its_cost():
    cfg = RunConfig(width=16, frozen_depth=2, batch_size=256, method="sgd")
    unit_of = lambda c, kind="train": plan.unit_of([c], kind, lambda c: True)  # noqa: E731
    unit = unit_of(cfg)
    assert plan.engine_name(unit) == "native-fnn" and "batch 256" in unit
    same = [cfg.replace(rank=5, lr=0.1, weight_decay=1e-3, seed=4, frozen_depth=6, n_epochs=10, pretrained=1)]
    differ = [cfg.replace(task="classification"), cfg.replace(activation="linear"), cfg.replace(n_train=400),
              cfg.replace(batch_size=64), cfg.replace(protocol="reference"), cfg.replace(method="flt"),
              cfg.replace(width=32)]
    assert all(unit_of(c) == unit for c in same)
    assert len({unit_of(c) for c in differ} | {unit}) == len(differ) + 1
    ours = cfg.replace(method="ours")
    assert unit_of(ours, "construct") != unit_of(ours.replace(frozen_depth=8), "construct")
    # model generation: priced per protocol and shape, pretrained keys by their pretraining
    models = unit_of(cfg, "models")
    assert plan.engine_name(models) == "models-fnn" and "pretrained" not in models
    pretrained = unit_of(cfg.replace(pretrained=1), "models")
    assert "pretrained up to 1000 steps" in pretrained and pretrained != models
    assert unit_of(cfg.replace(pretrained=1, pretrained_level=10.0), "models") != pretrained
    assert unit_of(cfg.replace(protocol="reference"), "models") != models
    assert unit_of(cfg.replace(rank=3, seed=2, frozen_depth=8), "models") == models
    # final-layer tuning costs what its cell's deepest tuned layer costs, at its own depth
    flt = cfg.replace(method="flt", frozen_depth=8)
    shallow = plan.unit_of([flt.replace(last_layers=k) for k in (1, 2)], "train", lambda c: True)
    deep = plan.unit_of([flt.replace(last_layers=k) for k in (1, 7)], "train", lambda c: True)
    assert shallow != deep and "last layers up to 7" in deep and "depths 1/8" in deep
    assert unit_of(flt.replace(frozen_depth=4)) != unit_of(flt.replace(frozen_depth=8))


def test_config_cost_arithmetic():
    rate = plan.Rate.from_dict(RATE)
    cal_eval = 2 * plan.CAL_N_TEST + plan.CAL_N_VAL
    cfg = RunConfig(frozen_depth=2, n_epochs=100, n_test=plan.CAL_N_TEST, n_val=plan.CAL_N_VAL, method="sgd")
    assert plan.config_cost(cfg, "train", rate) == pytest.approx(100 * 2e-4 + 0.02)
    big = cfg.replace(n_test=5 * plan.CAL_N_TEST)
    assert plan.config_cost(big, "train", rate) == pytest.approx(100 * 2e-4 + 0.02 * (eval_of(big) / cal_eval))
    assert plan.config_cost(cfg.replace(method="ours"), "construct", rate) == pytest.approx(0.02)
    # a pretraining is counted at its measured mean length, never beyond its budget
    models = dataclasses.replace(rate, pretrain_steps=(300.0, 500.0))
    pre = cfg.replace(pretrained=1, pretrained_epochs=1000)
    assert plan.config_cost(pre, "models", models) == pytest.approx(0.02 + 500 * 2e-4)
    assert plan.config_cost(pre.replace(pretrained_epochs=200), "models", models) == pytest.approx(0.02 + 200 * 2e-4)
    assert plan.config_cost(cfg, "models", models) == pytest.approx(0.02)
    assert plan.Rate.from_dict(dataclasses.asdict(models)) == models


def test_skipped_validations_come_off_the_native_step_only():
    rates = EveryUnit(plan.Rate.from_dict(RATE))
    rates["validation-fnn"] = plan.Rate((1, 2), (1e-5, 5e-5), (0.0, 0.0))
    cfg = RunConfig(frozen_depth=2, n_epochs=103, n_test=plan.CAL_N_TEST, n_val=plan.CAL_N_VAL, method="sgd",
                    val_every=10)
    assert plan.validations(cfg) == 11  # steps 10, ..., 100 and 103
    full = plan.config_cost(cfg, "train", rates["native-fnn"])
    rate = rates["native-fnn"]
    assert plan.engine_cost(cfg, "train", rate, rates, lambda c: True) == pytest.approx(full - (103 - 11) * 5e-5)
    assert plan.engine_cost(cfg, "train", rate, rates, lambda c: False) == pytest.approx(full)  # torch: the full step
    assert plan.engine_cost(cfg.replace(val_every=1), "train", rate, rates, lambda c: True) == pytest.approx(full)


def test_a_plan_with_val_every_calibrates_the_validation(tmp_path):
    wf, jobs = plan.load_workflow(CONFIG, "smoke", ["linear"])
    asked = []
    calibrate = lambda unit, example: asked.append(unit) or fake_calibrate(unit)  # noqa: E731
    dense = plan.make_plan(wf, jobs, [2], calibrate=calibrate, native=default_native, path=tmp_path / "a.json")
    assert "validation-fnn" not in asked
    sparse_jobs = [dataclasses.replace(j, configs=tuple(
        c.replace(val_every=5) if j.kind == "train" and j.protocol == "paper" else c for c in j.configs)) for j in jobs]
    sparse = plan.make_plan(wf, sparse_jobs, [2], calibrate=calibrate, native=default_native, path=tmp_path / "b.json")
    assert "validation-fnn" in asked and sparse["total"]["core_s"] < dense["total"]["core_s"]
    assert sparse["total"]["config_steps"] == dense["total"]["config_steps"]


def test_a_real_calibration_of_the_fnn_validation():
    measured = plan.calibrate_unit("validation-fnn")
    rate = plan.Rate.from_dict(measured)
    assert rate.depths == plan.CAL_DEPTHS["fnn"] and all(s > 0 for s in rate.step_s)
    assert rate.step(8) < 1e-3  # one validation of 256 samples: microseconds, not milliseconds


def eval_of(cfg):
    return 2 * cfg.n_test + cfg.n_val


def test_job_costs_add_startup_configs_and_cells(smoke):
    wf, jobs = smoke
    rate = plan.Rate((1, 2), (1e-4, 2e-4), (0.01, 0.02), cell_step_s=(1e-3, 3e-3), cell_s=(0.5, 0.7))
    rates = EveryUnit(rate)
    costs = plan.job_costs(jobs, rates, 1.5, default_native)
    shared = 0  # train jobs whose configs share cells
    for job, cost in zip(jobs, costs):
        cells = plan.job_cells(job, default_native)
        assert sorted(c.config_hash() for cell in cells for c in cell) == sorted(c.config_hash() for c in job.configs)
        expected = 1.5 + sum(plan.config_cost(c, job.kind, rate) + plan.stream_cost(c, job.kind, rates)
                             for c in job.configs)
        if job.kind == "train":
            shared += len(cells) < len(job.configs)
            expected += sum(c[0].n_epochs * rate.cell_step(c[0].frozen_depth) + rate.cell(c[0].frozen_depth)
                            for c in cells)
        assert cost == pytest.approx(expected)
    assert shared > 10
    rows = plan.count(jobs, costs, 1.5, [plan.cell_costs(j, rates, default_native) for j in jobs])
    assert sum(r.core_s for r in rows) == pytest.approx(sum(costs))
    assert sum(sum(r.engines.values()) for r in rows) == pytest.approx(sum(costs))


def test_the_reference_transformer_pays_for_its_own_batches(smoke, tmp_path):
    """Reference TFN training: per config and step, the distinct share of positions times
    the stream's per-evaluation rate (two evaluations; one with a fixed training set);
    nothing for the paper protocol, the FNN or constructions."""
    rates = EveryUnit(plan.Rate.from_dict(RATE))
    tfn = RunConfig(exp="tfn", method="sgd", width=16, n_epochs=100, frozen_depth=2, target_depth=2, protocol="reference")
    share = plan.distinct_share(2)
    assert 0 < plan.distinct_share(1) < share <= 1 and plan.distinct_share(6) == share  # deeper: depth 2's
    assert plan.stream_cost(tfn, "train", rates) == pytest.approx(100 * share * 2 * 2e-4)
    shallow = tfn.replace(frozen_depth=1, target_depth=1)
    assert plan.stream_cost(shallow, "train", rates) == pytest.approx(
        100 * plan.distinct_share(1) * 2 * rates[plan.STREAM].step(1))
    assert plan.stream_cost(tfn.replace(n_train=64), "train", rates) == pytest.approx(100 * share * 2e-4)
    for cfg, kind in ((tfn.replace(protocol="paper"), "train"), (tfn, "construct"), (tfn.replace(exp="fnn"), "train")):
        assert plan.stream_cost(cfg, kind, rates) == 0.0
    wf, jobs = smoke
    costs = plan.job_costs(jobs, rates, 1.5, default_native)
    by_engine = [plan.cell_costs(j, rates, default_native) for j in jobs]
    rows = {(r.experiment, r.protocol): r for r in plan.count(jobs, costs, 1.5, by_engine)}
    assert rows[("tfn", "reference")].engines[plan.STREAM] > 0
    assert plan.STREAM not in rows[("tfn", "paper")].engines and plan.STREAM not in rows[("fnn", "reference")].engines
    result = plan.make_plan(wf, jobs, [2], calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json")
    assert plan.STREAM in result["calibration"]


def test_engine_of():
    fnn, tfn = RunConfig(method="sgd", width=16), RunConfig(exp="tfn", method="sgd", width=16, protocol="reference")
    for protocol in ("paper", "reference"):
        assert plan.engine_of(fnn.replace(protocol=protocol), "train", default_native) == "native-fnn"
        assert plan.engine_of(tfn.replace(protocol=protocol), "train", default_native) == "native-tfn"
    assert plan.engine_of(tfn.replace(better_optim=1), "train", default_native) == "torch-tfn"
    assert plan.engine_of(fnn.replace(width=4), "train", default_native) == "torch-fnn"
    assert plan.engine_of(tfn, "construct", default_native) == "construct-tfn"
    assert plan.engine_of(fnn, "models", default_native) == "models-fnn"
    # a plug-in method: autograd, but on the transformer through the native pass's gradients
    assert plan.engine_of(tfn.replace(method="dora"), "train", default_native) == "gradients-tfn"
    assert plan.engine_of(tfn.replace(method="dora", width=8), "train", default_native) == "autograd-tfn"
    assert plan.engine_of(fnn.replace(method="dora"), "train", default_native) == "autograd-fnn"


def test_makespan_and_wall_time():
    assert plan.makespan([3, 2, 4, 3], 2) == 6  # longest first: {4, 2}, {3, 3}
    assert plan.makespan([5, 1, 1], 8) == 5
    assert plan.makespan([1] * 8, 2) == 4
    with pytest.raises(ConfigError):
        plan.makespan([1], 0)

    class J:
        def __init__(self, kind, seed):
            self.experiment, self.protocol, self.kind, self.seed = "e", "paper", kind, seed

    jobs = [J("models", 0), J("train", 0), J("construct", 0), J("models", 1), J("train", 1)]
    costs = [2.0, 10.0, 1.0, 2.0, 3.0]
    assert plan.wall_time(jobs, costs, 1) == pytest.approx(18.0)  # every job in turn
    assert plan.wall_time(jobs, costs, 8) == pytest.approx(12.0)  # seed 0's models, then its training


def test_parse_cores():
    assert plan.parse_cores("2,8") == [2, 8]
    for bad in ("", "0", "two"):
        with pytest.raises(ConfigError, match="--cores"):
            plan.parse_cores(bad)


def test_second_plan_reads_the_cache(smoke, tmp_path):
    wf, jobs = smoke
    calls = []

    def counting(unit, example):
        assert example is None or (example and all(isinstance(c, RunConfig) for c in example))  # a cell
        calls.append(unit)
        return fake_calibrate(unit)

    path = tmp_path / "c.json"
    first = plan.make_plan(wf, jobs, [2], calibrate=counting, native=default_native, path=path)
    engines = sorted(calls)
    assert len(engines) == len(set(engines)) and plan.STARTUP in engines
    # the plug-in methods train with autograd, on the transformer through the native pass's
    # gradients; the pre-norm and D = 8 transformers on torch
    assert {"native-tfn", "autograd-fnn", "gradients-tfn", "torch-tfn"} <= {plan.engine_name(u) for u in engines}
    assert {c["source"] for c in first["calibration"].values()} == {"measured"}
    second = plan.make_plan(wf, jobs, [2], calibrate=counting, native=default_native, path=path)
    assert sorted(calls) == engines  # nothing measured again
    assert {c["source"] for c in second["calibration"].values()} == {"cache"}
    assert second["total"] == first["total"]
    plan.make_plan(wf, jobs, [2], calibrate=counting, native=default_native, path=path, recalibrate=True)
    assert len(calls) == 2 * len(engines)
    cached = json.loads(path.read_text())
    assert all(key.endswith(tuple(engines)) for key in cached)


def test_cache_key_names_version_cpu_torch_and_engine():
    import torch

    from lorabench import __version__

    key = plan.cache_key("native-fnn")
    assert key.split("|") == [__version__, plan.cpu_model(), torch.__version__, "native-fnn"]


def test_format_and_json(smoke, tmp_path, capsys):
    wf, jobs = smoke
    result = plan.make_plan(wf, jobs, [2, 8], calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json")
    text = plan.format_plan(result)
    assert "total" in text and "on 8 core(s)" in text and "startup" in text
    assert result["wall_s"]["8"] <= result["wall_s"]["2"]
    json.dumps(result)  # JSON-able
    # the experiments beyond the paper's own are costed apart, and only beside the paper's
    beyond = sum(r["core_s"] for r in result["rows"] if r["experiment"] in BEYOND_THE_PAPER)
    assert 0 < beyond < result["total"]["core_s"] and result["beyond_the_paper_s"] == pytest.approx(beyond)
    line = next(x for x in text.split("\n") if x.startswith("core-h of the paper's own experiments"))
    assert line.endswith(plan._hours(beyond)) and plan._hours(result["total"]["core_s"] - beyond) in line
    paper_only = plan.make_plan(wf, [j for j in jobs if j.experiment not in BEYOND_THE_PAPER], [2],
                                calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json")
    assert paper_only["beyond_the_paper_s"] == 0 and "of those beyond it" not in plan.format_plan(paper_only)


def test_a_real_calibration_of_the_constructions():
    example = [RunConfig(method="ours", width=8, target_depth=2, frozen_depth=4, rank=r) for r in range(1, 9)]
    measured = plan.calibrate_unit(plan.unit_of(example, "construct", default_native), example)
    rate = plan.Rate.from_dict(measured)
    assert rate.depths == (4, 4)  # a construction's unit names its depths
    assert 0 < rate.config(4) < 10 and rate.step(4) == 0 and rate.cell_step(4) == 0
    assert "16 constructions" in measured["measured"]


def test_a_real_calibration_of_a_training_unit(monkeypatch):
    sizes, steps = (4, 8), (5, 25)
    monkeypatch.setitem(plan.CAL_CELLS, "native-fnn", (sizes, steps))
    example = [RunConfig(method="sgd", width=16, task="classification", batch_size=64, rank=r) for r in (1, 8, 16)]
    unit = plan.unit_of(example, "train", default_native)
    measured = plan.calibrate_unit(unit, example)
    rate = plan.Rate.from_dict(measured)
    assert rate.depths == plan.CAL_DEPTHS["fnn"]
    # Timing noise may move a cell's whole per-step cost from its configs to the cell
    # (plan._split), so only a step of the larger measured cell is certain to be priced
    # above zero (and with it the whole cell, as every part is non-negative).
    for depth in rate.depths:
        assert sizes[1] * rate.step(depth) + rate.cell_step(depth) > 0
    assert "cells of 4 and 8 configs x 5 and 25 steps" in measured["measured"]
    assert "steps timed alone" in measured["measured"]


def test_a_real_calibration_of_pretraining_measures_its_mean_length():
    """Pretraining stops below initial / pretrained_level: the unit counts the steps it
    took on CAL_PRETRAIN_SEEDS seeds, which the projection then charges."""
    from lorabench.core.protocols import generate_models

    key = RunConfig(width=16, target_depth=1, frozen_depth=2, batch_size=64, pretrained=1, pretrained_epochs=60,
                    pretrained_level=1.5, seed=7)
    measured = plan.calibrate_unit(plan.unit_of([key], "models", default_native), [key])
    rate = plan.Rate.from_dict(measured)
    for depth in rate.depths:
        cfg = plan._cal_cell([key], depth, 1)[0]
        taken = [generate_models(cfg.replace(seed=s, pretrained=1)).pretrain_steps
                 for s in range(plan.CAL_PRETRAIN_SEEDS)]
        assert rate.pretraining(depth) == pytest.approx(sum(taken) / len(taken))
        assert 0 < rate.pretraining(depth) <= 60 and rate.step(depth) > 0
        assert plan.config_cost(key.replace(frozen_depth=depth), "models", rate) == pytest.approx(
            rate.config(depth) + rate.pretraining(depth) * rate.step(depth))
    assert min(rate.pretrain_steps) < 60  # at this level some pretraining stops early
    plain = plan.Rate.from_dict(plan.calibrate_unit(plan.unit_of([key.replace(pretrained=0)], "models", default_native),
                                                    [key.replace(pretrained=0)]))
    assert plain.pretrain_steps == (0.0, 0.0) and plain.config(2) > 0


def test_a_calibration_cell_is_like_the_cell_it_prices():
    cell = [RunConfig(method="flt", width=16, frozen_depth=8, last_layers=k, lr=lr, seed=3, n_epochs=5000)
            for k in range(1, 8) for lr in (1e-4, 1e-3, 1e-2)]
    for size in (4, 21, 64):
        cal = plan._cal_cell(cell, 8, size, steps=50)
        assert len(cal) == size and len({c.config_hash() for c in cal}) == size  # distinct configs
        assert all(c.frozen_depth == 8 and c.n_epochs == 50 and c.seed == 0 for c in cal)
        assert {c.last_layers for c in cal} >= {1, 7}  # spread over the whole cell
    shallow = plan._cal_cell(cell, 2, 8)
    assert max(c.last_layers for c in shallow) == 2  # never deeper than the model


def test_a_real_calibration_of_the_reference_transformer_stream(monkeypatch):
    monkeypatch.setattr(plan, "CAL_STREAM_POSITIONS", 2)
    measured = plan.calibrate_unit(plan.STREAM)
    rate = plan.Rate.from_dict(measured)
    assert rate.depths == plan.CAL_DEPTHS["tfn"]
    assert all(0 < rate.step(d) < 1 for d in rate.depths) and rate.config(1) == 0
    assert "2 positions per depth" in measured["measured"]


class FakeJob:
    def __init__(self, experiment, protocol, kind, seed=0):
        self.experiment, self.protocol, self.kind, self.seed = experiment, protocol, kind, seed


def test_parse_duration():
    assert plan.parse_duration("2h") == 7200 and plan.parse_duration("90min") == 5400
    assert plan.parse_duration("30m") == 1800 and plan.parse_duration("5400s") == 5400
    for bad in ("", "2", "two hours", "0h", "-1h"):
        with pytest.raises(ConfigError, match="--pieces"):
            plan.parse_duration(bad)


def test_pieces_keep_both_protocols_together_when_they_fit_and_pack_first_fit():
    # per (experiment, protocol): one models job of 1 s and one train job; budget 100 s on 1 core
    train = {("a", "paper"): 20, ("a", "reference"): 20, ("b", "paper"): 60, ("b", "reference"): 60,
             ("c", "paper"): 150, ("c", "reference"): 10, ("d", "paper"): 10, ("d", "reference"): 10}
    jobs, costs = [], []
    for (name, protocol), seconds in train.items():
        jobs += [FakeJob(name, protocol, "models"), FakeJob(name, protocol, "train")]
        costs += [1.0, float(seconds)]
    pieces = plan.make_pieces(jobs, costs, 1, 100.0, ["paper", "reference"])
    got = [(p.experiments, p.protocols, p.over_budget) for p in pieces]
    assert got == [
        (["a", "d"], ["paper", "reference"], False),  # 42 + 22 s: together
        (["b"], ["paper"], False), (["c"], ["paper"], True),  # c alone is above the budget
        (["b", "c"], ["reference"], False),  # 61 + 11 s
    ]
    covered = sorted((e, p) for piece in pieces for e in piece.experiments for p in piece.protocols)
    assert covered == sorted(train)
    assert all(p.wall_s <= 100 for p in pieces if not p.over_budget)
    assert pieces[0].wall_s == pytest.approx(64.0) and pieces[0].core_s == pytest.approx(64.0)


def test_an_experiment_above_the_budget_is_cut_into_its_jobs():
    # a (paper only, linked to b) is above the 100 s budget: its jobs go to pieces of their own;
    # b's train job copies rows from a's first train job, so it never runs before it
    jobs = [FakeJob("a", "paper", "models", 0), FakeJob("a", "paper", "train", 0), FakeJob("a", "paper", "train", 0),
            FakeJob("a", "paper", "models", 1), FakeJob("a", "paper", "train", 1),
            FakeJob("b", "paper", "models", 0), FakeJob("b", "paper", "train", 0),
            FakeJob("c", "paper", "models", 0), FakeJob("c", "paper", "train", 0)]
    costs = [5.0, 60.0, 50.0, 5.0, 90.0, 1.0, 30.0, 1.0, 20.0]
    paths = [f"results/job{i}" for i in range(len(jobs))]
    pieces = plan.make_pieces(jobs, costs, 1, 100.0, ["paper"], linked=[("b", "a")], sources={6: [1]}, paths=paths)
    assert [(p.experiments, p.targets) for p in pieces] == [
        (["c"], []),  # whole experiments first
        (["a"], ["results/job4"]),  # 90 s and its models job
        (["a", "b"], ["results/job1", "results/job6"]),  # b with (or after) its source: 60 + 30 + models jobs
        (["a"], ["results/job2"]),  # 50 s: its seed's models job ran in the piece before
    ]
    assert [p.core_s for p in pieces] == [21.0, 95.0, 96.0, 50.0]  # each models job counted once, where it runs
    assert not any(p.over_budget for p in pieces)
    one = plan.Piece(["a"], ["paper"], targets=["results/job4"])
    assert plan.piece_command(one, "paper", 2) == "snakemake --cores 2 results/job4 --config preset=paper"


def test_plan_sets_its_projection_against_the_jobs_that_ran(smoke, tmp_path):
    wf, jobs = smoke
    train = [next(j for j in jobs if j.kind == "train" and j.experiment == "fnn" and j.protocol == p)
             for p in ("paper", "reference")]
    records = tmp_path / "benchmarks"
    for job, cpu in zip(train, (3.0, 5.0)):
        record = records / "train" / job.experiment / job.protocol / f"{job.id}.tsv"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"s\tcpu_time\n{cpu + 1}\t{cpu}\n")
    result = plan.make_plan(wf, jobs, [2], calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json",
                            records=records)
    baseline = plan.make_plan(wf, jobs, [2], calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json")
    rows = result["measured"]["rows"]
    assert [(r["experiment"], r["protocol"], r["jobs"], r["measured_cpu_s"]) for r in rows] == [
        ("fnn", "paper", 1, 3.0), ("fnn", "reference", 1, 5.0)]
    own, _ = plan.own_work(jobs, lbx.shared_configs(list(jobs)))
    rates = {e: plan.Rate.from_dict(c) for e, c in baseline["calibration"].items() if e != plan.STARTUP}
    costs = plan.job_costs(own, rates, baseline["startup_s"], default_native)
    for row, job in zip(rows, train):
        assert row["projected_cpu_s"] == pytest.approx(costs[jobs.index(job)])
        assert row["ratio"] == pytest.approx(row["measured_cpu_s"] / row["projected_cpu_s"])
    assert "projected against measured CPU time" in plan.format_plan(result)
    empty = plan.make_plan(wf, jobs, [2], calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json",
                           records=tmp_path / "none")
    assert empty["measured"]["rows"] == [] and "no job of this plan" in plan.format_plan(empty)


def test_plan_prints_the_pieces_and_their_commands(smoke, tmp_path):
    wf, jobs = smoke
    result = plan.make_plan(wf, jobs, [2], calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json",
                            pieces_s=60.0)
    pieces = result["pieces"]
    assert pieces["cores"] == 2 and pieces["budget_s"] == 60.0
    covered = sorted((e, p) for run in pieces["runs"] for e in run["experiments"] for p in run["protocols"])
    assert covered == sorted((name, p) for name in wf.experiments for p in wf.protocols)
    for run in pieces["runs"]:
        assert run["over_budget"] or run["wall_s"] <= 60.0
        assert run["command"] == (f"snakemake --cores 2 all_runs --config preset=smoke "
                                  f"experiments=[{','.join(run['experiments'])}] protocols=[{','.join(run['protocols'])}]")
    assert pieces["combine"] == "snakemake --cores 2 all_figures --config preset=smoke"
    text = plan.format_plan(result)
    assert "piece(s) of at most 60 s on 2 core(s)" in text and pieces["combine"] in text
    json.dumps(result)
    # a run in pieces that has begun: the jobs whose outputs exist are left out
    fnn = {j.path for j in jobs if j.experiment == "fnn"}
    rest = plan.make_plan(wf, jobs, [2], calibrate=fake_calibrate, native=default_native, path=tmp_path / "c.json",
                          pieces_s=60.0, done=fnn.__contains__)["pieces"]
    assert rest["done"] == len(fnn) and "fnn" not in {e for run in rest["runs"] for e in run["experiments"]}
    assert "already done here are left out" in plan.format_pieces(rest)[0]


def test_bad_pieces_budget_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["plan", "--configfile", CONFIG, "--preset", "smoke", "--pieces", "two hours"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--pieces" in err and len(err.strip().splitlines()) == 1


def test_the_preview_of_nothing_to_run_is_silent(smoke):
    wf, _ = smoke
    assert plan.preview(wf, [], 2) is None
