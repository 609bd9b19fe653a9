// dnad's native CPU kernels: the backward of depthwise convolutions, and training-mode BatchNorm
// forward and backward, on channels_last (NHWC) float32/float64 maps.
//
// Why: at the DARTS ops' sizes (8-64 channels, 4-32 px maps) oneDNN's depthwise backward and
// PyTorch's channels_last BatchNorm run far below what the memory allows (a 5x5 depthwise weight
// grad on an AVX2 CPU took 13.6 ms for 131k values). These loops vectorise over the channels of one
// pixel (8 floats or 4 doubles per vector, GCC/Clang vector extensions, so any target compiles) and
// keep every pass over a map in cache-sized pieces. Loaded by dnad/native/__init__.py through ctypes:
// plain C entry points, no PyTorch headers, so it builds in about a second.
//
// Numerics: the same sums as PyTorch's kernels in another order (float32 rounding differs, float64
// agrees to ~1e-14); reductions over the batch accumulate per image / per 256 rows in T and across
// those in double. Deterministic for a given thread count (static schedules, partials summed in order).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#define DNAD_PRAGMA(x) _Pragma(#x)
#else
#define DNAD_PRAGMA(x)
static inline int omp_get_thread_num() { return 0; }
#endif

namespace {

template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int L = 8;
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int L = 4;
};
template <typename V, typename T> inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T> inline void vstore(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// ---------------------------------------------------------------- depthwise convolution ----------
// Shapes: x (N, H, W, C), weight (C, k, k) as PyTorch stores (C, 1, k, k), output (N, Ho, Wo, C);
// stride s, dilation d, zero padding p on every side.

// valid outputs xo of a tap at column offset `off`: 0 <= xo*s + off < Win, xo in [0, Wo)
inline void tap_range(int off, int s, int Win, int Wo, int& lo, int& hi) {
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  const int m = Win - 1 - off;
  hi = m < 0 ? 0 : m / s + 1;
  if (hi > Wo) hi = Wo;
  if (lo > hi) lo = hi;
}

// one (H, W, C) image into the interior of a (H+2p, W+2p, C) buffer whose border is zero
template <typename T> void pad_into(const T* src, T* dst, int H, int W, int C, int p) {
  const int Wp = W + 2 * p;
  for (int y = 0; y < H; ++y)
    std::memcpy(dst + ((size_t)(y + p) * Wp + p) * C, src + (size_t)y * W * C, sizeof(T) * (size_t)W * C);
}

// y = correlation of the padded image xp (row width Wp) with wt (k*k, C): every tap is in range,
// XB output pixels per block so XB independent accumulators hide the FMA latency
template <typename T, int XB>
void corr_padded(const T* xp, const T* wt, T* y, int Wp, int C, int Ho, int Wo, int k, int s, int d) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::L;
  const size_t xs = (size_t)s * C, dc = (size_t)d * C, row = (size_t)Wp * C;
  int c0 = 0;
  for (; c0 + L <= C; c0 += L) {
    for (int yo = 0; yo < Ho; ++yo) {
      T* yrow = y + (size_t)yo * Wo * C + c0;
      const T* xbase = xp + (size_t)yo * s * row + c0;
      int xo = 0;
      for (; xo + XB <= Wo; xo += XB) {
        V acc[XB];
        for (int q = 0; q < XB; ++q) acc[q] = V{};
        for (int i = 0; i < k; ++i) {
          const T* xrow = xbase + (size_t)i * d * row + (size_t)xo * xs;
          const T* wrow = wt + (size_t)i * k * C + c0;
          for (int j = 0; j < k; ++j) {
            const V w = vload<V>(wrow + (size_t)j * C);
            const T* xq = xrow + (size_t)j * dc;
            for (int q = 0; q < XB; ++q) acc[q] += w * vload<V>(xq + q * xs);
          }
        }
        for (int q = 0; q < XB; ++q) vstore(yrow + (size_t)(xo + q) * C, acc[q]);
      }
      for (; xo < Wo; ++xo) {
        V acc = V{};
        for (int i = 0; i < k; ++i) {
          const T* xrow = xbase + (size_t)i * d * row + (size_t)xo * xs;
          const T* wrow = wt + (size_t)i * k * C + c0;
          for (int j = 0; j < k; ++j) acc += vload<V>(wrow + (size_t)j * C) * vload<V>(xrow + (size_t)j * dc);
        }
        vstore(yrow + (size_t)xo * C, acc);
      }
    }
  }
  for (; c0 < C; ++c0)  // channels past the last full vector
    for (int yo = 0; yo < Ho; ++yo)
      for (int xo = 0; xo < Wo; ++xo) {
        T a = 0;
        for (int i = 0; i < k; ++i)
          for (int j = 0; j < k; ++j)
            a += wt[(size_t)(i * k + j) * C + c0] *
                 xp[((size_t)(yo * s + i * d) * Wp + (size_t)xo * s + (size_t)j * d) * C + c0];
        y[((size_t)yo * Wo + xo) * C + c0] = a;
      }
}

// gxp (padded, zero on entry) += the transposed correlation of g with wt: the input grad of any stride
template <typename T>
void scatter_padded(const T* g, const T* wt, T* gxp, int Wp, int C, int Ho, int Wo, int k, int s, int d) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::L;
  const size_t xs = (size_t)s * C;
  int c0 = 0;
  for (; c0 + L <= C; c0 += L)
    for (int yo = 0; yo < Ho; ++yo) {
      const T* grow = g + (size_t)yo * Wo * C + c0;
      for (int i = 0; i < k; ++i) {
        T* orow = gxp + (size_t)(yo * s + i * d) * Wp * C + c0;
        for (int j = 0; j < k; ++j) {
          const V w = vload<V>(wt + (size_t)(i * k + j) * C + c0);
          T* o = orow + (size_t)j * d * C;
          for (int xo = 0; xo < Wo; ++xo)
            vstore(o + xo * xs, vload<V>(o + xo * xs) + w * vload<V>(grow + (size_t)xo * C));
        }
      }
    }
  for (; c0 < C; ++c0)
    for (int yo = 0; yo < Ho; ++yo)
      for (int i = 0; i < k; ++i)
        for (int j = 0; j < k; ++j)
          for (int xo = 0; xo < Wo; ++xo)
            gxp[((size_t)(yo * s + i * d) * Wp + (size_t)xo * s + (size_t)j * d) * C + c0] +=
                wt[(size_t)(i * k + j) * C + c0] * g[((size_t)yo * Wo + xo) * C + c0];
}

// gw (k*k, C) += the weight grad of one image; taps clipped to the image (no padded copy)
template <typename T>
void wgrad_img(const T* x, const T* g, T* gw, int H, int W, int C, int Ho, int Wo, int k, int s, int d, int p) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::L;
  const size_t xs = (size_t)s * C;
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      const int off = -p + j * d;
      int lo, hi;
      tap_range(off, s, W, Wo, lo, hi);
      T* gwt = gw + (size_t)(i * k + j) * C;
      int c0 = 0;
      for (; c0 + L <= C; c0 += L) {
        V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
        for (int yo = 0; yo < Ho; ++yo) {
          const int yi = yo * s - p + i * d;
          if (yi < 0 || yi >= H) continue;
          const T* gp = g + (size_t)yo * Wo * C + c0;
          const T* xp = x + (size_t)yi * W * C + c0 + (std::ptrdiff_t)off * C;
          int xo = lo;
          for (; xo + 4 <= hi; xo += 4) {
            a0 += vload<V>(gp + (size_t)xo * C) * vload<V>(xp + xo * xs);
            a1 += vload<V>(gp + (size_t)(xo + 1) * C) * vload<V>(xp + (xo + 1) * xs);
            a2 += vload<V>(gp + (size_t)(xo + 2) * C) * vload<V>(xp + (xo + 2) * xs);
            a3 += vload<V>(gp + (size_t)(xo + 3) * C) * vload<V>(xp + (xo + 3) * xs);
          }
          for (; xo < hi; ++xo) a0 += vload<V>(gp + (size_t)xo * C) * vload<V>(xp + xo * xs);
        }
        vstore(gwt + c0, vload<V>(gwt + c0) + ((a0 + a1) + (a2 + a3)));
      }
      for (; c0 < C; ++c0) {
        T a = 0;
        for (int yo = 0; yo < Ho; ++yo) {
          const int yi = yo * s - p + i * d;
          if (yi < 0 || yi >= H) continue;
          for (int xo = lo; xo < hi; ++xo)
            a += g[((size_t)yo * Wo + xo) * C + c0] * x[((size_t)yi * W + (size_t)(xo * s + off)) * C + c0];
        }
        gwt[c0] += a;
      }
    }
}

// (C, k*k) -> (k*k, C), the taps reversed when `flip`
template <typename T> void taps_major(const T* w, T* wt, int C, int k, bool flip) {
  const int kk = k * k;
  for (int c = 0; c < C; ++c)
    for (int t = 0; t < kk; ++t) wt[(size_t)(flip ? kk - 1 - t : t) * C + c] = w[(size_t)c * kk + t];
}

// forward of any stride/dilation: each image padded into a per-thread buffer, then correlated
template <typename T>
void dw_forward(const T* x, const T* w, T* y, int N, int H, int W, int C, int Ho, int Wo, int k, int s, int d,
                int p, int nt) {
  std::vector<T> wt((size_t)k * k * C);
  taps_major(w, wt.data(), C, k, false);
  const int Wp = W + 2 * p;
  const size_t padded = (size_t)(H + 2 * p) * Wp * C;
DNAD_PRAGMA(omp parallel num_threads(N < nt ? (N > 0 ? N : 1) : nt))
  {
    std::vector<T> buf(padded, T(0));
DNAD_PRAGMA(omp for schedule(static))
    for (int n = 0; n < N; ++n) {
      pad_into(x + (size_t)n * H * W * C, buf.data(), H, W, C, p);
      corr_padded<T, 4>(buf.data(), wt.data(), y + (size_t)n * Ho * Wo * C, Wp, C, Ho, Wo, k, s, d);
    }
  }
}

template <typename T>
void dw_backward(const T* x, const T* w, const T* g, T* gin, T* gw, int N, int H, int W, int C, int Ho, int Wo,
                 int k, int s, int d, int p, int nt) {
  const size_t KC = (size_t)k * k * C;
  // stride 1 with 'same' padding: the input grad is the correlation of g with the flipped kernel
  const bool gather = s == 1 && Ho == H && Wo == W && 2 * p == (k - 1) * d;
  std::vector<T> wt(KC);
  taps_major(w, wt.data(), C, k, gather);
  std::vector<double> acc(gw ? (size_t)nt * KC : 0, 0.0);
  const int Wp = (gather ? Wo : W) + 2 * p;
  const size_t padded = (size_t)((gather ? Ho : H) + 2 * p) * Wp * C;
DNAD_PRAGMA(omp parallel num_threads(nt))
  {
    const int t = omp_get_thread_num();
    std::vector<T> img(gw ? KC : 0);
    std::vector<T> buf(gin ? padded : 0, T(0));
DNAD_PRAGMA(omp for schedule(static))
    for (int n = 0; n < N; ++n) {
      const T* gn = g + (size_t)n * Ho * Wo * C;
      if (gin) {
        T* gi = gin + (size_t)n * H * W * C;
        if (gather) {
          pad_into(gn, buf.data(), Ho, Wo, C, p);
          corr_padded<T, 4>(buf.data(), wt.data(), gi, Wp, C, H, W, k, 1, d);
        } else {
          std::fill(buf.begin(), buf.end(), T(0));
          scatter_padded(gn, wt.data(), buf.data(), Wp, C, Ho, Wo, k, s, d);
          for (int y = 0; y < H; ++y)
            std::memcpy(gi + (size_t)y * W * C, buf.data() + ((size_t)(y + p) * Wp + p) * C,
                        sizeof(T) * (size_t)W * C);
        }
      }
      if (gw) {
        std::fill(img.begin(), img.end(), T(0));
        wgrad_img(x + (size_t)n * H * W * C, gn, img.data(), H, W, C, Ho, Wo, k, s, d, p);
        double* a = acc.data() + (size_t)t * KC;
        for (size_t q = 0; q < KC; ++q) a[q] += img[q];
      }
    }
  }
  if (gw)
    for (int c = 0; c < C; ++c)
      for (int tap = 0; tap < k * k; ++tap) {
        double sum = 0;
        for (int t = 0; t < nt; ++t) sum += acc[(size_t)t * KC + (size_t)tap * C + c];
        gw[(size_t)c * k * k + tap] = (T)sum;
      }
}

// ---------------------------------------------------------------- BatchNorm (training) -----------
// x is M rows of C channels (an NHWC map: M = N*H*W). Per-channel sums: a float partial per 256
// rows, double across them and across threads.
constexpr int64_t ROWS = 256;

// out[c] = sum_r (x[r,c] - center[c])^p, p = 1 (center may be null) or 2
template <typename T>
void column_sums(const T* x, const T* center, int64_t M, int C, bool square, double* out, int nt) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::L;
  std::vector<double> part((size_t)nt * C, 0.0);
  const int64_t chunks = (M + ROWS - 1) / ROWS;
DNAD_PRAGMA(omp parallel num_threads(nt))
  {
    double* pt = part.data() + (size_t)omp_get_thread_num() * C;
DNAD_PRAGMA(omp for schedule(static))
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t r0 = ch * ROWS, r1 = std::min(M, r0 + ROWS);
      int c0 = 0;
      for (; c0 + L <= C; c0 += L) {
        const V m = center ? vload<V>(center + c0) : V{};
        V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
        const T* p = x + c0;
        int64_t r = r0;
        if (square) {
          for (; r + 4 <= r1; r += 4) {
            const V d0 = vload<V>(p + r * C) - m, d1 = vload<V>(p + (r + 1) * C) - m;
            const V d2 = vload<V>(p + (r + 2) * C) - m, d3 = vload<V>(p + (r + 3) * C) - m;
            a0 += d0 * d0;
            a1 += d1 * d1;
            a2 += d2 * d2;
            a3 += d3 * d3;
          }
          for (; r < r1; ++r) {
            const V d0 = vload<V>(p + r * C) - m;
            a0 += d0 * d0;
          }
        } else {
          for (; r + 4 <= r1; r += 4) {
            a0 += vload<V>(p + r * C) - m;
            a1 += vload<V>(p + (r + 1) * C) - m;
            a2 += vload<V>(p + (r + 2) * C) - m;
            a3 += vload<V>(p + (r + 3) * C) - m;
          }
          for (; r < r1; ++r) a0 += vload<V>(p + r * C) - m;
        }
        const V sum = (a0 + a1) + (a2 + a3);
        for (int b = 0; b < L; ++b) pt[c0 + b] += sum[b];
      }
      for (; c0 < C; ++c0) {
        const T m = center ? center[c0] : T(0);
        T a = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const T v = x[r * C + c0] - m;
          a += square ? v * v : v;
        }
        pt[c0] += a;
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    double sum = 0;
    for (int t = 0; t < nt; ++t) sum += part[(size_t)t * C + c];
    out[c] = sum;
  }
}

// out = a*x + b (+ e*z when z is given), per channel
template <typename T>
void affine_rows(const T* x, const T* a, const T* b, const T* z, const T* e, T* out, int64_t M, int C, int nt) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::L;
DNAD_PRAGMA(omp parallel for schedule(static) num_threads(nt))
  for (int64_t r = 0; r < M; ++r) {
    const T* xr = x + r * C;
    const T* zr = z ? z + r * C : nullptr;
    T* o = out + r * C;
    int c0 = 0;
    for (; c0 + L <= C; c0 += L) {
      V v = vload<V>(xr + c0) * vload<V>(a + c0) + vload<V>(b + c0);
      if (zr) v += vload<V>(zr + c0) * vload<V>(e + c0);
      vstore(o + c0, v);
    }
    for (; c0 < C; ++c0) o[c0] = xr[c0] * a[c0] + b[c0] + (zr ? zr[c0] * e[c0] : T(0));
  }
}

template <typename T>
void bn_forward(const T* x, const T* w, const T* b, T* y, T* mean, T* invstd, T* rmean, T* rvar, int64_t M, int C,
                double momentum, double eps, int nt) {
  std::vector<double> s(C);
  column_sums<T>(x, nullptr, M, C, false, s.data(), nt);
  for (int c = 0; c < C; ++c) mean[c] = (T)(s[c] / (double)M);
  column_sums<T>(x, mean, M, C, true, s.data(), nt);  // two passes: no cancellation in the variance
  std::vector<T> a(C), shift(C);
  for (int c = 0; c < C; ++c) {
    const double var = s[c] / (double)M;
    const T is = (T)(1.0 / std::sqrt(var + eps));
    invstd[c] = is;
    if (rmean) rmean[c] = (T)((1.0 - momentum) * rmean[c] + momentum * mean[c]);
    if (rvar) rvar[c] = (T)((1.0 - momentum) * rvar[c] + momentum * s[c] / (double)(M > 1 ? M - 1 : 1));
    a[c] = w ? w[c] * is : is;
    shift[c] = (b ? b[c] : T(0)) - mean[c] * a[c];
  }
  affine_rows<T>(x, a.data(), shift.data(), nullptr, nullptr, y, M, C, nt);
}

// sums of g and of g*(x - mean) per channel, in one pass over both maps
template <typename T>
void grad_sums(const T* x, const T* g, const T* mean, int64_t M, int C, double* sg, double* sgx, int nt) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::L;
  std::vector<double> part((size_t)nt * 2 * C, 0.0);
  const int64_t chunks = (M + ROWS - 1) / ROWS;
DNAD_PRAGMA(omp parallel num_threads(nt))
  {
    double* pg = part.data() + (size_t)omp_get_thread_num() * 2 * C;
    double* px = pg + C;
DNAD_PRAGMA(omp for schedule(static))
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t r0 = ch * ROWS, r1 = std::min(M, r0 + ROWS);
      int c0 = 0;
      for (; c0 + L <= C; c0 += L) {
        const V m = vload<V>(mean + c0);
        V g0 = V{}, g1 = V{}, x0 = V{}, x1 = V{};
        int64_t r = r0;
        for (; r + 2 <= r1; r += 2) {
          const V ga = vload<V>(g + r * C + c0), gb = vload<V>(g + (r + 1) * C + c0);
          g0 += ga;
          g1 += gb;
          x0 += ga * (vload<V>(x + r * C + c0) - m);
          x1 += gb * (vload<V>(x + (r + 1) * C + c0) - m);
        }
        for (; r < r1; ++r) {
          const V ga = vload<V>(g + r * C + c0);
          g0 += ga;
          x0 += ga * (vload<V>(x + r * C + c0) - m);
        }
        const V sgv = g0 + g1, sxv = x0 + x1;
        for (int b = 0; b < L; ++b) {
          pg[c0 + b] += sgv[b];
          px[c0 + b] += sxv[b];
        }
      }
      for (; c0 < C; ++c0) {
        T a = 0, e = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const T gv = g[r * C + c0];
          a += gv;
          e += gv * (x[r * C + c0] - mean[c0]);
        }
        pg[c0] += a;
        px[c0] += e;
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    double a = 0, e = 0;
    for (int t = 0; t < nt; ++t) {
      a += part[(size_t)t * 2 * C + c];
      e += part[(size_t)t * 2 * C + C + c];
    }
    sg[c] = a;
    sgx[c] = e;
  }
}

template <typename T>
void bn_backward(const T* x, const T* g, const T* w, const T* mean, const T* invstd, T* gx, T* gw, T* gb, int64_t M,
                 int C, int nt) {
  std::vector<double> sg(C), sgx(C);
  grad_sums<T>(x, g, mean, M, C, sg.data(), sgx.data(), nt);
  if (gw)
    for (int c = 0; c < C; ++c) gw[c] = (T)(sgx[c] * invstd[c]);
  if (gb)
    for (int c = 0; c < C; ++c) gb[c] = (T)sg[c];
  if (!gx) return;
  // gx = w*invstd * (g - mean(g) - (x - mean) * invstd^2 * mean(g*(x - mean))) = A*g + B*x + D
  std::vector<T> A(C), B(C), D(C);
  for (int c = 0; c < C; ++c) {
    const double is = invstd[c], a = is * (w ? (double)w[c] : 1.0);
    const double bc = -a * is * is * sgx[c] / (double)M;
    A[c] = (T)a;
    B[c] = (T)bc;
    D[c] = (T)(-a * sg[c] / (double)M - (double)mean[c] * bc);
  }
  affine_rows<T>(g, A.data(), D.data(), x, B.data(), gx, M, C, nt);
}

}  // namespace

extern "C" {
int dnad_native_abi() { return 3; }
int dnad_native_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

#define DNAD_DW(SUF, T)                                                                                  \
  void dnad_dw_forward_##SUF(const T* x, const T* w, T* y, int N, int H, int W, int C, int Ho, int Wo, int k, \
                             int s, int d, int p, int nt) {                                              \
    dw_forward<T>(x, w, y, N, H, W, C, Ho, Wo, k, s, d, p, nt);                                              \
  }                                                                                                      \
  void dnad_dw_backward_##SUF(const T* x, const T* w, const T* g, T* gin, T* gw, int N, int H, int W, int C, \
                              int Ho, int Wo, int k, int s, int d, int p, int nt) {                      \
    dw_backward<T>(x, w, g, gin, gw, N, H, W, C, Ho, Wo, k, s, d, p, nt);                                    \
  }                                                                                                      \
  void dnad_bn_forward_##SUF(const T* x, const T* w, const T* b, T* y, T* mean, T* invstd, T* rmean, T* rvar, \
                             int64_t M, int C, double momentum, double eps, int nt) {                   \
    bn_forward<T>(x, w, b, y, mean, invstd, rmean, rvar, M, C, momentum, eps, nt);                           \
  }                                                                                                      \
  void dnad_bn_backward_##SUF(const T* x, const T* g, const T* w, const T* mean, const T* invstd, T* gx, T* gw, \
                              T* gb, int64_t M, int C, int nt) {                                         \
    bn_backward<T>(x, g, w, mean, invstd, gx, gw, gb, M, C, nt);                                             \
  }
DNAD_DW(f32, float)
DNAD_DW(f64, double)
}
