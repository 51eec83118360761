# Config checks, the jobs of the config, and the input and parameter functions of the
# workflow. The logic lives in lorabench.runs.experiments: it expands the validated config
# into RunConfigs and cuts them into jobs named by a hash of their configs
# (results/<stage>/<experiment>/<protocol>/s<seed>-<hash>.*).
import os
import shlex
import sys

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from lorabench.core.config import ConfigError
from lorabench.report import catalog
from lorabench.runs import experiments as lbx

SCHEMA_PATH = os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")


def config_files():
    """The config files in the order Snakemake merged them (the Snakefile's, then --configfile)."""
    paths = [*workflow.configfiles, *workflow.overwrite_configfiles]
    out = []
    for path in dict.fromkeys(str(p) for p in paths):
        with open(path) as f:
            out.append(yaml.safe_load(f) or {})
    return out


def checked_config(config):
    """The config, checked against the schema (one short line on error, before any job),
    with the schema's defaults, and the experiment selection of `--config experiments=[...]`."""
    definitions, selection = lbx.split_selection(config, config_files())
    if selection is not None:
        config["experiments"] = definitions
    with open(SCHEMA_PATH) as f:
        problem = lbx.schema_error(config, yaml.safe_load(f))
    if problem:
        raise WorkflowError(f"config: {problem}")
    validate(config, SCHEMA_PATH)  # sets the schema's defaults
    try:
        loaded = lbx.load(config)
        return loaded if selection is None else loaded.select(selection)
    except ConfigError as error:
        raise WorkflowError(f"config: {error}") from None


WF = checked_config(config)
DEFINED = list(config["experiments"])
SELECTED = list(WF.experiments)


class Untracked:
    """A shell value that never reruns a job when it changes (Snakemake records only
    params of builtin types): where and how a job runs, not what it computes. What a job
    computes is in its path (the hash of its configs)."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text

    def __format__(self, spec):
        return format(self.text, spec)


def flags(**values):
    """--name value pairs, each value shell-quoted."""
    return " ".join(f"--{name.replace('_', '-')} {shlex.quote(str(value))}" for name, value in values.items())


# The interpreter running Snakemake has lorabench installed; with --use-conda the
# environment's python is the one on PATH.
_conda = "conda" in str(getattr(workflow.deployment_settings, "deployment_method", "")).lower()
LB = Untracked("python -m lorabench" if _conda else f"{shlex.quote(sys.executable)} -m lorabench")
CONDA_ENV = "../../envs/lorabench.yaml"
DEVICE = Untracked(flags(device=WF.device))
DISPATCH = Untracked(
    flags(
        dispatch=WF.dispatch,
        slurm_partition=WF.slurm.partition,
        slurm_gpus=WF.slurm.gpus,
        slurm_cpus=WF.slurm.cpus,
        slurm_mem_gb=WF.slurm.mem_gb,
        slurm_time_min=WF.slurm.time_min,
        slurm_account=WF.slurm.account,
        slurm_qos=WF.slurm.qos,
    )
)

JOBS = WF.jobs()
# Every defined experiment's jobs: a selected experiment's train job may reuse the rows of
# configs it shares with another experiment's (lbx.shared_configs), selected or not.
DEFINED_JOBS = WF.jobs(defined=True)
JOB_BY_ID = lbx.job_index(DEFINED_JOBS)
MODELS_JOB = lbx.models_jobs(DEFINED_JOBS)
SHARED = WF.shared
RUN_JOBS = WF.run_jobs()  # the selection's jobs and the other experiments' train jobs it reuses


def command_targets():
    """The targets on the command line: Snakemake hands them to the workflow only after it
    is parsed, so they are read from the arguments (paths under results/, and this
    workflow's target rules). Empty: the default target."""
    rules = {"all_figures", "all_runs", "all_results", "claims", "paper_tables", "costs", "aggregate"}
    return [arg for arg in sys.argv[1:] if arg.startswith("results/") or arg in rules]


def targeted_experiments():
    """The selected experiments the command's targets need: a figure's, a per-experiment
    file's, or all of them (the target rules, the joined files, or no target)."""
    needed = set()
    for target in command_targets():
        parts = target.split("/")
        if len(parts) >= 4 and parts[:2] == ["results", "figures"]:  # results/figures/<protocol>/<name>.<ext>
            needed.update(catalog.FIGURE_EXPERIMENTS.get(parts[3].rsplit(".", 1)[0], SELECTED))
        elif len(parts) >= 3 and parts[0] == "results" and parts[2].split(".")[0] in SELECTED:
            needed.add(parts[2].split(".")[0])
        else:
            return SELECTED
    return [name for name in SELECTED if name in needed] or SELECTED


# Snakemake invocations that run no job (they inspect or tidy the working directory).
NO_JOB_FLAGS = {"--unlock", "--list-rules", "--list", "--list-target-rules", "--lt", "--summary", "--detailed-summary",
                "--dag", "--rulegraph", "--filegraph", "--d3dag", "--touch", "--cleanup-metadata", "--cleanup-shadow",
                "--delete-all-output", "--delete-temp-output", "--list-changes", "--list-input-changes", "--li",
                "--list-params-changes", "--lp", "--list-untracked", "--lu", "--archive", "--export-cwl",
                "--containerize", "--generate-unit-tests", "--lint", "--print-compilation", "--list-conda-envs",
                "--conda-cleanup-envs", "--report"}


def print_preview():
    """Before the first job (dry runs too): what the jobs still to run will cost, from the
    cached calibration (lorabench.runs.plan.preview); nothing when they train nothing or
    the invocation runs no job (NO_JOB_FLAGS)."""
    from lorabench.runs import plan

    flags = {arg.split("=")[0] for arg in sys.argv[1:]}
    if flags & NO_JOB_FLAGS and "--report-after-run" not in flags:
        return
    jobs = lbx.jobs_for_outputs(command_targets(), DEFINED_JOBS, SHARED)  # a piece of jobs
    if jobs is None:
        needed = targeted_experiments()
        jobs = RUN_JOBS if needed == SELECTED else WF.select(needed).run_jobs()
    to_run = [j for j in jobs if not os.path.exists(j.path)]
    try:
        cores = int(workflow.cores)
    except (WorkflowError, TypeError, ValueError):
        cores = 1
    try:
        block = plan.preview(WF, to_run, cores)
    except Exception as error:  # noqa: BLE001 (a projection must never stop a run: e.g. device cuda on a login node)
        block = f"lorabench: preset {WF.preset}, {len(to_run)} jobs to run; no projection ({error})" if to_run else None
    if block:
        print(block, file=sys.stderr)

# Figures whose experiments all run, each under every protocol they all run under; each
# reads only its experiments' results under its protocol.
FIGURE_NAMES = catalog.drawn_figures(SELECTED)
FIGURE_PROTOCOLS = {name: catalog.figure_protocols(name, {e: WF.protocols_of(e) for e in SELECTED})
                    for name in FIGURE_NAMES}
FIGURES = [f"results/figures/{p}/{name}.{ext}" for name in FIGURE_NAMES for p in FIGURE_PROTOCOLS[name]
           for ext in ("png", "pdf")]
CLAIMS = [
    "results/claims.md",
    "results/claims.csv",
    *expand("results/protocol_comparison.{ext}", ext=("png", "pdf", "md", "csv")),
]
PAPER_TABLES = "results/paper_tables.md"  # per figure of the paper: what it shows, what this run measured
SELECTION_NOTE = catalog.selection_note(SELECTED, DEFINED)
# What a piece of a run in pieces builds: its experiments' rows per protocol, no figures.
PIECE = [f"results/{kind}/{name}/{p}.parquet" for kind in ("runs", "selected") for name in SELECTED
         for p in WF.protocols_of(name)]
REPORT_DIR = os.path.join(workflow.basedir, "workflow", "report")


wildcard_constraints:
    experiment="[A-Za-z0-9_]+",
    protocol="paper|reference",
    job=r"(s\d+|all)-[0-9a-f]{16}",


def find_job(wildcards, kind):
    key = (wildcards.experiment, wildcards.protocol, kind, wildcards.job)
    if key not in JOB_BY_ID:
        raise WorkflowError(
            f"no {kind} job {wildcards.job} in experiment {wildcards.experiment} ({wildcards.protocol}) of this config"
        )
    return JOB_BY_ID[key]


def models_of(kind):
    """Input function: the models file of a construct/train job's seed."""

    def inputs(wildcards):
        job = find_job(wildcards, kind)
        return MODELS_JOB[(job.experiment, job.protocol, job.seed)].path

    return inputs


def reused_outputs(wildcards):
    """Input function: the outputs of the other experiments' train jobs whose configs a
    train job shares (it copies their rows instead of training them)."""
    job = find_job(wildcards, "train")
    return [JOB_BY_ID[source].path for source in SHARED.get(lbx.job_key(job), {})]


def job_ref(kind):
    """Params function: the job's reference, from which its step expands it again (small,
    shell-quoted; untracked because the job's path already names its configs)."""
    return lambda wildcards: Untracked(shlex.quote(WF.job_ref(find_job(wildcards, kind))))


def job_lb(rule):
    """Params function: ``python -m lorabench`` with the job's own CPU-time record beside
    its benchmark record (Snakemake's sampled CPU time misses up to 30 s of a job:
    lorabench.runs.costs). Part of the untracked ``lb`` value, so the rule's shell
    command, which Snakemake checks for code changes, stays the same."""
    def value(wildcards):
        record = f"logs/benchmarks/{rule}/{wildcards.experiment}/{wildcards.protocol}/{wildcards.job}.cpu.json"
        return Untracked(f"{LB} {flags(cpu_record=record)}")

    return value


def result_files(experiment=None, protocol=None):
    """The construction and training result files of one experiment and protocol (or every one)."""
    return sorted(j.path for j in JOBS
                  if j.kind != "models" and experiment in (None, j.experiment) and protocol in (None, j.protocol))


def _running(experiment):
    if experiment not in WF.experiments:
        raise WorkflowError(f"experiment {experiment!r} does not run (running: {', '.join(SELECTED)})")


def protocol_results(wildcards):
    _running(wildcards.experiment)
    running = WF.protocols_of(wildcards.experiment)
    if wildcards.protocol not in running:
        raise WorkflowError(f"protocol {wildcards.protocol!r} does not run for {wildcards.experiment} "
                            f"(running: {', '.join(running)})")
    return result_files(wildcards.experiment, wildcards.protocol)


def experiment_runs(wildcards):
    """An experiment's per-protocol rows, of every protocol that runs."""
    _running(wildcards.experiment)
    return [f"results/runs/{wildcards.experiment}/{p}.parquet" for p in WF.protocols_of(wildcards.experiment)]


def figure_selection(name):
    """Input function: the selected rows a figure reads under its protocol, its
    experiments' of that protocol."""

    def inputs(wildcards):
        drawn = FIGURE_PROTOCOLS[name]
        if wildcards.protocol not in drawn:
            raise WorkflowError(f"figure {name} is not drawn under protocol {wildcards.protocol!r} "
                                f"(drawn under: {', '.join(drawn)})")
        return [f"results/selected/{e}/{wildcards.protocol}.parquet" for e in catalog.FIGURE_EXPERIMENTS[name]]

    return inputs


def caption(name):
    path = os.path.join(REPORT_DIR, f"{name}.rst")
    return path if os.path.exists(path) else os.path.join(REPORT_DIR, "figure.rst")


def benchmark_files():
    """Every benchmark record of the jobs this run needs but the costs step's own."""
    out = [f"logs/benchmarks/{j.kind if j.kind != 'models' else 'generate_models'}/{j.experiment}/{j.protocol}/{j.id}.tsv" for j in RUN_JOBS]
    out += [f"logs/benchmarks/aggregate_protocol/{name}/{p}/runs.tsv" for name in SELECTED for p in WF.protocols_of(name)]
    out += [f"logs/benchmarks/aggregate_experiment/{name}/all/runs.tsv" for name in SELECTED]
    out += ["logs/benchmarks/aggregate/all/all/runs.tsv", "logs/benchmarks/claims/all/all/claims.tsv",
            "logs/benchmarks/paper_tables/all/all/paper_tables.tsv"]
    out += [f"logs/benchmarks/figure_{name}/{'+'.join(catalog.FIGURE_EXPERIMENTS[name])}/{p}/figure.tsv"
            for name in FIGURE_NAMES for p in FIGURE_PROTOCOLS[name]]
    return sorted(out)


if workflow.is_main_process:  # not in a job's own Snakemake process (cluster execution)
    print_preview()
