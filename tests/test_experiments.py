"""The workflow config's expansion into RunConfigs and jobs (lorabench.runs.experiments)."""

import copy
import dataclasses
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import yaml

from lorabench.runs import experiments as lbx
from lorabench.core.config import ConfigError, RunConfig
from lorabench.core.theory import fnn_threshold_rank

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())
SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
NAMES = ["linear", "fnn", "tfn", "flt", "bias", "rank_step", "classification", "depth", "generalization",
         "training_curves", "uniform_sv", "threshold_law", "methods", "tfn_low_rank", "tfn_prenorm"]
BEYOND = {"methods", "tfn_low_rank", "tfn_prenorm"}  # beyond the paper: 3 seeds in the paper preset, paper protocol


def load(preset="paper", **changes):
    config = copy.deepcopy(CONFIG)
    config["preset"] = preset
    config.update(changes)
    return lbx.load(config)


@pytest.fixture(scope="module")
def paper():
    return load("paper")


@pytest.fixture(scope="module")
def smoke():
    return load("smoke")


def test_config_matches_schema():
    jsonschema.validate(CONFIG, SCHEMA)


def test_schema_settings_are_the_runconfig_fields():
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"protocol", "method", "method_settings"}
    assert set(SCHEMA["definitions"]["settings"]["properties"]) == fields


# The paper's grid (docs/experiments.md): 5 seeds, lr (3) x wd (4) for gradient runs, ranks 1..16.
GRID = 12  # learning rates x weight decays
LRS = 3  # the experiments beyond the paper: no weight decay
PAPER_COUNTS = {
    "linear": 2 * 5 * (16 + 16 * GRID),  # random/pretrained; ours + sgd
    "fnn": 2 * 2 * 5 * (16 + 16 * GRID),  # 2 depth pairs
    "tfn": 2 * 2 * 5 * (16 + 16 * GRID),
    "flt": 2 * 5 * (7 * GRID + 16 * GRID),  # last 1..7 layers; LoRA ranks 1..16
    "bias": 2 * 5 * 2 * 16 * GRID,  # tune_bias 0/1
    "rank_step": 2 * 5 * 5 * GRID,  # 5 steps at rank 8
    "classification": 2 * 2 * 5 * (17 + 16 * GRID),  # 2 tasks x 2 depths; ours ranks 0..16
    "depth": 7 * 5 * 16 * GRID,  # L = 2..14
    "generalization": 2 * 5 * (16 + 16 * GRID),
    "training_curves": 2 * 5 * 5 * GRID,  # ranks 1,4,8,13,16
    "uniform_sv": 5 * (16 + 16 * GRID),
    # beyond the paper, constructions only, 3 seeds, ranks 1..D: FNN 5 depth pairs at D = 8..64, TFN 2 depths at D = 8..32
    "threshold_law": 3 * (5 * (8 + 16 + 32 + 64) + 2 * (8 + 16 + 32)),
    # beyond the paper, 3 seeds, the 3 learning rates without weight decay (LRS), random/pretrained, ranks
    # 1, 2, 4, 8, 16 in FNN (1, 2), (2, 4) and TFN depth 1: the construction; LoRA, DoRA, VeRA, PiSSA; full
    # fine-tuning's one point; the last 1..L layers
    "methods": 3 * 2 * (3 * 5 + 3 * (4 * 5 + 1) * LRS + (2 + 4) * LRS),
    # 3 seeds, depths 1 and 2, ranks 1..R* (D = 32: 1-8, 12, 16): the construction; LoRA and LoRA from it
    "tfn_low_rank": 3 * 2 * (4 + 8 + 10) * (1 + 2 * LRS),
    # 3 seeds, depths 1 and 2, 7 ranks: the plain construction; LoRA on the plain and the pre-norm transformer
    "tfn_prenorm": 3 * 2 * 7 * (1 + 2 * LRS),
}


def test_paper_preset_counts_match_the_paper_grid(paper):
    assert list(paper.experiments) == NAMES
    assert {name: len(cfgs) for name, cfgs in paper.experiments.items()} == PAPER_COUNTS
    assert paper.protocols == ("paper", "reference")


def test_paper_preset_settings(paper):
    assert set(lbx.BEYOND_THE_PAPER) == BEYOND  # what `lorabench plan` costs apart
    for name, cfgs in paper.experiments.items():
        if name == "threshold_law":
            continue  # its own grid: test_threshold_law_grid
        assert {c.seed for c in cfgs} == set(range(3 if name in BEYOND else 5)), name
        assert {c.width for c in cfgs} == ({8, 16, 32} if name == "tfn_low_rank" else {16})
        for c in cfgs:
            if c.method == "ours":
                assert (c.lr, c.weight_decay) == (RunConfig.lr, RunConfig.weight_decay)  # not swept
            else:
                assert c.batch_size == 256 and c.n_val == 256
                assert c.n_epochs == (20000 if name == "generalization" else 5000)
        gradient = [c for c in cfgs if c.method != "ours"]
        assert {(c.lr, c.weight_decay) for c in gradient} == {
            (lr, wd) for lr in (1e-2, 1e-3, 1e-4) for wd in ((0.0,) if name in BEYOND else (0.0, 1e-4, 1e-3, 1e-2))
        }, name
    tfn = paper.experiments["tfn"]
    assert {(c.target_depth, c.frozen_depth, c.n_head, c.seq_length) for c in tfn} == {(1, 1, 2, 10), (2, 2, 2, 10)}
    assert {c.n_train for c in paper.experiments["generalization"]} == {400, 800}
    assert {c.method for c in paper.experiments["flt"]} == {"flt", "sgd"}
    assert {c.last_layers for c in paper.experiments["flt"] if c.method == "flt"} == set(range(1, 8))
    assert {c.rank_step for c in paper.experiments["rank_step"]} == {-2, -1, 0, 1, 2}
    assert {c.pretrained for c in paper.experiments["classification"]} == {0}
    assert {c.init_mode for c in paper.experiments["uniform_sv"]} == {"uniform_singular_values"}
    methods = paper.experiments["methods"]
    assert {c.method for c in methods} == {"ours", "sgd", "flt", "full", "dora", "vera", "pissa"}
    assert {c.method for c in methods if c.exp == "tfn"} == {"ours", "sgd", "full", "dora", "vera", "pissa"}
    assert {(c.frozen_depth, c.last_layers) for c in methods if c.method == "flt"} == {
        (2, 1), (2, 2), (4, 1), (4, 2), (4, 3), (4, 4)}
    assert {c.tune_bias for c in methods if c.method != "ours"} == {1}
    assert {c.method_settings for c in methods if c.method == "vera"} == {'{"d_init":0.1}'}


def test_smoke_preset_is_small_but_complete(smoke):
    assert list(smoke.experiments) == NAMES
    total = sum(len(c) for c in smoke.experiments.values())
    assert total < 800
    for name, cfgs in smoke.experiments.items():
        assert {c.seed for c in cfgs} == {0, 1}
        assert all(c.n_test == 500 for c in cfgs)
        gradient = [c for c in cfgs if c.method != "ours"]
        assert all(c.n_epochs == (10 if name in {"tfn"} | BEYOND else 30) and c.lr == 1e-2 and c.weight_decay == 0
                   for c in gradient)
    # the threshold rank of the FNN experiments is kept, so the figures show it
    for c in smoke.experiments["fnn"]:
        assert fnn_threshold_rank(16, c.frozen_depth, c.target_depth) in {
            x.rank for x in smoke.experiments["fnn"] if x.frozen_depth == c.frozen_depth
        }


def test_threshold_law_grid(paper, smoke):
    cfgs = paper.experiments["threshold_law"]
    assert {c.method for c in cfgs} == {"ours"} and {c.pretrained for c in cfgs} == {0} and {c.seed for c in cfgs} == {0, 1, 2}
    fnn = {(c.width, c.target_depth, c.frozen_depth) for c in cfgs if c.exp == "fnn"}
    assert fnn == {(w, lbar, depth) for w in (8, 16, 32, 64) for lbar, depth in ((1, 2), (1, 4), (2, 4), (2, 5), (2, 6))}
    tfn = {(c.width, c.target_depth, c.frozen_depth) for c in cfgs if c.exp == "tfn"}
    assert tfn == {(w, depth, depth) for w in (8, 16, 32) for depth in (1, 2)}
    for width in (8, 16, 32, 64):  # every rank 1..D, in paper and quick (the quick preset's rank subset is replaced)
        for wf in (paper, load("quick")):
            assert {c.rank for c in wf.experiments["threshold_law"] if c.width == width} == set(range(1, width + 1))
    # smoke: D = 8, 16; FNN (1, 2), TFN depth 1; the ranks either side of the threshold D/2
    small = smoke.experiments["threshold_law"]
    assert {(c.exp, c.width, c.target_depth, c.frozen_depth) for c in small} == {
        (exp, w, 1, depth) for w in (8, 16) for exp, depth in (("fnn", 2), ("tfn", 1))}
    assert {c.rank for c in small if c.width == 8} == {3, 4, 7, 8} and {c.rank for c in small if c.width == 16} == {3, 4, 7, 8, 16}


def test_an_experiments_only_drops_runs_and_its_subset_replaces_the_presets():
    config = copy.deepcopy(CONFIG)
    config["preset"] = "quick"
    config["presets"]["quick"]["experiments"]["fnn"] = {"only": {"target_depth": [2]}, "subset": {"rank": [5, 7]}}
    fnn = lbx.load(config).experiments["fnn"]
    assert {(c.target_depth, c.frozen_depth) for c in fnn} == {(2, 4)}
    assert {c.rank for c in fnn} == {5, 7}  # not in the quick preset's own rank subset
    config["presets"]["quick"]["experiments"]["fnn"] = {"only": {"target_depth": [3]}}
    with pytest.raises(ConfigError, match="'fnn' has no runs"):
        lbx.load(config)
    config["presets"]["quick"]["experiments"]["fnn"] = {"only": {"nope": [3]}}
    with pytest.raises(ConfigError, match="unknown setting.*nope"):
        lbx.load(config)


def test_quick_preset_trains_the_transformer_1000_steps_under_both_protocols():
    tfn = [c for c in load("quick").experiments["tfn"] if c.method != "ours"]
    assert tfn and {c.n_epochs for c in tfn} == {1000}
    assert {c.pretrained for c in tfn} == {0, 1} and {c.target_depth for c in tfn} == {1, 2}
    assert load("quick").protocols == ("paper", "reference")


def test_quick_preset_lies_between(smoke, paper):
    quick = load("quick")
    sizes = [sum(len(c) for c in wf.experiments.values()) for wf in (smoke, quick, paper)]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("split", [True, False])
def test_jobs_cut_per_experiment_protocol_and_seed(smoke, split):
    wf = dataclasses.replace(smoke, split_seeds=split)
    jobs = wf.jobs()
    ids = Counter((j.experiment, j.protocol, j.kind, j.id) for j in jobs)
    assert max(ids.values()) == 1
    kinds = Counter(j.kind for j in jobs)
    # experiments x their protocols (x seeds)
    assert kinds["models"] == sum(len(wf.protocols_of(n)) for n in NAMES) * (2 if split else 1)
    assert {wf.protocols_of(n) for n in BEYOND} == {("paper",)}
    for job in jobs:
        assert {c.seed for c in job.configs} == ({job.seed} if split else {0, 1})
        assert job.id.startswith(f"s{job.seed}-" if split else "all-")
        assert {c.protocol for c in job.configs} == {job.protocol}
        if job.kind == "construct":
            assert {c.method for c in job.configs} == {"ours"}
        if job.kind == "train":
            assert "ours" not in {c.method for c in job.configs}
    for name, cfgs in smoke.experiments.items():  # every config of every experiment in one job
        configs = [c for j in jobs if j.kind != "models" and j.experiment == name for c in j.configs]
        assert len(configs) == len(set(configs)) == len(wf.protocols_of(name)) * len(cfgs)


def test_changing_one_experiment_changes_only_its_job_ids():
    before = {(j.experiment, j.protocol, j.kind, j.seed): j.id for j in load("smoke").jobs()}
    config = copy.deepcopy(CONFIG)
    config["preset"] = "smoke"
    config["experiments"]["bias"]["settings"]["pretrained_lr"] = 2.0e-3
    after = {(j.experiment, j.protocol, j.kind, j.seed): j.id for j in lbx.load(config).jobs()}
    assert before.keys() == after.keys()
    changed = {key for key in before if before[key] != after[key]}
    assert changed and {key[0] for key in changed} == {"bias"}


def test_shared_configs_train_once_in_the_first_experiment_that_holds_them(paper):
    """bias, depth, rank_step and training_curves hold fnn (and flt) configs: each shared
    config is taken from the first train job that trains it, of the same protocol."""
    jobs = paper.jobs()
    index = lbx.job_index(jobs)
    shared = lbx.shared_configs(jobs)
    order = list(paper.experiments)
    pairs = Counter()
    for key, by_source in shared.items():
        job = index[key]
        for source_key, cfgs in by_source.items():
            source = index[source_key]
            assert source.kind == "train" and source.protocol == job.protocol and source.seed == job.seed
            assert order.index(source.experiment) < order.index(job.experiment)
            assert set(cfgs) <= set(job.configs) & set(source.configs) and source_key not in shared
            pairs[(job.experiment, source.experiment)] += len(cfgs)
    assert pairs == {("bias", "fnn"): 3840, ("rank_step", "fnn"): 240, ("depth", "fnn"): 1920,
                     ("depth", "flt"): 1920, ("training_curves", "fnn"): 1200,
                     # LoRA at ranks 1, 2, 4, 8, 16 in the fnn and tfn experiments' settings, seeds 0-2, paper only
                     ("methods", "fnn"): 2 * 2 * 3 * 5 * LRS, ("methods", "tfn"): 2 * 3 * 5 * LRS,
                     # plain LoRA on random D = 16 transformers: ranks 1-8 below R*, and the pre-norm comparison's 7
                     ("tfn_low_rank", "tfn"): 2 * 8 * 3 * LRS, ("tfn_prenorm", "tfn"): 2 * 7 * 3 * LRS}
    # bias trains only its fixed-bias runs; its tuned-bias ones are fnn's (1, 2) runs
    bias = {c for j in jobs if j.experiment == "bias" and j.kind == "train" for c in j.configs}
    copied = {c for key, by in shared.items() if key[0] == "bias" for cfgs in by.values() for c in cfgs}
    assert copied == {c for c in bias if c.tune_bias == 1}


def test_a_selection_pulls_in_the_train_jobs_it_reuses(smoke):
    """Sharing is decided over every defined experiment: a selected experiment's jobs
    (and ids) do not change with the selection; its run also holds the reused train jobs
    and their models jobs, and nothing else of theirs."""
    selected = smoke.select(["bias"])
    assert [j.id for j in selected.jobs()] == [j.id for j in smoke.jobs() if j.experiment == "bias"]
    run = selected.run_jobs()
    others = [j for j in run if j.experiment != "bias"]
    assert {j.experiment for j in others} == {"fnn"} and {j.kind for j in others} == {"models", "train"}
    defined = lbx.shared_configs(smoke.jobs())
    reused = {source for key, by in defined.items() if key[0] == "bias" for source in by}
    assert {lbx.job_key(j) for j in others if j.kind == "train"} == reused
    assert lbx.shared_configs(run) == {key: by for key, by in defined.items() if key[0] == "bias"}
    without_fnn = load("smoke", experiments={k: v for k, v in CONFIG["experiments"].items() if k != "fnn"})
    alone = without_fnn.select(["bias"])
    assert not any(key[0] == "bias" for key in lbx.shared_configs(without_fnn.jobs()))
    assert alone.run_jobs() == alone.jobs()


def test_paper_protocol_models_do_not_depend_on_rank(smoke):
    smoke = dataclasses.replace(smoke, split_seeds=True)
    models = [j for j in smoke.jobs() if j.kind == "models" and j.protocol == "paper" and j.experiment == "fnn"]
    # one model key per (pretrained, depth pair) and seed
    assert all(len(j.configs) == 4 for j in models)
    reference = [j for j in smoke.jobs() if j.kind == "models" and j.protocol == "reference" and j.experiment == "fnn"]
    assert all(len(j.configs) > 4 for j in reference)  # the authors' ranks change their random stream


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda c: c["experiments"]["fnn"]["settings"].update(rnak=3), "rnak"),
        (lambda c: c["experiments"]["fnn"]["methods"].update(adam={}), "adam"),
        (lambda c: c["experiments"]["linear"]["methods"]["sgd"].update(rank=[0, 1]), "rank"),
        (lambda c: c["defaults"].update(width=0), "width"),
        (lambda c: c["defaults"].update(protocol="paper"), "protocol"),
        (lambda c: c.update(preset="huge"), "preset"),
        (lambda c: c.update(dispatch="pbs"), "dispatch"),
        (lambda c: c.update(device="tpu"), "device"),
        (lambda c: c.update(protocols=["paper", "authors"]), "authors"),
        (lambda c: c["presets"]["smoke"]["set"].update(colour=1), "colour"),
    ],
)
def test_bad_configs_are_refused_by_name(change, needle):
    config = copy.deepcopy(CONFIG)
    change(config)
    with pytest.raises(ConfigError, match=needle):
        lbx.load(config)


def test_val_every_is_refused_under_the_reference_protocol_before_any_job():
    """Experiments expand under the paper protocol; a val_every that the reference protocol
    refuses is caught when the workflow loads, with the experiment and protocol named."""
    config = copy.deepcopy(CONFIG)
    config["defaults"]["val_every"] = 10
    with pytest.raises(ConfigError, match="experiment 'linear' under protocol 'reference'.*protocols=\\[paper\\]"):
        lbx.load(config)
    paper_only = lbx.load({**config, "protocols": ["paper"]})
    trained = [c for c in paper_only.experiments["linear"] if c.method == "sgd"]
    assert trained and {c.val_every for c in trained} == {10}
    assert {c.val_every for c in paper_only.experiments["linear"] if c.method == "ours"} == {1}
    jobs = {(j.experiment, j.kind, j.seed): j.id for j in paper_only.jobs() if j.kind != "train"}
    assert jobs == {(j.experiment, j.kind, j.seed): j.id for j in load(protocols=["paper"]).jobs() if j.kind != "train"}


def test_sweep_and_preset_mechanics():
    spec = {"settings": {"pretrained": [0, 1]}, "variants": [{"target_depth": 1, "frozen_depth": 2}],
            "methods": {"ours": {"rank": [1, 2, 3]}, "sgd": {"rank": [1, 2, 3]}}}
    defaults = {"width": 4, "seed": [0, 1], "lr": [1e-2, 1e-3], "n_epochs": 100, "n_test": 50}
    cfgs = lbx.expand_experiment("x", spec, defaults, {})
    assert Counter(c.method for c in cfgs) == {"ours": 2 * 2 * 3, "sgd": 2 * 2 * 3 * 2}
    preset = {"set": {"seed": [7]}, "cap": {"n_epochs": 10}, "subset": {"rank": [2, 9]}}
    cfgs = lbx.expand_experiment("x", spec, defaults, preset)
    assert {c.seed for c in cfgs} == {7} and {c.rank for c in cfgs} == {2}
    assert {c.n_epochs for c in cfgs if c.method == "sgd"} == {10}


# full_length: the paper's configs, fewer seeds (the transformer one; threshold_law its own three).
FULL_LENGTH_SEEDS = {name: {0, 1} for name in NAMES} | {"tfn": {0}, "threshold_law": {0, 1, 2}} | {n: {0} for n in BEYOND}


def test_full_length_is_the_paper_grid_on_fewer_seeds(paper):
    full = load("full_length")
    assert list(full.experiments) == list(paper.experiments)
    for name, cfgs in full.experiments.items():
        expected = {c for c in paper.experiments[name] if c.seed in FULL_LENGTH_SEEDS[name]}
        assert set(cfgs) == expected, name
        assert {c.seed for c in cfgs} == FULL_LENGTH_SEEDS[name]
    steps = {c.n_epochs for c in full.experiments["generalization"] if c.method == "sgd"}
    assert steps == {20000} and {c.n_epochs for c in full.experiments["fnn"] if c.method == "sgd"} == {5000}


def test_split_by_cuts_a_seeds_training_into_one_job_per_value(smoke):
    wf = dataclasses.replace(smoke, split_seeds=True, split_by=("target_depth", "pretrained"))
    jobs = [j for j in wf.jobs() if j.experiment == "fnn" and j.protocol == "paper"]
    train = [j for j in jobs if j.kind == "train"]
    assert len(train) == 2 * 2 * 2  # seeds x depth pairs x random/pretrained
    for job in train:
        assert len({(c.seed, c.target_depth, c.pretrained) for c in job.configs}) == 1
    assert Counter(j.kind for j in jobs) == {"models": 2, "construct": 2, "train": 8}
    unsplit = [c for j in smoke.jobs() if j.experiment == "fnn" and j.protocol == "paper" and j.kind == "train"
               for c in j.configs]
    assert Counter(c for j in train for c in j.configs) == Counter(unsplit)
    for job in jobs:  # each job's reference expands back to it
        assert lbx.resolve_job(wf.job_ref(job)) == job


def test_split_by_names_runconfig_fields():
    config = copy.deepcopy(CONFIG)
    config["presets"]["smoke"]["split_by"] = ["depht"]
    config["preset"] = "smoke"
    with pytest.raises(ConfigError, match="split_by.*depht"):
        lbx.load(config)


def test_a_piece_of_job_outputs_runs_those_jobs_their_sources_and_models(paper):
    """What a run naming job outputs runs (and what its preview projects): the jobs, the
    train jobs whose rows they copy, and their seeds' models jobs; None for other targets."""
    jobs = paper.jobs(defined=True)
    shared = paper.shared
    index = lbx.job_index(jobs)
    copier = index[next(key for key in shared if key[0] == "bias")]
    [source_key] = shared[lbx.job_key(copier)]
    got = lbx.jobs_for_outputs([copier.path], jobs, shared)
    assert {lbx.job_key(j) for j in got if j.kind != "models"} == {lbx.job_key(copier), source_key}
    assert {(j.experiment, j.seed) for j in got if j.kind == "models"} == {
        ("bias", copier.seed), (source_key[0], index[source_key].seed)}
    assert {j.protocol for j in got} == {copier.protocol}
    assert lbx.jobs_for_outputs(["results/figures/fnn.png"], jobs, shared) is None
    assert lbx.jobs_for_outputs([], jobs, shared) is None
