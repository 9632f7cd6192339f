// One decode step of 1-4 rows of a layerfold DecodeNet on x86 CPUs with AVX-512 BF16, in one OpenMP
// parallel region: every GEMV, the attention and the small ops of all layers run between barriers of
// the same thread team, so a step pays one fork/join instead of one per kernel, and the rows of each
// matrix are handed out dynamically (a thread that falls behind takes fewer blocks) instead of in
// fixed halves. Built and loaded by engine/native.py (plain C ABI, no Python or torch headers).
//
// Packed matrix (N, K) of bf16: rows in blocks of 48 (zero rows pad the last one), laid out
// [N/48][K][48], so a block is one sequential stream the hardware prefetcher follows and each k adds
// x[k] times 48 weights to three fp32 accumulators. Each thread takes long contiguous runs of blocks
// (guided schedule): interleaving single blocks between threads cost ~20% of the bandwidth, and this
// layout read ~10% faster than 16-row blocks with _mm512_dpbf16_ps (paired, 2-core EPYC). With
// several rows each loaded weight vector is multiplied into every row's accumulators.
// Rounding points follow the compiled torch step: bf16 activations between ops, fp32 inside them.

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

typedef uint16_t bf16;

namespace {

constexpr int R = 48;  // rows per block

inline float bf2f(bf16 x) {
    uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline bf16 f2bf(float f) {  // round to nearest even, NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<bf16>(u >> 16);
}

inline float rbf(float f) { return bf2f(f2bf(f)); }  // round through bf16

inline __m512 load16(const bf16* p) {  // 16 bf16 -> 16 fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline __m512 exp16(__m512 x) {  // e^x (Cephes-style polynomial): ~1 ulp; below -87 clamps, above 88.7 gives inf
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

}  // namespace

extern "C" {

struct LfMat {  // a packed matrix (see the top of the file)
    const bf16* w;
    int32_t n, k;
};

struct LfLayer {
    int32_t has_attn, has_mlp, d_in, d_mid, d_out;
    // attention (has_attn)
    const bf16* attn_norm;
    LfMat wqkv;
    const bf16* bqkv;                    // (q + 2 kv) or null
    const bf16* q_norm;                  // (hd) or null
    const bf16* k_norm;
    int32_t n_heads, n_kv, hd;
    bf16* k_cache;                       // the (max_batch, n_kv, max_len, hd) cache (row r at r * n_kv * max_len * hd)
    bf16* v_cache;
    const bf16* cos;                     // (max_len, hd)
    const bf16* sin;
    LfMat wo;                            // (d_mid, q [+ d_in])
    int32_t fused_attn_sc;               // wo is [o | S]: its input is [y | h]
    LfMat attn_sc;                       // w == null unless the layer has a shortcut but no attention
    // MLP (has_mlp)
    const bf16* mlp_norm;
    LfMat wgu;                           // n = d_ffn; each block is 48 gate rows then the 48 matching up rows
    LfMat wd;                            // (d_out, d_ffn [+ d_mid])
    int32_t fused_mlp_sc;
    LfMat mlp_sc;
};

struct LfModel {
    int32_t n_layers, vocab, d_embed, d_final, max_len, window;  // window 0: none
    float eps;
    const LfLayer* layers;
    const bf16* embed;       // (vocab, d_embed), plain
    const bf16* final_norm;
    LfMat head;              // (vocab, d_final)
    int32_t max_rows;        // sequences a step may decode together (1..4)
    // scratch, zero-initialised by the caller, max_rows rows of the given stride each; see engine/native.py
    bf16* h0;                // the residual stream (two buffers: a GEMV reads one and writes the other)
    bf16* h1;
    int32_t hs;
    float* xn;               // a GEMV's input, per thread: max_rows * xs each
    int32_t xs;
    bf16* qkv;
    int32_t qs;
    float* y;                // attention output [y | h]
    int32_t ys;
    float* act;              // SwiGLU output [a | h]
    int32_t as;
    float* scores;           // per thread: max_len each
};

}  // extern "C"

namespace {

// the 48 dot products of a block against x (fp32, k = 0..K-1)
inline void block_dot(const bf16* wb, const float* x, int K, float* out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;
    int k = 0;
    for (; k + 2 <= K; k += 2) {  // two k at a time: six independent accumulator chains
        const bf16* w = wb + static_cast<size_t>(k) * R;
        const __m512 xa = _mm512_set1_ps(x[k]), xb = _mm512_set1_ps(x[k + 1]);
        a0 = _mm512_fmadd_ps(xa, load16(w), a0);
        a1 = _mm512_fmadd_ps(xa, load16(w + 16), a1);
        a2 = _mm512_fmadd_ps(xa, load16(w + 32), a2);
        b0 = _mm512_fmadd_ps(xb, load16(w + 48), b0);
        b1 = _mm512_fmadd_ps(xb, load16(w + 64), b1);
        b2 = _mm512_fmadd_ps(xb, load16(w + 80), b2);
    }
    if (k < K) {
        const bf16* w = wb + static_cast<size_t>(k) * R;
        const __m512 xa = _mm512_set1_ps(x[k]);
        a0 = _mm512_fmadd_ps(xa, load16(w), a0);
        a1 = _mm512_fmadd_ps(xa, load16(w + 16), a1);
        a2 = _mm512_fmadd_ps(xa, load16(w + 32), a2);
    }
    _mm512_storeu_ps(out, _mm512_add_ps(a0, b0));
    _mm512_storeu_ps(out + 16, _mm512_add_ps(a1, b1));
    _mm512_storeu_ps(out + 32, _mm512_add_ps(a2, b2));
}

// the same for M rows of x (row stride xs) at once: each weight is loaded once for all rows
template <int M>
inline void block_dot_rows(const bf16* wb, const float* x, size_t xs, int K, float* out) {
    __m512 acc[M][3];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = acc[m][2] = _mm512_setzero_ps();
    for (int k = 0; k < K; ++k) {
        const bf16* w = wb + static_cast<size_t>(k) * R;
        const __m512 w0 = load16(w), w1 = load16(w + 16), w2 = load16(w + 32);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
            const __m512 xm = _mm512_set1_ps(x[m * xs + k]);
            acc[m][0] = _mm512_fmadd_ps(xm, w0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(xm, w1, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(xm, w2, acc[m][2]);
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
        for (int c = 0; c < 3; ++c) _mm512_storeu_ps(out + m * R + 16 * c, acc[m][c]);
}

// out[m * 48 + j]: block row j against row m of x, for nrows rows
inline void dot_rows(int nrows, const bf16* wb, const float* x, size_t xs, int K, float* out) {
    switch (nrows) {
        case 1: block_dot(wb, x, K, out); break;
        case 2: block_dot_rows<2>(wb, x, xs, K, out); break;
        case 3: block_dot_rows<3>(wb, x, xs, K, out); break;
        default: block_dot_rows<4>(wb, x, xs, K, out); break;
    }
}

enum Epi { STORE_BF16, RESID_BF16, STORE_F32 };

// y = W x (+ bias) (+ res) for every row over blocks handed out dynamically; ends with the team's barrier.
// x, res and out_bf rows are xst, rs and os apart; out_f rows (the logits) m.n apart
inline void gemv(const LfMat& m, int nrows, const float* x, size_t xst, Epi epi, const bf16* bias,
                 const bf16* res, size_t rs, bf16* out_bf, size_t os, float* out_f) {
    const int nb = (m.n + R - 1) / R;
    const size_t bstride = static_cast<size_t>(R) * m.k;
#pragma omp for schedule(guided)
    for (int b = 0; b < nb; ++b) {
        alignas(64) float acc[4 * R];
        dot_rows(nrows, m.w + b * bstride, x, xst, m.k, acc);
        const int r0 = b * R, r1 = r0 + R < m.n ? r0 + R : m.n;
        for (int row = 0; row < nrows; ++row) {
            for (int r = r0; r < r1; ++r) {
                float v = acc[row * R + r - r0];
                if (epi == STORE_F32) {
                    out_f[static_cast<size_t>(row) * m.n + r] = v;
                } else {
                    v = rbf(v);  // the matrix product's bf16 output, as torch rounds it before bias or residual
                    if (bias) v = rbf(v + bf2f(bias[r]));
                    if (epi == RESID_BF16) v = v + bf2f(res[row * rs + r]);
                    out_bf[row * os + r] = f2bf(v);
                }
            }
        }
    }
}

inline __m512 rbf16v(__m512 x) {  // round 16 floats through bf16 (nearest even)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

// a = silu(g) * u with g, u from the interleaved gate|up blocks, for every row (act rows as apart)
inline void gemv_swiglu(const LfMat& m, int nrows, const float* x, size_t xst, float* act, size_t as) {
    const int nb = (m.n + R - 1) / R;
    const size_t bstride = static_cast<size_t>(R) * m.k;
#pragma omp for schedule(guided)
    for (int b = 0; b < nb; ++b) {
        alignas(64) float g[4 * R], u[4 * R];
        dot_rows(nrows, m.w + 2 * b * bstride, x, xst, m.k, g);
        dot_rows(nrows, m.w + (2 * b + 1) * bstride, x, xst, m.k, u);
        for (int row = 0; row < nrows; ++row) {
            for (int c = 0; c < R; c += 16) {
                const __m512 gv = rbf16v(_mm512_load_ps(g + row * R + c)), uv = rbf16v(_mm512_load_ps(u + row * R + c));
                const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(
                    _mm512_setzero_ps(), gv))));
                const __m512 a = rbf16v(_mm512_mul_ps(rbf16v(silu), uv));
                const int rows = m.n - b * R - c < 16 ? m.n - b * R - c : 16;
                if (rows > 0)
                    _mm512_mask_storeu_ps(act + row * as + b * R + c, static_cast<__mmask16>((1u << rows) - 1u), a);
            }
        }
    }
}

// xn = rmsnorm(h) * w (bf16 values, as fp32); every thread computes its own copy (no barrier needed)
inline void rmsnorm(const bf16* h, const bf16* w, int d, float eps, float* xn) {
    float ss = 0.0f;
    for (int i = 0; i < d; ++i) {
        const float v = bf2f(h[i]);
        ss += v * v;
    }
    const float r = 1.0f / std::sqrt(ss / d + eps);
    for (int i = 0; i < d; ++i) xn[i] = rbf(rbf(bf2f(h[i]) * r) * bf2f(w[i]));
}

inline void to_f32(const bf16* h, int d, float* out) {
    for (int i = 0; i < d; ++i) out[i] = bf2f(h[i]);
}

// one head's q or k: optional per-head rmsnorm, rotary at slot pos (rotate-half), rounded to bf16
inline void head_rope(const bf16* x, const bf16* norm_w, const bf16* cos, const bf16* sin, int hd, float eps,
                      float* out) {
    float t[512];
    if (norm_w) {
        float ss = 0.0f;
        for (int i = 0; i < hd; ++i) ss += bf2f(x[i]) * bf2f(x[i]);
        const float r = 1.0f / std::sqrt(ss / hd + eps);
        for (int i = 0; i < hd; ++i) t[i] = rbf(rbf(bf2f(x[i]) * r) * bf2f(norm_w[i]));
    } else {
        for (int i = 0; i < hd; ++i) t[i] = bf2f(x[i]);
    }
    const int half = hd / 2;
    for (int i = 0; i < hd; ++i) {
        const float rot = i < half ? -t[i + half] : t[i - half];
        out[i] = rbf(t[i] * bf2f(cos[i]) + rot * bf2f(sin[i]));
    }
}

inline __m512 load16m(const bf16* p, __mmask16 mk) {  // masked: lanes outside mk read as 0
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
}

// attention of query head hq at slot pos over the cache prefix [start, pos) and its own new k, v; the
// first query head of each KV group also writes the new k, v into the cache (no other head reads them
// from there in this step). Any head size up to 512: the last 16 lanes are masked.
void attend_head(const LfLayer& l, int row, const bf16* qkv, int hq, int pos, int start, int max_len, float eps,
                 float* scores, float* y) {
    const int hd = l.hd, group = l.n_heads / l.n_kv, g = hq / group, nv = (hd + 15) / 16;
    const __mmask16 last = static_cast<__mmask16>(hd % 16 ? (1u << (hd % 16)) - 1u : 0xffffu);
    auto mask = [&](int c) { return c == nv - 1 ? last : static_cast<__mmask16>(0xffffu); };
    const bf16* cos = l.cos + static_cast<size_t>(pos) * hd;
    const bf16* sin = l.sin + static_cast<size_t>(pos) * hd;
    alignas(64) float q[512], k[512], v[512];
    head_rope(qkv + hq * hd, l.q_norm, cos, sin, hd, eps, q);
    head_rope(qkv + (l.n_heads + g) * hd, l.k_norm, cos, sin, hd, eps, k);
    const bf16* vnew = qkv + (l.n_heads + l.n_kv + g) * hd;
    for (int i = 0; i < hd; ++i) v[i] = bf2f(vnew[i]);
    const size_t row_off = (static_cast<size_t>(row) * l.n_kv + g) * max_len * hd;
    bf16* kc = l.k_cache + row_off;
    bf16* vc = l.v_cache + row_off;
    if (hq % group == 0) {
        for (int i = 0; i < hd; ++i) {
            kc[static_cast<size_t>(pos) * hd + i] = f2bf(k[i]);
            vc[static_cast<size_t>(pos) * hd + i] = vnew[i];
        }
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    __m512 qv[32];
    for (int c = 0; c < nv; ++c) qv[c] = _mm512_maskz_loadu_ps(mask(c), q + 16 * c);
    const int n = pos - start + 1;  // keys: start .. pos
    float mx = -INFINITY;
    for (int j = start; j < pos; ++j) {
        const bf16* kj = kc + static_cast<size_t>(j) * hd;
        __m512 acc = _mm512_mul_ps(qv[0], load16m(kj, mask(0)));
        for (int c = 1; c < nv; ++c) acc = _mm512_fmadd_ps(qv[c], load16m(kj + 16 * c, mask(c)), acc);
        const float s = _mm512_reduce_add_ps(acc) * scale;
        scores[j - start] = s;
        mx = s > mx ? s : mx;
    }
    {
        float s = 0.0f;
        for (int i = 0; i < hd; ++i) s += q[i] * k[i];
        s *= scale;
        scores[n - 1] = s;
        mx = s > mx ? s : mx;
    }
    __m512 vsum = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(mx)));
        _mm512_storeu_ps(scores + j, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    if (j < n) {
        const __mmask16 mk = static_cast<__mmask16>((1u << (n - j)) - 1u);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, scores + j), _mm512_set1_ps(mx)));
        _mm512_mask_storeu_ps(scores + j, mk, e);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(mk, e));
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
    __m512 o[32];
    for (int c = 0; c < nv; ++c) o[c] = _mm512_setzero_ps();
    for (int jj = start; jj < pos; ++jj) {
        const __m512 p = _mm512_set1_ps(scores[jj - start]);
        const bf16* vj = vc + static_cast<size_t>(jj) * hd;
        for (int c = 0; c < nv; ++c) o[c] = _mm512_fmadd_ps(p, load16m(vj + 16 * c, mask(c)), o[c]);
    }
    const __m512 pl = _mm512_set1_ps(scores[n - 1]);
    for (int c = 0; c < nv; ++c) o[c] = _mm512_fmadd_ps(pl, _mm512_maskz_loadu_ps(mask(c), v + 16 * c), o[c]);
    float* yh = y + hq * hd;
    for (int c = 0; c < nv; ++c)
        _mm512_mask_storeu_ps(yh + 16 * c, mask(c), rbf16v(_mm512_mul_ps(o[c], _mm512_set1_ps(inv))));
}

}  // namespace

// one step for rows 0..nrows-1: row m reads toks[m], writes it at slot pos[m] of cache row m and gets
// fp32 logits at logits + m * vocab. Returns 0, or 1 when an argument is out of range
extern "C" int lf_cpu_decode(const LfModel* m, const int64_t* toks, const int32_t* pos, int32_t nrows,
                             float* logits, int32_t nthreads) {
    if (nrows < 1 || nrows > m->max_rows || nrows > 4) return 1;
    int start[4];
    for (int r = 0; r < nrows; ++r) {
        if (toks[r] < 0 || toks[r] >= m->vocab || pos[r] < 0 || pos[r] >= m->max_len) return 1;
        start[r] = (m->window > 0 && pos[r] - m->window + 1 > 0) ? pos[r] - m->window + 1 : 0;
    }
    const size_t hs = m->hs, xs = m->xs, qs = m->qs, ys = m->ys, as = m->as;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num();
        float* xn = m->xn + static_cast<size_t>(t) * m->max_rows * xs;
        float* scores = m->scores + static_cast<size_t>(t) * m->max_len;
        bf16* h = m->h0;
        bf16* hn = m->h1;
        auto next = [&]() { bf16* s = h; h = hn; hn = s; };  // the output just written becomes the stream
        auto norm = [&](const bf16* w, int d) {  // every row, into this thread's xn
            for (int r = 0; r < nrows; ++r) rmsnorm(h + r * hs, w, d, m->eps, xn + r * xs);
        };
        auto shortcut_only = [&](const LfMat& sc, int d) {  // h @ S^T where no branch carries the shortcut
            for (int r = 0; r < nrows; ++r) to_f32(h + r * hs, d, xn + r * xs);
            gemv(sc, nrows, xn, xs, STORE_BF16, nullptr, nullptr, 0, hn, hs, nullptr);
            next();
        };
#pragma omp single
        for (int r = 0; r < nrows; ++r)
            std::memcpy(h + r * hs, m->embed + toks[r] * m->d_embed, sizeof(bf16) * m->d_embed);
        for (int li = 0; li < m->n_layers; ++li) {
            const LfLayer& l = m->layers[li];
            if (l.has_attn) {
                norm(l.attn_norm, l.d_in);
                gemv(l.wqkv, nrows, xn, xs, STORE_BF16, l.bqkv, nullptr, 0, m->qkv, qs, nullptr);
                const int q_dim = l.n_heads * l.hd, units = l.n_heads + 1;
#pragma omp for schedule(dynamic, 1)
                for (int u = 0; u < nrows * units; ++u) {
                    const int r = u / units, hq = u % units;
                    if (hq < l.n_heads)
                        attend_head(l, r, m->qkv + r * qs, hq, pos[r], start[r], m->max_len, m->eps, scores,
                                    m->y + r * ys);
                    else if (l.fused_attn_sc)  // the shortcut's input rides behind y
                        to_f32(h + r * hs, l.d_in, m->y + r * ys + q_dim);
                }
                gemv(l.wo, nrows, m->y, ys, l.fused_attn_sc ? STORE_BF16 : RESID_BF16, nullptr, h, hs, hn, hs,
                     nullptr);
                next();
            } else if (l.attn_sc.w) {
                shortcut_only(l.attn_sc, l.d_in);
            }
            if (l.has_mlp) {
                norm(l.mlp_norm, l.d_mid);
                if (l.fused_mlp_sc) {
#pragma omp single nowait
                    for (int r = 0; r < nrows; ++r) to_f32(h + r * hs, l.d_mid, m->act + r * as + l.wgu.n);
                }
                gemv_swiglu(l.wgu, nrows, xn, xs, m->act, as);
                gemv(l.wd, nrows, m->act, as, l.fused_mlp_sc ? STORE_BF16 : RESID_BF16, nullptr, h, hs, hn, hs,
                     nullptr);
                next();
            } else if (l.mlp_sc.w) {
                shortcut_only(l.mlp_sc, l.d_mid);
            }
        }
        norm(m->final_norm, m->d_final);
        gemv(m->head, nrows, xn, xs, STORE_F32, nullptr, nullptr, 0, nullptr, 0, logits);
    }
    return 0;
}
