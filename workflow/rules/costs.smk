# What every job cost: Snakemake's benchmark record of each job (logs/benchmarks/<rule>/
# <experiment>/<protocol>/...tsv) summed per experiment, rule and protocol into
# results/costs.csv (lorabench.runs.costs).


rule costs:
    input:
        FIGURES,
        CLAIMS,
        PAPER_TABLES,
        "results/runs.parquet",
    output:
        "results/costs.csv",
    log:
        "logs/costs.log",
    params:
        lb=LB,
        records=Untracked(" ".join(shlex.quote(path) for path in benchmark_files())),
    resources:
        runtime=10,
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "{params.lb} costs --out {output} {params.records} > {log} 2>&1"
