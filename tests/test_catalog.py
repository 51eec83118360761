"""Which experiments each figure reads (lorabench.report.catalog)."""

from lorabench.report import catalog
from lorabench.report.figures import FIGURE_NAMES


def test_every_figure_has_its_experiments():
    assert list(catalog.FIGURE_EXPERIMENTS) == list(FIGURE_NAMES)


def test_only_figures_of_running_experiments_are_drawn():
    assert catalog.drawn_figures(["fnn", "tfn"]) == ["fnn", "fnn_log", "tfn"]
    assert catalog.drawn_figures(["classification"]) == ["classification", "distribution_shift"]
    assert catalog.drawn_figures([]) == []


def test_selection_note_names_what_was_left_out():
    defined = ["linear", "fnn", "tfn"]
    assert catalog.selection_note(defined, defined) == ""
    note = catalog.selection_note(["fnn"], defined)
    assert "Not run: linear, tfn" in note
    not_drawn = note.split("figures (")[1].split(")")[0].split(", ")
    assert "linear" in not_drawn and "tfn" in not_drawn and "fnn" not in not_drawn and "fnn_log" not in not_drawn


def test_threshold_law_figure_needs_only_its_experiment():
    assert catalog.drawn_figures(["threshold_law"]) == ["threshold_law"]


def test_a_figure_is_drawn_under_the_protocols_all_its_experiments_ran_under(monkeypatch):
    ran = {"fnn": ["paper", "reference"], "methods": ["paper"]}
    assert catalog.figure_protocols("fnn_log", ran) == ["paper", "reference"]
    assert catalog.figure_protocols("methods", ran) == ["paper"]
    assert catalog.figure_protocols("tfn", ran) == []
    monkeypatch.setitem(catalog.FIGURE_EXPERIMENTS, "fnn_and_methods", ("fnn", "methods"))
    assert catalog.figure_protocols("fnn_and_methods", ran) == ["paper"]
