// Fused block-circulant product for few rows (decode) on the CPU: bcllm.kernel builds this file
// on first use through torch's extension mechanism. Conventions as in bcllm/circulant.py
// (docs/DESIGN.md sections 1 and 4): x (n, in) float32, planar spectra (2, F, q, p) float32 (real
// parts, then imaginary parts), F = ceil(b/2); for even b the Nyquist frequency b/2, real, sits in
// the place of frequency 0's imaginary part (zero), so that a block's spectra are b floats, as
// many as its weights,
//
//   x_hat[r, i, f] = sum_t x[r, i*b + t] exp(-2 pi i f t / b)              (real DFT of each block)
//   y_hat[r, j, f] = sum_i x_hat[r, i, f] spec[f, i, j]                     (complex multiply-accumulate)
//   y[r, j*b + t]  = irfft(y_hat[r, j, :])[t]                               (inverse real DFT)
//
// in one pass that reads every spectrum value once (two streams, real and imaginary). The complex
// products are real multiply-adds on the planar parts, Re += xr Sr - xi Si and Im += xr Si + xi Sr,
// for a tile of output blocks at a time whose sums stay in registers over all input blocks: no
// shuffles, no partial sums through memory (at the folded frequency 0 the two real parts multiply
// separately: Re += xr Sr, Im += xi Si). The spectra may also be int8 codes with one float32 scale
// per frequency and output block, (F, p) (bcllm.ops.circulant.quantize_spectra): the codes are
// widened to float in registers and the scale multiplies each output sum once, after the input
// blocks (it does not depend on the input block), so a quarter of the bytes is read. With
// several threads each takes a contiguous range of frequencies and adds its frequencies' share of
// the inverse DFT into its own output, summed at the end: the inverse DFT is linear in y_hat.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

namespace {

struct Tables {
  std::vector<float> fwd_re, fwd_im;  // (b, F): cos(2 pi f t / b), -sin(2 pi f t / b)
  std::vector<float> inv_re, inv_im;  // (F, b): w_f cos(2 pi f t / b) / b, -w_f sin(2 pi f t / b) / b
  // even b, f = 0: fwd_im and inv_im hold the folded Nyquist's (-1)^t and (-1)^t / b instead
};

// Frequencies stored per block: ceil(b / 2) (bcllm.circulant.stored_frequencies).
inline int64_t stored_frequencies(int64_t b) { return (b + 1) / 2; }

// Whether frequency f holds the folded pair (Re of f = 0, the real Nyquist value): f = 0 of even b.
inline bool folded(int64_t f, int64_t b) { return f == 0 && b % 2 == 0; }

// A scratch buffer per thread and slot, kept across calls: no allocation on the decode path.
float* scratch(int slot, size_t n) {
  static thread_local std::vector<float> buffers[11];
  std::vector<float>& buffer = buffers[slot];
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// DFT tables for block size b, computed once (in double) and kept for the life of the process.
const Tables& tables(int64_t b) {
  static std::mutex mutex;
  static std::map<int64_t, Tables> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(b);
  if (found != cache.end()) return found->second;
  const int64_t F = stored_frequencies(b);
  Tables t;
  t.fwd_re.resize(b * F); t.fwd_im.resize(b * F); t.inv_re.resize(F * b); t.inv_im.resize(F * b);
  for (int64_t f = 0; f < F; ++f) {
    // irfft counts each frequency twice (its mirror), except f = 0 (and the Nyquist frequency)
    const double w = f == 0 ? 1.0 : 2.0;
    for (int64_t s = 0; s < b; ++s) {
      const double angle = 2.0 * M_PI * double((f * s) % b) / double(b), sign = s % 2 ? -1.0 : 1.0;
      t.fwd_re[s * F + f] = float(std::cos(angle));
      t.fwd_im[s * F + f] = float(folded(f, b) ? sign : -std::sin(angle));
      t.inv_re[f * b + s] = float(w * std::cos(angle) / b);
      t.inv_im[f * b + s] = float(folded(f, b) ? sign / b : -w * std::sin(angle) / b);
    }
  }
  return cache.emplace(b, std::move(t)).first->second;
}

struct Problem {
  const float* x;       // (n, in)
  const float* spec;    // (2, F, q, p): real parts, then imaginary parts (float32 spectra), or null
  const int8_t* codes;  // the same layout as int8 codes (int8 spectra), or null
  const float* scales;  // (F, p): the codes' scale per frequency and output block
  int64_t n, in, out, b, F, q, p;
};

// 16 floats (one AVX-512 register, two AVX ones): GCC/Clang vector extensions, unaligned access.
typedef float vec __attribute__((vector_size(64), aligned(4)));
constexpr int64_t V = 16;
inline __attribute__((always_inline)) vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline __attribute__((always_inline)) void store(float* p, const vec& v) { std::memcpy(p, &v, sizeof v); }
// 16 int8 codes widened to one vec of floats: sign-extend and convert in registers (the generic
// __builtin_convertvector compiled to scalar conversions on AVX2, 2.7x slower than float spectra).
inline __attribute__((always_inline)) vec load(const int8_t* p) {
  vec v;
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(__i386__))
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&v, &f, sizeof v);
#elif defined(__AVX2__) && (defined(__x86_64__) || defined(__i386__))
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
  std::memcpy(&v, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof lo, &hi, sizeof hi);
#else
  typedef int8_t codes16 __attribute__((vector_size(16), aligned(1)));
  codes16 c;
  std::memcpy(&c, p, sizeof c);
  v = __builtin_convertvector(c, vec);
#endif
  return v;
}

// The spectra of the problem as S (float: the float32 spectra; int8_t: the codes).
template <typename S> inline const S* planes(const Problem& P);
template <> inline const float* planes<float>(const Problem& P) { return P.spec; }
template <> inline const int8_t* planes<int8_t>(const Problem& P) { return P.codes; }

// x_hat, frequency-major per row: xr[(r * F + f) * q + i] (and xi); the last block is zero-padded.
// Vectorised over input blocks: the row is first transposed to xt[t][i] (b x q, q rounded up).
// Inputs t and b - t share cos and have opposite sin, so their sum and difference halve the work:
// Re = x[0] + sum_s (x[s] + x[b-s]) cos + [b even] x[b/2] cos(pi f), Im = -sum_s (x[s] - x[b-s]) sin;
// the folded Nyquist (even b, "Im" of f = 0) has Re's form with the coefficients (-1)^s.
void forward_dft(const Problem& P, const Tables& t, float* xr, float* xi) {
  const int64_t b = P.b, F = P.F, q = P.q, qv = (q + V - 1) / V * V, h = (b - 1) / 2;
  float* xt = scratch(0, b * qv);
  float* sum = scratch(1, h * qv);
  float* diff = scratch(2, h * qv);
  for (int64_t r = 0; r < P.n; ++r) {
    std::fill(xt, xt + b * qv, 0.f);
    const float* xs = P.x + r * P.in;
    for (int64_t i = 0; i < q; ++i) {
      for (int64_t s = 0, len = std::min(b, P.in - i * b); s < len; ++s) xt[s * qv + i] = xs[i * b + s];
    }
    for (int64_t s = 1; s <= h; ++s) {
      for (int64_t l = 0; l < qv; ++l) {
        sum[(s - 1) * qv + l] = xt[s * qv + l] + xt[(b - s) * qv + l];
        diff[(s - 1) * qv + l] = xt[s * qv + l] - xt[(b - s) * qv + l];
      }
    }
    for (int64_t i0 = 0; i0 < q; i0 += V) {
      const int64_t width = std::min(V, q - i0);
      for (int64_t f = 0; f < F; ++f) {
        const bool nyquist = folded(f, b);
        vec re = load(xt + i0), im = nyquist ? load(xt + i0) : vec{};
        for (int64_t s = 1; s <= h; ++s) {
          re += t.fwd_re[s * F + f] * load(sum + (s - 1) * qv + i0);
          im += t.fwd_im[s * F + f] * load((nyquist ? sum : diff) + (s - 1) * qv + i0);
        }
        if (b % 2 == 0) {
          re += t.fwd_re[b / 2 * F + f] * load(xt + b / 2 * qv + i0);
          if (nyquist) im += t.fwd_im[b / 2 * F] * load(xt + b / 2 * qv + i0);
        }
        float out[2 * V];
        store(out, re);
        store(out + V, im);
        std::copy(out, out + width, xr + (r * P.F + f) * q + i0);
        std::copy(out + V, out + V + width, xi + (r * P.F + f) * q + i0);
      }
    }
  }
}

// Software prefetch distance in rows of the spectra. Cold, 1 row, two threads, median us of three
// alternated runs without / with 8 rows: 11008x4096 b=64 143-180 / 121-150, 1536x576 b=16
// 14-17 / 14-16; 4 rows gained less, 32 and 64 lost.
constexpr int64_t PREFETCH_ROWS = 8;

// y_hat[r, j, f] for one frequency f and T vectors of output blocks j0 .. j0 + T*V, every row r:
// the accumulators stay in registers over all q input blocks, so each spectrum value is loaded
// once and no partial sum goes through memory. Two accumulators per part break the chain of
// dependent multiply-adds (their latency, not memory, would set the pace). Folded: frequency 0
// of even b, two real products (Re x Sr, Im x Si). S = int8_t: codes, scaled per output block at the end.
template <int T, bool Folded, typename S>
void multiply_tile(const Problem& P, const float* xr, const float* xi, int64_t f, int64_t j0, float* yr, float* yi) {
  const int64_t p = P.p, q = P.q;
  const S* __restrict__ sr = planes<S>(P) + f * q * p + j0;
  const S* __restrict__ si = planes<S>(P) + (P.F + f) * q * p + j0;
  for (int64_t r = 0; r < P.n; ++r) {
    const float* ar = xr + (r * P.F + f) * q;
    const float* ai = xi + (r * P.F + f) * q;
    vec re0[T] = {}, re1[T] = {}, im0[T] = {}, im1[T] = {};
    for (int64_t i = 0; i < q; ++i) {
      const float a = ar[i], c = ai[i];
      for (int k = 0; k < T; ++k) {
        if (r == 0) {  // the tile's lines PREFETCH_ROWS input blocks ahead (past the plane: the next one's)
          __builtin_prefetch(sr + (i + PREFETCH_ROWS) * p + k * V);
          __builtin_prefetch(si + (i + PREFETCH_ROWS) * p + k * V);
        }
        const vec vr = load(sr + i * p + k * V), vi = load(si + i * p + k * V);
        if constexpr (Folded) {
          re0[k] += a * vr;
          im0[k] += c * vi;
        } else {
          re0[k] += a * vr;
          re1[k] -= c * vi;
          im0[k] += a * vi;
          im1[k] += c * vr;
        }
      }
    }
    for (int k = 0; k < T; ++k) {
      if constexpr (std::is_same_v<S, int8_t>) {
        const vec scale = load(P.scales + f * p + j0 + k * V);
        store(yr + r * p + j0 + k * V, (re0[k] + re1[k]) * scale);
        store(yi + r * p + j0 + k * V, (im0[k] + im1[k]) * scale);
      } else {
        store(yr + r * p + j0 + k * V, re0[k] + re1[k]);
        store(yi + r * p + j0 + k * V, im0[k] + im1[k]);
      }
    }
  }
}

// Vectors per tile: 4 accumulators each fill 24 of AVX-512's 32 registers (AVX2 has 16 halves).
#ifdef __AVX512F__
constexpr int TILE = 6;
#else
constexpr int TILE = 2;
#endif

// One tile of `vectors` (1..T) vectors at column j0: the template instance of that width.
template <int T, typename S>
void multiply_tile_at(const Problem& P, const float* xr, const float* xi, int64_t f, int64_t j0, float* yr, float* yi,
                      int64_t vectors = T) {
  if constexpr (T > 1) {
    if (vectors < T) return multiply_tile_at<T - 1, S>(P, xr, xi, f, j0, yr, yi, vectors);
  }
  if (folded(f, P.b)) multiply_tile<T, true, S>(P, xr, xi, f, j0, yr, yi);
  else multiply_tile<T, false, S>(P, xr, xi, f, j0, yr, yi);
}

// y_hat[r, :, f] into yr/yi (n, p): full tiles, then one of the vectors left, then (p not a
// multiple of V) one vector ending at column p, which recomputes a few columns to the same values.
template <typename S>
void multiply_accumulate(const Problem& P, const float* xr, const float* xi, int64_t f, float* yr, float* yi) {
  const int64_t p = P.p;
  if (p < V) {  // too narrow for one vector (tiny layers): plain loops
    const S* spec = planes<S>(P);
    for (int64_t r = 0; r < P.n; ++r) {
      for (int64_t j = 0; j < p; ++j) {
        float re = 0.f, im = 0.f;
        for (int64_t i = 0; i < P.q; ++i) {
          const float a = xr[(r * P.F + f) * P.q + i], c = xi[(r * P.F + f) * P.q + i];
          const float vr = spec[(f * P.q + i) * p + j], vi = spec[((P.F + f) * P.q + i) * p + j];
          if (folded(f, P.b)) { re += a * vr; im += c * vi; }
          else { re += a * vr - c * vi; im += a * vi + c * vr; }
        }
        const float scale = std::is_same_v<S, int8_t> ? P.scales[f * p + j] : 1.f;
        yr[r * p + j] = re * scale;
        yi[r * p + j] = im * scale;
      }
    }
    return;
  }
  int64_t j = 0;
  for (; j + TILE * V <= p; j += TILE * V) multiply_tile_at<TILE, S>(P, xr, xi, f, j, yr, yi);
  const int64_t left = (p - j) / V;  // whole vectors left, fewer than TILE
  if (left > 0) multiply_tile_at<TILE, S>(P, xr, xi, f, j, yr, yi, left);
  j += left * V;
  if (j < p) multiply_tile_at<1, S>(P, xr, xi, f, p - V, yr, yi);
}

// y[r, j*b + t] = sum over f in [f0, f1) of the inverse DFT terms of y_hat[r, j, f], cropped to
// `out` columns. y_hat frequency-major: yr[(f - f0) * n * p + r * p + j]. B > 0: the block size,
// a multiple of V known at compile time (held in registers).
template <int64_t B>
void inverse_dft(const Problem& P, const Tables& t, const float* yr, const float* yi, int64_t f0, int64_t f1,
                 float* y) {
  const int64_t b = B > 0 ? B : P.b, nf = f1 - f0, stride = P.n * P.p;
  float* acc = scratch(3, b);
  for (int64_t r = 0; r < P.n; ++r) {
    for (int64_t j = 0; j < P.p; ++j) {
      const int64_t start = j * b, len = std::min(b, P.out - start);
      if (len <= 0) break;
      const float* a = yr + r * P.p + j;
      const float* c = yi + r * P.p + j;
      if constexpr (B > 0) {
        vec sum[B / V] = {};
        for (int64_t f = 0; f < nf; ++f) {
          const float* u = t.inv_re.data() + (f0 + f) * B;
          const float* v = t.inv_im.data() + (f0 + f) * B;
          for (int64_t k = 0; k < B / V; ++k) sum[k] += a[f * stride] * load(u + k * V) + c[f * stride] * load(v + k * V);
        }
        for (int64_t k = 0; k < B / V; ++k) store(acc + k * V, sum[k]);
      } else {
        std::fill(acc, acc + b, 0.f);
        for (int64_t f = 0; f < nf; ++f) {
          const float* u = t.inv_re.data() + (f0 + f) * b;
          const float* v = t.inv_im.data() + (f0 + f) * b;
          for (int64_t s = 0; s < b; ++s) acc[s] += a[f * stride] * u[s] + c[f * stride] * v[s];
        }
      }
      std::copy(acc, acc + len, y + r * P.out + start);
    }
  }
}

// Frequencies [f0, f1): their multiply-accumulate over all blocks, then their share of the
// inverse DFT, written (not added) into y (n, out).
template <typename S>
void frequency_range(const Problem& P, const Tables& t, const float* xr, const float* xi, int64_t f0, int64_t f1,
                     float* y) {
  const int64_t size = P.n * P.p;
  float* yr = scratch(6, size * (f1 - f0));
  float* yi = scratch(7, size * (f1 - f0));
  for (int64_t f = f0; f < f1; ++f) multiply_accumulate<S>(P, xr, xi, f, yr + (f - f0) * size, yi + (f - f0) * size);
  switch (P.b) {
    case 16: inverse_dft<16>(P, t, yr, yi, f0, f1, y); break;
    case 32: inverse_dft<32>(P, t, yr, yi, f0, f1, y); break;
    case 64: inverse_dft<64>(P, t, yr, yi, f0, f1, y); break;
    case 128: inverse_dft<128>(P, t, yr, yi, f0, f1, y); break;
    default: inverse_dft<0>(P, t, yr, yi, f0, f1, y);
  }
}


// The whole product for P (its spectra as S), into y: the forward DFT, then the frequencies split
// over `threads` tasks on torch's intra-op thread pool (0: all of its threads, read here: a compiled
// graph cannot ask torch for the count), each writing its share of the inverse DFT, summed at the end.
template <typename S>
void product(Problem P, torch::Tensor& y, int64_t threads) {
  const int64_t n = P.n, F = P.F;
  const Tables& t = tables(P.b);
  float* xr = scratch(8, n * F * P.q);
  float* xi = scratch(9, n * F * P.q);
  forward_dft(P, t, xr, xi);
  if (threads <= 0) threads = at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min(threads, F)), size = n * P.out;
  float* __restrict__ dst = y.data_ptr<float>();
  if (parts == 1) {
    frequency_range<S>(P, t, xr, xi, 0, F, dst);
    return;
  }
  float* partial = scratch(10, (parts - 1) * size);  // part k > 0 writes partial + (k - 1) * size
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      frequency_range<S>(P, t, xr, xi, k * F / parts, (k + 1) * F / parts, k ? partial + (k - 1) * size : dst);
    }
  });
  for (int64_t k = 1; k < parts; ++k) {
    const float* __restrict__ src = partial + (k - 1) * size;
    for (int64_t e = 0; e < size; ++e) dst[e] += src[e];
  }
}

// The checks both entry points share: x, the spectra's shape (2, F, q, p) against the sizes.
void check_shapes(const torch::Tensor& x, const torch::Tensor& spec, int64_t out_features, int64_t in_features,
                  int64_t block_size) {
  TORCH_CHECK(x.device().is_cpu() && spec.device().is_cpu(), "circulant_decode: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "circulant_decode: x must be (n, in) float32");
  TORCH_CHECK(spec.dim() == 4 && spec.size(0) == 2 && spec.is_contiguous(),
              "circulant_decode: spectra must be contiguous planar (2, F, q, p)");
  const int64_t b = block_size, F = spec.size(1), q = spec.size(2), p = spec.size(3);
  TORCH_CHECK(b >= 1 && F == stored_frequencies(b), "circulant_decode: spectra have ", F,
              " frequencies, block size ", b, " needs ", stored_frequencies(b));
  TORCH_CHECK(x.size(1) == in_features && q == (in_features + b - 1) / b,
              "circulant_decode: x has ", x.size(1), " columns, in_features ", in_features, ", ", q, " input blocks");
  TORCH_CHECK(out_features >= 1 && out_features <= p * b, "circulant_decode: out_features ", out_features,
              " does not fit ", p, " output blocks of ", b);
}

}  // namespace

// y = x @ W.T for the block-circulant W whose spectra are `spec` (float32); `threads` > 1 splits the
// frequencies over that many tasks on torch's intra-op thread pool, 0 over all of its threads.
torch::Tensor circulant_decode(const torch::Tensor& x, const torch::Tensor& spec, int64_t out_features,
                               int64_t in_features, int64_t block_size, int64_t threads) {
  check_shapes(x, spec, out_features, in_features, block_size);
  TORCH_CHECK(spec.scalar_type() == torch::kFloat32, "circulant_decode: spectra must be float32");
  const torch::Tensor xc = x.contiguous();
  torch::Tensor y = torch::empty({xc.size(0), out_features}, xc.options());
  if (xc.size(0) == 0) return y;
  product<float>({xc.data_ptr<float>(), spec.data_ptr<float>(), nullptr, nullptr, xc.size(0), in_features,
                  out_features, block_size, spec.size(1), spec.size(2), spec.size(3)}, y, threads);
  return y;
}

// The same product with int8 `codes` (2, F, q, p) and float32 `scales` (F, p): spectra = codes * scales.
torch::Tensor circulant_decode_int8(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                                    int64_t out_features, int64_t in_features, int64_t block_size, int64_t threads) {
  check_shapes(x, codes, out_features, in_features, block_size);
  TORCH_CHECK(codes.scalar_type() == torch::kInt8, "circulant_decode: codes must be int8");
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() &&
              scales.dim() == 2 && scales.size(0) == codes.size(1) && scales.size(1) == codes.size(3),
              "circulant_decode: scales must be contiguous float32 (F, p) = (", codes.size(1), ", ", codes.size(3), ")");
  const torch::Tensor xc = x.contiguous();
  torch::Tensor y = torch::empty({xc.size(0), out_features}, xc.options());
  if (xc.size(0) == 0) return y;
  product<int8_t>({xc.data_ptr<float>(), nullptr, codes.data_ptr<int8_t>(), scales.data_ptr<float>(), xc.size(0),
                   in_features, out_features, block_size, codes.size(1), codes.size(2), codes.size(3)}, y, threads);
  return y;
}

// The same function as the torch operator bcllm::circulant_decode, for graphs that torch.compile
// captures: registered here, the compiled graph calls it through the dispatcher alone (~2 us),
// where an operator defined in Python went back through Python on every call (~20 us).
TORCH_LIBRARY(bcllm, m) {
  m.def("circulant_decode(Tensor x, Tensor spec, int out_features, int in_features, int block_size, "
        "int threads) -> Tensor");
  m.def("circulant_decode_int8(Tensor x, Tensor codes, Tensor scales, int out_features, int in_features, "
        "int block_size, int threads) -> Tensor");
}
TORCH_LIBRARY_IMPL(bcllm, CPU, m) {
  m.impl("circulant_decode", &circulant_decode);
  m.impl("circulant_decode_int8", &circulant_decode_int8);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("circulant_decode", &circulant_decode, "fused block-circulant product for few rows (CPU, float32)");
  m.def("circulant_decode_int8", &circulant_decode_int8, "the same product with int8 spectra and float32 scales");
}
