# Stage 4: one job per figure and protocol (results/figures/<protocol>/<name>.png and .pdf,
# in the report's Figures under the protocol, with a caption from workflow/report/<name>.rst),
# reading only its experiments' selected rows of that protocol; figures of experiments that
# do not run, and protocols they do not run under, are not requested. Then the claims and the
# protocol comparison, with a note naming the experiments left out of the run; and the
# paper's figures side by side with this run's measurements (results/paper_tables.md).

for name in FIGURE_NAMES:

    rule:
        name:
            f"figure_{name}"
        input:
            selected=figure_selection(name),
        output:
            png=report(
                f"results/figures/{{protocol}}/{name}.png",
                caption=caption(name),
                category="Figures",
                subcategory="{protocol}",
            ),
            pdf=f"results/figures/{{protocol}}/{name}.pdf",
        log:
            f"logs/figures/{{protocol}}/{name}.log",
        benchmark:
            f"logs/benchmarks/figure_{name}/{'+'.join(catalog.FIGURE_EXPERIMENTS[name])}/{{protocol}}/figure.tsv"
        params:
            lb=LB,
            name=name,
        resources:
            runtime=30,
            mem_mb=8000,
        conda:
            CONDA_ENV
        shell:
            "{params.lb} figures --selected {input.selected} --name {params.name} --protocol {wildcards.protocol}"
            " --out results/figures > {log} 2>&1"


rule claims:
    input:
        runs="results/runs.parquet",
        selected="results/selected.parquet",
    output:
        md="results/claims.md",
        csv="results/claims.csv",
        comparison=report(
            "results/protocol_comparison.png", caption=caption("protocol_comparison"), category="Protocols"
        ),
        comparison_rest=expand("results/protocol_comparison.{ext}", ext=("pdf", "md", "csv")),
    log:
        "logs/claims.log",
    benchmark:
        "logs/benchmarks/claims/all/all/claims.tsv"
    params:
        lb=LB,
        note=shlex.quote(SELECTION_NOTE),
    resources:
        runtime=30,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{params.lb} claims --runs {input.runs} --selected {input.selected} --out results --note {params.note}"
        " > {log} 2>&1"


rule paper_tables:
    input:
        selected="results/selected.parquet",
    output:
        PAPER_TABLES,
    log:
        "logs/paper_tables.log",
    benchmark:
        "logs/benchmarks/paper_tables/all/all/paper_tables.tsv"
    params:
        lb=LB,
    resources:
        runtime=30,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{params.lb} paper-tables --selected {input.selected} --out {output} > {log} 2>&1"
