# Stage 3: every result row in results/runs.parquet; selection by validation loss (per
# rank, seed, ... over lr x weight decay) in results/selected.parquet.


rule aggregate:
    input:
        result_files(),
    output:
        "results/runs.parquet",
    log:
        "logs/aggregate.log",
    resources:
        runtime=30,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{LB} aggregate --out {output} {input} > {log} 2>&1"


rule select:
    input:
        "results/runs.parquet",
    output:
        "results/selected.parquet",
    log:
        "logs/select.log",
    resources:
        runtime=30,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{LB} select --runs {input} --out {output} > {log} 2>&1"
