// fp32 self-attention on the CPU, forward and backward: out = softmax(q k^T * scale) v, one head per thread at a time;
// and a bf16 forward for inference, which widens each head's q, k and v to fp32 and rounds the output back.
//
// Built on first use by vitkit/models/native.py (g++ -O3 -march=native -fopenmp, a plain C interface called through
// ctypes). PyTorch's CPU flash-attention kernel does its fp32 products with MKL, which takes a slow generic path on
// AMD CPUs; these register-tiled products run about twice as fast there. `vec` is GCC's portable vector extension:
// -march=native lowers it to AVX-512, AVX2 or NEON. A head's 197 tokens fit in cache whole, so each head computes
// its full score matrix (no online softmax); the backward recomputes it from the saved row maxima and sums.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

// The vector width follows the target: 16 floats with AVX-512 (32 registers), else 8 (AVX2 has 16 registers; NEON
// pairs its 128-bit ones). A register tile is R rows of NV vectors: with AVX-512 6 x 4 accumulators, 4 loads and a
// broadcast fill 29 of the 32 registers; with 8-float vectors 6 x 2 + 2 + 1 fill 15 of 16. A 16-float tile on AVX2
// would spill every accumulator (that build ran 19x slower than PyTorch's kernel on a Zen 3).
#if defined(__AVX512F__)
static const int W = 16;  // floats per vec
static const int NV = 4;  // vectors per tile row
#else
static const int W = 8;
static const int NV = 2;
#endif
static const int R = 6;  // rows per register tile
typedef float vec __attribute__((vector_size(4 * W), aligned(4)));  // loads and stores need not be aligned
typedef int32_t ivec __attribute__((vector_size(4 * W), aligned(4)));
typedef uint32_t uvec __attribute__((vector_size(4 * W), aligned(4)));
typedef uint16_t hvec __attribute__((vector_size(2 * W), aligned(2)));  // W bf16 values

static inline vec splat(float x) { return vec{} + x; }

// {0, 1, ..., W - 1}
static inline ivec lanes() {
    ivec x{};
    for (int l = 0; l < W; l++) x[l] = l;
    return x;
}

// acc[r][u] = sum over k < K of a[r][k * lda] * b[k * ldb + u * W ...]: entries of a broadcast, rows of b loaded as
// vectors. lda = 1 walks rows of a matrix; lda = its row stride walks its columns (a product with the transpose).
template <int N>
static inline void product(const float* const* a, long lda, long K, const float* b, long ldb, vec (&acc)[R][N]) {
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int u = 0; u < N; u++) acc[r][u] = vec{};
    for (long k = 0; k < K; k++) {
        vec bv[N];
#pragma GCC unroll 4
        for (int u = 0; u < N; u++) bv[u] = *(const vec*)(b + k * ldb + u * W);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            // a scalar times a vector: GCC broadcasts it straight from memory. (splat() adds it to 0, which keeps
            // a -0.0 apart and costs an add and a shuffle on the floating-point ports per entry: 1.5-1.7x slower on a
            // Zen 3.)
            const float av = a[r][k * lda];
#pragma GCC unroll 4
            for (int u = 0; u < N; u++) acc[r][u] += av * bv[u];
        }
    }
}

// The M x N product of a (rows a + i * a_row, entries k * a_col along them) and b (K rows of ldb), N a multiple of
// W, handed to store(row, column, vector of W results) tile by tile. Not inlined: inside the large head functions
// GCC kept a tile's row pointers on the stack and reloaded them at every step of the product (on x86; the backward
// ran 1.4x slower for it).
template <class Store>
__attribute__((noinline)) static void gemm(const float* a, long a_row, long a_col, long M, long K, const float* b,
                                           long ldb, long N, Store store) {
    auto tile = [&](auto nv, long i, long j, int rows, const float* const* ar) {
        constexpr int N = decltype(nv)::value;
        vec acc[R][N];
        product<N>(ar, a_col, K, b + j, ldb, acc);
        // Unrolled with constant indices, so the accumulators stay in registers; a loop to `rows` made GCC keep
        // them on the stack (stored after the product, loaded again here: forward 1.05-1.08x faster on a Zen 4).
#pragma GCC unroll 6
        for (int r = 0; r < R; r++)
            if (r < rows)
#pragma GCC unroll 4
                for (int u = 0; u < N; u++) store(i + r, j + u * W, acc[r][u]);
    };
    for (long i = 0; i < M; i += R) {
        const int rows = int(std::min<long>(R, M - i));
        const float* ar[R];
        for (int r = 0; r < R; r++) ar[r] = a + (i + std::min(r, rows - 1)) * a_row;  // a short tile repeats a row
        long j = 0;
        for (; j + NV * W <= N; j += NV * W) tile(std::integral_constant<int, NV>{}, i, j, rows, ar);
        for (; j < N; j += W) tile(std::integral_constant<int, 1>{}, i, j, rows, ar);
    }
}

// 2^x with a relative error of about 1e-7; exactly 0 for x <= -127 and -inf.
static inline vec exp2v(vec x) {
    const vec magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
    x = x < -127.f ? splat(-127.f) : x;
    vec t = x + magic;
    vec f = x - (t - magic);                          // x - round(x), in [-0.5, 0.5]
    ivec pow2 = ((ivec)t - 0x4B400000 + 127) << 23;  // the float 2^round(x); 0 when round(x) = -127
    // 2^f = sum over k <= 7 of (f ln 2)^k / k!, truncated after 1e-8
    vec p = splat(1.5252733804059840e-05f);
    p = p * f + 1.5403530393381608e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.6181291076284772e-03f;
    p = p * f + 5.5504108664821580e-02f;
    p = p * f + 2.4022650695910071e-01f;
    p = p * f + 6.9314718055994531e-01f;
    p = p * f + 1.f;
    return p * (vec)pow2;
}

static inline float hmax(vec x) {
    float m = x[0];
    for (int l = 1; l < W; l++) m = std::max(m, x[l]);
    return m;
}

static inline float hsum(vec x) {
    float s = 0.f;
    for (int l = 0; l < W; l++) s += x[l];
    return s;
}

static inline vec from_bf16(const uint16_t* x) {
    return (vec)(__builtin_convertvector(*(const hvec*)x, uvec) << 16);
}

// Rounded to nearest even; NaN stays NaN.
static inline void to_bf16(vec x, uint16_t* out) {
    const uvec bits = (uvec)x;
    uvec r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    r = x != x ? uvec{} + 0x7FC0 : r;
    *(hvec*)out = __builtin_convertvector(r, hvec);
}

// A (batch, heads, T, d) operand: its data and its batch, head and token strides in floats (unit stride along d).
struct Operand {
    float* data;
    long batch, head, token;
    float* at(long b, long h) const { return data + b * batch + h * head; }
};

struct Shape {
    long heads, T, d, Tp;  // Tp: T rounded up to a multiple of W, the padded row length of the score matrices
    float scale;           // of the logits, times log2(e): the softmax runs on 2^x
};

// One round of transposing W vectors in place: swapping the off-diagonal blocks of B lanes (B = W/2, ..., 2, 1).
template <int B>
static inline void swap_blocks(vec (&r)[W]) {
    const ivec lo = lanes();
    const ivec from_lo = (lo & B) ? lo + W - B : lo;  // row i keeps its lanes without bit B, takes row i+B's
    const ivec from_hi = (lo & B) ? lo + W : lo + B;  // row i+B takes row i's upper lanes, keeps its own
    for (int i = 0; i < W; i++)
        if (!(i & B)) {
            const vec a = r[i], b = r[i + B];
            r[i] = __builtin_shuffle(a, b, from_lo);
            r[i + B] = __builtin_shuffle(a, b, from_hi);
        }
}

// Transposes W vectors in place: rounds of B = W/2, ..., 2, 1 lanes.
template <int B>
static inline void transpose_rounds(vec (&r)[W]) {
    swap_blocks<B>(r);
    if constexpr (B > 1) transpose_rounds<B / 2>(r);
}

// The scaled and padded transpose of a (T, d) operand: d rows of Tp, zero past T. W x W blocks, in registers.
static void transpose(const float* x, long token, const Shape& s, float scale, float* xt) {
    for (long j = 0; j < s.Tp; j += W)
        for (long c = 0; c < s.d; c += W) {
            vec r[W];
            for (int i = 0; i < W; i++) r[i] = j + i < s.T ? *(const vec*)(x + (j + i) * token + c) * scale : vec{};
            transpose_rounds<W / 2>(r);
            for (int i = 0; i < W; i++) *(vec*)(xt + (c + i) * s.Tp + j) = r[i];
        }
}

// scores[i][j] = (q_i . k_j) * scale in log2 units, -inf on the padding columns. (Row maxima taken here, a load and
// a store per vector, made the product over only d = 64 terms 1.05x slower; the softmax takes them from the row.)
static void scores(const float* q, long q_token, const float* kt, const Shape& s, float* out) {
    const vec lane = __builtin_convertvector(lanes(), vec);
    gemm(q, q_token, 1, s.T, s.d, kt, s.Tp, s.Tp, [&](long i, long j, vec x) {
        if (j + W > s.T) x = lane + float(j) >= float(s.T) ? splat(-INFINITY) : x;
        *(vec*)(out + i * s.Tp + j) = x;
    });
}

// Per-thread scratch: two transposed operands (d x Tp), two score matrices (T x Tp), a row vector; for the bf16
// forward also fp32 copies of a head's q, k, v and out (T x d each) and its stats.
struct Scratch {
    float *at, *bt, *p, *dp, *row, *wide, *stats;
    Scratch(const Shape& s, bool bf16) {
        const long floats = 2 * s.d * s.Tp + 2 * s.T * s.Tp + s.T + (bf16 ? 4 * s.T * s.d + 2 * s.T : 0);
        at = static_cast<float*>(std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64));
        bt = at + s.d * s.Tp;
        p = bt + s.d * s.Tp;
        dp = p + s.T * s.Tp;
        row = dp + s.T * s.Tp;
        wide = bf16 ? row + s.T : nullptr;  // not allocated for the fp32 kernels
        stats = bf16 ? wide + 4 * s.T * s.d : nullptr;
    }
    ~Scratch() { std::free(at); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

// out = softmax(q k^T) v; stats[i] = (row maximum in log2 units, 1 / row sum), what the backward needs.
static void forward_head(const Operand* t, long b, long h, const Shape& s, float* stats, Scratch& m) {
    const Operand &q = t[0], &k = t[1], &v = t[2], &out = t[3];
    transpose(k.at(b, h), k.token, s, s.scale, m.at);
    scores(q.at(b, h), q.token, m.at, s, m.p);
    for (long i = 0; i < s.T; i++) {
        float* row = m.p + i * s.Tp;
        vec rmax = splat(-INFINITY);
        for (long j = 0; j < s.Tp; j += W) rmax = *(vec*)(row + j) > rmax ? *(vec*)(row + j) : rmax;
        const float mx = hmax(rmax);
        vec sum = vec{};
        for (long j = 0; j < s.Tp; j += W) {
            vec e = exp2v(*(vec*)(row + j) - mx);
            *(vec*)(row + j) = e;
            sum += e;
        }
        m.row[i] = 1.f / hsum(sum);
        stats[2 * i] = mx;
        stats[2 * i + 1] = m.row[i];
    }
    float* o = out.at(b, h);
    gemm(m.p, s.Tp, 1, s.T, s.T, v.at(b, h), v.token, s.d,
         [&](long i, long c, vec x) { *(vec*)(o + i * out.token + c) = x * m.row[i]; });
}

// With p = softmax(q k^T scale) and dp = dout v^T: ds = p * (dp - rowsum(dout * out)), dq = ds k scale,
// dk = ds^T q scale, dv = p^T dout.
static void backward_head(const Operand* t, long b, long h, const Shape& s, const float* stats, Scratch& m) {
    const Operand &q = t[0], &k = t[1], &v = t[2], &out = t[3], &dout = t[4], &dq = t[5], &dk = t[6], &dv = t[7];
    const float* qh = q.at(b, h);
    const float* kh = k.at(b, h);
    const float* doh = dout.at(b, h);
    transpose(kh, k.token, s, s.scale, m.at);
    transpose(v.at(b, h), v.token, s, 1.f, m.bt);
    scores(qh, q.token, m.at, s, m.p);
    for (long i = 0; i < s.T; i++) {
        float* row = m.p + i * s.Tp;
        for (long j = 0; j < s.Tp; j += W) *(vec*)(row + j) = exp2v(*(vec*)(row + j) - stats[2 * i]) * stats[2 * i + 1];
        const float *go = doh + i * dout.token, *o = out.at(b, h) + i * out.token;
        vec dot = vec{};
        for (long c = 0; c < s.d; c += W) dot += *(const vec*)(go + c) * *(const vec*)(o + c);
        m.row[i] = hsum(dot);
    }
    gemm(doh, dout.token, 1, s.T, s.d, m.bt, s.Tp, s.Tp, [&](long i, long j, vec x) {
        const long at = i * s.Tp + j;
        *(vec*)(m.dp + at) = *(vec*)(m.p + at) * (x - m.row[i]);  // ds, in place of dp
    });
    const float scale = s.scale / 1.4426950408889634f;  // the logits' own scale
    float *gq = dq.at(b, h), *gk = dk.at(b, h), *gv = dv.at(b, h);
    gemm(m.dp, s.Tp, 1, s.T, s.T, kh, k.token, s.d,
         [&](long i, long c, vec x) { *(vec*)(gq + i * dq.token + c) = x * scale; });
    gemm(m.dp, 1, s.Tp, s.T, s.T, qh, q.token, s.d,
         [&](long j, long c, vec x) { *(vec*)(gk + j * dk.token + c) = x * scale; });
    gemm(m.p, 1, s.Tp, s.T, s.T, doh, dout.token, s.d,
         [&](long j, long c, vec x) { *(vec*)(gv + j * dv.token + c) = x; });
}

// The bf16 forward of one head: q, k, v widened into m.wide (T x d each), the fp32 forward, out rounded back.
static void forward_head_bf16(uint16_t* const* data, const long* strides, long b, long h, const Shape& s, Scratch& m) {
    Operand wide[4];
    for (int n = 0; n < 4; n++) wide[n] = Operand{m.wide + n * s.T * s.d, 0, 0, s.d};
    for (int n = 0; n < 3; n++) {
        const uint16_t* x = data[n] + b * strides[3 * n] + h * strides[3 * n + 1];
        for (long i = 0; i < s.T; i++)
            for (long c = 0; c < s.d; c += W)
                *(vec*)(wide[n].data + i * s.d + c) = from_bf16(x + i * strides[3 * n + 2] + c);
    }
    forward_head(wide, 0, 0, s, m.stats, m);
    uint16_t* o = data[3] + b * strides[9] + h * strides[10];
    for (long i = 0; i < s.T; i++)
        for (long c = 0; c < s.d; c += W)
            to_bf16(*(const vec*)(wide[3].data + i * s.d + c), o + i * strides[11] + c);
}

template <class Head>
static void each_head(long batch, const Shape& s, int threads, bool bf16, Head head) {
#pragma omp parallel num_threads(threads)
    {
        Scratch m(s, bf16);
#pragma omp for schedule(static)
        for (long bh = 0; bh < batch * s.heads; bh++) head(bh / s.heads, bh % s.heads, m);
    }
}

static Shape shape(long heads, long T, long d, float scale) {
    return Shape{heads, T, d, (T + W - 1) / W * W, scale * 1.4426950408889634f};
}

extern "C" {

// data: q, k, v, out; strides: their (batch, head, token) strides. d must be a multiple of W (16 serves every
// build). stats: (batch, heads, T, 2) floats for the backward.
void vitkit_attention_forward(float* const* data, const long* strides, long batch, long heads, long T, long d,
                              float scale, float* stats, int threads) {
    Operand t[4];
    for (int n = 0; n < 4; n++) t[n] = Operand{data[n], strides[3 * n], strides[3 * n + 1], strides[3 * n + 2]};
    const Shape s = shape(heads, T, d, scale);
    each_head(batch, s, threads, false, [&](long b, long h, Scratch& m) {
        forward_head(t, b, h, s, stats + (b * heads + h) * T * 2, m);
    });
}

// The same for bf16 q, k, v and out (strides in bf16 elements), for inference: no stats.
void vitkit_attention_forward_bf16(uint16_t* const* data, const long* strides, long batch, long heads, long T, long d,
                                   float scale, int threads) {
    const Shape s = shape(heads, T, d, scale);
    each_head(batch, s, threads, true,
              [&](long b, long h, Scratch& m) { forward_head_bf16(data, strides, b, h, s, m); });
}

// data: q, k, v, out, dout (read) and dq, dk, dv (written); strides as above; stats from the forward.
void vitkit_attention_backward(float* const* data, const long* strides, long batch, long heads, long T, long d,
                               float scale, const float* stats, int threads) {
    Operand t[8];
    for (int n = 0; n < 8; n++) t[n] = Operand{data[n], strides[3 * n], strides[3 * n + 1], strides[3 * n + 2]};
    const Shape s = shape(heads, T, d, scale);
    each_head(batch, s, threads, false, [&](long b, long h, Scratch& m) {
        backward_head(t, b, h, s, stats + (b * heads + h) * T * 2, m);
    });
}
}
