"""The native steps with subnormal floats flushed to zero (the default) against IEEE
gradual underflow (``LORABENCH_NATIVE_SUBNORMALS=keep``), in one run.

Late in training, subnormal floats appear in the native steps: softmax weights of
far-off tokens in the transformer, Adam moments of parameters whose gradient has
stopped in deep FNNs. On x86 each operation on one takes a microcode assist.
training_steps.c therefore sets MXCSR's flush-to-zero and denormals-are-zero bits for the
duration of a step. This script measures what that buys and what it changes.

Per cell of the paper preset (its own configs, seed 0, the given number of steps), the
two modes side by side, each in its own process (each builds its own library): the CPU
seconds of the cell; how many of its result rows (last and best state per config) are
identical in every metric; how many selections (per rank, the learning rate and weight
decay with the lowest validation loss among the cell's) pick the same config; the largest
relative difference of the test loss and the best step over all rows, and of the test
loss over the selected rows.

    python benchmarks/subnormals.py                 # 2,000 steps per cell (minutes)
    python benchmarks/subnormals.py --steps 5000    # the paper's full length
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

# (experiment, protocol, predicate on a train job's first config): the cells compared
CELLS = {
    "tfn paper, depth 1": ("tfn", "paper", lambda c: c.target_depth == 1 and not c.pretrained),
    "tfn paper, depth 2": ("tfn", "paper", lambda c: c.target_depth == 2 and not c.pretrained),
    "tfn reference, depth 1": ("tfn", "reference", lambda c: c.target_depth == 1 and not c.pretrained),
    "fnn flt, depth 8": ("flt", "paper", lambda c: c.method == "flt" and not c.pretrained),
    "fnn LoRA, depth 8": ("flt", "paper", lambda c: c.method == "sgd" and c.pretrained),
    "fnn LoRA, (2, 4)": ("fnn", "paper", lambda c: c.target_depth == 2 and not c.pretrained),
    "fnn classification": ("classification", "paper", lambda c: c.task == "classification" and not c.pretrained),
}
METRICS = ("test_loss", "test_shift_loss", "val_loss", "train_loss", "best_step", "diverged")


def run_cell(name: str, steps: int, out: str) -> None:
    """In the child process: train the cell and write its rows and CPU seconds."""
    import time

    import torch

    from lorabench.runs import plan
    from lorabench.runs.runner import cells, native_engine_for, run_configs

    torch.set_num_threads(1)
    experiment, protocol, chosen = CELLS[name]
    _, jobs = plan.load_workflow(str(Path(__file__).resolve().parents[1] / "config.yaml"), "paper", [experiment])
    job = next(j for j in jobs if j.kind == "train" and j.protocol == protocol and j.seed == 0 and chosen(j.configs[0]))
    cell = [c.replace(n_epochs=steps) for c in cells(job.configs, native_engine_for(torch.device("cpu")))[0]]
    list(run_configs(cell[:1], device="cpu"))  # untimed: the build, imports, warm-up
    start = time.process_time()
    rows = list(run_configs(cell, device="cpu"))
    seconds = time.process_time() - start
    with open(out, "wb") as f:
        pickle.dump({"seconds": seconds, "configs": len(cell), "engine": rows[0]["engine"],
                     "rows": rows}, f)


def measure(name: str, steps: int) -> dict:
    """Both modes of one cell, side by side (one process each)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for mode in ("keep", "flush"):
            env = dict(os.environ, LORABENCH_NATIVE_SUBNORMALS=mode)
            procs[mode] = subprocess.Popen([sys.executable, __file__, "--child", name, "--steps", str(steps),
                                            "--out", str(Path(tmp) / f"{mode}.pkl")], env=env)
        out = {}
        for mode, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"{name}, subnormals {mode}: the cell failed")
            with open(Path(tmp) / f"{mode}.pkl", "rb") as f:
                out[mode] = pickle.load(f)
        return out


def selected(rows: list[dict]) -> dict:
    """Per selection group (rank and the rest of the config but the learning rate and the
    weight decay, per checkpoint): the row ``runs.selection`` picks among the cell's."""
    import pandas as pd

    from lorabench.runs.selection import group_columns, select_by_validation

    chosen = select_by_validation(pd.DataFrame(rows))
    keys = group_columns(chosen)
    return {repr([row[k] for k in keys]): row for row in chosen.to_dict("records") if not row["diverged"]}


def relative(a, b) -> float:
    if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the table as JSON to this file")
    args = parser.parse_args()
    if args.child:
        run_cell(args.child, args.steps, args.out)
        return
    table = []
    print(f"{'cell':<24} {'configs':>7} {'keep CPU-s':>10} {'flush CPU-s':>11} {'speed-up':>8}  {'identical rows':>14}  "
          f"{'same selection':>14}  largest relative difference: all rows (test loss, best step); selected rows")
    for name in args.cells:
        both = measure(name, args.steps)
        keep, flush = both["keep"], both["flush"]
        assert keep["engine"] == "native-keep-subnormals" and flush["engine"] == "native", (keep["engine"], flush["engine"])
        pairs = {(r["config_hash"], r["checkpoint"]): r for r in keep["rows"]}
        same, worst = 0, {"test_loss": 0.0, "best_step": 0.0}
        for r in flush["rows"]:
            other = pairs[(r["config_hash"], r["checkpoint"])]
            same += all(relative(r[m], other[m]) == 0.0 for m in METRICS)
            for m in worst:
                worst[m] = max(worst[m], relative(r[m], other[m]))
        chosen_keep, chosen_flush = selected(keep["rows"]), selected(flush["rows"])
        same_choice = sum(chosen_keep[k]["config_hash"] == chosen_flush.get(k, {}).get("config_hash")
                          for k in chosen_keep)
        worst_selected = max((relative(chosen_flush[k]["test_loss"], chosen_keep[k]["test_loss"])
                              for k in chosen_keep if k in chosen_flush), default=0.0)
        row = {"cell": name, "configs": flush["configs"], "steps": args.steps, "keep_cpu_s": keep["seconds"],
               "flush_cpu_s": flush["seconds"], "speedup": keep["seconds"] / flush["seconds"],
               "identical_rows": same, "rows": len(flush["rows"]), "same_selection": same_choice,
               "selections": len(chosen_keep), "max_rel_test_loss": worst["test_loss"],
               "max_rel_best_step": worst["best_step"], "max_rel_selected_test_loss": worst_selected}
        table.append(row)
        print(f"{name:<24} {row['configs']:>7} {row['keep_cpu_s']:>10.1f} {row['flush_cpu_s']:>11.1f} "
              f"{row['speedup']:>7.2f}x  {same:>5} of {len(flush['rows']):<5}  {same_choice:>5} of {len(chosen_keep):<5}  "
              f"{worst['test_loss']:.1e}, {worst['best_step']:.1e}; {worst_selected:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
