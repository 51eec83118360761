# Stage 4: figures (results/figures/<name>.png and .pdf, in the report with a caption
# from workflow/report/<name>.rst), claims and the protocol comparison.
try:
    from lorabench.report.figures import FIGURE_NAMES
except ImportError:  # the figures module has not landed: all_figures has no figures yet
    FIGURE_NAMES = []
FIGURE_NAMES = list(FIGURE_NAMES() if callable(FIGURE_NAMES) else FIGURE_NAMES)
FIGURES = expand("results/figures/{name}.{ext}", name=FIGURE_NAMES, ext=("png", "pdf"))
CLAIMS = [
    "results/claims.md",
    "results/claims.csv",
    *expand("results/protocol_comparison.{ext}", ext=("png", "pdf", "md", "csv")),
]
REPORT_DIR = os.path.join(workflow.basedir, "workflow", "report")


def caption(name):
    path = os.path.join(REPORT_DIR, f"{name}.rst")
    return path if os.path.exists(path) else os.path.join(REPORT_DIR, "figure.rst")


rule figures:
    input:
        runs="results/runs.parquet",
        selected="results/selected.parquet",
    output:
        png=[report(f"results/figures/{name}.png", caption=caption(name), category="Figures") for name in FIGURE_NAMES],
        pdf=expand("results/figures/{name}.pdf", name=FIGURE_NAMES),
    log:
        "logs/figures.log",
    resources:
        runtime=30,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{LB} figures --runs {input.runs} --selected {input.selected} --out results/figures > {log} 2>&1"


rule claims:
    input:
        runs="results/runs.parquet",
        selected="results/selected.parquet",
    output:
        md="results/claims.md",
        csv="results/claims.csv",
        comparison=report("results/protocol_comparison.png", caption=caption("protocol_comparison"), category="Protocols"),
        comparison_rest=expand("results/protocol_comparison.{ext}", ext=("pdf", "md", "csv")),
    log:
        "logs/claims.log",
    resources:
        runtime=30,
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "{LB} claims --runs {input.runs} --selected {input.selected} --out results > {log} 2>&1"
