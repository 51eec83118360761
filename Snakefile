# lorabench: the synthetic experiments of Zeng & Lee, "The Expressive Power of Low-Rank
# Adaptation" (ICLR 2024). Target: all_figures. See README.md "Running the workflow".
from snakemake.utils import min_version

min_version("8.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/costs.smk"


rule all_figures:
    input:
        FIGURES,
        CLAIMS,
        PAPER_TABLES,
        "results/costs.csv",
    default_target: True


rule all_runs:  # one piece of a run in pieces (`lorabench plan --pieces 2h`): train and aggregate, draw nothing
    input:
        PIECE,


rule all_results:
    input:
        "results/runs.parquet",
        "results/selected.parquet",
