"""Which experiments each figure reads, in one place: the workflow requests a figure only
when every experiment it reads runs, under each protocol they all run under, and each
figure depends only on those experiments' results. ``tests/test_catalog.py`` checks that
the keys are the figures of figures.py."""

from __future__ import annotations

from typing import Iterable, Mapping

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


def figure_protocols(name: str, protocols: Mapping[str, Iterable[str]]) -> list[str]:
    """The protocols figure ``name`` is drawn under, given each experiment's protocols
    (``protocols``: experiment -> its protocols): those every experiment it reads has, in
    the first one's order. A protocol missing one of them would leave its panels empty."""
    first, *rest = (list(protocols.get(experiment, ())) for experiment in FIGURE_EXPERIMENTS[name])
    return [p for p in first if all(p in other for other in rest)]


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
