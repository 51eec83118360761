"""The paper's figures side by side with what the suite measures: one short table per figure.

Each table row is a quantity the paper states or shows (values read off its figures, so
approximate; figures are named by their section and content, as the figure numbers
differ between the arXiv versions), next to the same quantity measured on the selected
rows, one column per protocol. The measurements are the figures' statistic: the median
over seeds of the selected run (per rank and seed, the lr x weight-decay point with the
lowest validation loss); gradient runs at one checkpoint ('last' by default, the final
state, as the paper), constructions at theirs. ``R*`` is the threshold rank the rows
carry (``threshold_rank``: the theorems' exactness rank of that setting). Nothing is
hard-coded on the measured side: a quantity whose rows are absent reads 'not run'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd

from ..core.config import RunConfig
from .analysis import DEFAULT_CHECKPOINT, curve, present_protocols, rows, threshold
from .style import atomic_write_text, g, markdown_table

NOT_RUN = "not run"
Rank = Union[int, str]  # a rank, or "R*" / "R*-1" (the rows' threshold rank, and one below it)
Measure = Callable[[pd.DataFrame, str, str], str]  # (selected, protocol, checkpoint) -> text


@dataclass(frozen=True)
class Row:
    quantity: str
    paper: str  # what the paper states or its figure shows
    measure: Measure


@dataclass(frozen=True)
class Table:
    title: str
    source: str  # where in the paper
    experiment: str
    rows: tuple[Row, ...]


# ------------------------------------------------------------------ measures
def _resolve(rank: Rank, df: pd.DataFrame) -> Optional[int]:
    if isinstance(rank, int):
        return rank
    thr = threshold(df)
    if thr is None:
        return None
    return thr - 1 if rank == "R*-1" else thr


def _value(selected, protocol, checkpoint, experiment, method, at: Rank, y="test_loss", x="rank", **equal) -> float:
    df = rows(selected, experiment, protocol, method, checkpoint, **equal)
    where = _resolve(at, df)
    return math.nan if df.empty or where is None else curve(df, x, y).at(where)


def median(experiment: str, method: str, at: Rank, y: str = "test_loss", x: str = "rank", **equal) -> Measure:
    """The median over seeds of ``y`` at ``x = at``."""
    def measure(selected, protocol, checkpoint):
        return _text(_value(selected, protocol, checkpoint, experiment, method, at, y, x, **equal))
    return measure


def with_params(experiment: str, method: str, at: int, x: str = "rank", **equal) -> Measure:
    """The median test MSE at ``x = at`` and the run's tunable parameters."""
    def measure(selected, protocol, checkpoint):
        df = rows(selected, experiment, protocol, method, checkpoint, **equal)
        mse = _value(selected, protocol, checkpoint, experiment, method, at, x=x, **equal)
        params = df.loc[df[x] == at, "n_trainable_params"] if not df.empty else pd.Series(dtype=float)
        return _text(mse) + (f" ({int(params.median())} params)" if len(params) and not math.isnan(mse) else "")
    return measure


def threshold_of(experiment: str, **equal) -> Measure:
    def measure(selected, protocol, checkpoint):
        thr = threshold(rows(selected, experiment, protocol, "ours", checkpoint, **equal))
        return NOT_RUN if thr is None else str(thr)
    return measure


def _medians(selected, protocol, checkpoint, experiment, method, y="test_loss", **equal) -> pd.Series:
    return curve(rows(selected, experiment, protocol, method, checkpoint, **equal), "rank", y).as_series()


def crossover(experiment: str, gradient: dict, **equal) -> Measure:
    """The smallest rank at which the construction's median is at or below the gradient
    update's (``gradient``: further filters of the gradient rows)."""
    def measure(selected, protocol, checkpoint):
        ours = _medians(selected, protocol, checkpoint, experiment, "ours", **equal)
        gd = _medians(selected, protocol, checkpoint, experiment, "sgd", **equal, **gradient)
        common = ours.index.intersection(gd.index)
        if not len(common):
            return NOT_RUN
        at = [r for r in sorted(common) if ours[r] <= gd[r]]
        return f"R={int(at[0])}" if at else f"none up to R={int(max(common))}"
    return measure


def quotient(experiment: str, method: str, at: Rank, top: str, bottom: str, **equal) -> Measure:
    """The median of ``top`` over the median of ``bottom`` at ``rank = at`` (e.g. test over
    training MSE: the generalization gap)."""
    def measure(selected, protocol, checkpoint):
        a = _value(selected, protocol, checkpoint, experiment, method, at, top, **equal)
        b = _value(selected, protocol, checkpoint, experiment, method, at, bottom, **equal)
        return _text(a / b) if b and not math.isnan(a) and not math.isnan(b) else NOT_RUN
    return measure


def fraction_below(experiment: str, better: dict, worse: dict, **equal) -> Measure:
    """At how many common ranks the ``better`` gradient curve is below the ``worse`` one."""
    def measure(selected, protocol, checkpoint):
        a = _medians(selected, protocol, checkpoint, experiment, "sgd", **equal, **better)
        b = _medians(selected, protocol, checkpoint, experiment, "sgd", **equal, **worse)
        common = a.index.intersection(b.index)
        return f"{sum(a[r] < b[r] for r in common)} of {len(common)} ranks" if len(common) else NOT_RUN
    return measure


def _text(value: float) -> str:
    return NOT_RUN if value is None or (isinstance(value, float) and math.isnan(value)) else g(value)


# ------------------------------------------------------------------ the tables
RANDOM, PRETRAINED = {"pretrained": 0}, {"pretrained": 1}
FNN_12, FNN_24 = {"target_depth": 1, "frozen_depth": 2}, {"target_depth": 2, "frozen_depth": 4}
BINARY, MULTI = {"task": "binary_classification"}, {"task": "classification"}


RANKS = ((1, "R=1"), ("R*", "R=R*"), (16, "R=16"))
CLIFF = ((1, "R=1"), ("R*-1", "R=R*-1"), ("R*", "R=R*"), (16, "R=16"))  # the transformer's drop at R*


def _rank_rows(experiment: str, panel: str, equal: dict, paper: dict, gradient: Optional[dict] = None,
               ranks=RANKS) -> list[Row]:
    """Construction and gradient update at ``ranks``, and where they cross; ``paper``
    gives the paper's statement per key ('ours R=1', 'sgd R=R*', ..., 'crossover')."""
    gradient = gradient or {}
    out = []
    for method, name, extra in (("ours", "construction", {}), ("sgd", "gradient update", gradient)):
        for at, label in ranks:
            out.append(Row(f"{panel}: {name}, {label}", paper.get(f"{method} {label}", "-"),
                           median(experiment, method, at, **equal, **extra)))
    out.append(Row(f"{panel}: first rank where the construction is at or below the gradient update",
                   paper.get("crossover", "-"), crossover(experiment, gradient, **equal)))
    return out


TABLES: tuple[Table, ...] = (
    Table("Linear model", "Sec. 6, approximation error against rank, linear-model panel; Lemma 1 (Sec. 3)",
          "linear", (
              Row("threshold rank R* = ceil(D/L)", "8 (D=16, L=2)", threshold_of("linear", **RANDOM)),
              *_rank_rows("linear", "random", RANDOM, {
                  "ours R=1": "~0.28", "ours R=R*": "~0 (exact; ~0 already from R ~7)", "ours R=16": "~0",
                  "sgd R=1": "~0.28: coincides with the construction at every rank", "sgd R=R*": "~0",
                  "sgd R=16": "~0", "crossover": "none: the curves coincide"}),
              *_rank_rows("linear", "pretrained", PRETRAINED, {
                  "ours R=1": "~0.083", "ours R=R*": "~0 (from R ~7)", "ours R=16": "~0",
                  "sgd R=1": "~0.083 (coincides)", "sgd R=R*": "~0", "crossover": "none: the curves coincide"}),
          )),
    Table("ReLU FNNs", "Sec. 6, FNN panel (Lbar=2, L=4); Appendix G, FNN approximation (both depth pairs); Sec. 4",
          "fnn", (
              Row("threshold rank R* = ceil(D Lbar/L)", "8 for (Lbar, L) = (1, 2) and (2, 4)", threshold_of("fnn", **FNN_24, **RANDOM)),
              *_rank_rows("fnn", "(2, 4) random", {**FNN_24, **RANDOM}, {
                  "ours R=1": "~0.021", "ours R=R*": "~0 (from R ~7-8)", "ours R=16": "~0",
                  "sgd R=1": "~0.009: below the construction",
                  "sgd R=R*": "plateau ~5e-4 to 1.5e-3, never exactly 0", "sgd R=16": "plateau ~5e-4 to 1.5e-3",
                  "crossover": "R ~5-6"}, {"tune_bias": 1}),
              *_rank_rows("fnn", "(2, 4) pretrained", {**FNN_24, **PRETRAINED}, {
                  "ours R=1": "~0.020", "sgd R=1": "~0.0065", "crossover": "similar to random"}, {"tune_bias": 1}),
              *_rank_rows("fnn", "(1, 2) random", {**FNN_12, **RANDOM}, {
                  "ours R=1": "~0.11", "ours R=R*": "~1e-9 to 1e-11 (log scale)", "ours R=16": "~1e-9 to 1e-11",
                  "sgd R=1": "~0.087",
                  "sgd R=R*": "plateau ~1e-5 to 5e-5 (log scale)", "sgd R=16": "plateau ~1e-5 to 5e-5",
                  "crossover": "the construction is the lower from R ~7-8"}, {"tune_bias": 1}),
          )),
    Table("Transformer networks (H=2, N=10)", "Appendix G, TFN approximation; Theorem 7 (Sec. 5)", "tfn", (
        Row("threshold rank R* = ceil(D/2)", "8 (D=16)", threshold_of("tfn", target_depth=1, **RANDOM)),
        *_rank_rows("tfn", "depth 1 random", {"target_depth": 1, **RANDOM}, {
            "ours R=R*-1": "~1", "ours R=R*": "~1e-6: about six orders of magnitude below R=7",
            "ours R=16": "~1e-6 or below", "sgd R=1": "~10", "sgd R=R*": "plateau ~1 (from R ~7)",
            "sgd R=16": "plateau ~1", "crossover": "R=8 at the latest"}, ranks=CLIFF),
        *_rank_rows("tfn", "depth 2 random", {"target_depth": 2, **RANDOM}, {
            "ours R=R*-1": "~1e2", "ours R=R*": "~1e-2 to 1e-3",
            "sgd R=1": "~150-160: flat at every rank", "sgd R=R*": "~150-160", "sgd R=16": "~150-160 (training fails)",
            "crossover": "R=8 at the latest"}, ranks=CLIFF),
        *_rank_rows("tfn", "depth 1 pretrained", {"target_depth": 1, **PRETRAINED}, {
            "sgd R=1": "~6", "sgd R=16": "~0.2-0.5", "crossover": "similar to random"}),
    )),
    Table("Final-layer tuning against LoRA (Lbar=1, L=8)",
          "Appendix G.4, comparison to tuning final layers; Table 1 finding 3; Lemma 4", "flt", (
              Row("random: LoRA R=1", "~0.083 at 256 parameters", with_params("flt", "sgd", 1, **RANDOM)),
              Row("random: final-layer tuning, last 1 layer", "~0.118 at 256 parameters",
                  with_params("flt", "flt", 1, x="last_layers", **RANDOM)),
              Row("random: final-layer tuning, last 7 layers", "~0.073 at 1,792 parameters",
                  with_params("flt", "flt", 7, x="last_layers", **RANDOM)),
              Row("random: LoRA R=7", "~0.01 from ~2,500 parameters: below final-layer tuning at equal parameters",
                  with_params("flt", "sgd", 7, **RANDOM)),
              Row("random: LoRA R=16", "~0.01", with_params("flt", "sgd", 16, **RANDOM)),
              Row("pretrained: LoRA R=1", "~0.038", with_params("flt", "sgd", 1, **PRETRAINED)),
              Row("pretrained: final-layer tuning, last 1 layer", "~0.050", with_params("flt", "flt", 1, x="last_layers", **PRETRAINED)),
              Row("pretrained: final-layer tuning, last 7 layers", "~0.029", with_params("flt", "flt", 7, x="last_layers", **PRETRAINED)),
              Row("pretrained: LoRA R=16", "~0.005-0.01", with_params("flt", "sgd", 16, **PRETRAINED)),
          )),
    Table("Fixed against updatable biases (Lbar=1, L=2)",
          "Appendix G, benefit of updating biases; Table 1 finding 4", "bias", (
              Row("random: fixed biases, R=1", "~0.11", median("bias", "sgd", 1, tune_bias=0, **RANDOM)),
              Row("random: updatable biases, R=1", "~0.088", median("bias", "sgd", 1, tune_bias=1, **RANDOM)),
              Row("random: updatable biases, R=8", "~0 (from R ~6-7)", median("bias", "sgd", 8, tune_bias=1, **RANDOM)),
              Row("random: fixed biases, R=8", "above 0 (reaches ~0 only by R ~12-16)", median("bias", "sgd", 8, tune_bias=0, **RANDOM)),
              Row("random: fixed biases, R=16", "~0", median("bias", "sgd", 16, tune_bias=0, **RANDOM)),
              Row("random: ranks where updatable < fixed", "every rank",
                  fraction_below("bias", {"tune_bias": 1}, {"tune_bias": 0}, **RANDOM)),
              Row("pretrained: fixed biases, R=1", "~0.047", median("bias", "sgd", 1, tune_bias=0, **PRETRAINED)),
              Row("pretrained: updatable biases, R=1", "~0.025", median("bias", "sgd", 1, tune_bias=1, **PRETRAINED)),
              Row("pretrained: ranks where updatable < fixed", "every rank",
                  fraction_below("bias", {"tune_bias": 1}, {"tune_bias": 0}, **PRETRAINED)),
          )),
    Table("Classification and distribution shift (random frozen models)",
          "Appendix G, classification and distribution shift", "classification", tuple(
              row
              for task, name, paper in (
                  (BINARY, "binary", {"R=0": "~0.52 (1, 2); ~0.57 (2, 4)", "ours 1": "~0.65", "ours 8": "1.00 (from R=8)",
                                      "gd": "~0.83-0.87 at every R >= 1",
                                      "shift (1, 2)": "~0.86 in distribution, ~0.80 shifted",
                                      "shift (2, 4)": "~0.86 in distribution, ~0.70-0.77 shifted"}),
                  (MULTI, "16 classes", {"R=0": "~0.1 (1, 2); ~0.22 (2, 4)", "ours 8": "1.00 (from R=8)",
                                         "gd": "saturates ~0.72-0.75 (1, 2), ~0.65 (2, 4)",
                                         "shift (1, 2)": "~0.73 in distribution, ~0.58 shifted",
                                         "shift (2, 4)": "~0.65 in distribution, ~0.42 shifted"}),
              )
              for pair, pair_name in ((FNN_12, "(1, 2)"), (FNN_24, "(2, 4)"))
              for row in (
                  Row(f"{name} {pair_name}: construction accuracy, R=0", paper["R=0"],
                      median("classification", "ours", 0, y="test_accuracy", **task, **pair)),
                  Row(f"{name} {pair_name}: construction accuracy, R=1", paper.get("ours 1", "-"),
                      median("classification", "ours", 1, y="test_accuracy", **task, **pair)),
                  Row(f"{name} {pair_name}: construction accuracy, R=R*", paper["ours 8"],
                      median("classification", "ours", "R*", y="test_accuracy", **task, **pair)),
                  Row(f"{name} {pair_name}: gradient update accuracy, R=1", paper["gd"],
                      median("classification", "sgd", 1, y="test_accuracy", **task, **pair)),
                  Row(f"{name} {pair_name}: gradient update accuracy, R=16", paper["gd"],
                      median("classification", "sgd", 16, y="test_accuracy", **task, **pair)),
                  Row(f"{name} {pair_name}: gradient update accuracy on shifted inputs (x5), R=16", paper[f"shift {pair_name}"],
                      median("classification", "sgd", 16, y="test_shift_accuracy", **task, **pair)),
              )
          )),
    Table("Generalization from a finite training set (20,000 steps)", "Appendix G, generalization",
          "generalization", (
              Row("(1, 2), n_train=400: gradient update training MSE, R=16", "~1e-7: keeps falling with R",
                  median("generalization", "sgd", 16, y="train_loss", **FNN_12)),
              Row("(1, 2), n_train=400: gradient update test MSE, R=R*", "~1e-3: plateau from R=8",
                  median("generalization", "sgd", "R*", **FNN_12)),
              Row("(1, 2), n_train=400: gradient update test MSE, R=16", "~1e-3",
                  median("generalization", "sgd", 16, **FNN_12)),
              Row("(1, 2): gradient update test / training MSE, R=16", "~1e4 (overfitting)",
                  quotient("generalization", "sgd", 16, "test_loss", "train_loss", **FNN_12)),
              Row("(1, 2): construction test MSE, R=R*", "~1e-9 (exact from R=8)", median("generalization", "ours", "R*", **FNN_12)),
              Row("(2, 4), n_train=800: gradient update training MSE, R=1", "~3e-2 (training ~ test)",
                  median("generalization", "sgd", 1, y="train_loss", **FNN_24)),
              Row("(2, 4), n_train=800: gradient update test MSE, R=1", "~3e-2", median("generalization", "sgd", 1, **FNN_24)),
              Row("(2, 4), n_train=800: gradient update training MSE, R=16", "~4e-4 (training ~ test)",
                  median("generalization", "sgd", 16, y="train_loss", **FNN_24)),
              Row("(2, 4), n_train=800: gradient update test MSE, R=16", "~4e-4", median("generalization", "sgd", 16, **FNN_24)),
              Row("(2, 4): gradient update test / training MSE, R=16", "~1 (no gap)",
                  quotient("generalization", "sgd", 16, "test_loss", "train_loss", **FNN_24)),
              Row("(2, 4): construction test MSE, R=R*", "~1e-9 (exact from R=8)", median("generalization", "ours", "R*", **FNN_24)),
          )),
    Table("Training curves (final training loss, random frozen models)",
          "Appendix G, training curves (one best run per rank in the paper; here the median over seeds)",
          "training_curves", tuple(
              Row(f"{name}: final training loss, R={rank}", paper, median("training_curves", "sgd", rank, y="train_loss", **pair))
              for pair, name, values in (
                  (FNN_12, "(1, 2)", {1: "~0.1 (stalls)", 4: "~1e-2", 8: "~1e-4", 13: "~1e-6 to 1e-7", 16: "~1e-6 to 1e-7"}),
                  (FNN_24, "(2, 4)", {1: "~5e-3 (plateau)", 4: "~5e-3 (plateau)", 8: "between 2e-4 and 5e-3",
                                      13: "between 2e-4 and 5e-3", 16: "~2e-4 (plateau)"}),
              )
              for rank, paper in values.items()
          )),
    Table("Beyond the paper: every method against its parameter budget (FNN (1, 2), random frozen model)",
          "not in the paper: its question asked of other adapters (the methods experiment)", "methods", tuple(
              Row(f"{label}, R=4", "not in the paper", median("methods", method, 4, **FNN_12, **RANDOM))
              for method, label in (("ours", "construction"), ("sgd", "LoRA (gradient)"), ("dora", "DoRA"),
                                    ("vera", "VeRA"), ("pissa", "PiSSA"))
          ) + (Row("full fine-tuning", "not in the paper",
                   median("methods", "full", RunConfig.rank, **FNN_12, **RANDOM)),)),
    Table("Beyond the paper: the transformer below its threshold (D = 16, random frozen model)",
          "not in the paper, which bounds the transformer's error only from R* = D/2 on (Sec. 5)", "tfn_low_rank", tuple(
              Row(f"L={depth}: {label}, R={rank}", "no bound below R* in the paper",
                  median("tfn_low_rank", method, rank, width=16, target_depth=depth))
              for depth in (1, 2) for rank in (1, 4)
              for method, label in (("ours", "construction"), ("sgd", "gradient update"),
                                    ("lora_from_construction", "gradient update from the construction"))
          )),
    Table("Beyond the paper: pre-norm residual blocks with LayerNorm (D = 16, random frozen model)",
          "not in the paper, whose transformer has no skip connections or LayerNorm (Sec. 5)", "tfn_prenorm", tuple(
              Row(f"L={depth}: gradient update, {name}, R={rank}",
                  "not in the paper" if prenorm else "see the TFN figure (Appendix G)",
                  median("tfn_prenorm", "sgd", rank, target_depth=depth, prenorm=prenorm))
              for depth in (1, 2) for prenorm, name in ((0, "plain"), (1, "pre-norm")) for rank in (1, 8, 16)
          )),
)


# ------------------------------------------------------------------ writing
def _seeds(selected: pd.DataFrame, experiment: str, protocol: str) -> int:
    if selected is None or selected.empty or "experiment" not in selected:
        return 0
    part = selected[(selected["experiment"] == experiment) & (selected["protocol"] == protocol)]
    return int(part["seed"].nunique()) if not part.empty else 0


def table_frame(table: Table, selected: pd.DataFrame, protocols: list[str],
                checkpoint: str = DEFAULT_CHECKPOINT) -> pd.DataFrame:
    """One figure's side-by-side table: quantity, the paper, and a column per protocol."""
    out = []
    for row in table.rows:
        values = {"quantity": row.quantity, "the paper": row.paper}
        for protocol in protocols:
            ran = _seeds(selected, table.experiment, protocol) > 0
            values[f"measured ({protocol})"] = row.measure(selected, protocol, checkpoint) if ran else NOT_RUN
        out.append(values)
    return pd.DataFrame(out, columns=["quantity", "the paper", *[f"measured ({p})" for p in protocols]])


def paper_tables_markdown(selected: pd.DataFrame, checkpoint: str = DEFAULT_CHECKPOINT) -> str:
    protocols = present_protocols(selected)
    lines = [
        "# The paper's figures side by side with this run",
        "",
        "For each synthetic figure of Zeng & Lee (ICLR 2024): what the paper states or its figure shows "
        "(values read off the figures, so approximate), and the same quantity measured here: the median "
        f"over seeds of the selected runs (gradient runs at checkpoint '{checkpoint}'; constructions as built). "
        "R* is the threshold rank of the setting (the theorems' exactness rank); (Lbar, L) are the target "
        "and frozen depths. 'not run': no rows for it in these results.",
    ]
    for table in TABLES:
        seeds = ", ".join(f"{p}: {_seeds(selected, table.experiment, p)}" for p in protocols)
        frame = table_frame(table, selected, protocols, checkpoint)
        lines += ["", f"## {table.title}", "", f"Paper: {table.source}. Seeds measured: {seeds}.", "",
                  markdown_table(frame, list(frame.columns))]
    return "\n".join(lines) + "\n"


def write_paper_tables(selected: pd.DataFrame, out, checkpoint: str = DEFAULT_CHECKPOINT) -> Path:
    """The tables as Markdown in ``out`` (written atomically)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, paper_tables_markdown(selected, checkpoint))
