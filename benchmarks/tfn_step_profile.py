"""Where the native transformer step spends its time.

Builds the native library with debug lines (in a fresh cache folder, so the normal build
is untouched), trains the transformer cell of ``cell_throughput.py`` (192 configurations,
D=16, H=2, N=10, depth 2, batch 256, validation every step) on one thread under
``perf record``, and charges each sample taken in the step to the part of the step its
inlined call chain runs in (``addr2line -i``). Prints each part's share of the step's
samples; samples outside the library (start-up, torch's test-set evaluation) are left out.

    python benchmarks/tfn_step_profile.py [--steps 200] [--json FILE]

Needs ``perf`` (linux-perf) with permission to sample the process, and ``addr2line``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBUG_BUILD = "from lorabench.training import native; native.FLAGS += ['-g']"  # same cache key in both processes
WORKER = DEBUG_BUILD + """
import runpy, sys
sys.argv = ["cell_throughput.py", "--worker", "tfn", "--steps", "{steps}", "--threads", "1", "--engine", "native"]
runpy.run_path("{script}", run_name="__main__")
"""


def part_of(chain: list[tuple[str, str]], source_line) -> str:
    """The step's part for one sample: chain is innermost first, (function, file:line)."""
    names = [name for name, _ in chain]

    def line_in(function: str) -> str:
        return next((source_line(loc) for name, loc in chain if name == function), "")

    def product_in(block: str, rest: str) -> str:
        line = line_in(block)
        return ("projections X Mq, X Mv^T" if re.search(r"w->m[qv]", line)
                else "feed-forward" if re.search(r"w->w[12]_t", line) else rest)

    if "adam" in names:
        return "Adam update"
    if "tfn_weights" in names:
        return "effective weights (W0 + A B^T) and their products"
    if "add_squared_errors" in names and "tfn_token_pass" in names:
        return "loss and its gradient"
    if "tfn_gradients_from_sums" in names:
        return "backward: LoRA factors' gradients"
    if "tfn_backward_chunk" in names:
        if "attention_backward_impl" in names:
            return "backward: attention (softmax, scores, values)"
        if "tokens_as_lanes" in names:
            return "backward: tokens onto lanes (transposes)"
        if "weight_gradient_add" in names:
            return "backward: weight gradients (X^T G)"
        if "add_column_parts" in names:
            return "backward: bias gradients (column sums)"
        return "backward: gradients w.r.t. activations (G W)"
    if "lanes_validation_loss" in names:  # plain blocks: the validation pass with a sample on each lane
        if "lanes_attention" in names:
            what = "softmax exp" if "vexp" in names else "attention: scores, P V, softmax max, sum, scale"
        elif "lanes_squared_errors" in names:
            what = "loss"
        elif "samples_as_lanes" in names:
            what = "samples onto lanes (transposes)"
        else:
            what = product_in("lanes_block", "output layer")
        return f"forward (validation, samples on lanes): {what}"
    if "tfn_forward_rows" in names:
        which = "validation" if "vx" in line_in("tfn_config_step") else "training"
        if "attention_impl" in names:
            if "vexp" in names:
                what = "softmax exp"
            elif "weighted_rows" in names:
                what = "scores and P V products"
            else:
                what = "softmax max, sum, scale"
        elif "tokens_as_lanes" in names:
            what = "tokens onto lanes (transposes)"
        else:
            what = product_in("tfn_block_forward", "output layer and the rest")
        return f"forward ({which}): {what}"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LORABENCH_CACHE_DIR": tmp}
        worker = WORKER.format(steps=args.steps, script=HERE / "cell_throughput.py")
        # The library is built before perf starts, so the compiler's samples stay out.
        subprocess.run([sys.executable, "-c", DEBUG_BUILD + "; native._build(16)"], env=env, check=True)
        data = Path(tmp) / "perf.data"
        subprocess.run(["perf", "record", "-F", "997", "-o", str(data), sys.executable, "-c", worker], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        library = next(Path(tmp).glob("training_steps-*-w16-n*.so"))
        symbols = {}
        for line in subprocess.run(["nm", str(library)], capture_output=True, text=True, check=True).stdout.split("\n"):
            fields = line.split()
            if len(fields) == 3:
                symbols[fields[2]] = int(fields[0], 16)
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym,symoff,dso"], capture_output=True,
                                text=True, check=True).stdout
        addresses = collections.Counter()
        for line in script.split("\n"):
            match = re.search(r"(\w+)\+0x([0-9a-f]+) \((.*)\)", line)
            if match and match.group(3) == str(library) and match.group(1) in symbols:
                addresses[symbols[match.group(1)] + int(match.group(2), 16)] += 1
        decoded = subprocess.run(["addr2line", "-a", "-f", "-i", "-e", str(library),
                                  *[hex(a) for a in addresses]], capture_output=True, text=True, check=True)
    chains, current, lines = {}, None, decoded.stdout.split("\n")
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("0x"):
            current = int(lines[i], 16)
            chains[current] = []
            i += 1
        else:
            chains[current].append((lines[i], lines[i + 1].split(" ")[0]))
            i += 2
    source = (HERE.parent / "src/lorabench/training/training_steps.c").read_text().split("\n")

    def source_line(location: str) -> str:
        number = location.rsplit(":", 1)[-1]
        return source[int(number) - 1] if number.isdigit() and 0 < int(number) <= len(source) else ""

    parts = collections.Counter()
    for address, count in addresses.items():
        parts[part_of(chains.get(address, []), source_line)] += count
    total = sum(parts.values())
    if not total:
        sys.exit("no samples in the native library: is perf allowed to sample (kernel.perf_event_paranoid)?")
    print(f"{total} samples in the native step ({args.steps} steps of 192 configurations)")
    print(f"{'part of the step':62s} share")
    for part, count in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"{part:62s} {100 * count / total:5.1f}%")
    stages = collections.Counter()
    for part, count in parts.items():
        stages[part.split(":")[0] if ":" in part else "weights, loss, Adam, other"] += count
    attention = sum(c for p, c in parts.items() if "attention" in p or "scores" in p or "softmax" in p)
    print("\nby stage: " + ", ".join(f"{stage} {100 * c / total:.1f}%" for stage, c in stages.most_common())
          + f"; attention (forward and backward) {100 * attention / total:.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"samples": total, "steps": args.steps,
                                         "shares": {p: c / total for p, c in parts.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
