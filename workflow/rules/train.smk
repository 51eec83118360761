# Stage 2: constructed adapters (method ours) and gradient training (the batched trainer),
# one job per (experiment, protocol, seed). Device, dispatch, threads and Slurm settings
# come from the config as untracked, shell-quoted params: they never rerun a job.


rule construct:
    input:
        models=models_of("construct"),
    output:
        "results/constructions/{experiment}/{protocol}/{job}.parquet",
    log:
        "logs/construct/{experiment}/{protocol}/{job}.log",
    benchmark:
        "logs/benchmarks/construct/{experiment}/{protocol}/{job}.tsv"
    params:
        lb=job_lb("construct"),
        job=job_ref("construct"),
        device=DEVICE,
    threads: WF.threads
    resources:
        runtime=60,
        mem_mb=4000,
    conda:
        CONDA_ENV
    shell:
        "{params.lb} construct --job {params.job} --models {input.models} --out {output}"
        " {params.device} --threads {threads} > {log} 2>&1"


rule train:
    input:
        models=models_of("train"),
        reuse=reused_outputs,
    output:
        "results/cells/{experiment}/{protocol}/{job}.parquet",
    log:
        "logs/train/{experiment}/{protocol}/{job}.log",
    benchmark:
        "logs/benchmarks/train/{experiment}/{protocol}/{job}.tsv"
    params:
        lb=job_lb("train"),
        job=job_ref("train"),
        device=DEVICE,
        dispatch=DISPATCH,
    threads: WF.threads
    resources:
        runtime=WF.slurm.time_min,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{params.lb} train --job {params.job} --models {input.models} --reuse {input.reuse} --out {output}"
        " {params.device} --threads {threads} {params.dispatch}"
        " --log-dir logs/submitit/{wildcards.experiment}/{wildcards.protocol}/{wildcards.job} > {log} 2>&1"
