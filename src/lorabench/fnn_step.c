/* One training step of many FNN configurations, each in its own core-local working set.
 *
 * For every configuration c of [c_begin, c_end): the effective weights (W0 + A B^T for
 * LoRA, the weights themselves for final-layer tuning), forward pass on the training
 * batch, loss and hand-written backward pass, torch.optim.Adam's update (L2 weight decay
 * added to the gradient, bias correction, eps) on the trainable entries, then the loss
 * on the validation set with the updated parameters.
 *
 * Why C: at the paper's width (D = 16) a configuration's whole step is ~2 MFLOP on
 * 16 x 16 matrices. Done as stacked torch operations, the time goes to elementwise
 * passes over (C, B, D) tensors and to batched products of tiny matrices; here a
 * configuration's activations (~80 KB) stay in cache from the forward pass to the
 * update, and every 16-wide row is one SIMD register.
 *
 * Configurations are independent: a configuration's numbers do not depend on which
 * others share the call, nor on how callers split [0, C) across threads.
 *
 * Layouts (float32, row-major): frozen weights (C, L, D, D) with W[i][j] mapping input j
 * to output i (y = W x + b); parameters (C, P): LoRA a (L, D, D), b (L, D, D), then
 * biases (L, D) when present; final-layer tuning: weights (L, D, D), biases (L, D).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define LANES 16 /* floats per vector; the width must be a multiple (native.py checks) */
#define MAX_WIDTH 64

/* GCC/Clang vector extensions: one 16-float row chunk; AVX-512 does it in one instruction,
 * AVX2 in two. `vec_u` may be unaligned. */
typedef float vec __attribute__((vector_size(4 * LANES)));
typedef float vec_u __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int ivec __attribute__((vector_size(4 * LANES)));

INLINE vec load(const float *p) { return *(const vec_u *)p; }
INLINE void store(float *p, vec v) { *(vec_u *)p = v; }
INLINE vec splat(float x) { return (vec){0} + x; }
/* v where keep is true, else 0 (a NaN in v is kept when keep is true). */
INLINE vec keep_where(ivec keep, vec v) { return (vec)((ivec)v & keep); }
INLINE float sum_lanes(vec v) {
    float total = 0.0f;
    for (int k = 0; k < LANES; k++) total += v[k];
    return total;
}

enum { REGRESSION = 0, CLASSIFICATION = 1, BINARY = 2 };

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

/* Rows times a matrix, a block of R rows at a time: R independent accumulators per output
 * vector keep the FMA units busy (one row alone is a chain of D dependent FMAs). */
#define ROW_BLOCK 8

/* out[r] = in[r] M (+ bias), then zeroed where negative (relu; a NaN stays a NaN, as with
 * torch.relu) or where gate[r] is not positive (the backward pass through a ReLU). */
INLINE void rows_times(const float *restrict in, const int R, const float *restrict M, const float *restrict bias,
                       int relu, const float *restrict gate, float *restrict out, const int D, const int NV) {
    vec acc[ROW_BLOCK][MAX_WIDTH / LANES];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NV; q++) acc[r][q] = bias ? load(bias + q * LANES) : splat(0.0f);
    for (int j = 0; j < D; j++)
        for (int q = 0; q < NV; q++) {
            const vec m = load(M + j * D + q * LANES);
            for (int r = 0; r < R; r++) acc[r][q] += splat(in[r * D + j]) * m;
        }
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NV; q++) {
            vec o = acc[r][q];
            if (relu) o = keep_where(~(o < 0.0f), o);
            if (gate) o = keep_where(load(gate + r * D + q * LANES) > 0.0f, o);
            store(out + r * D + q * LANES, o);
        }
}

INLINE void matmul(const float *restrict in, int n, const float *restrict M, const float *restrict bias, int relu,
                   const float *restrict gate, float *restrict out, const int D, const int NV) {
    int b = 0;
    for (; b + ROW_BLOCK <= n; b += ROW_BLOCK)
        rows_times(in + (long)b * D, ROW_BLOCK, M, bias, relu, gate ? gate + (long)b * D : NULL, out + (long)b * D,
                   D, NV);
    for (; b < n; b++)
        rows_times(in + (long)b * D, 1, M, bias, relu, gate ? gate + (long)b * D : NULL, out + (long)b * D, D, NV);
}

/* out[b] = act(W in[b] + bias), with wt = W^T. */
INLINE void affine(const float *restrict in, int n, const float *restrict wt, const float *restrict bias, int relu,
                   float *restrict out, const int D, const int NV) {
    matmul(in, n, wt, bias, relu, NULL, out, D, NV);
}

/* dW = g^T h (D x D), a block of output rows at a time; db = column sums of g. */
INLINE void weight_gradient(const float *restrict g, const float *restrict h, int n, float *restrict dW,
                            float *restrict db, const int D, const int NV) {
    for (int i0 = 0; i0 < D; i0 += ROW_BLOCK) {
        vec acc[ROW_BLOCK][MAX_WIDTH / LANES];
        for (int r = 0; r < ROW_BLOCK; r++)
            for (int q = 0; q < NV; q++) acc[r][q] = splat(0.0f);
        for (int b = 0; b < n; b++)
            for (int q = 0; q < NV; q++) {
                const vec hv = load(h + (long)b * D + q * LANES);
                for (int r = 0; r < ROW_BLOCK; r++) acc[r][q] += splat(g[(long)b * D + i0 + r]) * hv;
            }
        for (int r = 0; r < ROW_BLOCK; r++)
            for (int q = 0; q < NV; q++) store(dW + (i0 + r) * D + q * LANES, acc[r][q]);
    }
    if (!db) return;
    for (int q = 0; q < NV; q++) {
        vec part[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
        int b = 0;
        for (; b + 4 <= n; b += 4)
            for (int k = 0; k < 4; k++) part[k] += load(g + (long)(b + k) * D + q * LANES);
        for (; b < n; b++) part[0] += load(g + (long)b * D + q * LANES);
        store(db + q * LANES, (part[0] + part[1]) + (part[2] + part[3]));
    }
}

/* Loss of outputs `out` against targets `y` (n x D), and when `grad` is given, its
 * gradient with respect to `out`. Sums in double; the loss is a mean over samples. */
INLINE float task_loss(const float *restrict out, const float *restrict y, int n, int task, float *restrict grad,
                       const int D, const int NV) {
    double total = 0.0;
    if (task == REGRESSION) {
        const vec scale = splat(2.0f / (float)((long)n * D));
        for (long b = 0; b < n; b++) {
            vec squares = splat(0.0f);
            for (int q = 0; q < NV; q++) {
                const long at = b * D + q * LANES;
                const vec r = load(out + at) - load(y + at);
                squares += r * r;
                if (grad) store(grad + at, scale * r);
            }
            total += sum_lanes(squares);
        }
        return (float)(total / ((double)n * D));
    }
    /* Cross entropy with the target's outputs as soft, unnormalised class weights;
     * binary: both first summed over the two halves of the coordinates. */
    const int K = task == BINARY ? 2 : D;
    const int half = D / 2;
    for (int b = 0; b < n; b++) {
        const float *o = out + (long)b * D, *t = y + (long)b * D;
        float logit[MAX_WIDTH], weight[MAX_WIDTH];
        if (task == BINARY) {
            logit[0] = logit[1] = weight[0] = weight[1] = 0.0f;
            for (int i = 0; i < D; i++) {
                logit[i >= half] += o[i];
                weight[i >= half] += t[i];
            }
        } else {
            memcpy(logit, o, D * sizeof(float));
            memcpy(weight, t, D * sizeof(float));
        }
        float peak = logit[0];
        for (int k = 1; k < K; k++) peak = logit[k] > peak ? logit[k] : peak;
        double norm = 0.0, weight_sum = 0.0, sample = 0.0;
        for (int k = 0; k < K; k++) norm += exp((double)logit[k] - peak);
        const double log_norm = peak + log(norm);
        for (int k = 0; k < K; k++) {
            sample -= (double)weight[k] * ((double)logit[k] - log_norm);
            weight_sum += weight[k];
        }
        total += sample;
        if (grad) {
            float d[MAX_WIDTH];
            for (int k = 0; k < K; k++)
                d[k] = (float)((exp((double)logit[k] - log_norm) * weight_sum - weight[k]) / n);
            float *g = grad + (long)b * D;
            for (int i = 0; i < D; i++) g[i] = task == BINARY ? d[i >= half] : d[i];
        }
    }
    return (float)(total / n);
}

INLINE void transpose(const float *restrict m, float *restrict t, const int D) {
    for (int i = 0; i < D; i++)
        for (int j = 0; j < D; j++) t[j * D + i] = m[i * D + j];
}

/* W = W0 + A B^T (LoRA) or the parameters themselves, and W^T. `scratch`: D x D. */
INLINE void effective_weights(const Shape *s, const float *restrict w0, const float *restrict p, float *restrict w,
                              float *restrict wt, float *restrict scratch, const int D, const int NV) {
    const long DD = (long)D * D;
    for (int l = 0; l < s->depth; l++) {
        float *W = w + l * DD;
        if (s->full) {
            memcpy(W, p + s->off_a + l * DD, DD * sizeof(float));
        } else {
            const float *A = p + s->off_a + l * DD, *W0 = w0 + l * DD;
            float *BT = scratch;
            transpose(p + s->off_b + l * DD, BT, D);
            for (int i = 0; i < D; i++) {
                vec acc[MAX_WIDTH / LANES];
                for (int q = 0; q < NV; q++) acc[q] = splat(0.0f);
                for (int r = 0; r < D; r++) {
                    const vec a = splat(A[i * D + r]);
                    for (int q = 0; q < NV; q++) acc[q] += a * load(BT + r * D + q * LANES);
                }
                /* The product first, then the sum, as torch's W0 + A @ B^T. */
                for (int q = 0; q < NV; q++) store(W + i * D + q * LANES, load(W0 + i * D + q * LANES) + acc[q]);
            }
        }
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
INLINE void adam(const Shape *s, const AdamConsts *k, float step_size, float weight_decay, const float *restrict grad,
                 const float *restrict mask, float *restrict p, float *restrict m, float *restrict v) {
    const float one_minus_beta1 = 1.0f - k->beta1, one_minus_beta2 = (float)(1.0 - (double)k->beta2);
    for (long i = 0; i < s->n_param; i++) {
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
    for (int i = 0; i < D; i++) {
        vec acc[MAX_WIDTH / LANES];
        for (int q = 0; q < NV; q++) acc[q] = splat(0.0f);
        for (int j = 0; j < D; j++) {
            const vec d = splat(dW[i * D + j]);
            for (int q = 0; q < NV; q++) acc[q] += d * load(B + j * D + q * LANES);
        }
        for (int q = 0; q < NV; q++) store(dA + i * D + q * LANES, acc[q]);
    }
    for (int j = 0; j < D; j++) {
        vec acc[MAX_WIDTH / LANES];
        for (int q = 0; q < NV; q++) acc[q] = splat(0.0f);
        for (int i = 0; i < D; i++) {
            const vec d = splat(dW[i * D + j]);
            for (int q = 0; q < NV; q++) acc[q] += d * load(A + i * D + q * LANES);
        }
        for (int q = 0; q < NV; q++) store(dB + j * D + q * LANES, acc[q]);
    }
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
        adam(s, k, step_size, weight_decay, grad, mask, p, m, v);
        effective_weights(s, w0, p, w, wt, scratch, D, NV);
    }
    *val_loss = network_loss(s, wt, p, vx, vy, nval, va, vb, D, NV);
}

static long work_floats(const Shape *s) {
    const long DD = (long)s->width * s->width, BD = (long)s->batch * s->width;
    return 3 * s->depth * DD + DD + s->n_param + 2 * BD + s->depth * BD + 2L * s->val_batch * s->width;
}

/* Returns 0, or -1 when the shape is out of range or memory is short (nothing done). */
int fnn_step(const Shape *s, const AdamConsts *k, int c_begin, int c_end, const float *w0, float *param,
             float *exp_avg, float *exp_avg_sq, const float *mask, const float *step_size,
             const float *weight_decay, const float *x, const float *y, const float *vx, const float *vy,
             const unsigned char *active, float *train_loss, float *val_loss) {
    if (s->width < LANES || s->width > MAX_WIDTH || s->width % LANES || s->depth < 1 || s->batch < 1 ||
        s->val_batch < 1)
        return -1;
    float *work = malloc(work_floats(s) * sizeof(float));
    if (!work) return -1;
    const long DD = (long)s->width * s->width, P = s->n_param;
    for (int c = c_begin; c < c_end; c++) {
        const float *cw0 = s->full ? NULL : w0 + c * s->depth * DD;
#define STEP(D)                                                                                                    \
    config_step(s, k, cw0, param + c * P, exp_avg + c * P, exp_avg_sq + c * P, mask + c * P, step_size[c],       \
                weight_decay[c], x + c * s->x_stride, y + c * s->y_stride, vx, vy, active[c], train_loss + c,      \
                val_loss + c, work, D, (D) / LANES)
        /* One copy of the step per width, so that every loop has a fixed length. */
        switch (s->width) {
        case 16: STEP(16); break;
        case 32: STEP(32); break;
        case 48: STEP(48); break;
        case 64: STEP(64); break;
        }
#undef STEP
    }
    free(work);
    return 0;
}
