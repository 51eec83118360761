#!/usr/bin/env python
"""Fault script: kill -9 the smoke workflow in the middle of training, resume it
with --rerun-incomplete, and compare its Parquet files to those of an uninterrupted run,
bit for bit except the timing columns.

    python tests/faults/kill_and_resume.py [--keep] [--experiments fnn,tfn] [--cores 2]

Exit status 0 when every check passes. About 2 x the smoke wall time (~5 min on 2 cores);
not part of CI (tests/test_workflow.py has a smaller version of the same fault).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from lorabench.runs.results import RUNS_SCHEMA, SELECTED_SCHEMA, read_table

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
VOLATILE = ["wall_time_s", "device_name", "torch_threads"]  # timing and host, not results


def make_workdir(path: Path, experiments: list[str] | None) -> Path:
    path.mkdir(parents=True)
    shutil.copy(ROOT / "Snakefile", path / "Snakefile")
    shutil.copytree(ROOT / "workflow", path / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    if (ROOT / "envs").exists():
        shutil.copytree(ROOT / "envs", path / "envs")
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["preset"] = "smoke"
    if experiments:
        config["experiments"] = {k: v for k, v in config["experiments"].items() if k in experiments}
        config["presets"]["smoke"]["experiments"] = {
            k: v for k, v in (config["presets"]["smoke"].get("experiments") or {}).items() if k in experiments
        }
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, cores: int) -> None:
    cmd = [SNAKEMAKE, "--cores", str(cores), *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"FAIL: {' '.join(cmd)} in {workdir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def frame(path: Path, schema):
    df = read_table(path, schema).to_pandas().drop(columns=VOLATILE)
    return df.sort_values(["experiment", "config_hash", "checkpoint"]).reset_index(drop=True)


def bitwise_differences(a, b) -> list[str]:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return [f"shape/columns differ: {a.shape} vs {b.shape}"]
    out = []
    for column in a.columns:
        bad = 0
        for x, y in zip(a[column], b[column]):
            if isinstance(x, (float, np.floating)) or isinstance(y, (float, np.floating)):
                same = np.float64(x).tobytes() == np.float64(y).tobytes()
            elif isinstance(x, (list, np.ndarray)):
                same = np.asarray(x).tobytes() == np.asarray(y).tobytes()
            else:
                same = (x is None and y is None) or x == y
            bad += not same
        if bad:
            out.append(f"{column}: {bad} rows differ")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", help="comma-separated subset (default: every experiment)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    args = parser.parse_args()
    experiments = args.experiments.split(",") if args.experiments else None
    base = Path(tempfile.mkdtemp(prefix="lorabench-kill-"))
    ok = True
    try:
        whole = make_workdir(base / "whole", experiments)
        t0 = time.perf_counter()
        snakemake(whole, "all_results", cores=args.cores)
        print(f"uninterrupted run: {time.perf_counter() - t0:.0f} s")

        cut = make_workdir(base / "cut", experiments)
        proc = subprocess.Popen([SNAKEMAKE, "--cores", str(args.cores), "all_results"], cwd=cut,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        cells = cut / "results/cells"
        deadline = time.time() + 600
        # mid-training: some training results written, others still running
        while time.time() < deadline and len(list(cells.rglob("*.parquet"))) < 2 and proc.poll() is None:
            time.sleep(0.1)
        running = subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "lorabench (train|construct)"],
                                 capture_output=True, text=True).stdout.split()
        os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and every job it started
        proc.wait()
        done_at_kill = sorted(p.relative_to(cut) for p in cells.rglob("*.parquet"))
        print(f"killed -9 with {len(done_at_kill)} result files written and {len(running)} lorabench train/construct processes running")
        if proc.returncode != -signal.SIGKILL or not running:
            print("FAIL: the kill did not land in the middle of training")
            ok = False
        if (cut / "results/runs.parquet").exists():
            print("FAIL: runs.parquet exists after the kill")
            ok = False
        leftovers = sorted(p.relative_to(cut) for p in (cut / "results").rglob(".*.tmp"))
        print(f"temporary files left by the killed jobs (never outputs; not read): {len(leftovers)}")
        for path in done_at_kill:  # every file that exists is whole
            read_table(cut / path)

        t0 = time.perf_counter()
        snakemake(cut, "--unlock", cores=args.cores)
        snakemake(cut, "all_results", "--rerun-incomplete", cores=args.cores)
        print(f"resumed run: {time.perf_counter() - t0:.0f} s")
        for name, schema in (("runs", RUNS_SCHEMA), ("selected", SELECTED_SCHEMA)):
            a, b = frame(cut / f"results/{name}.parquet", schema), frame(whole / f"results/{name}.parquet", schema)
            diff = bitwise_differences(a, b)
            n_float = sum(str(t).startswith(("double", "list<item: double")) for t in schema.types)
            print(f"{name}.parquet: {len(a)} rows x {len(a.columns)} columns ({n_float} float columns) compared "
                  f"bit for bit (without {', '.join(VOLATILE)}): {'IDENTICAL' if not diff else 'DIFFERENT'}")
            for line in diff:
                print("   ", line)
            ok &= not diff
        dry = subprocess.run([SNAKEMAKE, "--cores", "1", "-n", "all_results"], cwd=cut, capture_output=True, text=True)
        nothing = "Nothing to be done" in dry.stdout + dry.stderr
        print(f"after resuming, a dry run has nothing to do: {nothing}")
        ok &= nothing
    finally:
        if args.keep:
            print(f"work folders kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
