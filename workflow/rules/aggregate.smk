# Stage 3: per experiment, its result rows (results/runs/<experiment>.parquet) and their
# selection by validation loss (per rank, seed, ... over lr x weight decay;
# results/selected/<experiment>.parquet); then every experiment's rows in
# results/runs.parquet and their selection in results/selected.parquet.


rule aggregate_experiment:
    input:
        experiment_results,
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
