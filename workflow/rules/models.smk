# Stage 1: the frozen + target models of each (experiment, protocol, seed); the job specs
# (results/specs/..., the RunConfigs of each job) are written by common.smk.


rule generate_models:
    input:
        spec=spec_of("models"),
    output:
        "results/models/{experiment}/{protocol}/{job}.pt",
    log:
        "logs/generate_models/{experiment}/{protocol}/{job}.log",
    threads: WF.threads
    resources:
        runtime=60,
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "{LB} models --spec {input.spec} --out {output} --threads {threads} > {log} 2>&1"
