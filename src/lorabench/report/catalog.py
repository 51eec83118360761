"""Which experiments each figure reads, in one place: the workflow requests a figure only
when every experiment it reads runs, and each figure depends only on those experiments'
results. ``tests/test_figures.py`` checks that the keys are the figures of figures.py."""

from __future__ import annotations

from typing import Iterable

FIGURE_EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "linear": ("linear",),
    "fnn": ("fnn",),
    "fnn_log": ("fnn",),
    "tfn": ("tfn",),
    "flt": ("flt",),
    "bias": ("bias",),
    "rank_step": ("rank_step",),
    "classification": ("classification",),
    "distribution_shift": ("classification",),
    "depth": ("depth",),
    "generalization": ("generalization",),
    "training_curves": ("training_curves",),
    "uniform_sv": ("uniform_sv",),
    "threshold_law": ("threshold_law",),
    "methods": ("methods",),
    "tfn_low_rank": ("tfn_low_rank",),
    "tfn_prenorm": ("tfn_prenorm",),
}


def drawn_figures(experiments: Iterable[str]) -> list[str]:
    """The figures whose experiments all run, in catalog order."""
    ran = set(experiments)
    return [name for name, needs in FIGURE_EXPERIMENTS.items() if set(needs) <= ran]


def selection_note(selected: Iterable[str], defined: Iterable[str]) -> str:
    """A Markdown note naming the experiments left out of a run and the figures not drawn
    for it ("" when every defined experiment runs)."""
    selected = list(selected)
    left_out = [name for name in defined if name not in selected]
    if not left_out:
        return ""
    skipped = [name for name in FIGURE_EXPERIMENTS if name not in drawn_figures(selected)]
    return (
        "\n## Experiments not run\n\n"
        f"This run selected {', '.join(selected)} (`--config experiments=[...]`). Not run: "
        f"{', '.join(left_out)}; their claims above read 'not run' and their figures "
        f"({', '.join(skipped) or 'none'}) were not drawn.\n"
    )
