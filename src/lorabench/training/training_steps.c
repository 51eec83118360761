/* One training step of many configurations (FNN or TFN), each in its own core-local
 * working set.
 *
 * For every configuration c of [c_begin, c_end): the effective weights (W0 + A B^T for
 * LoRA, the weights themselves for final-layer tuning), forward pass on the training
 * batch, loss and hand-written backward pass, torch.optim.Adam's update (L2 weight decay
 * added to the gradient, bias correction, eps) on the trainable entries, then the loss
 * on the validation set with the updated parameters.
 *
 * Why C: at the paper's width (D = 16) a configuration's whole step is a few MFLOP on
 * 16 x 16 matrices. Done as stacked torch operations, the time goes to elementwise
 * passes over (C, B, D) tensors and to batched products of tiny matrices; here a
 * configuration's activations stay in cache from the forward pass to the update, and
 * every 16-wide row is one SIMD register.
 *
 * Configurations are independent: a configuration's numbers do not depend on which
 * others share the call, nor on how callers split [0, C) across threads.
 *
 * FNN layouts (float32, row-major): frozen weights (C, L, D, D) with W[i][j] mapping input
 * j to output i (y = W x + b); parameters (C, P): LoRA a (L, D, D), b (L, D, D), then
 * biases (L, D) when present; final-layer tuning: weights (L, D, D), biases (L, D).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__) && !defined(KEEP_SUBNORMALS)
#include <xmmintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))

/* The training steps run with subnormal floats (below 2^-126, about 1.2e-38) flushed to
 * zero, as inputs and as results (x86 MXCSR FTZ and DAZ), restored on return so that the
 * caller's arithmetic is untouched. Softmax weights of far-off tokens, and Adam moments
 * decaying after their gradient stops, fall into that range; on x86 every operation on
 * them takes a microcode assist, which made a transformer step about 1.6x and a deep FNN
 * step up to 5x slower late in training. A subnormal's contribution is below float32's
 * resolution wherever it is added to a normal number, so flushing changes a result only
 * where every term of a sum is that small. Build with -DKEEP_SUBNORMALS for IEEE gradual
 * underflow (native.py: LORABENCH_NATIVE_SUBNORMALS=keep). */
#if defined(__SSE__) && !defined(KEEP_SUBNORMALS)
#define FTZ_DAZ 0x8040u
INLINE unsigned flush_subnormals(void) {
    const unsigned old = _mm_getcsr();
    _mm_setcsr(old | FTZ_DAZ);
    return old;
}
INLINE void restore_float_mode(unsigned old) { _mm_setcsr(old); }
#else
INLINE unsigned flush_subnormals(void) { return 0; }
INLINE void restore_float_mode(unsigned old) { (void)old; }
#endif
/* Floats per vector: one register of the widest vector unit. Wider generic vectors than
 * the hardware's are split by the compiler into pieces that live on the stack (on an AVX2
 * core the 16-lane build ran the transformer step 3.5-5x slower). The arithmetic does not
 * depend on the width: every output is summed in the same order, and the one reduction
 * across lanes (sum16) is written for 16 lanes whatever the width; only the compiler's
 * choice of which multiply-adds to fuse may differ (docs/speed.md). Widths must be multiples of 16
 * (native.py checks), so of LANES too. */
#ifndef LANES
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
#endif
#define MAX_WIDTH 64
/* The most tokens a transformer step of this build takes (native.py builds 16 unless a run
 * needs more: each query vector of a score row is one more copy of the attention passes,
 * and those copies take most of the build time). */
#ifndef MAX_TOKENS
#define MAX_TOKENS 64
#endif

/* GCC/Clang vector extensions; `vec_u` may be unaligned. */
typedef float vec __attribute__((vector_size(4 * LANES)));
typedef float vec_u __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int ivec __attribute__((vector_size(4 * LANES)));

INLINE vec load(const float *p) { return *(const vec_u *)p; }
INLINE void store(float *p, vec v) { *(vec_u *)p = v; }
#if LANES == 16
#define EVERY_LANE(i) i, i, i, i, i, i, i, i, i, i, i, i, i, i, i, i
#elif LANES == 8
#define EVERY_LANE(i) i, i, i, i, i, i, i, i
#else
#error "LANES must be 8 or 16"
#endif
/* Every lane x. (Not (vec){0} + x: that is a scalar 0 + x first, which the compiler must
 * keep (it turns -0 into +0), and it keeps the broadcast out of the FMA's memory operand.) */
INLINE vec splat(float x) { return __builtin_shufflevector((vec){x}, (vec){x}, EVERY_LANE(0)); }
/* v where keep is true, else 0 (a NaN in v is kept when keep is true). */
INLINE vec keep_where(ivec keep, vec v) { return (vec)((ivec)v & keep); }

#define SUM16_PARTS (16 / LANES) /* vectors in 16 lanes */
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));
/* The sum of 16 lanes (parts[0] holds the first LANES of them) as a tree of halvings: the
 * same order whatever LANES is, and no chain of 16 dependent scalar adds. */
INLINE float sum16(const vec parts[SUM16_PARTS]) {
    vec8 half;
#if LANES == 16
    vec8 lo, hi;
    memcpy(&lo, &parts[0], sizeof lo);
    memcpy(&hi, (const char *)&parts[0] + sizeof lo, sizeof hi);
    half = lo + hi;
#else
    half = parts[0] + parts[1];
#endif
    vec4 a, b;
    memcpy(&a, &half, sizeof a);
    memcpy(&b, (const char *)&half + sizeof a, sizeof b);
    const vec4 quarter = a + b;
    return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

enum { REGRESSION = 0, CLASSIFICATION = 1, BINARY = 2 };
/* Or'ed into a classification task: cross entropy against the target's argmax class
 * (one-hot weights) instead of the target's outputs as weights. */
enum { LABELS = 4 };

typedef struct {
    int depth, width, batch, val_batch;
    int full;     /* 1: parameters are the weights (final-layer tuning); 0: LoRA */
    int has_bias; /* biases exist (and are stored in the parameters) */
    int relu;     /* 1: ReLU after every layer; 0: linear */
    int task;
    long n_param, off_a, off_b, off_bias; /* final-layer tuning: the weights at off_a */
    long x_stride, y_stride;              /* 0: one batch shared by every configuration */
} Shape;

typedef struct {
    float beta1, beta2, eps, bias_correction2_sqrt;
} AdamConsts;

/* What happens to an output row besides the sum: started from a bias vector (else from 0,
 * or from out itself with accumulate), then zeroed where negative (relu; a NaN stays a
 * NaN, as with torch.relu) or where the gate row is not positive (the backward pass
 * through a ReLU; gate rows are `ld` floats apart, as the output's). */
typedef struct {
    int accumulate;
    const float *bias;
    int relu;
    const float *gate;
} RowsEnd;

#define PLAIN ((RowsEnd){0, NULL, 0, NULL})
#define ACCUMULATE ((RowsEnd){1, NULL, 0, NULL})

/* out[r] = sum_j a[r * a_row + j * a_col] m[j] for R rows at once, j < J: R independent
 * FMA chains per output vector keep the FMA units busy (one row alone is a chain of J
 * dependent FMAs), and each row of m is loaded once for all of them. The rows of m and
 * out are NV vectors wide, `ld` floats apart; a_row = 1 reads a transposed. */
#ifdef __AVX512F__
/* 16 accumulators, half the 32 vector registers: 16 rows at D = 16. (8 rows ran the
 * transformer step 1.05x slower, 24 rows 1.17x slower, on a 2-core Xeon with AVX-512.) */
#define ROW_BLOCK(NV) (16 / (NV))
#else /* AVX2: 16 registers of 8 lanes; at D = 16 (two vectors a row) 2, 4 and 6 rows ran
      * the transformer step equally fast on a znver3 core, within the machine's noise */
#define ROW_BLOCK(NV) 2
#endif
#define MAX_ROW_BLOCK 16
INLINE void weighted_rows_block(const float *restrict a, long a_row, long a_col, const int R, int J,
                                const float *restrict m, long ld, RowsEnd end, float *restrict out, const int NV) {
    vec acc[MAX_ROW_BLOCK][MAX_WIDTH / LANES];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NV; q++)
            acc[r][q] = end.accumulate ? load(out + r * ld + q * LANES)
                        : end.bias     ? load(end.bias + q * LANES)
                                       : splat(0.0f);
    for (int j = 0; j < J; j++)
        for (int q = 0; q < NV; q++) {
            const vec mv = load(m + j * ld + q * LANES);
            for (int r = 0; r < R; r++) acc[r][q] += splat(a[r * a_row + j * a_col]) * mv;
        }
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NV; q++) {
            vec o = acc[r][q];
            if (end.relu) o = keep_where(~(o < 0.0f), o);
            if (end.gate) o = keep_where(load(end.gate + r * ld + q * LANES) > 0.0f, o);
            store(out + r * ld + q * LANES, o);
        }
}

/* weighted_rows_block over n output rows: blocks of `block`, then 8, 4, 2, 1 below it. */
INLINE void weighted_rows_by(const int block, const float *restrict a, long a_row, long a_col, long n, int J,
                             const float *restrict m, long ld, RowsEnd end, float *restrict out, const int NV) {
    long r = 0;
    RowsEnd at = end;
    for (; r + block <= n; r += block) {
        at.gate = end.gate ? end.gate + r * ld : NULL;
        weighted_rows_block(a + r * a_row, a_row, a_col, block, J, m, ld, at, out + r * ld, NV);
    }
#define TAIL_BLOCK(R)                                                                                              \
    if (n - r >= R) {                                                                                              \
        at.gate = end.gate ? end.gate + r * ld : NULL;                                                             \
        weighted_rows_block(a + r * a_row, a_row, a_col, R, J, m, ld, at, out + r * ld, NV);                       \
        r += R;                                                                                                    \
    }
    if (block > 8) TAIL_BLOCK(8)
    if (block > 4) TAIL_BLOCK(4)
    if (block > 2) TAIL_BLOCK(2)
    TAIL_BLOCK(1)
#undef TAIL_BLOCK
}

INLINE void weighted_rows(const float *restrict a, long a_row, long a_col, long n, int J, const float *restrict m,
                          long ld, RowsEnd end, float *restrict out, const int NV) {
    weighted_rows_by(ROW_BLOCK(NV), a, a_row, a_col, n, J, m, ld, end, out, NV);
}

/* weighted_rows for the rows of one sample's tokens (10 in the paper's transformer):
 * blocks of at most 8. Below 16 rows that is the same split as weighted_rows', and it
 * leaves out the 16-row block's code, which these products seldom run (it took 1 s of the
 * build). */
INLINE void weighted_rows_few(const float *restrict a, long a_row, long a_col, long n, int J,
                              const float *restrict m, long ld, RowsEnd end, float *restrict out, const int NV) {
    weighted_rows_by(ROW_BLOCK(NV) < 8 ? ROW_BLOCK(NV) : 8, a, a_row, a_col, n, J, m, ld, end, out, NV);
}

/* out = in M (n rows of D), with bias, ReLU and gate as in RowsEnd. */
INLINE void matmul(const float *restrict in, long n, const float *restrict M, const float *restrict bias, int relu,
                   const float *restrict gate, float *restrict out, const int D, const int NV) {
    weighted_rows(in, D, 1, n, D, M, D, (RowsEnd){0, bias, relu, gate}, out, NV);
}

/* out += in M. */
INLINE void matmul_add(const float *restrict in, long n, const float *restrict M, float *restrict out, const int D,
                       const int NV) {
    weighted_rows(in, D, 1, n, D, M, D, ACCUMULATE, out, NV);
}

/* out[b] = act(W in[b] + bias), with wt = W^T. */
INLINE void affine(const float *restrict in, int n, const float *restrict wt, const float *restrict bias, int relu,
                   float *restrict out, const int D, const int NV) {
    matmul(in, n, wt, bias, relu, NULL, out, D, NV);
}

/* The column sums of g (n rows of D) in four parts: parts[j] (row j of parts, 4 x D) adds
 * the rows j, j + 4, j + 8, ..., and rows past the last multiple of 4 go to parts[0]. A
 * batch taken in chunks whose row counts are multiples of 4 (but the last) adds each
 * row to the same part as in one call. */
INLINE void add_column_parts(const float *restrict g, long n, float *restrict parts, const int D, const int NV) {
    for (int q = 0; q < NV; q++) {
        vec part[4];
        for (int j = 0; j < 4; j++) part[j] = load(parts + j * D + q * LANES);
        long b = 0;
        for (; b + 4 <= n; b += 4)
            for (int j = 0; j < 4; j++) part[j] += load(g + (b + j) * D + q * LANES);
        for (; b < n; b++) part[0] += load(g + b * D + q * LANES);
        for (int j = 0; j < 4; j++) store(parts + j * D + q * LANES, part[j]);
    }
}

/* db = the column sums from add_column_parts' parts. */
INLINE void column_sums(const float *restrict parts, float *restrict db, const int D, const int NV) {
    for (int q = 0; q < NV; q++) {
        const float *at = parts + q * LANES;
        store(db + q * LANES, (load(at) + load(at + D)) + (load(at + 2 * D) + load(at + 3 * D)));
    }
}

/* dW = g^T h (D x D), a block of output rows at a time; db = column sums of g (either may
 * be NULL). */
INLINE void weight_gradient(const float *restrict g, const float *restrict h, long n, float *restrict dW,
                            float *restrict db, const int D, const int NV) {
    if (dW) weighted_rows(g, 1, D, D, (int)n, h, D, PLAIN, dW, NV); /* dW[i] = sum_b g[b][i] h[b] */
    if (!db) return;
    float parts[4 * MAX_WIDTH] = {0.0f};
    add_column_parts(g, n, parts, D, NV);
    column_sums(parts, db, D, NV);
}

/* dW += g^T h: the chain of each entry of dW goes on from its value (weight_gradient's
 * chain when dW starts at 0 and a batch comes in chunks, in order). */
INLINE void weight_gradient_add(const float *restrict g, const float *restrict h, long n, float *restrict dW,
                                const int D, const int NV) {
    weighted_rows(g, 1, D, D, (int)n, h, D, ACCUMULATE, dW, NV);
}

/* total plus the squared errors of n rows of outputs against y, row by row (lane i of 16
 * holds the squares of the coordinates i mod 16, then sum16), in double; with grad, also
 * the gradient scale * (out - y). */
INLINE double add_squared_errors(const float *restrict out, const float *restrict y, long n, vec scale,
                                 float *restrict grad, double total, const int D, const int NV) {
    for (long b = 0; b < n; b++) {
        vec squares[SUM16_PARTS];
        for (int part = 0; part < SUM16_PARTS; part++) squares[part] = splat(0.0f);
        for (int q = 0; q < NV; q++) {
            const long at = b * D + q * LANES;
            const vec r = load(out + at) - load(y + at);
            squares[q % SUM16_PARTS] += r * r;
            if (grad) store(grad + at, scale * r);
        }
        total += sum16(squares);
    }
    return total;
}

/* ------------------------------------------------------------ exp in doubles
 * The classification losses take exp in double precision (task_loss), one per class and
 * sample; a call of libm's exp for each would cost more than the rest of the step. These
 * are libm's exps a vector at a time, bit for bit: the same algorithm as glibc's exp (2.28 and
 * later, from Arm's optimized-routines): x = k ln2 / 128 + r with |r| <= ln2 / 256,
 * exp(x) = 2^(k/128) exp(r), 2^(k/128) = H (1 + T) from a table, exp(r) - 1 a degree-5
 * polynomial, in the same operations, fused into the same multiply-adds (glibc's FMA build
 * fuses exactly those written a * b + c below, as the compiler does here with FMA; a
 * build without FMA fuses none, as glibc's build for such CPUs). tests/test_native.py
 * holds every result to Python's math.exp (libm's). Arguments whose magnitude is 512 or
 * more (or not finite) go to libm itself: glibc handles overflow and subnormal results
 * there on another path. */
#define DLANES (LANES / 2) /* doubles per vector */
typedef double dvec __attribute__((vector_size(8 * DLANES)));
typedef unsigned long long uvec __attribute__((vector_size(8 * DLANES)));
typedef long long lvec __attribute__((vector_size(8 * DLANES))); /* a comparison's lanes */

/* For k = 0 .. 127, H(k) = 2^(k/128) rounded to a double and T(k) = (2^(k/128) - H(k)) /
 * H(k) rounded to a double: T(k)'s bits, then H(k)'s bits minus k << 45 (so that adding
 * k << 45 for the whole k gives the scale 2^floor(k/128) H(k mod 128)). */
static const unsigned long long EXP_TABLE[256] = {
    0x0000000000000000, 0x3ff0000000000000, 0x3c9b3b4f1a88bf6e, 0x3feff63da9fb3335,
    0xbc7160139cd8dc5d, 0x3fefec9a3e778061, 0xbc905e7a108766d1, 0x3fefe315e86e7f85,
    0x3c8cd2523567f613, 0x3fefd9b0d3158574, 0xbc8bce8023f98efa, 0x3fefd06b29ddf6de,
    0x3c60f74e61e6c861, 0x3fefc74518759bc8, 0x3c90a3e45b33d399, 0x3fefbe3ecac6f383,
    0x3c979aa65d837b6d, 0x3fefb5586cf9890f, 0x3c8eb51a92fdeffc, 0x3fefac922b7247f7,
    0x3c3ebe3d702f9cd1, 0x3fefa3ec32d3d1a2, 0xbc6a033489906e0b, 0x3fef9b66affed31b,
    0xbc9556522a2fbd0e, 0x3fef9301d0125b51, 0xbc5080ef8c4eea55, 0x3fef8abdc06c31cc,
    0xbc91c923b9d5f416, 0x3fef829aaea92de0, 0x3c80d3e3e95c55af, 0x3fef7a98c8a58e51,
    0xbc801b15eaa59348, 0x3fef72b83c7d517b, 0xbc8f1ff055de323d, 0x3fef6af9388c8dea,
    0x3c8b898c3f1353bf, 0x3fef635beb6fcb75, 0xbc96d99c7611eb26, 0x3fef5be084045cd4,
    0x3c9aecf73e3a2f60, 0x3fef54873168b9aa, 0xbc8fe782cb86389d, 0x3fef4d5022fcd91d,
    0x3c8a6f4144a6c38d, 0x3fef463b88628cd6, 0x3c807a05b0e4047d, 0x3fef3f49917ddc96,
    0x3c968efde3a8a894, 0x3fef387a6e756238, 0x3c875e18f274487d, 0x3fef31ce4fb2a63f,
    0x3c80472b981fe7f2, 0x3fef2b4565e27cdd, 0xbc96b87b3f71085e, 0x3fef24dfe1f56381,
    0x3c82f7e16d09ab31, 0x3fef1e9df51fdee1, 0xbc3d219b1a6fbffa, 0x3fef187fd0dad990,
    0x3c8b3782720c0ab4, 0x3fef1285a6e4030b, 0x3c6e149289cecb8f, 0x3fef0cafa93e2f56,
    0x3c834d754db0abb6, 0x3fef06fe0a31b715, 0x3c864201e2ac744c, 0x3fef0170fc4cd831,
    0x3c8fdd395dd3f84a, 0x3feefc08b26416ff, 0xbc86a3803b8e5b04, 0x3feef6c55f929ff1,
    0xbc924aedcc4b5068, 0x3feef1a7373aa9cb, 0xbc9907f81b512d8e, 0x3feeecae6d05d866,
    0xbc71d1e83e9436d2, 0x3feee7db34e59ff7, 0xbc991919b3ce1b15, 0x3feee32dc313a8e5,
    0x3c859f48a72a4c6d, 0x3feedea64c123422, 0xbc9312607a28698a, 0x3feeda4504ac801c,
    0xbc58a78f4817895b, 0x3feed60a21f72e2a, 0xbc7c2c9b67499a1b, 0x3feed1f5d950a897,
    0x3c4363ed60c2ac11, 0x3feece086061892d, 0x3c9666093b0664ef, 0x3feeca41ed1d0057,
    0x3c6ecce1daa10379, 0x3feec6a2b5c13cd0, 0x3c93ff8e3f0f1230, 0x3feec32af0d7d3de,
    0x3c7690cebb7aafb0, 0x3feebfdad5362a27, 0x3c931dbdeb54e077, 0x3feebcb299fddd0d,
    0xbc8f94340071a38e, 0x3feeb9b2769d2ca7, 0xbc87deccdc93a349, 0x3feeb6daa2cf6642,
    0xbc78dec6bd0f385f, 0x3feeb42b569d4f82, 0xbc861246ec7b5cf6, 0x3feeb1a4ca5d920f,
    0x3c93350518fdd78e, 0x3feeaf4736b527da, 0x3c7b98b72f8a9b05, 0x3feead12d497c7fd,
    0x3c9063e1e21c5409, 0x3feeab07dd485429, 0x3c34c7855019c6ea, 0x3feea9268a5946b7,
    0x3c9432e62b64c035, 0x3feea76f15ad2148, 0xbc8ce44a6199769f, 0x3feea5e1b976dc09,
    0xbc8c33c53bef4da8, 0x3feea47eb03a5585, 0xbc845378892be9ae, 0x3feea34634ccc320,
    0xbc93cedd78565858, 0x3feea23882552225, 0x3c5710aa807e1964, 0x3feea155d44ca973,
    0xbc93b3efbf5e2228, 0x3feea09e667f3bcd, 0xbc6a12ad8734b982, 0x3feea012750bdabf,
    0xbc6367efb86da9ee, 0x3fee9fb23c651a2f, 0xbc80dc3d54e08851, 0x3fee9f7df9519484,
    0xbc781f647e5a3ecf, 0x3fee9f75e8ec5f74, 0xbc86ee4ac08b7db0, 0x3fee9f9a48a58174,
    0xbc8619321e55e68a, 0x3fee9feb564267c9, 0x3c909ccb5e09d4d3, 0x3feea0694fde5d3f,
    0xbc7b32dcb94da51d, 0x3feea11473eb0187, 0x3c94ecfd5467c06b, 0x3feea1ed0130c132,
    0x3c65ebe1abd66c55, 0x3feea2f336cf4e62, 0xbc88a1c52fb3cf42, 0x3feea427543e1a12,
    0xbc9369b6f13b3734, 0x3feea589994cce13, 0xbc805e843a19ff1e, 0x3feea71a4623c7ad,
    0xbc94d450d872576e, 0x3feea8d99b4492ed, 0x3c90ad675b0e8a00, 0x3feeaac7d98a6699,
    0x3c8db72fc1f0eab4, 0x3feeace5422aa0db, 0xbc65b6609cc5e7ff, 0x3feeaf3216b5448c,
    0x3c7bf68359f35f44, 0x3feeb1ae99157736, 0xbc93091fa71e3d83, 0x3feeb45b0b91ffc6,
    0xbc5da9b88b6c1e29, 0x3feeb737b0cdc5e5, 0xbc6c23f97c90b959, 0x3feeba44cbc8520f,
    0xbc92434322f4f9aa, 0x3feebd829fde4e50, 0xbc85ca6cd7668e4b, 0x3feec0f170ca07ba,
    0x3c71affc2b91ce27, 0x3feec49182a3f090, 0x3c6dd235e10a73bb, 0x3feec86319e32323,
    0xbc87c50422622263, 0x3feecc667b5de565, 0x3c8b1c86e3e231d5, 0x3feed09bec4a2d33,
    0xbc91bbd1d3bcbb15, 0x3feed503b23e255d, 0x3c90cc319cee31d2, 0x3feed99e1330b358,
    0x3c8469846e735ab3, 0x3feede6b5579fdbf, 0xbc82dfcd978e9db4, 0x3feee36bbfd3f37a,
    0x3c8c1a7792cb3387, 0x3feee89f995ad3ad, 0xbc907b8f4ad1d9fa, 0x3feeee07298db666,
    0xbc55c3d956dcaeba, 0x3feef3a2b84f15fb, 0xbc90a40e3da6f640, 0x3feef9728de5593a,
    0xbc68d6f438ad9334, 0x3feeff76f2fb5e47, 0xbc91eee26b588a35, 0x3fef05b030a1064a,
    0x3c74ffd70a5fddcd, 0x3fef0c1e904bc1d2, 0xbc91bdfbfa9298ac, 0x3fef12c25bd71e09,
    0x3c736eae30af0cb3, 0x3fef199bdd85529c, 0x3c8ee3325c9ffd94, 0x3fef20ab5fffd07a,
    0x3c84e08fd10959ac, 0x3fef27f12e57d14b, 0x3c63cdaf384e1a67, 0x3fef2f6d9406e7b5,
    0x3c676b2c6c921968, 0x3fef3720dcef9069, 0xbc808a1883ccb5d2, 0x3fef3f0b555dc3fa,
    0xbc8fad5d3ffffa6f, 0x3fef472d4a07897c, 0xbc900dae3875a949, 0x3fef4f87080d89f2,
    0x3c74a385a63d07a7, 0x3fef5818dcfba487, 0xbc82919e2040220f, 0x3fef60e316c98398,
    0x3c8e5a50d5c192ac, 0x3fef69e603db3285, 0x3c843a59ac016b4b, 0x3fef7321f301b460,
    0xbc82d52107b43e1f, 0x3fef7c97337b9b5f, 0xbc892ab93b470dc9, 0x3fef864614f5a129,
    0x3c74b604603a88d3, 0x3fef902ee78b3ff6, 0x3c83c5ec519d7271, 0x3fef9a51fbc74c83,
    0xbc8ff7128fd391f0, 0x3fefa4afa2a490da, 0xbc8dae98e223747d, 0x3fefaf482d8e67f1,
    0x3c8ec3bc41aa2008, 0x3fefba1bee615a27, 0x3c842b94c3a9eb32, 0x3fefc52b376bba97,
    0x3c8a64a931d185ee, 0x3fefd0765b6e4540, 0xbc8e37bae43be3ed, 0x3fefdbfdad9cbe14,
    0x3c77893b4d91cd9d, 0x3fefe7c1819e90d8, 0x3c5305c14160cc89, 0x3feff3c22b8f71f1,
};

INLINE dvec exp_lanes(dvec x) {
    const double shift = 0x1.8p52; /* adding it rounds to an integer in the low bits */
    const dvec kd_shifted = x * 0x1.71547652b82fep7 + shift;  /* x 128 / ln2 */
    const uvec ki = (uvec)kd_shifted;
    const dvec kd = kd_shifted - shift;
    dvec r = x + kd * -0x1.62e42fefa0000p-8; /* ln2 / 128 in two parts */
    r = r + kd * -0x1.cf79abc9e3b3ap-47;
    dvec tail;
    uvec scale_bits;
    for (int j = 0; j < DLANES; j++) {
        const unsigned long long at = 2 * (ki[j] % 128);
        tail[j] = ((const double *)EXP_TABLE)[at];
        scale_bits[j] = EXP_TABLE[at + 1] + (ki[j] << 45);
    }
    const dvec r2 = r * r;
    const dvec poly = (tail + r) + r2 * (r * 0x1.555555555543cp-3 + 0x1.ffffffffffdbdp-2) +
                      r2 * r2 * (r * 0x1.1111167a4d017p-7 + 0x1.55555cf172b91p-5);
    const dvec scale = (dvec)scale_bits;
    return scale + scale * poly;
}

/* exp on every lane, bit for bit libm's exp. */
INLINE dvec exp_vector(dvec x) {
    dvec e = exp_lanes(x);
    for (int j = 0; j < DLANES; j++)
        if (!(fabs(x[j]) < 512.0)) e[j] = exp(x[j]);
    return e;
}

/* Lanes that are true take a, the others b. */
INLINE dvec dlanes_where(lvec m, dvec a, dvec b) { return (dvec)((m & (lvec)a) | (~m & (lvec)b)); }

/* Exported for the tests: exp_vector over n values. */
void exp_values(const double *x, double *out, long n) {
    for (long i = 0; i < n; i += DLANES) {
        dvec v = {0};
        for (int j = 0; j < DLANES && i + j < n; j++) v[j] = x[i + j];
        const dvec e = exp_vector(v);
        for (int j = 0; j < DLANES && i + j < n; j++) out[i + j] = e[j];
    }
}

/* Loss of outputs `out` against targets `y` (n x D), and when `grad` is given, its
 * gradient with respect to `out`. Sums in double; the loss is a mean over samples. */
INLINE float task_loss(const float *restrict out, const float *restrict y, int n, int task, float *restrict grad,
                       const int D, const int NV) {
    double total = 0.0;
    if (task == REGRESSION) {
        total = add_squared_errors(out, y, n, splat(2.0f / (float)((long)n * D)), grad, 0.0, D, NV);
        return (float)(total / ((double)n * D));
    }
    /* Cross entropy with the target's outputs as soft, unnormalised class weights, or
     * with LABELS one-hot weights at their argmax (the first maximum, as torch's argmax);
     * binary: both first summed over the two halves of the coordinates. DLANES samples at
     * a time, a sample on each lane: each sample's sums run over its classes in order, as
     * they would one sample at a time, and the samples' losses are added in order. */
    const int labels = task & LABELS;
    task &= ~LABELS;
    const int K = task == BINARY ? 2 : D;
    const int half = D / 2;
    for (int b0 = 0; b0 < n; b0 += DLANES) {
        const int m = n - b0 < DLANES ? n - b0 : DLANES;
        dvec logit[MAX_WIDTH], weight[MAX_WIDTH];
        for (int j = 0; j < DLANES; j++) {
            float l[MAX_WIDTH] = {0}, w[MAX_WIDTH] = {0}; /* lanes past m: zeros, never read back */
            if (j < m) {
                const float *o = out + (long)(b0 + j) * D, *t = y + (long)(b0 + j) * D;
                if (task == BINARY) {
                    for (int i = 0; i < D; i++) {
                        l[i >= half] += o[i];
                        w[i >= half] += t[i];
                    }
                } else {
                    memcpy(l, o, D * sizeof(float));
                    memcpy(w, t, D * sizeof(float));
                }
                if (labels) {
                    int label = 0;
                    for (int k = 1; k < K; k++) label = w[k] > w[label] ? k : label;
                    for (int k = 0; k < K; k++) w[k] = k == label ? 1.0f : 0.0f;
                }
            }
            for (int k = 0; k < K; k++) logit[k][j] = l[k], weight[k][j] = w[k];
        }
        dvec peak = logit[0]; /* a float's value: the maximum of floats */
        for (int k = 1; k < K; k++) peak = dlanes_where(logit[k] > peak, logit[k], peak);
        dvec e[MAX_WIDTH], norm = {0}, weight_sum = {0}, sample = {0}, log_norm;
        for (int k = 0; k < K; k++) norm += e[k] = exp_vector(logit[k] - peak);
        for (int j = 0; j < DLANES; j++) log_norm[j] = peak[j] + log(norm[j]);
        for (int k = 0; k < K; k++) {
            sample -= weight[k] * (logit[k] - log_norm);
            weight_sum += weight[k];
        }
        for (int j = 0; j < m; j++) total += sample[j];
        if (grad) {
            float d[MAX_WIDTH][DLANES];
            for (int k = 0; k < K; k++) { /* softmax: the exps above */
                const dvec dk = (e[k] / norm * weight_sum - weight[k]) / (double)n;
                for (int j = 0; j < DLANES; j++) d[k][j] = (float)dk[j];
            }
            for (int j = 0; j < m; j++) {
                float *g = grad + (long)(b0 + j) * D;
                for (int i = 0; i < D; i++) g[i] = d[task == BINARY ? i >= half : i][j];
            }
        }
    }
    return (float)(total / n);
}

INLINE void transpose(const float *restrict m, float *restrict t, const int D) {
    for (int i = 0; i < D; i++)
        for (int j = 0; j < D; j++) t[j * D + i] = m[i * D + j];
}

/* W = W0 + A B^T for one adapted matrix (the product first, then the sum, as torch's
 * W0 + A @ B^T). `scratch`: D x D. */
INLINE void lora_weight(const float *restrict w0, const float *restrict A, const float *restrict Bf,
                        float *restrict W, float *restrict scratch, const int D, const int NV) {
    transpose(Bf, scratch, D);
    weighted_rows(A, D, 1, D, D, scratch, D, PLAIN, W, NV); /* W[i] = sum_r A[i][r] B^T[r] */
    for (long at = 0; at < (long)D * D; at += LANES) store(W + at, load(w0 + at) + load(W + at));
}

/* The FNN's effective weights: W0 + A B^T (LoRA) or the parameters themselves, and W^T. */
INLINE void effective_weights(const Shape *s, const float *restrict w0, const float *restrict p, float *restrict w,
                              float *restrict wt, float *restrict scratch, const int D, const int NV) {
    const long DD = (long)D * D;
    for (int l = 0; l < s->depth; l++) {
        float *W = w + l * DD;
        if (s->full)
            memcpy(W, p + s->off_a + l * DD, DD * sizeof(float));
        else
            lora_weight(w0 + l * DD, p + s->off_a + l * DD, p + s->off_b + l * DD, W, scratch, D, NV);
        transpose(W, wt + l * DD, D);
    }
}

INLINE float network_loss(const Shape *s, const float *restrict wt, const float *restrict p, const float *restrict x,
                          const float *restrict y, int n, float *restrict a, float *restrict b, const int D,
                          const int NV) {
    const float *in = x;
    for (int l = 0; l < s->depth; l++) {
        float *out = (l % 2 == 0) ? a : b;
        affine(in, n, wt + (long)l * D * D, s->has_bias ? p + s->off_bias + (long)l * D : NULL, s->relu, out, D, NV);
        in = out;
    }
    return task_loss(in, y, n, s->task, NULL, D, NV);
}

/* torch.optim.Adam's single-tensor step, operation for operation. */
INLINE void adam(long n_param, const AdamConsts *k, float step_size, float weight_decay, const float *restrict grad,
                 const float *restrict mask, float *restrict p, float *restrict m, float *restrict v) {
    const float one_minus_beta1 = 1.0f - k->beta1, one_minus_beta2 = (float)(1.0 - (double)k->beta2);
    for (long i = 0; i < n_param; i++) {
        const float g = (grad[i] + weight_decay * p[i]) * mask[i];
        m[i] = m[i] + one_minus_beta1 * (g - m[i]);
        v[i] = v[i] * k->beta2 + one_minus_beta2 * g * g;
        const float denom = sqrtf(v[i]) / k->bias_correction2_sqrt + k->eps;
        p[i] = p[i] - step_size * m[i] / denom;
    }
}

/* Gradients of W = W0 + A B^T: dA = dW B, dB = dW^T A (each row a vector over the rank). */
INLINE void lora_gradients(const float *restrict dW, const float *restrict A, const float *restrict B,
                           float *restrict dA, float *restrict dB, const int D, const int NV) {
    weighted_rows(dW, D, 1, D, D, B, D, PLAIN, dA, NV); /* dA[i] = sum_j dW[i][j] B[j] */
    weighted_rows(dW, 1, D, D, D, A, D, PLAIN, dB, NV); /* dB[j] = sum_i dW[i][j] A[i] */
}

INLINE void config_step(const Shape *s, const AdamConsts *k, const float *restrict w0, float *restrict p,
                        float *restrict m, float *restrict v, const float *restrict mask, float step_size,
                        float weight_decay, const float *restrict x, const float *restrict y,
                        const float *restrict vx, const float *restrict vy, int active, float *train_loss,
                        float *val_loss, float *restrict work, const int D, const int NV) {
    const int L = s->depth, B = s->batch, nval = s->val_batch;
    const long DD = (long)D * D, BD = (long)B * D;
    float *w = work, *wt = w + L * DD, *dw = wt + L * DD, *scratch = dw + L * DD, *grad = scratch + DD;
    float *g = grad + s->n_param, *g_prev = g + BD, *hidden = g_prev + BD; /* hidden: L x B x D */
    float *va = hidden + L * BD, *vb = va + (long)nval * D;

    effective_weights(s, w0, p, w, wt, scratch, D, NV);
    const float *in = x;
    for (int l = 0; l < L; l++) {
        affine(in, B, wt + l * DD, s->has_bias ? p + s->off_bias + l * D : NULL, s->relu, hidden + l * BD, D, NV);
        in = hidden + l * BD;
    }
    const float loss = task_loss(hidden + (L - 1) * BD, y, B, s->task, g, D, NV);
    *train_loss = loss;

    if (active && isfinite(loss)) {
        memset(grad, 0, s->n_param * sizeof(float));
        if (s->relu) /* through the last ReLU: zero where its output is not positive */
            for (long at = 0; at < BD; at += LANES)
                store(g + at, keep_where(load(hidden + (L - 1) * BD + at) > 0.0f, load(g + at)));
        for (int l = L - 1; l >= 0; l--) {
            /* g: gradient w.r.t. layer l's pre-activation output. */
            const float *h_in = l > 0 ? hidden + (l - 1) * BD : x;
            weight_gradient(g, h_in, B, dw + l * DD, s->has_bias ? grad + s->off_bias + l * D : NULL, D, NV);
            if (l > 0) { /* g_prev = g W, through the previous layer's ReLU */
                matmul(g, B, w + l * DD, NULL, 0, s->relu ? h_in : NULL, g_prev, D, NV);
                float *swap = g;
                g = g_prev;
                g_prev = swap;
            }
        }
        for (int l = 0; l < L; l++) {
            if (s->full)
                memcpy(grad + s->off_a + l * DD, dw + l * DD, DD * sizeof(float));
            else
                lora_gradients(dw + l * DD, p + s->off_a + l * DD, p + s->off_b + l * DD, grad + s->off_a + l * DD,
                               grad + s->off_b + l * DD, D, NV);
        }
        adam(s->n_param, k, step_size, weight_decay, grad, mask, p, m, v);
        effective_weights(s, w0, p, w, wt, scratch, D, NV);
    }
    /* no validation samples: this step is not validated (val_every) */
    *val_loss = nval > 0 ? network_loss(s, wt, p, vx, vy, nval, va, vb, D, NV) : NAN;
}

static long work_floats(const Shape *s) {
    const long DD = (long)s->width * s->width, BD = (long)s->batch * s->width;
    return 3 * s->depth * DD + DD + s->n_param + 2 * BD + s->depth * BD + 2L * s->val_batch * s->width;
}

/* One copy of a step per width (CALL(D)), so that every loop has a fixed length. A build
 * holds one width (-DWIDTH=D): the wide copies take most of the compile time, and a run
 * needs the widths it trains only (native.py builds one library per width). */
#ifndef WIDTH
#error "build with -DWIDTH=D, D one of 16, 32, 48, 64 (native.py does)"
#endif
#define BY_WIDTH(CALL)                                                                                             \
    switch (s->width) {                                                                                            \
    case WIDTH: CALL(WIDTH); break;                                                                                \
    }

/* Returns 0, or -1 when the shape is out of range or memory is short (nothing done). */
int fnn_step(const Shape *s, const AdamConsts *k, int c_begin, int c_end, const float *w0, float *param,
             float *exp_avg, float *exp_avg_sq, const float *mask, const float *step_size,
             const float *weight_decay, const float *x, const float *y, const float *vx, const float *vy,
             const unsigned char *active, float *train_loss, float *val_loss) {
    if (s->width != WIDTH || s->width < LANES || s->width > MAX_WIDTH || s->width % LANES || s->depth < 1 ||
        s->batch < 1 || s->val_batch < 0)
        return -1;
    float *work = malloc(work_floats(s) * sizeof(float));
    if (!work) return -1;
    const long DD = (long)s->width * s->width, P = s->n_param;
    const unsigned float_mode = flush_subnormals();
    for (int c = c_begin; c < c_end; c++) {
        const float *cw0 = s->full ? NULL : w0 + c * s->depth * DD;
#define STEP(D)                                                                                                    \
    config_step(s, k, cw0, param + c * P, exp_avg + c * P, exp_avg_sq + c * P, mask + c * P, step_size[c],       \
                weight_decay[c], x + c * s->x_stride, y + c * s->y_stride, vx, vy, active[c], train_loss + c,      \
                val_loss + c, work, D, (D) / LANES)
        BY_WIDTH(STEP)
#undef STEP
    }
    restore_float_mode(float_mode);
    free(work);
    return 0;
}

/* ------------------------------------------------------------------------------ TFN
 * Hidden states are token rows (B x N x D): every weight multiplies all B N tokens as
 * one `matmul`. Per block l and head h: Mq = Wk^T Wq, Mv = Wo Wv; for each sample,
 * S[k][q] = x_k . (Mq x_q), P = softmax of S over the keys k, head output at query q:
 * sum_k P[k][q] Mv x_k; the heads are summed, then relu(W1 . + b1), then W2 . + b2.
 * The output layer is W_out. Frozen tensors per configuration (row-major):
 * wq wk wv wo (L, H, D, D), w1 w2 (L, D, D), w_out (D, D); trainable biases b1, b2 (L, D)
 * live in the parameters. LoRA factors in the parameters: wq wk wv wo (L, H, D, D),
 * w2 (D, D) (the last block's), w_out (D, D).
 */
enum { TQ = 0, TK, TV, TO, T2, TOUT, T_ADAPTED };

typedef struct {
    int depth, heads, width, tokens, batch, val_batch;
    int prenorm; /* 1: pre-norm residual blocks x + Attn(LN(x)), then a + FFN(LN(a)) */
    int chunk;   /* samples a token-row pass takes at a time (tfn_token_pass), a multiple of 4 */
    long n_param;
    long off_a[T_ADAPTED], off_b[T_ADAPTED], off_b1, off_b2;
    long x_stride, y_stride;   /* 0: one training batch shared by every configuration */
    long vx_stride, vy_stride; /* 0: one validation set shared by every configuration */
} TfnShape;

typedef struct {
    const float *wq, *wk, *wv, *wo, *w1, *w2, *w_out; /* this configuration's frozen weights */
} TfnFrozen;

/* The effective matrices of one configuration: per block and head Wq Wk Wv Wo (kept for
 * the gradients) and Mq^T, Mv^T (as row-times matrices), W1^T, W2, W2^T, W_out, W_out^T. */
typedef struct {
    float *wq, *wk, *wv, *wo, *mq_t, *mv_t, *mq, *mv, *w1_t, *w1, *w2, *w2_t, *w_out, *w_out_t;
} TfnWeights;

/* The products and transposes the passes use, from Wq Wk Wv Wo, W2 and W_out in w (W1 is
 * frozen: taken from f). */
INLINE void tfn_derived_weights(const TfnShape *s, const TfnFrozen *f, TfnWeights *w, const int D, const int NV) {
    const long DD = (long)D * D;
    const int L = s->depth, H = s->heads;
    for (int m = 0; m < L * H; m++) {
        weighted_rows(w->wk + m * DD, 1, D, D, D, w->wq + m * DD, D, PLAIN, w->mq + m * DD, NV); /* Mq = Wk^T Wq */
        weighted_rows(w->wo + m * DD, D, 1, D, D, w->wv + m * DD, D, PLAIN, w->mv + m * DD, NV); /* Mv = Wo Wv */
        transpose(w->mq + m * DD, w->mq_t + m * DD, D);
        transpose(w->mv + m * DD, w->mv_t + m * DD, D);
    }
    for (int l = 0; l < L; l++) {
        memcpy(w->w1 + l * DD, f->w1 + l * DD, DD * sizeof(float));
        transpose(f->w1 + l * DD, w->w1_t + l * DD, D);
        transpose(w->w2 + l * DD, w->w2_t + l * DD, D);
    }
    transpose(w->w_out, w->w_out_t, D);
}

/* The effective weights W0 + A B^T of the adapted matrices, then the derived ones. */
INLINE void tfn_weights(const TfnShape *s, const TfnFrozen *f, const float *restrict p, TfnWeights *w,
                        float *restrict scratch, const int D, const int NV) {
    const long DD = (long)D * D;
    const int L = s->depth, H = s->heads;
    for (int m = 0; m < L * H; m++) {
        const float *frozen[4] = {f->wq, f->wk, f->wv, f->wo};
        float *effective[4] = {w->wq, w->wk, w->wv, w->wo};
        for (int e = TQ; e <= TO; e++) /* one inlined copy for the four */
            lora_weight(frozen[e] + m * DD, p + s->off_a[e] + m * DD, p + s->off_b[e] + m * DD, effective[e] + m * DD,
                        scratch, D, NV);
    }
    for (int l = 0; l < L; l++) {
        if (l == L - 1)
            lora_weight(f->w2 + l * DD, p + s->off_a[T2], p + s->off_b[T2], w->w2 + l * DD, scratch, D, NV);
        else
            memcpy(w->w2 + l * DD, f->w2 + l * DD, DD * sizeof(float));
    }
    lora_weight(f->w_out, p + s->off_a[TOUT], p + s->off_b[TOUT], w->w_out, scratch, D, NV);
    tfn_derived_weights(s, f, w, D, NV);
}

/* Lanes that are true take a, the others b. */
INLINE vec lanes_where(ivec m, vec a, vec b) { return (vec)((m & (ivec)a) | (~m & (ivec)b)); }

/* exp on every lane (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial
 * in r, times 2^n through the exponent bits): within 2 ulp of expf; 0 below expf's
 * underflow (its subnormal range is dropped), a NaN stays a NaN. */
INLINE vec vexp(vec x) {
    const vec lo = splat(-87.33654f), hi = splat(88.3762626647949f);
    const ivec under = x < lo;
    vec z = lanes_where(x > hi, hi, lanes_where(under, lo, x));
    const vec magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vec n = (z * splat(1.44269504088896341f) + magic) - magic;
    const vec r = (z - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);
    vec y = splat(1.9875691500e-4f);
    y = y * r + splat(1.3981999507e-3f);
    y = y * r + splat(8.3334519073e-3f);
    y = y * r + splat(4.1665795894e-2f);
    y = y * r + splat(1.6666665459e-1f);
    y = y * r + splat(5.0000001201e-1f);
    y = y * (r * r) + r + splat(1.0f);
    const ivec scale = (__builtin_convertvector(n, ivec) + 127) << 23;
    return keep_where(~under, y * (vec)scale);
}

#define MAX_QV (MAX_TOKENS / LANES) /* vectors of a score row (one lane per query) */

/* The LANES x LANES block r transposed in registers: log2(LANES) rounds, each swapping
 * the off-diagonal S x S blocks of every 2S x 2S block with two-source shuffles. */
#define UNPAREN(...) __VA_ARGS__
#define SWAP_BLOCKS(S, LO, HI)                                                                                     \
    for (int i = 0; i < LANES; i++)                                                                                \
        if (!(i & S)) {                                                                                            \
            const vec a = r[i], b = r[i + S];                                                                      \
            r[i] = __builtin_shufflevector(a, b, UNPAREN LO);                                                      \
            r[i + S] = __builtin_shufflevector(a, b, UNPAREN HI);                                                  \
        }
INLINE void transpose_block(vec r[LANES]) {
#if LANES == 16
    SWAP_BLOCKS(8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
    SWAP_BLOCKS(4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
    SWAP_BLOCKS(2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
    SWAP_BLOCKS(1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
#else
    SWAP_BLOCKS(4, (0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15))
    SWAP_BLOCKS(2, (0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15))
    SWAP_BLOCKS(1, (0, 8, 2, 10, 4, 12, 6, 14), (1, 9, 3, 11, 5, 13, 7, 15))
#endif
}
#undef SWAP_BLOCKS
#undef UNPAREN

/* Token rows (n, N, D) as columns: (n, D, NQ * LANES), one lane per token, zero-padded;
 * LANES x LANES blocks transposed in registers. */
INLINE void tokens_as_lanes(const float *restrict rows, int n, int N, float *restrict cols, const int D,
                            const int NQ) {
    const int NP = NQ * LANES;
    for (int b = 0; b < n; b++) {
        const float *in = rows + (long)b * N * D;
        float *out = cols + (long)b * D * NP;
        for (int u = 0; u < NQ; u++)
            for (int c = 0; c < D; c += LANES) {
                vec r[LANES];
                for (int j = 0; j < LANES; j++)
                    r[j] = u * LANES + j < N ? load(in + (u * LANES + j) * D + c) : splat(0.0f);
                transpose_block(r);
                for (int i = 0; i < LANES; i++) store(out + (c + i) * NP + u * LANES, r[i]);
            }
    }
}

/* One head's attention for n samples of N tokens. Scores S[k][q] = t_k . x_q with
 * t = X Mq (token rows), laid out a key row at a time with the queries on the lanes
 * (xT: tokens_as_lanes of the inputs), so that the softmax over the keys is lane-wise.
 * probs (n, N keys, NQ * LANES); out (+)= the head's output, as to_out says (PLAIN or
 * ACCUMULATE); vr: Mv x (token rows). */
INLINE void attention_impl(const float *restrict xT, const float *restrict t, const float *restrict vr, int n,
                           int N, float *restrict probs, RowsEnd to_out, float *restrict out, const int D,
                           const int NV, const int NQ) {
    const int NP = NQ * LANES;
    for (int b = 0; b < n; b++) {
        const long base = (long)b * N * D;
        float *P = probs + (long)b * N * NP;
        weighted_rows_few(t + base, D, 1, N, D, xT + (long)b * D * NP, NP, PLAIN, P, NQ); /* S[k] = sum_i t[k][i] xT[i] */
        vec peak[MAX_QV], total[MAX_QV];
        for (int u = 0; u < NQ; u++) {
            peak[u] = load(P + u * LANES);
            total[u] = splat(0.0f);
        }
        for (int k = 1; k < N; k++)
            for (int u = 0; u < NQ; u++) {
                const vec sc = load(P + k * NP + u * LANES);
                peak[u] = lanes_where(sc > peak[u], sc, peak[u]);
            }
        for (int k = 0; k < N; k++) /* softmax over the keys, as torch: exp(s - max) / sum */
            for (int u = 0; u < NQ; u++) {
                const vec e = vexp(load(P + k * NP + u * LANES) - peak[u]);
                store(P + k * NP + u * LANES, e);
                total[u] += e;
            }
        for (int u = 0; u < NQ; u++) total[u] = splat(1.0f) / total[u];
        for (int k = 0; k < N; k++)
            for (int u = 0; u < NQ; u++) store(P + k * NP + u * LANES, load(P + k * NP + u * LANES) * total[u]);
        weighted_rows_few(P, 1, NP, N, N, vr + base, D, to_out, out + base, NV); /* out[q] (+)= sum_k P[k][q] vr[k] */
    }
}

/* One copy per score-row length up to MAX_QV query vectors, so that its loops have fixed
 * lengths (a constant false condition leaves no code behind). */
#define QV_CASE(Q, CALL)                                                                                           \
    case Q:                                                                                                        \
        if ((Q) <= MAX_QV) { CALL(Q); }                                                                            \
        break;
#define BY_QUERY_VECTORS(NQ, CALL)                                                                                 \
    switch (NQ) {                                                                                                  \
        QV_CASE(1, CALL) QV_CASE(2, CALL) QV_CASE(3, CALL) QV_CASE(4, CALL)                                        \
        QV_CASE(5, CALL) QV_CASE(6, CALL) QV_CASE(7, CALL) QV_CASE(8, CALL)                                        \
    }

INLINE void attention(const float *restrict xT, const float *restrict t, const float *restrict vr, int n, int N,
                      float *restrict probs, RowsEnd to_out, float *restrict out, const int D, const int NV) {
#define ATT(NQ) attention_impl(xT, t, vr, n, N, probs, to_out, out, D, NV, NQ)
    BY_QUERY_VECTORS((N + LANES - 1) / LANES, ATT)
#undef ATT
}

/* Activations of one block kept for the backward pass (token rows, n samples). */
typedef struct {
    float *xT, *q, *v, *probs, *att, *hid, *out; /* q (X Mq), v, probs: per head; xT: seen's tokens on lanes */
    float *seen, *fed; /* what attention and the feed-forward layer read: the input and att, or their LayerNorms */
    float *ln_x, *ln_att, *sd_x, *sd_att; /* pre-norm blocks only: the LayerNorms and their rows' deviations */
} TfnBlock;

/* The sum of a row of D floats (a multiple of 16) times another (b NULL: times 1), in the
 * same order whatever LANES is. */
INLINE float row_dot(const float *restrict a, const float *restrict b, const int D) {
    vec parts[SUM16_PARTS];
    for (int j = 0; j < SUM16_PARTS; j++) parts[j] = splat(0.0f);
    for (int i = 0; i < D; i += 16)
        for (int j = 0; j < SUM16_PARTS; j++)
            parts[j] += b ? load(a + i + j * LANES) * load(b + i + j * LANES) : load(a + i + j * LANES);
    return sum16(parts);
}

/* LayerNorm over each row of D floats without affine parameters (models.py
 * _layer_norm_over_width): y = (x - mean) / sd, sd = sqrt(variance + 1e-5), kept per row
 * for the backward pass. */
INLINE void layer_norm_rows(const float *restrict x, long rows, float *restrict y, float *restrict sd, const int D,
                            const int NV) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        const vec mean = splat(row_dot(xr, NULL, D) / D);
        for (int i = 0; i < NV; i++) store(yr + i * LANES, load(xr + i * LANES) - mean);
        sd[r] = sqrtf(row_dot(yr, yr, D) / D + 1e-5f);
        const vec s = splat(sd[r]);
        for (int i = 0; i < NV; i++) store(yr + i * LANES, load(yr + i * LANES) / s);
    }
}

/* out = plus + the gradient w.r.t. layer_norm_rows' input, given d w.r.t. its output y:
 * (d - mean(d) - y mean(d y)) / sd, row by row. out may be d or plus (each row is read
 * before it is written). */
INLINE void layer_norm_backward_rows(const float *restrict y, const float *restrict sd, long rows, const float *d,
                                     const float *plus, float *out, const int D, const int NV) {
    for (long r = 0; r < rows; r++) {
        const float *yr = y + r * D, *dr = d + r * D, *pr = plus + r * D;
        const vec mean_d = splat(row_dot(dr, NULL, D) / D), mean_dy = splat(row_dot(dr, yr, D) / D);
        const vec s = splat(sd[r]);
        for (int i = 0; i < NV; i++) {
            const int at = i * LANES;
            store(out + r * D + at, load(pr + at) + (load(dr + at) - mean_d - load(yr + at) * mean_dy) / s);
        }
    }
}

INLINE void add_rows(float *restrict out, const float *restrict plus, long count) {
    for (long i = 0; i < count; i++) out[i] += plus[i];
}

/* xT_ready: the tokens of what attention reads already on lanes (NULL: made here). */
INLINE void tfn_block_forward(const TfnShape *s, const TfnWeights *w, const float *restrict p, int l, int n,
                              const float *restrict x, const float *xT_ready, TfnBlock *a, const int D, const int NV) {
    const int H = s->heads, N = s->tokens, NQ = (N + LANES - 1) / LANES;
    const long DD = (long)D * D, rows = (long)n * N, RD = rows * D;
    a->seen = s->prenorm ? a->ln_x : (float *)x;
    if (s->prenorm) layer_norm_rows(x, rows, a->ln_x, a->sd_x, D, NV);
    const float *xT = xT_ready;
    if (!xT) {
        tokens_as_lanes(a->seen, n, N, a->xT, D, NQ);
        xT = a->xT;
    }
    for (int h = 0; h < H; h++) {
        const long m = (long)l * H + h;
        matmul(a->seen, rows, w->mq + m * DD, NULL, 0, NULL, a->q + h * RD, D, NV);
        matmul(a->seen, rows, w->mv_t + m * DD, NULL, 0, NULL, a->v + h * RD, D, NV);
        /* the first head writes att, the others add to it */
        attention(xT, a->q + h * RD, a->v + h * RD, n, N, a->probs + h * rows * NQ * LANES, h ? ACCUMULATE : PLAIN,
                  a->att, D, NV);
    }
    a->fed = s->prenorm ? a->ln_att : a->att;
    if (s->prenorm) {
        add_rows(a->att, x, RD);
        layer_norm_rows(a->att, rows, a->ln_att, a->sd_att, D, NV);
    }
    matmul(a->fed, rows, w->w1_t + l * DD, p + s->off_b1 + (long)l * D, 1, NULL, a->hid, D, NV);
    matmul(a->hid, rows, w->w2_t + l * DD, p + s->off_b2 + (long)l * D, 0, NULL, a->out, D, NV);
    if (s->prenorm) add_rows(a->out, a->att, RD);
}

/* Backward through one head's attention: given d_att (gradient w.r.t. the summed head
 * outputs; d_attT: its tokens on lanes), writes or adds (to_dx) the query-side term to dx
 * (unless NULL) and writes dt (w.r.t. t = X Mq, the key side) and dv (w.r.t. Mv x). */
INLINE void attention_backward_impl(const float *restrict x, const float *restrict t, const float *restrict vr,
                                    const float *restrict probs, const float *restrict d_att,
                                    const float *restrict d_attT, int n, int N, RowsEnd to_dx,
                                    float *restrict dx, float *restrict dt, float *restrict dv, const int D,
                                    const int NV, const int NQ) {
    const int NP = NQ * LANES;
    float dS[MAX_TOKENS * MAX_TOKENS];
    for (int b = 0; b < n; b++) {
        const long base = (long)b * N * D;
        const float *P = probs + (long)b * N * NP;
        weighted_rows_few(P, NP, 1, N, N, d_att + base, D, PLAIN, dv + base, NV); /* dv[k] = sum_q P[k][q] d_att[q] */
        /* dP[k][q] = vr_k . d_att_q, queries on the lanes */
        weighted_rows_few(vr + base, D, 1, N, D, d_attT + (long)b * D * NP, NP, PLAIN, dS, NQ);
        vec inner[MAX_QV];
        for (int u = 0; u < NQ; u++) inner[u] = splat(0.0f);
        for (int k = 0; k < N; k++)
            for (int u = 0; u < NQ; u++) inner[u] += load(P + k * NP + u * LANES) * load(dS + k * NP + u * LANES);
        for (int k = 0; k < N; k++) /* softmax backward over the keys */
            for (int u = 0; u < NQ; u++) {
                const int at = k * NP + u * LANES;
                store(dS + at, load(P + at) * (load(dS + at) - inner[u]));
            }
        /* S[k][q] = t_k . x_q: the key side dt[k] = sum_q dS[k][q] x[q], the query side
         * dx[q] += sum_k dS[k][q] t[k] */
        weighted_rows_few(dS, NP, 1, N, N, x + base, D, PLAIN, dt + base, NV);
        if (dx) weighted_rows_few(dS, 1, NP, N, N, t + base, D, to_dx, dx + base, NV);
    }
}

INLINE void attention_backward(const float *restrict x, const float *restrict t, const float *restrict vr,
                               const float *restrict probs, const float *restrict d_att, const float *restrict d_attT,
                               int n, int N, RowsEnd to_dx, float *restrict dx, float *restrict dt,
                               float *restrict dv, const int D, const int NV) {
#define ATT_BACK(NQ) attention_backward_impl(x, t, vr, probs, d_att, d_attT, n, N, to_dx, dx, dt, dv, D, NV, NQ)
    BY_QUERY_VECTORS((N + LANES - 1) / LANES, ATT_BACK)
#undef ATT_BACK
}

/* A batch rearranged onto lanes (its tokens, or its samples), kept for the configurations
 * that read the same batch. */
typedef struct {
    const float *rows; /* the batch they are of (NULL: none yet) */
    int n;
    float *lanes;
} InputLanes;

/* Whether cache holds the n samples at x already; if not, it is taken for them (the caller
 * fills it). */
INLINE int lanes_hold(InputLanes *cache, const float *x, int n) {
    if (cache->rows == x && cache->n == n) return 1;
    cache->rows = x, cache->n = n;
    return 0;
}

/* The validation pass's work space, a sample on each lane (lanes_validation_loss). */
typedef struct {
    InputLanes x, y;                   /* the validation set and its targets, (groups, N, D, LANES) */
    float *t, *v, *att, *hid, *out[2]; /* one group's activations, (N, D, LANES) each */
    float *scores;                     /* (N, LANES) */
} LaneWork;

/* Work space of one configuration, in floats. */
typedef struct {
    TfnWeights w;
    /* A plain first block's attention reads the data itself, the same for every
     * configuration that reads the same batch (all of a paper-protocol cell): its
     * transposes onto lanes are made once per batch and call. */
    InputLanes batch_lanes;
    LaneWork val;
    TfnBlock *blocks; /* L of them, holding one chunk's activations */
    float *y_out, *scratch, *d_out, *d_hid, *d_att, *d_attT, *dx, *dq, *dv, *dm, *grad;
    /* A batch's gradient sums, added to chunk by chunk (tfn_token_pass): d_mq, d_mv (L, H, D, D),
     * sum_w_out (D, D), sum_w1, sum_w2 (L, D, D) and the biases' column parts (L, 2, 4, D:
     * b1's, then b2's). */
    float *d_mq, *d_mv, *sum_w_out, *sum_w1, *sum_w2, *bias_parts;
} TfnWork;

/* Samples in a token-row chunk: a whole pass (training batch, token-row validation set,
 * a forward pass's batch) up to s->chunk. Chunks of a multiple of 4 samples keep the
 * biases' column sums in the parts of one pass (add_column_parts). */
static long chunk_samples(const TfnShape *s) {
    const long n = s->batch > s->val_batch ? s->batch : s->val_batch;
    return n < s->chunk ? n : s->chunk;
}

static long sums_floats(const TfnShape *s) {
    const long DD = (long)s->width * s->width;
    return 2L * s->depth * s->heads * DD + DD + 2L * s->depth * DD + 8L * s->depth * s->width;
}

static long tfn_work_floats(const TfnShape *s) {
    const long DD = (long)s->width * s->width, LH = (long)s->depth * s->heads;
    const long n = chunk_samples(s);
    const long NP = (s->tokens + LANES - 1) / LANES * LANES;
    const long RD = n * s->tokens * s->width, PP = n * s->tokens * NP, XT = n * s->width * NP;
    const long batch_lanes = (long)s->batch * s->width * NP;
    const long weights = 8 * LH * DD + 4 * s->depth * DD + 2 * DD;
    const long blocks = s->depth * ((3 + 2L * s->heads) * RD + s->heads * PP + XT);
    const long norms = s->prenorm ? s->depth * 2 * (RD + n * s->tokens) : 0;
    const long ND = (long)s->tokens * s->width * LANES, groups = (s->val_batch + LANES - 1) / LANES;
    const long lanes = 2 * groups * ND + 6 * ND + (long)s->tokens * LANES;
    return weights + sums_floats(s) + blocks + 7 * RD + XT + batch_lanes + 2 * DD + s->n_param + norms + lanes;
}

static float *take(float **cursor, long count) {
    float *out = *cursor;
    *cursor += count;
    return out;
}

static void tfn_work_layout(const TfnShape *s, float *base, TfnWork *k, TfnBlock *blocks) {
    const long DD = (long)s->width * s->width, LH = (long)s->depth * s->heads;
    const long n = chunk_samples(s);
    const long NP = (s->tokens + LANES - 1) / LANES * LANES;
    const long RD = n * s->tokens * s->width, PP = n * s->tokens * NP, XT = n * s->width * NP;
    float *c = base;
    TfnWeights *w = &k->w;
    w->wq = take(&c, LH * DD), w->wk = take(&c, LH * DD), w->wv = take(&c, LH * DD), w->wo = take(&c, LH * DD);
    w->mq = take(&c, LH * DD), w->mv = take(&c, LH * DD), w->mq_t = take(&c, LH * DD), w->mv_t = take(&c, LH * DD);
    /* the sums in one run of memory, zeroed at once (tfn_token_pass) */
    k->d_mq = take(&c, LH * DD), k->d_mv = take(&c, LH * DD), k->sum_w_out = take(&c, DD);
    k->sum_w1 = take(&c, s->depth * DD), k->sum_w2 = take(&c, s->depth * DD);
    k->bias_parts = take(&c, 8L * s->depth * s->width);
    w->w1 = take(&c, s->depth * DD), w->w1_t = take(&c, s->depth * DD);
    w->w2 = take(&c, s->depth * DD), w->w2_t = take(&c, s->depth * DD);
    w->w_out = take(&c, DD), w->w_out_t = take(&c, DD);
    for (int l = 0; l < s->depth; l++) {
        blocks[l].q = take(&c, s->heads * RD), blocks[l].v = take(&c, s->heads * RD);
        blocks[l].probs = take(&c, s->heads * PP), blocks[l].xT = take(&c, XT);
        blocks[l].att = take(&c, RD), blocks[l].hid = take(&c, RD), blocks[l].out = take(&c, RD);
    }
    k->blocks = blocks;
    k->y_out = take(&c, RD), k->d_out = take(&c, RD), k->d_hid = take(&c, RD), k->d_att = take(&c, RD);
    k->dx = take(&c, RD), k->dq = take(&c, RD), k->dv = take(&c, RD), k->d_attT = take(&c, XT);
    k->batch_lanes = (InputLanes){NULL, 0, take(&c, (long)s->batch * s->width * NP)};
    const long ND = (long)s->tokens * s->width * LANES, groups = (s->val_batch + LANES - 1) / LANES;
    LaneWork *z = &k->val;
    z->x = (InputLanes){NULL, 0, take(&c, groups * ND)}, z->y = (InputLanes){NULL, 0, take(&c, groups * ND)};
    z->t = take(&c, ND), z->v = take(&c, ND), z->att = take(&c, ND), z->hid = take(&c, ND);
    z->out[0] = take(&c, ND), z->out[1] = take(&c, ND), z->scores = take(&c, (long)s->tokens * LANES);
    k->scratch = take(&c, DD), k->dm = take(&c, DD);
    k->grad = take(&c, s->n_param);
    for (int l = 0; l < s->depth; l++) {
        TfnBlock *b = &blocks[l];
        if (s->prenorm) {
            b->ln_x = take(&c, RD), b->ln_att = take(&c, RD);
            b->sd_x = take(&c, n * s->tokens), b->sd_att = take(&c, n * s->tokens);
        } else {
            b->ln_x = b->ln_att = b->sd_x = b->sd_att = NULL;
        }
    }
}

/* The work space of one configuration, laid out in k: one allocation to free, or NULL
 * when the shape is out of range or memory is short. */
static void *tfn_work_new(const TfnShape *s, TfnWork *k) {
    if (s->width < LANES || s->width > MAX_WIDTH || s->width % LANES || s->depth < 1 || s->heads < 1 ||
        s->tokens < 1 || s->tokens > MAX_TOKENS || s->batch < 1 || s->val_batch < 0 || s->chunk < 4 || s->chunk % 4)
        return NULL;
    TfnBlock *blocks = malloc(s->depth * sizeof(TfnBlock) + tfn_work_floats(s) * sizeof(float));
    if (blocks) tfn_work_layout(s, (float *)(blocks + s->depth), k, blocks);
    return blocks;
}

/* Forward pass of one chunk of n samples (token rows x); returns the output rows
 * (k->y_out). xT_ready: x's tokens on lanes (NULL: made here). */
INLINE const float *tfn_forward_rows(const TfnShape *s, TfnWork *k, const float *restrict p, const float *x, int n,
                                     const float *xT_ready, const int D, const int NV) {
    const float *in = x;
    for (int l = 0; l < s->depth; l++) {
        tfn_block_forward(s, &k->w, p, l, n, in, l == 0 ? xT_ready : NULL, &k->blocks[l], D, NV);
        in = k->blocks[l].out;
    }
    matmul(in, (long)n * s->tokens, k->w.w_out_t, NULL, 0, NULL, k->y_out, D, NV);
    return k->y_out;
}

/* Where the backward pass puts a gradient w.r.t. an adapted matrix's effective weights
 * dW: the LoRA factors' gradients (dense NULL), or dW itself at dense. */
INLINE void adapted_gradient(const TfnShape *s, const float *restrict dW, int e, long at, const float *restrict p,
                             float *restrict grad, float *restrict dense, const int D, const int NV) {
    if (dense)
        memcpy(dense, dW, (long)D * D * sizeof(float));
    else
        lora_gradients(dW, p + s->off_a[e] + at, p + s->off_b[e] + at, grad + s->off_a[e] + at, grad + s->off_b[e] + at,
                       D, NV);
}

/* The dense gradients' layout (TfnDense): wq wk wv wo (L, H, D, D), w1 w2 (L, D, D),
 * w_out (D, D), then b1 b2 at off_b1 and off_b2 of the biases' layout. */
typedef struct {
    float *wq, *wk, *wv, *wo, *w1, *w2, *w_out, *biases;
} TfnDense;

static long tfn_dense_floats(const TfnShape *s) {
    const long DD = (long)s->width * s->width;
    return 4L * s->depth * s->heads * DD + 2L * s->depth * DD + DD + s->n_param;
}

static TfnDense tfn_dense_layout(const TfnShape *s, float *base) {
    const long DD = (long)s->width * s->width, LHDD = (long)s->depth * s->heads * DD;
    TfnDense g = {base, base + LHDD, base + 2 * LHDD, base + 3 * LHDD, base + 4 * LHDD, base + 4 * LHDD + s->depth * DD,
                  base + 4 * LHDD + 2 * s->depth * DD, base + 4 * LHDD + 2 * s->depth * DD + DD};
    return g;
}

/* The column parts (add_column_parts) of block l's b1 in a batch's sums; b2's follow them. */
INLINE float *b1_parts_of(TfnWork *k, int l, const int D) { return k->bias_parts + 8L * l * D; }

/* Backward pass of one chunk of n samples after tfn_forward_rows on it (k->d_out: the
 * loss's gradient w.r.t. its outputs): adds the chunk's rows, in order, to the batch's
 * gradient sums: the dense gradients of the adapted matrices (dense: of every weight
 * matrix) and the biases' column parts. */
INLINE void tfn_backward_chunk(const TfnShape *s, TfnWork *k, int n, int dense, const int D, const int NV) {
    const int L = s->depth, H = s->heads, N = s->tokens, NQ = (N + LANES - 1) / LANES;
    const long DD = (long)D * D, rows = (long)n * N, RD = rows * D;
    const float *top = k->blocks[L - 1].out;
    weight_gradient_add(k->d_out, top, rows, k->sum_w_out, D, NV); /* d W_out */
    float *d_out = k->dx; /* gradient w.r.t. the current block's output */
    matmul(k->d_out, rows, k->w.w_out, NULL, 0, NULL, d_out, D, NV);
    for (int l = L - 1; l >= 0; l--) {
        TfnBlock *a = &k->blocks[l];
        float *b1_parts = b1_parts_of(k, l, D), *b2_parts = b1_parts + 4L * D;
        /* LoRA adapts the last block's W2 only */
        if (dense || l == L - 1) weight_gradient_add(d_out, a->hid, rows, k->sum_w2 + l * DD, D, NV);
        add_column_parts(d_out, rows, b2_parts, D, NV);
        matmul(d_out, rows, k->w.w2 + l * DD, NULL, 0, a->hid, k->d_hid, D, NV);
        if (dense) weight_gradient_add(k->d_hid, a->fed, rows, k->sum_w1 + l * DD, D, NV);
        add_column_parts(k->d_hid, rows, b1_parts, D, NV);
        matmul(k->d_hid, rows, k->w.w1 + l * DD, NULL, 0, NULL, k->d_att, D, NV);
        /* pre-norm: the feed-forward layer read LN(att), and the block's output adds att */
        if (s->prenorm) layer_norm_backward_rows(a->ln_att, a->sd_att, rows, k->d_att, d_out, k->d_att, D, NV);
        /* d_out is consumed: reuse it as the gradient w.r.t. this block's input (the
         * first block's input is data: no gradient). */
        float *dx = l > 0 ? d_out : NULL;
        tokens_as_lanes(k->d_att, n, N, k->d_attT, D, NQ);
        for (int h = 0; h < H; h++) {
            const long mi = (long)l * H + h;
            attention_backward(a->seen, a->q + h * RD, a->v + h * RD, a->probs + h * rows * NQ * LANES, k->d_att,
                               k->d_attT, n, N, h ? ACCUMULATE : PLAIN, dx, k->dq, k->dv, D, NV);
            weight_gradient_add(a->seen, k->dq, rows, k->d_mq + mi * DD, D, NV); /* t = X Mq */
            weight_gradient_add(k->dv, a->seen, rows, k->d_mv + mi * DD, D, NV);
            if (dx) {
                matmul_add(k->dq, rows, k->w.mq_t + mi * DD, dx, D, NV);
                matmul_add(k->dv, rows, k->w.mv + mi * DD, dx, D, NV);
            }
        }
        /* pre-norm: attention read LN(x), and att adds x */
        if (dx && s->prenorm) layer_norm_backward_rows(a->ln_x, a->sd_x, rows, dx, k->d_att, dx, D, NV);
        d_out = dx;
    }
}

/* The gradients from a whole batch's sums: the LoRA factors' and the biases' into grad
 * (dense NULL; grad zeroed by the caller), or every weight matrix's and bias's into dense
 * (grad unused). */
INLINE void tfn_gradients_from_sums(const TfnShape *s, TfnWork *k, const float *restrict p, float *restrict grad,
                                    const TfnDense *dense, const int D, const int NV) {
    const int L = s->depth, H = s->heads;
    const long DD = (long)D * D;
    float *bias_grad = dense ? dense->biases : grad;
    adapted_gradient(s, k->sum_w_out, TOUT, 0, p, grad, dense ? dense->w_out : NULL, D, NV);
    adapted_gradient(s, k->sum_w2 + (L - 1) * DD, T2, 0, p, grad, dense ? dense->w2 + (L - 1) * DD : NULL, D, NV);
    if (dense) {
        memcpy(dense->w1, k->sum_w1, L * DD * sizeof(float));
        memcpy(dense->w2, k->sum_w2, (L - 1) * DD * sizeof(float));
    }
    for (int l = 0; l < L; l++) {
        const float *b1_parts = b1_parts_of(k, l, D), *b2_parts = b1_parts + 4L * D;
        column_sums(b1_parts, bias_grad + s->off_b1 + l * D, D, NV);
        column_sums(b2_parts, bias_grad + s->off_b2 + l * D, D, NV);
    }
    for (long mi = 0; mi < (long)L * H; mi++) {
        const float *dMq = k->d_mq + mi * DD, *dMv = k->d_mv + mi * DD;
        const float *Wq = k->w.wq + mi * DD, *Wk = k->w.wk + mi * DD, *Wv = k->w.wv + mi * DD, *Wo = k->w.wo + mi * DD;
        float *dense_of[4] = {NULL, NULL, NULL, NULL};
        if (dense) dense_of[TQ] = dense->wq, dense_of[TK] = dense->wk, dense_of[TV] = dense->wv, dense_of[TO] = dense->wo;
        /* Mq = Wk^T Wq: dWq = Wk dMq, dWk = Wq dMq^T; Mv = Wo Wv: dWo = dMv Wv^T, dWv = Wo^T dMv. */
        for (int e = TQ; e <= TO; e++) {
            if (e == TK) transpose(dMq, k->scratch, D);
            if (e == TO) transpose(Wv, k->scratch, D);
            const float *left = e == TQ ? Wk : e == TK ? Wq : e == TV ? Wo : dMv;
            const float *right = e == TQ ? dMq : e == TV ? dMv : k->scratch;
            const long left_row = e == TV ? 1 : D, left_col = e == TV ? D : 1; /* TV: Wo^T */
            weighted_rows(left, left_row, left_col, D, D, right, D, PLAIN, k->dm, NV);
            adapted_gradient(s, k->dm, e, mi * DD, p, grad, dense ? dense_of[e] + mi * DD : NULL, D, NV);
        }
    }
}

/* A token-row pass over n samples (token rows x), chunk_samples at a time: the forward
 * pass; against targets y (unless NULL) the mean squared error, which it returns (else
 * 0); with backward, each chunk's backward pass into the batch's gradient sums, zeroed
 * first; with outputs, the outputs copied there. lanes: where x's tokens on lanes are
 * kept between configurations (NULL: not kept). Every sum runs over the rows in the order
 * of a single pass over the whole batch, so the results do not depend on the chunks. */
INLINE float tfn_token_pass(const TfnShape *s, TfnWork *k, const float *restrict p, const float *x,
                            const float *y, int n, InputLanes *lanes, int backward, int dense,
                            float *restrict outputs, const int D, const int NV) {
    const int N = s->tokens, NQ = (N + LANES - 1) / LANES;
    const long sample_floats = (long)N * D;
    const float *xT = NULL;
    if (lanes && !s->prenorm) {
        if (!lanes_hold(lanes, x, n)) tokens_as_lanes(x, n, N, lanes->lanes, D, NQ);
        xT = lanes->lanes;
    }
    if (backward) memset(k->d_mq, 0, sums_floats(s) * sizeof(float)); /* the sums: one run from d_mq */
    const vec scale = splat(2.0f / (float)((long)n * N * D));
    const int chunk = (int)chunk_samples(s);
    double total = 0.0;
    for (int b = 0; b < n; b += chunk) {
        const int m = n - b < chunk ? n - b : chunk;
        const float *out = tfn_forward_rows(s, k, p, x + b * sample_floats, m,
                                            xT ? xT + (long)b * D * NQ * LANES : NULL, D, NV);
        if (outputs) memcpy(outputs + b * sample_floats, out, m * sample_floats * sizeof(float));
        if (y) total = add_squared_errors(out, y + b * sample_floats, (long)m * N, scale, backward ? k->d_out : NULL,
                                          total, D, NV);
        if (backward) tfn_backward_chunk(s, k, m, dense, D, NV);
    }
    return (float)(total / ((double)n * N * D));
}

/* ------------------------------------------------------------ validation, samples on lanes
 * The validation pass runs forward only and keeps nothing for a backward pass, so it holds
 * its activations with a sample on each lane, LANES samples a group: one vector per token
 * and coordinate. Attention then fills every lane (the token-row pass fills N of the
 * LANES query lanes: 10 of 16 in the paper's transformer) and needs no transposes but the
 * inputs', which every configuration of a call shares. Each output is the same chain of
 * multiply-adds from the same start as in the token-row pass (weighted_rows, attention,
 * task_loss), so the validation loss is bit for bit the same. Plain blocks only: pre-norm
 * blocks validate on the token-row pass. */

/* Samples [g LANES, (g + 1) LANES) of token rows (n, N, D) as (N, D, LANES), one lane per
 * sample; lanes past n are 0. */
INLINE void samples_as_lanes(const float *restrict rows, int n, int N, int g, float *restrict out, const int D) {
    for (int i = 0; i < N; i++)
        for (int c = 0; c < D; c += LANES) {
            vec r[LANES];
            for (int j = 0; j < LANES; j++) {
                const long b = (long)g * LANES + j;
                r[j] = b < n ? load(rows + (b * N + i) * D + c) : splat(0.0f);
            }
            transpose_block(r);
            for (int d = 0; d < LANES; d++) store(out + ((long)i * D + c + d) * LANES, r[d]);
        }
}

/* The whole set x (n samples) on lanes in cache, unless it holds x already. */
INLINE const float *set_as_lanes(InputLanes *cache, const float *x, int n, int N, const int D) {
    if (!lanes_hold(cache, x, n))
        for (int g = 0; g < (n + LANES - 1) / LANES; g++)
            samples_as_lanes(x, n, N, g, cache->lanes + (long)g * N * D * LANES, D);
    return cache->lanes;
}

/* out[i][e] = bias[e] + sum_j in[i][j] M[j][e] for a group's N tokens, then ReLU if asked
 * (matmul's product, M row-major D x D). */
INLINE void lanes_matmul(const float *restrict in, int N, const float *restrict M, const float *restrict bias,
                         int relu, float *restrict out, const int D) {
    for (int i = 0; i < N; i++) {
        const float *x = in + (long)i * D * LANES;
        float *o = out + (long)i * D * LANES;
        for (int e0 = 0; e0 < D; e0 += 16) {
            vec acc[16];
            for (int e = 0; e < 16; e++) acc[e] = bias ? splat(bias[e0 + e]) : splat(0.0f);
            for (int j = 0; j < D; j++) {
                const vec xj = load(x + j * LANES);
                for (int e = 0; e < 16; e++) acc[e] += xj * splat(M[j * D + e0 + e]);
            }
            for (int e = 0; e < 16; e++) store(o + (e0 + e) * LANES, relu ? keep_where(~(acc[e] < 0.0f), acc[e]) : acc[e]);
        }
    }
}

/* One head for a group: att[q] (+)= sum_k P[k][q] v[k] (add: to att, else written), P the
 * softmax over the keys k of S[k][q] = t[k] . x[q] (as attention). */
INLINE void lanes_attention(const float *restrict x, const float *restrict t, const float *restrict v, int N,
                            float *restrict scores, int add, float *restrict att, const int D) {
    for (int q = 0; q < N; q++) {
        const float *xq = x + (long)q * D * LANES;
        for (int k = 0; k < N; k++) {
            const float *tk = t + (long)k * D * LANES;
            vec acc = splat(0.0f);
            for (int i = 0; i < D; i++) acc += load(tk + i * LANES) * load(xq + i * LANES);
            store(scores + k * LANES, acc);
        }
        vec peak = load(scores), total = splat(0.0f);
        for (int k = 1; k < N; k++) {
            const vec sc = load(scores + k * LANES);
            peak = lanes_where(sc > peak, sc, peak);
        }
        for (int k = 0; k < N; k++) {
            const vec e = vexp(load(scores + k * LANES) - peak);
            store(scores + k * LANES, e);
            total += e;
        }
        const vec scale = splat(1.0f) / total;
        float *o = att + (long)q * D * LANES;
        for (int e0 = 0; e0 < D; e0 += 16) {
            vec acc[16];
            for (int e = 0; e < 16; e++) acc[e] = add ? load(o + (e0 + e) * LANES) : splat(0.0f);
            for (int k = 0; k < N; k++) {
                const vec pk = load(scores + k * LANES) * scale;
                for (int e = 0; e < 16; e++) acc[e] += pk * load(v + ((long)k * D + e0 + e) * LANES);
            }
            for (int e = 0; e < 16; e++) store(o + (e0 + e) * LANES, acc[e]);
        }
    }
}

/* One plain block for a group (tfn_block_forward's products). */
INLINE void lanes_block(const TfnShape *s, const TfnWeights *w, const float *restrict p, int l,
                        const float *restrict x, LaneWork *z, float *restrict out, const int D) {
    const int H = s->heads, N = s->tokens;
    const long DD = (long)D * D;
    for (int h = 0; h < H; h++) {
        const long m = (long)l * H + h;
        lanes_matmul(x, N, w->mq + m * DD, NULL, 0, z->t, D);
        lanes_matmul(x, N, w->mv_t + m * DD, NULL, 0, z->v, D);
        lanes_attention(x, z->t, z->v, N, z->scores, h > 0, z->att, D);
    }
    lanes_matmul(z->att, N, w->w1_t + l * DD, p + s->off_b1 + (long)l * D, 1, z->hid, D);
    lanes_matmul(z->hid, N, w->w2_t + l * DD, p + s->off_b2 + (long)l * D, 0, out, D);
}

/* total plus the squared errors of a group's first `valid` samples, row by row in
 * task_loss's order (sample, then token) and with its sums: lane m of 16 sums the
 * coordinates m, m + 16, ..., then sum16's tree. */
INLINE double lanes_squared_errors(const float *restrict y, const float *restrict target, int N, int valid,
                                   double total, const int D) {
    float row[MAX_TOKENS][LANES];
    for (int i = 0; i < N; i++) {
        vec part[16], half[8], quarter[4];
        for (int m = 0; m < 16; m++) part[m] = splat(0.0f);
        for (int d = 0; d < D; d++) {
            const long at = ((long)i * D + d) * LANES;
            const vec r = load(y + at) - load(target + at);
            part[d % 16] += r * r;
        }
        for (int m = 0; m < 8; m++) half[m] = part[m] + part[m + 8];
        for (int m = 0; m < 4; m++) quarter[m] = half[m] + half[m + 4];
        store(row[i], (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]));
    }
    for (int j = 0; j < valid; j++)
        for (int i = 0; i < N; i++) total += row[i][j];
    return total;
}

/* The mean squared error on the validation set (vx, vy: token rows), as task_loss of the
 * token-row pass's outputs. */
INLINE float lanes_validation_loss(const TfnShape *s, const TfnWeights *w, const float *restrict p, const float *vx,
                                   const float *vy, LaneWork *z, const int D) {
    const int N = s->tokens, n = s->val_batch;
    const long ND = (long)N * D * LANES;
    const float *x = set_as_lanes(&z->x, vx, n, N, D), *y = set_as_lanes(&z->y, vy, n, N, D);
    double total = 0.0;
    for (int g = 0; g * LANES < n; g++) {
        const float *in = x + g * ND;
        for (int l = 0; l < s->depth; l++) {
            lanes_block(s, w, p, l, in, z, z->out[l % 2], D);
            in = z->out[l % 2];
        }
        lanes_matmul(in, N, w->w_out_t, NULL, 0, z->t, D);
        const int valid = n - g * LANES < LANES ? n - g * LANES : LANES;
        total = lanes_squared_errors(z->t, y + g * ND, N, valid, total, D);
    }
    return (float)(total / ((double)n * N * D));
}

INLINE void tfn_config_step(const TfnShape *s, const AdamConsts *ac, const TfnFrozen *f, float *restrict p,
                            float *restrict m, float *restrict v, const float *restrict mask, float step_size,
                            float weight_decay, const float *restrict x, const float *restrict y,
                            const float *restrict vx, const float *restrict vy, int active, float *train_loss,
                            float *val_loss, TfnWork *k, const int D, const int NV) {
    tfn_weights(s, f, p, &k->w, k->scratch, D, NV);
    /* An active configuration's backward pass runs chunk by chunk with the forward pass,
     * before the loss of the whole batch is known: a non-finite loss discards it. */
    const float loss = tfn_token_pass(s, k, p, x, y, s->batch, &k->batch_lanes, active, 0, NULL, D, NV);
    *train_loss = loss;

    if (active && isfinite(loss)) {
        memset(k->grad, 0, s->n_param * sizeof(float));
        tfn_gradients_from_sums(s, k, p, k->grad, NULL, D, NV);
        adam(s->n_param, ac, step_size, weight_decay, k->grad, mask, p, m, v);
        tfn_weights(s, f, p, &k->w, k->scratch, D, NV);
    }
    if (s->val_batch == 0) { /* this step is not validated (val_every) */
        *val_loss = NAN;
        return;
    }
    if (s->prenorm) {
        *val_loss = tfn_token_pass(s, k, p, vx, vy, s->val_batch, NULL, 0, 0, NULL, D, NV);
    } else {
        *val_loss = lanes_validation_loss(s, &k->w, p, vx, vy, &k->val, D);
    }
}

int tfn_step(const TfnShape *s, const AdamConsts *ac, int c_begin, int c_end, const float *const *frozen,
             const long *frozen_stride, float *param, float *exp_avg, float *exp_avg_sq, const float *mask,
             const float *step_size, const float *weight_decay, const float *x, const float *y, const float *vx,
             const float *vy, const int *x_row, const int *v_row, const unsigned char *active, float *train_loss,
             float *val_loss) {
    if (s->width != WIDTH) return -1;
    TfnWork k;
    void *memory = tfn_work_new(s, &k);
    if (!memory) return -1;
    const long P = s->n_param;
    const unsigned float_mode = flush_subnormals();
    for (int c = c_begin; c < c_end; c++) {
        /* frozen: wq wk wv wo w1 w2 w_out, each with its per-configuration stride */
        const float *at[7];
        for (int t = 0; t < 7; t++) at[t] = frozen[t] + c * frozen_stride[t];
        const TfnFrozen f = {at[0], at[1], at[2], at[3], at[4], at[5], at[6]};
        /* configurations that share a batch read the same row (NULL: row c) */
        const long xr = x_row ? x_row[c] : c, vr = v_row ? v_row[c] : c;
#define TFN_STEP(D)                                                                                                \
    tfn_config_step(s, ac, &f, param + c * P, exp_avg + c * P, exp_avg_sq + c * P, mask + c * P, step_size[c],    \
                    weight_decay[c], x + xr * s->x_stride, y + xr * s->y_stride, vx + vr * s->vx_stride,          \
                    vy + vr * s->vy_stride, active[c], train_loss + c, val_loss + c, &k, D, (D) / LANES)
        BY_WIDTH(TFN_STEP)
#undef TFN_STEP
    }
    restore_float_mode(float_mode);
    free(memory);
    return 0;
}

/* Loss, and unless grads is NULL its gradients, of configurations [c_begin, c_end) of
 * transformers given by their whole weights (no adapters: a method on the generic path
 * forms its adapted matrices itself and maps these gradients onto its parameters).
 * weights: the TfnFrozen order, each with its per-configuration stride; biases (C, n_param)
 * with b1 and b2 at s->off_b1 and s->off_b2; x, y: s->batch samples as token rows (x_row
 * as in tfn_step); grads (C, tfn_dense_floats) in the TfnDense layout, left as they are
 * where the loss is not finite. Returns 0, or -1 when the shape is out of range or
 * memory is short. */
int tfn_gradients(const TfnShape *s, int c_begin, int c_end, const float *const *weights, const long *weight_stride,
                  const float *biases, const float *x, const float *y, const int *x_row, float *loss, float *grads) {
    if (s->width != WIDTH) return -1;
    TfnWork k;
    void *memory = tfn_work_new(s, &k);
    if (!memory) return -1;
    const long DD = (long)s->width * s->width, LHDD = (long)s->depth * s->heads * DD, G = tfn_dense_floats(s);
    const unsigned float_mode = flush_subnormals();
    for (int c = c_begin; c < c_end; c++) {
        const float *at[7];
        for (int t = 0; t < 7; t++) at[t] = weights[t] + c * weight_stride[t];
        const TfnFrozen f = {at[0], at[1], at[2], at[3], at[4], at[5], at[6]};
        const float *from[6] = {f.wq, f.wk, f.wv, f.wo, f.w2, f.w_out};
        float *to[6] = {k.w.wq, k.w.wk, k.w.wv, k.w.wo, k.w.w2, k.w.w_out};
        const long count[6] = {LHDD, LHDD, LHDD, LHDD, s->depth * DD, DD};
        for (int t = 0; t < 6; t++) memcpy(to[t], from[t], count[t] * sizeof(float));
        const float *p = biases + c * s->n_param;
        const long xr = x_row ? x_row[c] : c;
#define TFN_GRADIENTS(D)                                                                                           \
    {                                                                                                              \
    tfn_derived_weights(s, &f, &k.w, D, (D) / LANES);                                                              \
    loss[c] = tfn_token_pass(s, &k, p, x + xr * s->x_stride, y + xr * s->y_stride, s->batch, &k.batch_lanes,     \
                             grads != NULL, 1, NULL, D, (D) / LANES);                                              \
    if (grads && isfinite(loss[c])) {                                                                              \
        const TfnDense dense = tfn_dense_layout(s, grads + c * G);                                                 \
        tfn_gradients_from_sums(s, &k, p, NULL, &dense, D, (D) / LANES);                                           \
    }                                                                                                              \
    }
        BY_WIDTH(TFN_GRADIENTS)
#undef TFN_GRADIENTS
    }
    restore_float_mode(float_mode);
    free(memory);
    return 0;
}

/* The outputs of one model without adapters (the target of a cell) on s->batch samples:
 * token rows x (batch, N, D) to y (the same shape). frozen: its weights in the TfnFrozen
 * order; biases: b1 then b2 (L, D) each, at s->off_b1 and s->off_b2. Returns 0, or -1
 * when the shape is out of range or memory is short (nothing written). */
int tfn_forward(const TfnShape *s, const float *const *frozen, const float *biases, const float *x, float *y) {
    if (s->width != WIDTH) return -1;
    TfnWork k;
    void *memory = tfn_work_new(s, &k);
    if (!memory) return -1;
    const TfnFrozen f = {frozen[0], frozen[1], frozen[2], frozen[3], frozen[4], frozen[5], frozen[6]};
    const long DD = (long)s->width * s->width, LHDD = (long)s->depth * s->heads * DD;
    const float *from[6] = {f.wq, f.wk, f.wv, f.wo, f.w2, f.w_out};
    float *to[6] = {k.w.wq, k.w.wk, k.w.wv, k.w.wo, k.w.w2, k.w.w_out};
    const long count[6] = {LHDD, LHDD, LHDD, LHDD, s->depth * DD, DD};
    for (int t = 0; t < 6; t++) memcpy(to[t], from[t], count[t] * sizeof(float));
#define TFN_FORWARD(D)                                                                                             \
    tfn_derived_weights(s, &f, &k.w, D, (D) / LANES);                                                              \
    tfn_token_pass(s, &k, biases, x, NULL, s->batch, NULL, 0, 0, y, D, (D) / LANES)
    BY_WIDTH(TFN_FORWARD)
#undef TFN_FORWARD
    free(memory);
    return 0;
}

/* The layout native.py passes, checked when it loads the library: sizeof Shape, TfnShape,
 * AdamConsts; T_ADAPTED; the TfnFrozen pointer count; the enum index of each adapted TFN
 * matrix in native.py's order (TFN_ADAPTED). Writes at most n values; returns how many
 * there are. */
int abi_layout(long *out, int n) {
    const long values[] = {sizeof(Shape), sizeof(TfnShape), sizeof(AdamConsts), T_ADAPTED,
                           sizeof(TfnFrozen) / sizeof(const float *), TQ, TK, TV, TO, T2, TOUT};
    const int count = sizeof(values) / sizeof(values[0]);
    for (int i = 0; i < count && i < n; i++) out[i] = values[i];
    return count;
}
