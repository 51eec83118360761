# Stage 1: the frozen + target models of each (experiment, protocol, seed). The step
# expands its job again from the job's reference (params.job): no spec files.


rule generate_models:
    output:
        "results/models/{experiment}/{protocol}/{job}.pt",
    log:
        "logs/generate_models/{experiment}/{protocol}/{job}.log",
    benchmark:
        "logs/benchmarks/generate_models/{experiment}/{protocol}/{job}.tsv"
    params:
        lb=job_lb("generate_models"),
        job=job_ref("models"),
    threads: WF.threads
    resources:
        runtime=60,
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "{params.lb} models --job {params.job} --out {output} --threads {threads} > {log} 2>&1"
