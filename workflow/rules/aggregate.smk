# Stage 3: per experiment and protocol, its result rows (results/runs/<experiment>/
# <protocol>.parquet) and their selection by validation loss (per rank, seed, ... over
# lr x weight decay; results/selected/<experiment>/<protocol>.parquet): a run of one
# protocol never rewrites another's, so runs in pieces (`--config protocols=[...]`)
# combine. Then per experiment its protocols' rows (results/runs/<experiment>.parquet,
# results/selected/<experiment>.parquet), and every experiment's in results/runs.parquet
# and results/selected.parquet.


rule aggregate_protocol:
    input:
        protocol_results,
    output:
        runs="results/runs/{experiment}/{protocol}.parquet",
        selected="results/selected/{experiment}/{protocol}.parquet",
    log:
        "logs/aggregate_protocol/{experiment}/{protocol}.log",
    benchmark:
        "logs/benchmarks/aggregate_protocol/{experiment}/{protocol}/runs.tsv"
    params:
        lb=LB,
    resources:
        runtime=30,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{params.lb} aggregate --out {output.runs} --selected {output.selected} {input} > {log} 2>&1"


rule aggregate_experiment:
    input:
        experiment_runs,
    output:
        runs="results/runs/{experiment}.parquet",
        selected="results/selected/{experiment}.parquet",
    log:
        "logs/aggregate_experiment/{experiment}.log",
    benchmark:
        "logs/benchmarks/aggregate_experiment/{experiment}/all/runs.tsv"
    params:
        lb=LB,
    resources:
        runtime=30,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{params.lb} aggregate --out {output.runs} --selected {output.selected} {input} > {log} 2>&1"


rule aggregate:
    input:
        expand("results/runs/{experiment}.parquet", experiment=SELECTED),
    output:
        runs="results/runs.parquet",
        selected="results/selected.parquet",
    log:
        "logs/aggregate.log",
    benchmark:
        "logs/benchmarks/aggregate/all/all/runs.tsv"
    params:
        lb=LB,
    resources:
        runtime=30,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{params.lb} aggregate --out {output.runs} --selected {output.selected} {input} > {log} 2>&1"
