"""How many vector multiply-adds one core issues per second, at the native step's widths.

The native steps are built with ``-march=native`` and use the widest vectors the core has
(training_steps.c: 16 floats with AVX-512, 8 with AVX2). What a core issues of each
(how many multiply-add units it has at each width, at what clock under that load) is the
ceiling a step's products run against (docs/speed.md, "How far the transformer step is
from its limit"). This compiles a loop of 12 independent multiply-add chains at each
width with the native build's compiler and flags, and prints the multiply-adds and
GFLOP/s per second of CPU time on one core.

    python benchmarks/fma_throughput.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
/* 12 chains, each its own variable so that it stays in a register (an array would go
 * through memory every round) */
#define STEP(a) a = a * m + c;
#define RATE(NAME, LANES)                                                                        \
    static void NAME(long rounds) {                                                              \
        typedef float v __attribute__((vector_size(4 * LANES)));                                 \
        v m, c, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;                                \
        for (int i = 0; i < LANES; i++) {                                                        \
            m[i] = 0.999999f, c[i] = 1e-7f;                                                      \
            a0[i] = a1[i] = a2[i] = a3[i] = a4[i] = a5[i] = i;                                   \
            a6[i] = a7[i] = a8[i] = a9[i] = a10[i] = a11[i] = i + 1;                             \
        }                                                                                        \
        const double start = cpu_seconds();                                                      \
        for (long k = 0; k < rounds; k++) {                                                      \
            STEP(a0) STEP(a1) STEP(a2) STEP(a3) STEP(a4) STEP(a5)                                \
            STEP(a6) STEP(a7) STEP(a8) STEP(a9) STEP(a10) STEP(a11)                              \
            __asm__("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6),   \
                    "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));                         \
        }                                                                                        \
        const double seconds = cpu_seconds() - start;                                            \
        const v sum = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;               \
        printf("%d %.4f %.1f %g\n", LANES * 32, rounds * 12 / seconds / 1e9,                     \
               rounds * 12.0 * LANES * 2 / seconds / 1e9, sum[0]);                               \
    }
RATE(rate8, 8)
RATE(rate16, 16)
int main(int argc, char **argv) {
    const long rounds = atol(argv[1]);
    rate8(rounds);
#ifdef __AVX512F__
    rate16(rounds);
#endif
    return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="about how long each width runs")
    args = parser.parse_args()
    from lorabench.training import native

    with tempfile.TemporaryDirectory() as folder:
        source, binary = Path(folder) / "fma.c", Path(folder) / "fma"
        source.write_text(SOURCE)
        flags = [f for f in native._flags() if f not in ("-shared", "-fPIC")]
        subprocess.run([native._compiler(), *flags, "-o", str(binary), str(source)], check=True)
        rounds = int(args.seconds * 4e8)  # 12 multiply-adds a round: about 1 s at 5 G/s
        lines = subprocess.run([str(binary), str(rounds)], capture_output=True, text=True, check=True).stdout
    print(f"{'vector bits':>11}  {'G multiply-adds/s':>17}  {'GFLOP/s':>8}")
    rates = {}
    for line in lines.split("\n"):
        if line:
            bits, instructions, gflops, _ = line.split()
            rates[int(bits)] = float(gflops)
            print(f"{bits:>11}  {float(instructions):>17.2f}  {float(gflops):>8.1f}")
    if 512 in rates:
        print(f"512-bit / 256-bit flops: {rates[512] / rates[256]:.2f}")
    else:
        print("no AVX-512: the native step uses 256-bit vectors")


if __name__ == "__main__":
    sys.exit(main())
