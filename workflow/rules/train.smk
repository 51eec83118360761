# Stage 2: constructed adapters (method ours) and gradient training (the batched trainer),
# one job per (experiment, protocol, seed). Device, dispatch, threads and Slurm settings
# come from the config at run time and do not trigger reruns.


rule construct:
    input:
        spec=spec_of("construct"),
        models=models_of("construct"),
    output:
        "results/constructions/{experiment}/{protocol}/{job}.parquet",
    log:
        "logs/construct/{experiment}/{protocol}/{job}.log",
    threads: WF.threads
    resources:
        runtime=60,
        mem_mb=4000,
    conda:
        CONDA_ENV
    shell:
        "{LB} construct --spec {input.spec} --models {input.models} --out {output}"
        " --device {config[device]} --threads {threads} > {log} 2>&1"


rule train:
    input:
        spec=spec_of("train"),
        models=models_of("train"),
    output:
        "results/cells/{experiment}/{protocol}/{job}.parquet",
    log:
        "logs/train/{experiment}/{protocol}/{job}.log",
    threads: WF.threads
    resources:
        runtime=WF.slurm.time_min,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{LB} train --spec {input.spec} --models {input.models} --out {output}"
        " --device {config[device]} --threads {threads} --dispatch {config[dispatch]}"
        " --log-dir logs/submitit/{wildcards.experiment}/{wildcards.protocol}/{wildcards.job}"
        " --slurm-partition '{config[slurm][partition]}' --slurm-gpus {config[slurm][gpus]}"
        " --slurm-cpus {config[slurm][cpus]} --slurm-mem-gb {config[slurm][mem_gb]}"
        " --slurm-time-min {config[slurm][time_min]} --slurm-account '{config[slurm][account]}'"
        " --slurm-qos '{config[slurm][qos]}' > {log} 2>&1"
